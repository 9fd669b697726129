"""``ocpp-edge ctl`` as a user runs it: ``python -m ocpp_edge ctl ...`` in its own process
against a real admin endpoint (a Tornado server on a loopback port, in a thread of the
test process, with a small fake view behind it). Checked: the human output, ``--json``,
the exit codes, finding the endpoint and the token in the configuration file, and the
message when nothing is listening.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, free_port

from ocpp_edge.ops.admin import AdminSocket, rfc3339, start_admin_server
from ocpp_edge.ops.ctl import fmt_bytes, fmt_duration, url_from_listen

TOKEN = "ctl-test-token-0123456789abcdef"
ODD_CID = "CP:01 %/x"


class FakeView:
    def __init__(self) -> None:
        now = time.time()
        self.connected = {
            "CP-1": {"clientid": "CP-1", "username": "CP-1", "protocol": "ocpp1.6",
                     "listener": "ocpp.listener.ws", "ip_address": "192.0.2.7", "port": 50312,
                     "connected_at": rfc3339(now - (3 * 3600 + 12 * 60 + 5)),
                     "last_message_at": rfc3339(now - 4), "messages_in": 1234,
                     "messages_out": 1200, "pending_upstream": 1, "pending_dnstream": 1,
                     "queue_len": 0},
            "wallbox-garage-long-name": {
                "clientid": "wallbox-garage-long-name", "username": None,
                "protocol": "ocpp2.0.1", "listener": "ocpp.listener.wss",
                "ip_address": "2001:db8::5", "port": 443,
                "connected_at": rfc3339(now - 42), "last_message_at": None,
                "messages_in": 3, "messages_out": 2, "pending_upstream": 0,
                "pending_dnstream": 0, "queue_len": 17},
            ODD_CID: {"clientid": ODD_CID, "protocol": "ocpp1.6"},
        }
        self.kicked: list[str] = []
        self.started = now - 2 * 86400 - 3 * 3600

    def status(self) -> dict:
        return {
            "version": "0.1.0", "started_at": rfc3339(self.started),
            "uptime_seconds": time.time() - self.started,
            "config": {"file": "/etc/ocpp-edge.conf", "loaded_at": rfc3339(self.started)},
            "upstream": {"state": "connected", "server": "mqtt://127.0.0.1:1883",
                         "since": rfc3339(time.time() - 300), "reconnects": 2,
                         "replay_rate": 0.0},
            "charge_points": {"connected": len(self.connected)},
            "buffer": {"messages": 1234, "bytes": 1536 * 1024, "oldest_age_seconds": 303.0,
                       "dropped": 0, "max_messages": 100000, "max_bytes": 256 * 1024 * 1024},
            "listeners": [{"name": "ocpp.listener.ws", "url": "ws://0.0.0.0:33033/ocpp",
                           "connections": 2}],
        }

    def clients(self) -> list[dict]:
        return list(self.connected.values())

    def client(self, cid: str) -> dict | None:
        return self.connected.get(cid)

    def kick(self, cid: str) -> bool:
        if self.connected.pop(cid, None) is None:
            return False
        self.kicked.append(cid)
        return True

    def metrics_text(self) -> str:
        return ""

    def healthy(self) -> tuple[bool, str]:
        return True, "ok"


class AdminThread:
    """The admin server on its own event loop in a thread, as the gateway would run it;
    with ``sock``, also the admin socket there."""

    def __init__(self, view: FakeView, token: str | None, sock: Path | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []
        self.sock = str(sock) if sock else None
        self.unix: AdminSocket | None = None

        async def start() -> None:
            self.server, self.port = start_admin_server(view, "127.0.0.1", 0, token,
                                                        self.sock)
            if self.sock:
                self.unix = AdminSocket(view, self.sock)

        def main() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(start())
            except BaseException as exc:  # handed to the test thread
                failure.append(exc)
                ready.set()
                return
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=main, daemon=True)
        self.thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        async def shutdown() -> None:
            self.server.stop()
            if self.unix is not None:
                self.unix.close()
            await self.server.close_all_connections()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def view():
    return FakeView()


@pytest.fixture
def admin(view, tmp_path):
    server = AdminThread(view, None, tmp_path / "admin.sock")
    yield server
    server.stop()


@pytest.fixture
def admin_with_token(view):
    server = AdminThread(view, TOKEN)
    yield server
    server.stop()


def ctl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, http_proxy="http://192.0.2.1:9", HTTP_PROXY="http://192.0.2.1:9")
    return subprocess.run([sys.executable, "-m", "ocpp_edge", "ctl", *args],
                          capture_output=True, text=True, timeout=30, cwd=cwd or ROOT,
                          env=env)  # a proxy in the environment must not be used


def no_config(tmp_path: Path) -> str:
    return str(tmp_path / "absent.conf")


# -- commands -----------------------------------------------------------------------------


def test_status_human(admin):
    r = ctl("--url", admin.url, "status")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert re.search(r"^version\s+ocpp-edge 0\.1\.0$", out, re.M)
    assert re.search(r"^uptime\s+2d03h \(since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \w+\)$",
                     out, re.M)
    assert re.search(r"^config\s+/etc/ocpp-edge\.conf, loaded 2d03h ago$", out, re.M)
    assert re.search(r"^upstream\s+connected to mqtt://127\.0\.0\.1:1883 for (4m59s|5m0\ds), "
                     r"2 reconnects$", out, re.M)
    assert re.search(r"^charge points\s+3 connected$", out, re.M)
    assert re.search(r"^buffer\s+1234 messages, 1\.5 MB, oldest 5m03s, 0 dropped "
                     r"\(limits 100000 messages, 256\.0 MB\)$", out, re.M)
    # the values start in one column
    starts = {line.index(v) for line, v in ((ln, ln.split(None, 1)[1] if not ln.startswith(
        "charge points") else ln.split(None, 2)[2]) for ln in out.splitlines())}
    assert len(starts) == 1
    assert r.stderr == ""


def test_status_json_is_the_endpoints_json(admin, view):
    r = ctl("--url", admin.url, "--json", "status")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    want = view.status()
    assert got.keys() == want.keys()
    assert got["buffer"] == want["buffer"] and got["listeners"] == want["listeners"]


def test_clients_table(admin):
    r = ctl("--url", admin.url, "clients")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    header = lines[0].split()
    assert header[:4] == ["ID", "PROTOCOL", "ADDRESS", "CONNECTED"]
    assert lines[-1] == "3 charge points connected"
    rows = {ln.split()[0]: ln for ln in lines[1:-1]}
    assert "CP-1" in rows and "wallbox-garage-long-name" in rows
    cp1 = rows["CP-1"].split()
    assert cp1[:4] == ["CP-1", "ocpp1.6", "192.0.2.7:50312", "3h12m"]
    assert re.fullmatch(r"[4-9]s", cp1[4]) and cp1[5] == "ago"
    assert cp1[6:] == ["1234", "1200", "2", "0"]
    wb = rows["wallbox-garage-long-name"].split()
    assert wb[:5] == ["wallbox-garage-long-name", "ocpp2.0.1", "[2001:db8::5]:443", "42s", "-"]
    assert wb[-1] == "17"
    # aligned: every column starts where its header does
    for name in ("PROTOCOL", "ADDRESS", "CONNECTED"):
        col = lines[0].index(name)
        for ln in lines[1:-1]:
            assert ln[col - 2:col] == "  " and ln[col] != " ", (name, ln)
    # numbers are right-aligned under their header
    end = lines[0].index("QUEUE") + len("QUEUE")
    assert all(ln[:end].endswith(("0", "17", "-")) for ln in lines[1:-1])


def test_clients_json_and_none_connected(admin, view):
    r = ctl("--url", admin.url, "clients", "--json")  # options after the command too
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["meta"] == {"count": 3}
    assert [c["clientid"] for c in got["data"]] == list(view.connected)
    view.connected.clear()
    r = ctl("--url", admin.url, "clients")
    assert (r.returncode, r.stdout) == (0, "no charge points connected\n")


def test_one_client(admin, view):
    r = ctl("--url", admin.url, "client", "CP-1")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^address\s+192\.0\.2\.7:50312$", r.stdout, re.M)
    assert re.search(r"^connected\s+3h12m ago \(", r.stdout, re.M)
    assert re.search(r"^messages\s+1234 in, 1200 out$", r.stdout, re.M)
    assert re.search(r"^pending calls\s+1 from the charge point", r.stdout, re.M)
    r = ctl("--url", admin.url, "--json", "client", ODD_CID)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == view.connected[ODD_CID]


def test_unknown_client_exit_3(admin):
    for args in (("--url", admin.url, "client"), ("--socket", admin.sock, "kick")):
        r = ctl(*args, "CP-404")
        assert r.returncode == 3, r.stderr
        assert r.stderr == "ocpp-edge ctl: no charge point 'CP-404' is connected\n"
        assert r.stdout == ""


def test_kick(admin, view):
    r = ctl("--socket", admin.sock, "kick", ODD_CID)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"kicked {ODD_CID}: its connection was closed (1000)\n"
    assert view.kicked == [ODD_CID]
    r = ctl("--socket", admin.sock, "--json", "kick", "CP-1")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"clientid": "CP-1", "kicked": True}
    assert view.kicked == [ODD_CID, "CP-1"]


def test_kick_over_tcp_needs_the_socket_or_the_token(admin, view):
    """Issue 16: any local user could kick through the tokenless loopback endpoint."""
    r = ctl("--url", admin.url, "kick", "CP-1")
    assert r.returncode == 1
    assert "HTTP 403" in r.stderr and f"admin socket {admin.sock}" in r.stderr, r.stderr
    assert view.kicked == []
    r = ctl("--url", admin.url, "status")  # reading stays open
    assert r.returncode == 0, r.stderr


def test_socket_from_the_config_file_is_preferred(admin, view, tmp_path):
    conf = tmp_path / "ocpp-edge.conf"
    conf.write_text(f"admin.listen = 127.0.0.1:{free_port()}\nadmin.socket = {admin.sock}\n")
    r = ctl("--config", str(conf), "kick", "CP-1")  # nothing listens on that TCP port
    assert r.returncode == 0, r.stderr
    assert view.kicked == ["CP-1"]
    r = ctl("--config", str(conf), "--json", "status")
    assert r.returncode == 0 and json.loads(r.stdout)["version"] == "0.1.0"
    # an explicit --url means TCP, even with a usable socket in the configuration
    r = ctl("--config", str(conf), "--url", admin.url, "kick", ODD_CID)
    assert r.returncode == 1 and "HTTP 403" in r.stderr
    r = ctl("--socket", str(tmp_path / "absent.sock"), "status")
    assert r.returncode == 1
    assert "cannot use the admin socket" in r.stderr and "does not exist" in r.stderr


# -- token and configuration --------------------------------------------------------------


def test_token_from_option_and_refusals(admin_with_token, view, tmp_path):
    url = admin_with_token.url
    r = ctl("--url", url, "--config", no_config(tmp_path), "status")
    assert r.returncode == 1
    assert "requires the admin token (HTTP 401)" in r.stderr
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token-at-all\n")
    r = ctl("--url", url, "--token-file", str(wrong), "kick", "CP-1")
    assert r.returncode == 1
    assert "refused the token" in r.stderr
    assert view.kicked == []
    right = tmp_path / "right"
    right.write_text(TOKEN + "\n")
    r = ctl("--url", url, "--token-file", str(right), "kick", "CP-1")
    assert r.returncode == 0, r.stderr
    assert view.kicked == ["CP-1"]
    r = ctl("--url", url, "--token-file", str(tmp_path / "missing"), "status")
    assert r.returncode == 1
    assert "cannot read the token file" in r.stderr


def test_endpoint_and_token_from_the_config_file(admin_with_token, tmp_path):
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN)
    conf = tmp_path / "ocpp-edge.conf"
    conf.write_text(f"# site controller\nadmin.listen = 127.0.0.1:{admin_with_token.port}\n"
                    f"admin.token_file = {token_file}\nmqtt.server = mqtt://127.0.0.1:1883\n")
    r = ctl("--config", str(conf), "clients")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "3 charge points connected"
    conf.write_text(f"admin.listen = {admin_with_token.port}\nadmin.token_file = {token_file}\n")
    r = ctl("-c", str(conf), "status")
    assert r.returncode == 0, r.stderr


def test_admin_disabled_in_the_config(tmp_path):
    conf = tmp_path / "ocpp-edge.conf"
    conf.write_text("admin.listen = off\n")
    r = ctl("--config", str(conf), "status")
    assert r.returncode == 1
    assert "disabled" in r.stderr and "admin.listen = off" in r.stderr


def test_unreachable_gateway(tmp_path):
    port = free_port()
    r = ctl("--url", f"http://127.0.0.1:{port}", "status")
    assert r.returncode == 1
    assert r.stderr == (f"ocpp-edge ctl: cannot reach the gateway at http://127.0.0.1:{port}: "
                        "connection refused — is ocpp-edge running and admin.listen "
                        "enabled?\n")
    assert r.stdout == ""
    conf = tmp_path / "ocpp-edge.conf"
    conf.write_text(f"admin.listen = 0.0.0.0:{port}\n")  # a wildcard is reached on loopback
    r = ctl("--config", str(conf), "--json", "clients")
    assert r.returncode == 1
    assert f"http://127.0.0.1:{port}: connection refused" in r.stderr


def test_usage_errors_exit_2():
    for args in ((), ("kick",), ("client",), ("frobnicate",), ("status", "extra"),
                 ("--url", "ftp://x", "status"), ("--timeout", "0", "status")):
        r = ctl(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr
    r = ctl("--help")
    assert r.returncode == 0 and "status" in r.stdout and "kick" in r.stdout


# -- formatting ---------------------------------------------------------------------------


def test_durations_and_sizes():
    assert [fmt_duration(s) for s in (0, 42, 60, 303, 3600, 11525, 86399, 183600, -5)] == [
        "0s", "42s", "1m00s", "5m03s", "1h00m", "3h12m", "23h59m", "2d03h", "0s"]
    assert fmt_duration(None) == "-"
    assert [fmt_bytes(n) for n in (0, 1023, 1024, 1536, 256 * 1024 * 1024, 5 * 1024 ** 4)] == [
        "0 B", "1023 B", "1.0 KB", "1.5 KB", "256.0 MB", "5120.0 GB"]


def test_url_from_listen():
    assert url_from_listen("127.0.0.1:33080") == "http://127.0.0.1:33080"
    assert url_from_listen("33080") == "http://127.0.0.1:33080"
    assert url_from_listen("0.0.0.0:8080") == "http://127.0.0.1:8080"
    assert url_from_listen("[::1]:33080") == "http://[::1]:33080"
    assert url_from_listen("[::]:33080") == "http://[::1]:33080"
    assert url_from_listen("192.168.1.10:33080") == "http://192.168.1.10:33080"
    assert url_from_listen("off") is None


def test_status_shows_the_publish_rate_only_while_connected():
    from ocpp_edge.ops.ctl import render_status

    def upstream_line(state: str, rate: float) -> str:
        text = render_status({"upstream": {"state": state, "server": "mqtt://b:1883",
                                           "replay_rate": rate}}, time.time())
        return next(line for line in text.splitlines() if line.startswith("upstream"))

    assert upstream_line("connected", 2.46).endswith("publishing 2.5 msg/s")
    assert upstream_line("connected", 180.4).endswith("publishing 180 msg/s")
    assert "publishing" not in upstream_line("connected", 0.01)
    assert "publishing" not in upstream_line("disconnected", 3.0)  # an old average


def test_status_shows_local_mode_when_the_policy_is_local():
    from ocpp_edge.ops.ctl import render_status

    now = 1_800_000_000.0
    on = render_status({"local_mode": {
        "active": True, "reason": "upstream link down", "since": "2027-01-15T07:59:00Z",
        "answers": 12, "answered_awaiting_backend": 12, "disagreements": 0,
        "transactions_open": 1, "held": False}}, now)
    line = next(x for x in on.splitlines() if x.startswith("local mode"))
    assert "ON (upstream link down)" in line
    assert "12 answered locally, 12 awaiting the backend, 0 overruled" in line
    assert "1 local transaction(s)" in line
    off = render_status({"local_mode": {"active": False, "answers": 12, "held": True}}, now)
    line = next(x for x in off.splitlines() if x.startswith("local mode"))
    assert line.split(None, 2)[2].startswith("off") and "held for its transaction id" in line
    assert "local mode" not in render_status({"local_mode": None}, now)
