"""The admin endpoint's HTTP layer: real requests to a real Tornado server on a loopback
port (and on its Unix socket). The gateway behind it is a small fake view here (this tests
routes, status codes, headers, authentication); the gateway's own tests drive it with
real charge points.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.parse

import pytest
import tornado.httpclient

from ocpp_edge.config import MIN_TOKEN_LENGTH, is_loopback, load_token
from ocpp_edge.errors import ConfigError
from ocpp_edge.ops import admin as admin_module
from ocpp_edge.ops.admin import AdminSocket, rfc3339, start_admin_server
from ocpp_edge.ops.metrics import GatewayMetrics

TOKEN = "s3cr3t-t0ken-for-the-admin-api"
ODD_CID = "CP:01 %/ünï"  # ':' '%' space, a '/' (encoded), non-ASCII


def client_info(cid: str) -> dict:
    now = time.time()
    return {"clientid": cid, "username": cid, "protocol": "ocpp1.6",
            "listener": "ocpp.listener.ws", "ip_address": "192.0.2.7", "port": 50312,
            "connected_at": rfc3339(now - 3600), "last_message_at": rfc3339(now - 4),
            "messages_in": 12, "messages_out": 11, "pending_upstream": 0,
            "pending_dnstream": 1, "queue_len": 2}


class FakeView:
    def __init__(self) -> None:
        self.connected = {cid: client_info(cid) for cid in ("CP-1", "CP-2", ODD_CID)}
        self.kicked: list[str] = []
        self.health = (True, "ok")
        self.metrics = GatewayMetrics("0.1.0", 1700000000.0)
        self.metrics.message("upstream", "CALL", "Heartbeat")
        self.fail = False

    def status(self) -> dict:
        if self.fail:
            raise RuntimeError("view broke")
        return {"version": "0.1.0", "uptime_seconds": 12.5,
                "charge_points": {"connected": len(self.connected)}}

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
        return self.metrics.render()

    def healthy(self) -> tuple[bool, str]:
        return self.health


def run(view: FakeView, token: str | None, scenario, as_socket: bool = False) -> None:
    """Start the admin server on a free loopback port, run ``scenario(fetch)``, stop.
    ``as_socket``: the application of the admin socket (as if the request came through
    it; the socket itself is tested below), served on that port for the HTTP client."""

    async def main() -> None:
        if as_socket:
            server = admin_module._server(admin_module.make_admin_app(
                view, None, "/run/test/admin.sock", via_socket=True))
            [sock] = admin_module.bind_sockets(0, address="127.0.0.1")
            server.add_sockets([sock])
            port = sock.getsockname()[1]
        else:
            server, port = start_admin_server(view, "127.0.0.1", 0, token,
                                              "/run/test/admin.sock")
        http = tornado.httpclient.AsyncHTTPClient(force_instance=True)

        async def fetch(path: str, method: str = "GET", auth: str | None = None,
                        headers: dict | None = None) -> tornado.httpclient.HTTPResponse:
            h = dict(headers or {})
            if auth is not None:
                h["Authorization"] = auth
            return await http.fetch(f"http://127.0.0.1:{port}{path}", method=method,
                                    headers=h, raise_error=False,
                                    allow_nonstandard_methods=True, follow_redirects=False)

        try:
            await scenario(fetch)
        finally:
            http.close()
            server.stop()
            await server.close_all_connections()

    asyncio.run(main())


def body(resp) -> object:
    assert resp.headers["Content-Type"] == "application/json"
    return json.loads(resp.body)


def quoted(cid: str) -> str:
    return "/api/v1/clients/" + urllib.parse.quote(cid, safe="")


# -- the endpoints ------------------------------------------------------------------------


def test_status_clients_and_one_client():
    view = FakeView()

    async def scenario(fetch):
        r = await fetch("/api/v1/status")
        assert r.code == 200
        assert body(r)["charge_points"] == {"connected": 3}
        assert r.headers["Cache-Control"] == "no-store"

        r = await fetch("/api/v1/clients")
        listing = body(r)
        assert r.code == 200
        assert listing["meta"] == {"count": 3}
        assert {c["clientid"] for c in listing["data"]} == {"CP-1", "CP-2", ODD_CID}

        r = await fetch("/api/v1/clients/CP-2")
        assert r.code == 200 and body(r) == view.connected["CP-2"]

        r = await fetch(quoted(ODD_CID))  # percent-decoded, '/' included
        assert r.code == 200 and body(r)["clientid"] == ODD_CID

    run(view, None, scenario)


def test_unknown_client_is_404_clientid_not_found():
    async def scenario(fetch):
        for method in ("GET", "DELETE"):
            r = await fetch("/api/v1/clients/CP-404", method=method)
            assert r.code == 404
            assert body(r) == {"code": "CLIENTID_NOT_FOUND", "message": "Client ID not found"}

    run(FakeView(), None, scenario, as_socket=True)


def test_kick_closes_the_right_client_and_answers_204():
    view = FakeView()

    async def scenario(fetch):
        r = await fetch(quoted(ODD_CID), method="DELETE")
        assert r.code == 204 and r.body == b""
        assert view.kicked == [ODD_CID]
        r = await fetch(quoted(ODD_CID), method="DELETE")  # gone now
        assert r.code == 404
        assert view.kicked == [ODD_CID]
        r = await fetch("/api/v1/clients")
        assert body(r)["meta"]["count"] == 2

    run(view, None, scenario, as_socket=True)


def test_metrics_are_text_0_0_4():
    view = FakeView()

    async def scenario(fetch):
        r = await fetch("/metrics")
        assert r.code == 200
        assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert ('ocpp_edge_messages_total{direction="upstream",type="CALL",'
                'action="Heartbeat"} 1\n') in r.body.decode()

    run(view, None, scenario)


def test_healthz_ok_and_unhealthy():
    view = FakeView()

    async def scenario(fetch):
        r = await fetch("/healthz")
        assert (r.code, r.body) == (200, b"ok\n")
        assert r.headers["Content-Type"].startswith("text/plain")
        view.health = (False, "no charge point listener is up")
        r = await fetch("/healthz")
        assert (r.code, r.body) == (503, b"no charge point listener is up\n")

    run(view, None, scenario)


def test_unknown_paths_404_and_wrong_methods_405():
    async def scenario(fetch):
        for path in ("/", "/api/v1", "/api/v1/nope", "/api/v1/clients/", "/api/v1/clients/a/b",
                     "/api/v4/clients", "/metrics/x"):
            r = await fetch(path)
            assert r.code == 404, path
            assert body(r)["code"] == "NOT_FOUND"
        r = await fetch("/api/v1/status", method="POST", headers={"Content-Length": "0"})
        assert r.code == 405
        assert r.headers["Allow"] == "GET"
        assert body(r)["code"] == "METHOD_NOT_ALLOWED"
        r = await fetch("/api/v1/clients/CP-1", method="PUT", headers={"Content-Length": "0"})
        assert (r.code, r.headers["Allow"]) == (405, "GET, DELETE")
        r = await fetch("/api/v1/clients", method="DELETE")  # no bulk kick
        assert r.code == 405
        r = await fetch("/metrics", method="HEAD")
        assert r.code == 405
        r = await fetch("/healthz", method="BREW")
        assert r.code == 405

    run(FakeView(), None, scenario)


def test_a_failing_view_is_a_500_json_error():
    view = FakeView()
    view.fail = True

    async def scenario(fetch):
        r = await fetch("/api/v1/status")
        assert r.code == 500
        assert body(r)["code"] == "INTERNAL_ERROR"
        assert "view broke" not in r.body.decode()  # details go to the log only

    run(view, None, scenario)


# -- access control -----------------------------------------------------------------------


def test_token_required_accepted_and_wrong():
    view = FakeView()

    async def scenario(fetch):
        for path, method in (("/api/v1/status", "GET"), ("/api/v1/clients", "GET"),
                             ("/api/v1/clients/CP-1", "GET"), ("/api/v1/clients/CP-1", "DELETE"),
                             ("/metrics", "GET"), ("/api/v1/nope", "GET")):
            r = await fetch(path, method=method)
            assert r.code == 401, path
            assert r.headers["WWW-Authenticate"] == 'Bearer realm="ocpp-edge"'
            assert body(r)["code"] == "UNAUTHORIZED"
            r = await fetch(path, method=method, auth="Bearer wrong-token-wrong-token")
            assert r.code == 401, path
            assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]
            r = await fetch(path, method=method, auth=f"Basic {TOKEN}")
            assert r.code == 401, path
            r = await fetch(path, method=method, auth=f"Bearer {TOKEN}x")
            assert r.code == 401, path
        assert view.kicked == []

        r = await fetch("/api/v1/status", auth=f"Bearer {TOKEN}")
        assert r.code == 200
        r = await fetch("/metrics", auth=f"bearer {TOKEN}")  # the scheme is case-insensitive
        assert r.code == 200
        r = await fetch("/api/v1/nope", auth=f"Bearer {TOKEN}")
        assert r.code == 404
        r = await fetch("/api/v1/clients/CP-1", method="DELETE", auth=f"Bearer {TOKEN}")
        assert r.code == 204 and view.kicked == ["CP-1"]
        # /healthz needs no secret, so that probes need none
        r = await fetch("/healthz")
        assert r.code == 200
        # with a token, a host name in Host is fine (the token is the protection)
        r = await fetch("/api/v1/status", auth=f"Bearer {TOKEN}",
                        headers={"Host": "site-controller.example"})
        assert r.code == 200

    run(view, TOKEN, scenario)


def test_without_a_token_host_names_are_refused():
    # A browser page reaching the loopback port by DNS rebinding sends its own host name.
    view = FakeView()

    async def scenario(fetch):
        r = await fetch("/api/v1/clients/CP-1", method="DELETE",
                        headers={"Host": "attacker.example:33080"})
        assert r.code == 403
        assert body(r)["code"] == "FORBIDDEN"
        assert view.kicked == []
        for host in ("localhost:33080", "127.0.0.1", "[::1]:33080", "LOCALHOST"):
            r = await fetch("/api/v1/status", headers={"Host": host})
            assert r.code == 200, host

    run(view, None, scenario)


def test_without_a_token_tcp_may_read_but_not_kick():
    """Issue 16: any local user (nobody) could kick through the tokenless loopback port.
    Reading stays open; a change names the socket (and the token) instead."""
    view = FakeView()

    async def scenario(fetch):
        r = await fetch("/api/v1/clients/CP-1", method="DELETE")
        assert r.code == 403
        assert body(r)["code"] == "FORBIDDEN"
        assert "/run/test/admin.sock" in body(r)["message"]
        assert "admin.token_file" in body(r)["message"]
        assert view.kicked == []
        for path in ("/api/v1/status", "/api/v1/clients", "/api/v1/clients/CP-1", "/metrics"):
            r = await fetch(path)
            assert r.code == 200, path
        r = await fetch("/api/v1/clients", method="DELETE")  # no such method: still 405
        assert r.code == 405

    run(view, None, scenario)


def test_the_admin_socket_is_0660_and_allows_kicks(tmp_path, caplog):
    view = FakeView()
    path = str(tmp_path / "admin.sock")
    (tmp_path / "admin.sock").write_text("a stale file, not a socket")
    with pytest.raises(ValueError):
        asyncio.run(_socket_and(view, path, None))  # never removes a file that is not one
    os.unlink(path)

    async def exchange(request: bytes) -> bytes:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(request)
        data = await reader.read()
        writer.close()
        return data

    async def scenario() -> None:
        assert oct(os.stat(path).st_mode & 0o777) == "0o660"
        # no token, no Host check: the file's mode is the authorization
        got = await exchange(b"DELETE /api/v1/clients/CP-1 HTTP/1.1\r\nHost: x\r\n"
                             b"Connection: close\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 204"), got
        got = await exchange(b"GET /api/v1/status HTTP/1.1\r\nHost: localhost\r\n"
                             b"Connection: close\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 200"), got

    with caplog.at_level("INFO", logger="ocpp_edge.admin"):
        asyncio.run(_socket_and(view, path, scenario))
    assert view.kicked == ["CP-1"]
    assert not os.path.exists(path)  # removed on close
    assert any(f"through {path} by uid {os.getuid()}" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


async def _socket_and(view, path, scenario) -> None:
    sock = AdminSocket(view, path)
    try:
        if scenario is not None:
            await scenario()
    finally:
        sock.close()


# -- helpers ------------------------------------------------------------------------------


def test_is_loopback():
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LocalHost"):
        assert is_loopback(host), host
    for host in ("", "0.0.0.0", "::", "192.168.1.10", "10.0.0.1", "example.com",
                 "::ffff:8.8.8.8", "localhost.example"):
        assert not is_loopback(host), host


def test_rfc3339():
    assert rfc3339(0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339(1714557600.1234) == "2024-05-01T10:00:00.123Z"
    assert rfc3339(None) is None


def write(path, text: str, mode: int = 0o600):
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def test_load_token(tmp_path):
    assert load_token(write(tmp_path / "t", f"  {TOKEN}\n")) == TOKEN
    assert load_token(write(tmp_path / "g", TOKEN, 0o640)) == TOKEN  # group may read


@pytest.mark.parametrize("text,mode,words", [
    ("", 0o600, "is empty"),
    ("  \n\t\n", 0o600, "is empty"),
    (TOKEN, 0o644, "readable by every user"),
    (TOKEN, 0o604, "chmod 600"),
    ("two words-but-long-enough", 0o600, "no spaces"),
    ("x" * (MIN_TOKEN_LENGTH - 1), 0o600, "shorter than"),
])
def test_load_token_refuses(tmp_path, text, mode, words):
    with pytest.raises(ConfigError) as exc:
        load_token(write(tmp_path / "token", text, mode))
    assert words in str(exc.value)
    assert exc.value.key == "admin.token_file"


def test_load_token_missing_or_directory(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_token(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="directory"):
        load_token(str(tmp_path))
