"""``ocpp-edge passwd`` and ``ocpp-edge cert`` as operators run them: a real process, its
exit code, its output, and the files it leaves."""

from __future__ import annotations

import os
import pty
import re
import select
import stat
import subprocess
import sys
import time

from conftest import ROOT

from ocpp_edge.daemon import cli
from ocpp_edge.south.credentials import PasswordFile, hash_password, verify
from ocpp_edge.tools import cert as certtool


def run(*args, stdin: bytes = b"", timeout=30):
    return subprocess.run([sys.executable, "-m", "ocpp_edge", *args], input=stdin,
                          capture_output=True, timeout=timeout, cwd=ROOT)


def entry(path, cid):
    """The hash stored for ``cid`` (and the file parses)."""
    PasswordFile.load(path)
    for line in path.read_text().splitlines():
        if line.rpartition(":")[0] == cid:
            return line.rpartition(":")[2]
    raise AssertionError(f"no entry for {cid!r} in {path}")


# --- passwd ---------------------------------------------------------------------------

def test_generate_prints_the_stored_hex_key(tmp_path):
    f = tmp_path / "passwords"
    r = run("passwd", "CP-1", "--file", str(f), "--generate")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert re.fullmatch(r"[0-9a-f]{40}\n", out), out
    hexkey = out.strip()
    # The 40 digits are the password (AuthorizationKey, BasicAuthPassword) and are stored;
    # the raw 20 bytes are never all ASCII, so the gateway can tell them from text.
    assert verify(entry(f, "CP-1"), hexkey.encode())
    raw = bytes.fromhex(hexkey)
    assert len(raw) == 20 and not raw.isascii()
    assert not verify(entry(f, "CP-1"), raw)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o640
    assert f"added 'CP-1' to {f}" in r.stderr.decode()
    again = run("passwd", "CP-1", "--file", str(f), "--generate")
    assert again.stdout != r.stdout  # random
    assert not verify(entry(f, "CP-1"), hexkey.encode())  # replaced
    assert b"changed the key of 'CP-1'" in again.stderr


def test_generated_keys_are_never_ascii_when_decoded(monkeypatch):
    from ocpp_edge.tools import commands as tools

    draws = iter([b"A" * 20, b"\x7f" * 20, b"A" * 19 + b"\x80"])
    monkeypatch.setattr(tools.secrets, "token_bytes", lambda n: next(draws))
    assert tools._generate() == (b"A" * 19 + b"\x80").hex().encode()


def test_stdin_key_is_stored_exactly_minus_one_newline(tmp_path):
    f = tmp_path / "passwords"
    assert run("passwd", "CP-1", "--file", str(f), stdin=b"0123456789abcdef\n").returncode == 0
    assert run("passwd", "CP-2", "--file", str(f), stdin=b" spaced key 16b \r\n").returncode == 0
    assert run("passwd", "CP-3", "--file", str(f), stdin=b"two newlines....\n\n").returncode == 0
    binary = bytes.fromhex("00ff3a0a80c3287f") * 2 + b"\xfe"
    assert run("passwd", "CP-4", "--file", str(f), stdin=binary).returncode == 0
    pf = PasswordFile.load(f)
    assert pf.check("CP-1", b"0123456789abcdef") and not pf.check("CP-1", b"0123456789abcdef\n")
    assert pf.check("CP-2", b" spaced key 16b ")
    assert pf.check("CP-3", b"two newlines....\n")
    assert pf.check("CP-4", binary)
    assert not pf.check("CP-1", b"wrong")
    assert len(pf) == 4


def test_ids_with_colons_are_entries_too(tmp_path):
    # The file splits on the last colon; the gateway matches "<cid>:" as a prefix.
    f = tmp_path / "passwords"
    r = run("passwd", "site:CP:1", "--file", str(f), stdin=b"pass:with:colons")
    assert r.returncode == 0, r.stderr
    pf = PasswordFile.load(f)
    assert pf.ids() == ["site:CP:1"] and pf.check("site:CP:1", b"pass:with:colons")


def test_short_key_warns_empty_key_fails(tmp_path):
    f = tmp_path / "passwords"
    r = run("passwd", "CP-1", "--file", str(f), stdin=b"short\n")
    assert r.returncode == 0 and b"warning: the key is 5 bytes" in r.stderr
    r = run("passwd", "CP-2", "--file", str(f), stdin=b"\n")
    assert r.returncode == 1 and b"no key given" in r.stderr
    assert PasswordFile.load(f).ids() == ["CP-1"]


def test_change_and_delete(tmp_path):
    f = tmp_path / "passwords"
    f.write_text("# site A\n")
    run("passwd", "CP-1", "--file", str(f), stdin=b"first key 16 byt")
    r = run("passwd", "CP-1", "--file", str(f), stdin=b"second key 16 by")
    assert r.returncode == 0 and b"changed the key of 'CP-1'" in r.stderr
    assert not PasswordFile.load(f).check("CP-1", b"first key 16 byt")
    assert PasswordFile.load(f).check("CP-1", b"second key 16 by")
    r = run("passwd", "CP-1", "--file", str(f), "--delete")
    assert r.returncode == 0 and f.read_text() == "# site A\n"
    r = run("passwd", "CP-1", "--file", str(f), "--delete")
    assert r.returncode == 1
    assert r.stderr.decode() == f"ocpp-edge passwd: {f}: no entry for 'CP-1'\n"


def test_password_file_from_the_configuration(tmp_path):
    f = tmp_path / "from-config"
    conf = tmp_path / "ocpp-edge.conf"
    conf.write_text(f"mqtt.qos = 1\nauth.password_file = {f}\n")
    r = run("passwd", "CP-1", "--config", str(conf), stdin=b"key from config!")
    assert r.returncode == 0, r.stderr
    assert PasswordFile.load(f).check("CP-1", b"key from config!")
    conf.write_text("auth.password_file =\n")
    r = run("passwd", "CP-1", "--config", str(conf), stdin=b"x")
    assert r.returncode == 1 and b"auth.password_file" in r.stderr
    r = run("passwd", "CP-1", "--config", str(tmp_path / "missing.conf"), stdin=b"x")
    assert r.returncode == 1 and b"missing.conf" in r.stderr


def test_malformed_file_is_named_and_left_alone(tmp_path):
    f = tmp_path / "passwords"
    content = f"# ok\nCP-1:{hash_password(b'x')}\nCP-2:cleartext\n"
    f.write_text(content)
    r = run("passwd", "CP-3", "--file", str(f), stdin=b"0123456789abcdef")
    assert r.returncode == 1
    assert r.stderr.decode().startswith(f"ocpp-edge passwd: {f}:3: the hash is not in the "
                                        "form scrypt$")
    assert len(r.stderr.decode().splitlines()) == 1
    assert f.read_text() == content


def test_bad_ids_are_refused(tmp_path):
    f = tmp_path / "passwords"
    for cid, why in [("a/b", "'/', '+', '#'"), ("x" * 49, "longer than 48"),
                     ("a+b", "'+'"), ("a\x01", "control character")]:
        r = run("passwd", cid, "--file", str(f), "--generate")
        assert r.returncode == 1 and why in r.stderr.decode(), (cid, r.stderr)
    assert not f.exists()


def test_usage_errors_exit_2():
    for args in (["passwd"], ["passwd", "CP", "--generate", "--delete"],
                 ["passwd", "CP", "--bogus"], ["passwd", "CP1", "CP2"], ["cert"],
                 ["cert", "renew"], ["cert", "init", "--days", "x"]):
        r = run(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert b"usage: ocpp-edge" in r.stderr


def test_help_says_what_the_charge_point_needs():
    r = run("passwd", "--help")
    assert r.returncode == 0
    assert b"AuthorizationKey" in r.stdout and b"BasicAuthPassword" in r.stdout
    assert b"40 hexadecimal digits" in r.stdout


def test_key_from_a_terminal_is_not_echoed(tmp_path):
    f = tmp_path / "passwords"
    pid, fd = pty.fork()
    if pid == 0:  # the child: its terminal is the pty
        os.execv(sys.executable, [sys.executable, "-m", "ocpp_edge", "passwd", "CP-1",
                                  "--file", str(f)])
    output = b""

    def read_until(marker: bytes) -> None:
        nonlocal output
        deadline = time.monotonic() + 20
        while marker not in output and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    output += os.read(fd, 1024)
                except OSError:  # the child has gone
                    return

    try:
        read_until(b"Key for CP-1: ")
        os.write(fd, b"typed secret key\n")
        read_until(b"Again: ")
        os.write(fd, b"typed secret key\n")
        read_until(b"added 'CP-1'")
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, output
    assert b"typed secret" not in output
    assert PasswordFile.load(f).check("CP-1", b"typed secret key")


# --- cert -----------------------------------------------------------------------------

def test_cert_init_and_issue(tmp_path):
    tls = tmp_path / "tls"
    r = run("cert", "init", "--dir", str(tls), "--host", "gw.site", "--ip", "192.0.2.7",
            "--days", "100")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().split() == [str(tls / n) for n in ("ca.pem", "ca.key",
                                                                 "server.pem", "server.key")]
    assert b"gw.site" in r.stderr and b"192.0.2.7" in r.stderr
    server = certtool.load_certificates(tls / "server.pem")[0]
    san = server.extensions.get_extension_for_class(certtool.x509.SubjectAlternativeName)
    assert "gw.site" in san.value.get_values_for_type(certtool.x509.DNSName)
    r = run("cert", "init", "--dir", str(tls))
    assert r.returncode == 1 and b"already exist" in r.stderr and b"--force" in r.stderr
    r = run("cert", "init", "--dir", str(tls), "--keep-ca", "--force", "--rsa")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().split() == [str(tls / "server.pem"), str(tls / "server.key")]

    out = tmp_path / "chargers"
    r = run("cert", "issue", "CP-0042", "--dir", str(tls), "--out-dir", str(out), "--rsa")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().split() == [str(out / "CP-0042.pem"), str(out / "CP-0042.key")]
    cert = certtool.load_certificates(out / "CP-0042.pem")[0]
    assert certtool.common_name(cert) == "CP-0042"
    assert cert.public_key().key_size == 2048
    r = run("cert", "issue", "CP-0042", "--dir", str(tls), "--out-dir", str(out))
    assert r.returncode == 1 and b"--force" in r.stderr


def test_cert_failures_exit_1(tmp_path):
    r = run("cert", "issue", "CP-1", "--dir", str(tmp_path / "none"), "--out-dir",
            str(tmp_path))
    assert r.returncode == 1
    assert r.stderr.decode() == (f"ocpp-edge cert issue: no site CA in {tmp_path / 'none'} "
                                 "(ca.pem and ca.key): run 'ocpp-edge cert init' first\n")
    r = run("cert", "init", "--dir", str(tmp_path / "tls"), "--days", "0")
    assert r.returncode == 1 and b"at least 1 day" in r.stderr
    r = run("cert", "init", "--dir", str(tmp_path / "tls2"), "--ip", "not-an-ip")
    assert r.returncode == 1 and b"'not-an-ip' is not an IP address" in r.stderr


def test_the_gateway_command_line_dispatches(tmp_path, capsys):
    # In-process, through the console script's entry point.
    assert cli.main(["cert", "init", "--dir", str(tmp_path / "tls"), "--host", "x"]) == 0
    assert (tmp_path / "tls" / "ca.pem").exists()
    assert cli.main(["passwd", "CP-1", "--file", str(tmp_path / "pw"), "--generate"]) == 0
    assert PasswordFile.load(tmp_path / "pw").known("CP-1")
    capsys.readouterr()
    r = run("--version")  # the gateway's own options still work
    assert r.returncode == 0 and r.stdout.startswith(b"ocpp-edge "), r.stderr
