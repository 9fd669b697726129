"""Stopping and logging as the service manager sees them (issue "Debian package and systemd
service", items 4 and 5): SIGTERM closes charge points with 1001, commits the buffer and
exits 0; under journald every line carries a ``<N>`` priority and no timestamp."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

from conftest import ROOT, Backend, Broker, free_port, wait_for_port
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

SLOW_RETRY = "mqtt.reconnect_delay_min = 30s\nmqtt.reconnect_delay_max = 30s\n"


def test_sigterm_closes_with_1001_commits_and_exits_0(make_gateway, tmp_path):
    broker = Broker(tmp_path)  # not started: every message waits in the buffer
    gw = make_gateway(broker.port, SLOW_RETRY + "buffer.fsync_interval = 10s\n")
    with ws_connect(f"{gw.url}/T1", subprotocols=["ocpp1.6"], open_timeout=5) as ws:
        for i in range(50):
            ws.send(json.dumps([2, f"h{i}", "Heartbeat", {}]))
        # Frames are handled in order: once the answer to a broken frame is back, all 50
        # before it are in the buffer (the local answers to the Heartbeats come first).
        ws.send("not json")
        answers = [json.loads(ws.recv(timeout=10)) for _ in range(51)]
        assert [a[0] for a in answers] == [3] * 50 + [4]
        started = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        try:
            ws.recv(timeout=10)
            raise AssertionError("the gateway sent a frame instead of closing")
        except ConnectionClosed as closed:
            assert closed.rcvd is not None and closed.rcvd.code == 1001, closed
    assert gw.proc.wait(timeout=10) == 0
    assert time.monotonic() - started < 5  # TimeoutStopSec= is 30 s; this stays far below
    assert "stopped" in gw.log_text()

    # Nothing waited for the 10 s group commit: all 50 are on disk, delivered on restart.
    broker.start()
    backend = Backend(broker.port)
    try:
        gw.start()
        got = [backend.expect("ocpp/cp/T1", 20)[1]["UniqueId"] for _ in range(50)]
        assert got == [f"h{i}" for i in range(50)]
    finally:
        backend.close()
        gw.stop()
        broker.stop()


def run_and_stop(tmp_path, journal: bool) -> str:
    port = free_port()
    conf = tmp_path / "gw.conf"
    conf.write_text(f"ocpp.listener.ws = 127.0.0.1:{port}\n"
                    f"mqtt.server = mqtt://127.0.0.1:{free_port()}\n"
                    f"buffer.dir = {tmp_path / 'buffer'}\n"
                    # a file that does not exist yet: a warning at start-up
                    f"auth.password_file = {tmp_path / 'passwords'}\n"
                    "admin.listen = off\n"
                    "log.level = info\n")
    err_path = tmp_path / ("journal.txt" if journal else "stderr.txt")
    with open(err_path, "wb") as err:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        env.pop("JOURNAL_STREAM", None)
        if journal:  # what systemd sets when stderr is connected to journald
            st = os.fstat(err.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        proc = subprocess.Popen([sys.executable, "-m", "ocpp_edge", "--config", str(conf)],
                                stdout=err, stderr=err, env=env)
    try:
        wait_for_port(port, proc=proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    return err_path.read_text()


def test_journal_lines_carry_priorities_and_no_timestamps(tmp_path):
    lines = run_and_stop(tmp_path, journal=True).splitlines()
    assert lines and all(re.match(r"<[0-7]>", line) for line in lines), lines
    assert not any(re.search(r"\d\d:\d\d:\d\d", line) for line in lines), lines
    # syslog priorities: warning 4, info 6
    assert any(line.startswith("<4>") and "passwords does not exist" in line for line in lines)
    assert any(line.startswith("<6>") and "listening for charge points" in line
               for line in lines)


def test_plain_stderr_gets_timestamps_and_level_names(tmp_path):
    lines = run_and_stop(tmp_path, journal=False).splitlines()
    assert lines and not any(line.startswith("<") for line in lines)
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "
    assert any(re.match(stamp + r"WARNING .*passwords does not exist", line) for line in lines)
    assert any(re.match(stamp + r"INFO +.*listening for charge points", line) for line in lines)
