"""The command line as operators and scripts use it (SPEC "Names the outside world relies on")."""

import socket
import subprocess
import sys

from conftest import ROOT


def run(*args, timeout=20):
    return subprocess.run([sys.executable, "-m", "ocpp_edge", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_check_config_accepts_the_shipped_files():
    for name in ("etc/ocpp-edge.conf", "etc/ocpp-edge.dev.conf"):
        r = run("--check-config", "--config", str(ROOT / name))
        assert r.returncode == 0, r.stderr
        assert "configuration OK" in r.stdout


def test_check_config_names_key_and_line(tmp_path):
    conf = tmp_path / "bad.conf"
    conf.write_text("# comment\nmqtt.qos = 1\nocpp.upstream.topic = cp/${nope}\n")
    r = run("--check-config", "--config", str(conf))
    assert r.returncode == 1
    assert f"{conf}:3, key 'ocpp.upstream.topic': unknown placeholder ${{nope}}" in r.stderr


def test_unknown_key_names_key_and_line(tmp_path):
    conf = tmp_path / "bad.conf"
    conf.write_text("mqtt.qos = 1\n\nmqtt.keepalve = 30s\n")
    r = run("--check-config", "--config", str(conf))
    assert r.returncode == 1
    assert f"{conf}:3, key 'mqtt.keepalve': unknown key" in r.stderr


def test_missing_file_is_exit_1():
    r = run("--check-config", "--config", "/nonexistent/ocpp-edge.conf")
    assert r.returncode == 1 and "/nonexistent/ocpp-edge.conf" in r.stderr


def test_port_in_use_is_a_clear_start_failure(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        conf = tmp_path / "c.conf"
        conf.write_text(f"ocpp.listener.ws = 127.0.0.1:{port}\n"
                        "mqtt.server = mqtt://127.0.0.1:1\n"
                        f"buffer.dir = {tmp_path / 'buffer'}\n")
        r = run("--config", str(conf))
    assert r.returncode == 1
    assert "cannot start" in r.stderr and "Address already in use" in r.stderr


def test_version():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("ocpp-edge ")
