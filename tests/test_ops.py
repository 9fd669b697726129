"""Operations end to end (issue "Operations"): the admin endpoint, ``/metrics``,
``ocpp-edge ctl`` and presence on MQTT, against a running gateway process with real
charge points (websockets clients), a real Mosquitto and real HTTP requests."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from conftest import ROOT, Backend, GatewayProcess, eventually, free_port
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

PRESENCE_ON = ("ocpp.upstream.status_topic = sys/${node}/status\n"
               "ocpp.upstream.event_topic = sys/${node}/clients/${cid}/${event}\n")


def start(make_gateway, broker, extra: str = "") -> tuple[GatewayProcess, str]:
    port = free_port()
    gw = make_gateway(broker.port, f"admin.listen = 127.0.0.1:{port}\n" + extra)
    gw.wait_log("subscribed to ocpp/cs/+")
    return gw, f"http://127.0.0.1:{port}"


def request(base: str, path: str, method: str = "GET", token: str | None = None):
    """(status, body): JSON decoded when it is JSON."""
    req = urllib.request.Request(base + path, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status, raw, ctype = resp.status, resp.read(), resp.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        status, raw, ctype = exc.code, exc.read(), exc.headers["Content-Type"]
    if ctype and ctype.startswith("application/json"):
        return status, json.loads(raw)
    return status, raw.decode()


def request_unix(sock: str, path: str, method: str = "GET"):
    """(status, body) through the admin socket."""
    from ocpp_edge.ops.ctl import _UnixConnection

    conn = _UnixConnection(sock, 10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        raw = resp.read()
        if (resp.headers["Content-Type"] or "").startswith("application/json"):
            return resp.status, json.loads(raw)
        return resp.status, raw.decode()
    finally:
        conn.close()


def get(base: str, path: str):
    status, body = request(base, path)
    assert status == 200, (path, status, body)
    return body


def client(base: str, cid: str) -> dict | None:
    status, body = request(base, f"/api/v1/clients/{cid}")
    return body if status == 200 else None


def next_from_gateway(backend: Backend) -> tuple[str, dict]:
    """The next message the gateway published (the backend's own commands skipped)."""
    while True:
        topic, body = backend.expect()
        if not topic.startswith("ocpp/cs/"):
            return topic, body


def recv(ws) -> list:
    return json.loads(ws.recv(timeout=10))


# -- the admin endpoint -------------------------------------------------------------------

def test_listings_follow_connects_messages_and_disconnects(make_gateway, broker, backend):
    gw, admin = start(make_gateway, broker)
    assert get(admin, "/api/v1/clients") == {"data": [], "meta": {"count": 0}}
    with ws_connect(f"{gw.url}/CP1", subprotocols=["ocpp1.6"]) as ws:
        c = eventually(lambda: client(admin, "CP1"), "CP1 listed")
        assert (c["clientid"], c["protocol"], c["ip_address"]) == ("CP1", "ocpp1.6", "127.0.0.1")
        assert c["port"] == ws.socket.getsockname()[1]
        assert (c["messages_in"], c["messages_out"], c["last_message_at"]) == (0, 0, None)
        assert get(admin, "/api/v1/clients")["meta"]["count"] == 1

        ws.send(json.dumps([2, "hb1", "Heartbeat", {}]))
        backend.expect("ocpp/cp/CP1")
        c = client(admin, "CP1")
        assert (c["messages_in"], c["pending_upstream"]) == (1, 1)
        assert c["last_message_at"] is not None
        backend.publish("ocpp/cs/CP1", {"MessageTypeId": 3, "UniqueId": "hb1",
                                        "Payload": {"currentTime": "2026-12-02T18:00:00Z"}})
        assert recv(ws)[:2] == [3, "hb1"]
        c = eventually(lambda: (c := client(admin, "CP1"))["messages_out"] == 1 and c,
                       "the reply counted")
        assert c["pending_upstream"] == 0

        # The backend's CALLs: one in flight to the charge point, the next one queued.
        for uid in ("g1", "g2"):
            backend.publish("ocpp/cs/CP1", {"MessageTypeId": 2, "UniqueId": uid,
                                            "Action": "GetConfiguration", "Payload": {}})
        assert recv(ws)[:3] == [2, "g1", "GetConfiguration"]
        c = eventually(lambda: (c := client(admin, "CP1"))["queue_len"] == 1 and c,
                       "g2 queued")
        assert (c["pending_dnstream"], c["messages_out"]) == (1, 2)

        status = get(admin, "/api/v1/status")
        assert status["charge_points"] == {"connected": 1}
        assert status["upstream"]["state"] == "connected"
        assert status["listeners"] == [{"name": "ocpp.listener.ws",
                                        "url": f"ws://127.0.0.1:{gw.port}", "connections": 1}]
        assert status["config"]["file"] == str(gw.config)
    eventually(lambda: get(admin, "/api/v1/clients")["meta"]["count"] == 0, "CP1 gone")
    assert request(admin, "/api/v1/clients/CP1")[0] == 404
    assert get(admin, "/api/v1/status")["charge_points"] == {"connected": 0}


def test_kick_closes_the_right_socket_with_1000(make_gateway, broker, backend, tmp_path):
    sock = str(tmp_path / "admin.sock")
    gw, admin = start(make_gateway, broker, PRESENCE_ON + f"admin.socket = {sock}\n")
    with ws_connect(f"{gw.url}/A", subprotocols=["ocpp1.6"]) as a, \
            ws_connect(f"{gw.url}/B", subprotocols=["ocpp1.6"]) as b:
        eventually(lambda: get(admin, "/api/v1/clients")["meta"]["count"] == 2, "both listed")
        status, body = request(admin, "/api/v1/clients/A", "DELETE")  # TCP, no token
        assert status == 403 and body["code"] == "FORBIDDEN"
        status, body = request_unix(sock, "/api/v1/clients/A", "DELETE")
        assert (status, body) == (204, "")
        with pytest.raises(ConnectionClosed) as closed:
            a.recv(timeout=10)
        assert closed.value.rcvd.code == 1000
        event = backend.expect(f"ocpp/sys/gw-test-{gw.port}/clients/A/disconnected")[1]
        assert (event["reason"], event["clientid"]) == ("kicked", "A")
        # B is untouched: still listed, still served.
        assert [c["clientid"] for c in get(admin, "/api/v1/clients")["data"]] == ["B"]
        b.send(json.dumps([2, "b1", "Heartbeat", {}]))
        assert backend.expect("ocpp/cp/B")[1]["UniqueId"] == "b1"
    assert request_unix(sock, "/api/v1/clients/A", "DELETE") == (
        404, {"code": "CLIENTID_NOT_FOUND", "message": "Client ID not found"})


def samples(base: str) -> dict[tuple, float]:
    """Every sample of /metrics, parsed by prometheus_client's parser."""
    status, text = request(base, "/metrics")
    assert status == 200
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels) -> float:
    return found.get((name, frozenset(labels.items())), 0)


def test_metrics_parse_and_move_with_traffic(make_gateway, broker, backend):
    # The buffer policy's timeout answer is what is counted here.
    gw, admin = start(make_gateway, broker, "ocpp.upstream.awaiting_timeout = 2s\n"
                      "ocpp.upstream_down_policy = buffer\n")
    before = samples(admin)
    assert value(before, "ocpp_edge_upstream_connected") == 1
    assert value(before, "ocpp_edge_charge_points_connected") == 0
    msgs = "ocpp_edge_messages_total"
    with ws_connect(f"{gw.url}/M1", subprotocols=["ocpp1.6"]) as ws:
        ws.send(json.dumps([2, "hb1", "Heartbeat", {}]))
        backend.expect("ocpp/cp/M1")
        backend.publish("ocpp/cs/M1", {"MessageTypeId": 3, "UniqueId": "hb1",
                                       "Payload": {"currentTime": "2026-12-02T18:00:00Z"}})
        assert recv(ws)[0] == 3
        ws.send(json.dumps([3, "nobody-asked", {}]))  # an orphan reply
        ws.send(json.dumps([2, "b1", "BootNotification", {}]))  # fails the schema
        assert recv(ws)[:3] == [4, "b1", "OccurenceConstraintViolation"]
        ws.send(json.dumps([2, "au1", "Authorize", {"idTag": "T1"}]))  # never answered
        assert recv(ws)[:3] == [4, "au1", "InternalError"]  # the gateway's timeout answer
        during = samples(admin)
        assert value(during, "ocpp_edge_charge_points_connected") == 1
    after = eventually(lambda: (s := samples(admin)) and value(
        s, "ocpp_edge_connections_closed_total", reason="sock_closed") == 1 and s,
        "the close counted")

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("ocpp_edge_connections_opened_total", listener="ocpp.listener.ws") == 1
    assert moved(msgs, direction="upstream", type="CALL", action="Heartbeat") == 1
    assert moved(msgs, direction="dnstream", type="CALLRESULT", action="Heartbeat") == 1
    assert moved(msgs, direction="upstream", type="CALL", action="Authorize") == 1
    assert moved(msgs, direction="dnstream", type="CALLERROR", action="Authorize") == 1
    assert moved(msgs, direction="dnstream", type="CALLERROR", action="") == 1  # the Boot
    assert moved("ocpp_edge_callerrors_total", direction="dnstream",
                 code="OccurenceConstraintViolation") == 1
    assert moved("ocpp_edge_callerrors_total", direction="dnstream", code="InternalError") == 1
    assert moved("ocpp_edge_orphan_replies_total", direction="upstream") == 1
    assert moved("ocpp_edge_orphan_replies_total", direction="dnstream") == 0
    assert moved("ocpp_edge_schema_failures_total", direction="upstream") == 1
    assert moved("ocpp_edge_timeouts_total", direction="upstream") == 1
    assert moved("ocpp_edge_upstream_published_total") >= 2  # Heartbeat and Authorize
    assert value(after, "ocpp_edge_charge_points_connected") == 0
    assert value(after, "ocpp_edge_build_info", version="0.1.0") == 1
    assert ("ocpp_edge_buffer_messages", frozenset()) in after
    assert ("ocpp_edge_buffer_dropped_total", frozenset()) in after


def test_buffer_depth_and_age_while_the_broker_is_away(make_gateway, broker):
    gw, admin = start(make_gateway, broker)
    published = value(samples(admin), "ocpp_edge_upstream_published_total")
    broker.stop()
    eventually(lambda: value(samples(admin), "ocpp_edge_upstream_connected") == 0 or None,
               "the link seen down")
    assert get(admin, "/api/v1/status")["upstream"]["state"] == "disconnected"
    with ws_connect(f"{gw.url}/Q1", subprotocols=["ocpp1.6"]) as ws:
        for i in range(3):
            ws.send(json.dumps([2, f"m{i}", "Heartbeat", {}]))
        eventually(lambda: value(samples(admin), "ocpp_edge_buffer_messages") == 3,
                   "3 messages buffered")
        found = samples(admin)
        assert value(found, "ocpp_edge_buffer_bytes") > 0
        assert ("ocpp_edge_buffer_oldest_age_seconds", frozenset()) in found
        buffer = get(admin, "/api/v1/status")["buffer"]
        assert buffer["messages"] == 3 and buffer["oldest_age_seconds"] >= 0
        broker.start()
        found = eventually(lambda: (s := samples(admin)) and value(
            s, "ocpp_edge_buffer_messages") == 0 and s, "the backlog delivered")
    assert ("ocpp_edge_buffer_oldest_age_seconds", frozenset()) not in found  # empty
    assert value(found, "ocpp_edge_upstream_published_total") - published == 3
    assert value(found, "ocpp_edge_upstream_reconnects_total") == 1
    assert value(found, "ocpp_edge_upstream_connected") == 1
    assert get(admin, "/api/v1/status")["upstream"]["reconnects"] == 1


def test_reachable_admin_address_without_token_is_refused_at_start(make_gateway, broker,
                                                                  tmp_path):
    port = free_port()
    gw = make_gateway(broker.port, f"admin.listen = 0.0.0.0:{port}\n", start=False)
    line = gw.config.read_text().splitlines().index(f"admin.listen = 0.0.0.0:{port}") + 1
    for argv in (["--config", str(gw.config)], ["--check-config", "--config", str(gw.config)]):
        run = subprocess.run([sys.executable, "-m", "ocpp_edge", *argv], capture_output=True,
                             text=True, cwd=ROOT, timeout=30)
        assert run.returncode == 1, run
        assert f"{gw.config}:{line}, key 'admin.listen'" in run.stderr
        assert "admin.token_file" in run.stderr

    # With a token: it starts, and everything but /healthz wants the token.
    token = tmp_path / "admin.token"
    token.write_text("s3cret-token-0123456789\n")
    token.chmod(0o600)
    gw = make_gateway(broker.port, f"admin.listen = 0.0.0.0:{port}\n"
                                   f"admin.token_file = {token}\n")
    admin = f"http://127.0.0.1:{port}"
    assert request(admin, "/api/v1/status")[0] == 401
    assert request(admin, "/api/v1/status", token="wrong-token-0123456789")[0] == 401
    status, body = request(admin, "/api/v1/status", token="s3cret-token-0123456789")
    assert status == 200 and body["version"] == "0.1.0"
    assert request(admin, "/healthz") == (200, "ok\n")
    ctl = subprocess.run([sys.executable, "-m", "ocpp_edge", "ctl", "--config", str(gw.config),
                          "status"], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert ctl.returncode == 0, ctl
    assert "charge points  0 connected" in ctl.stdout


# -- ocpp-edge ctl ------------------------------------------------------------------------

def ctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ocpp_edge", "ctl", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=30)


def test_ctl_against_a_live_gateway(make_gateway, broker, backend, tmp_path):
    gw, admin = start(make_gateway, broker, f"admin.socket = {tmp_path}/admin.sock\n")
    with ws_connect(f"{gw.url}/CTL-1", subprotocols=["ocpp2.0.1"]) as ws:
        eventually(lambda: client(admin, "CTL-1"), "listed")
        ws.send(json.dumps([2, "h1", "Heartbeat", {}]))
        backend.expect("ocpp/cp/CTL-1")

        run = ctl("--config", str(gw.config), "status")  # the address from admin.listen
        assert run.returncode == 0, run
        assert "version        ocpp-edge 0.1.0" in run.stdout
        assert f"upstream       connected to mqtt://127.0.0.1:{broker.port}" in run.stdout
        assert "charge points  1 connected" in run.stdout

        run = ctl("--url", admin, "clients")
        assert run.returncode == 0, run
        header, row, total = run.stdout.splitlines()
        assert header.split() == ["ID", "PROTOCOL", "ADDRESS", "CONNECTED", "LAST", "MSG",
                                  "IN", "OUT", "PENDING", "QUEUE"]
        assert row.split()[:3] == ["CTL-1", "ocpp2.0.1", f"127.0.0.1:{ws.socket.getsockname()[1]}"]
        assert row.split()[-4:] == ["1", "0", "1", "0"]  # in, out, pending, queue
        assert total == "1 charge point connected"

        run = ctl("--url", admin, "--json", "client", "CTL-1")
        assert run.returncode == 0, run
        assert json.loads(run.stdout)["messages_in"] == 1

        run = ctl("--config", str(gw.config), "kick", "CTL-1")  # admin.socket
        assert (run.returncode, run.stdout) == (0, "kicked CTL-1: its connection was closed "
                                                   "(1000)\n")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd.code == 1000
    run = ctl("--config", str(gw.config), "kick", "CTL-1")
    assert run.returncode == 3 and "no charge point 'CTL-1' is connected" in run.stderr
    run = ctl("--url", admin, "clients")
    assert (run.returncode, run.stdout) == (0, "no charge points connected\n")
    gw.stop()
    run = ctl("--url", admin, "status")
    assert run.returncode == 1 and "connection refused" in run.stderr


# -- presence on MQTT (a real Mosquitto) --------------------------------------------------

def test_status_topic_online_offline_will_and_restart(make_gateway, broker):
    watcher = Backend(broker.port, subscribe="ocpp/sys/#")
    try:
        gw, _ = start(make_gateway, broker, PRESENCE_ON)
        topic = f"ocpp/sys/gw-test-{gw.port}/status"
        online = watcher.expect(topic, where=lambda b: b["status"] == "online")[1]
        assert online["version"] == "0.1.0" and online["node"] == f"gw-test-{gw.port}"
        assert online["started_at"].endswith("Z")

        gw.proc.send_signal(signal.SIGKILL)  # no DISCONNECT: the broker sends the will
        gw.proc.wait()
        will = watcher.expect(topic, where=lambda b: b["status"] == "offline")[1]
        assert (will["reason"], will["started_at"]) == ("connection_lost",
                                                        online["started_at"])
        # Retained: a backend subscribing now still learns the gateway is offline.
        late = Backend(broker.port, subscribe=topic)
        assert late.expect(topic)[1]["status"] == "offline"
        late.close()

        gw.start()
        again = watcher.expect(topic, where=lambda b: b["status"] == "online")[1]
        assert again["started_at"] >= online["started_at"]

        assert gw.stop() == 0  # a clean stop says offline itself (the will is discarded)
        stopped = watcher.expect(topic, where=lambda b: b["status"] == "offline")[1]
        assert stopped["reason"] == "shutdown"
    finally:
        watcher.close()


def test_connect_and_disconnect_events_in_order_with_the_messages(make_gateway, broker,
                                                                  backend):
    gw, admin = start(make_gateway, broker, PRESENCE_ON)
    events = f"ocpp/sys/gw-test-{gw.port}/clients/EV1"
    with ws_connect(f"{gw.url}/EV1", subprotocols=["ocpp1.6"]) as ws:
        local_port = ws.socket.getsockname()[1]
        ws.send(json.dumps([2, "boot1", "BootNotification",
                            {"chargePointVendor": "V", "chargePointModel": "M"}]))
        seen = []  # everything the backend receives, in order, up to the BootNotification
        while not seen or seen[-1][0] != "ocpp/cp/EV1":
            seen.append(backend.expect())
    topics = [t for t, _ in seen]
    assert f"{events}/connected" in topics  # and before the BootNotification
    connected = dict(seen)[f"{events}/connected"]
    assert connected["clientid"] == "EV1" and connected["username"] is None
    assert (connected["ipaddress"], connected["peerport"]) == ("127.0.0.1", local_port)
    assert (connected["proto_name"], connected["proto_ver"]) == ("OCPP", "1.6")
    assert connected["sockport"] == gw.port and connected["protocol"] == "ocpp"
    assert isinstance(connected["connected_at"], int) and connected["ts"] >= \
        connected["connected_at"]
    gone = backend.expect(f"{events}/disconnected")[1]
    assert (gone["reason"], gone["close_code"]) == ("sock_closed", 1000)
    assert gone["connected_at"] == connected["connected_at"]
    assert gone["disconnected_at"] >= gone["connected_at"]


def test_a_replaced_connection_is_discarded_before_the_new_one_connects(make_gateway, broker,
                                                                        backend):
    gw, admin = start(make_gateway, broker, PRESENCE_ON)
    events = f"ocpp/sys/gw-test-{gw.port}/clients/R1"
    with ws_connect(f"{gw.url}/R1", subprotocols=["ocpp1.6"]) as first:
        first_port = first.socket.getsockname()[1]
        assert backend.expect(f"{events}/connected")[1]["peerport"] == first_port
        with ws_connect(f"{gw.url}/R1", subprotocols=["ocpp2.0.1"]) as second:
            with pytest.raises(ConnectionClosed) as closed:
                first.recv(timeout=10)
            assert closed.value.rcvd.code == 1000  # SPEC "Connection"
            gone = backend.expect()  # the very next message on the broker
            assert gone[0] == f"{events}/disconnected"
            assert (gone[1]["reason"], gone[1]["peerport"]) == ("discarded", first_port)
            topic, again = backend.expect()
            assert topic == f"{events}/connected"
            assert (again["peerport"], again["proto_ver"]) == (
                second.socket.getsockname()[1], "2.0.1")
            c = client(admin, "R1")
            assert (c["protocol"], c["port"]) == ("ocpp2.0.1", again["peerport"])
    found = eventually(lambda: (s := samples(admin)) and value(
        s, "ocpp_edge_connections_closed_total", reason="sock_closed") == 1 and s, "closed")
    assert value(found, "ocpp_edge_connections_closed_total", reason="discarded") == 1


def test_a_silent_charge_point_is_closed_and_its_event_follows_the_backends_answer(
        make_gateway, broker, backend):
    gw, admin = start(make_gateway, broker, PRESENCE_ON + (
        "ocpp.default_heartbeat_interval = 1s\nocpp.heartbeat_checking_times_backoff = 1\n"))
    events = f"ocpp/sys/gw-test-{gw.port}/clients/S1"
    with ws_connect(f"{gw.url}/S1", subprotocols=["ocpp1.6"]) as ws:
        backend.expect(f"{events}/connected")
        backend.publish("ocpp/cs/S1", {"MessageTypeId": 2, "UniqueId": "r1",
                                       "Action": "Reset", "Payload": {"type": "Soft"}})
        assert recv(ws)[:3] == [2, "r1", "Reset"]  # and the charge point says nothing
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1000, "heartbeat timeout")
    # The backend's pending CALL is answered first, then the charge point is gone.
    topic, answer = next_from_gateway(backend)
    assert (topic, answer["UniqueId"], answer["ErrorCode"]) == ("ocpp/cp/S1/Reply", "r1",
                                                                "GenericError")
    topic, gone = next_from_gateway(backend)
    assert (topic, gone["reason"]) == (f"{events}/disconnected", "keepalive_timeout")
    assert get(admin, "/api/v1/clients")["meta"]["count"] == 0
    assert value(samples(admin), "ocpp_edge_connections_closed_total",
                 reason="keepalive_timeout") == 1


def test_a_taken_admin_port_stops_the_start_naming_the_key(make_gateway, broker):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        gw = make_gateway(broker.port, f"admin.listen = 127.0.0.1:{port}\n", start=False)
        run = subprocess.run([sys.executable, "-m", "ocpp_edge", "--config", str(gw.config)],
                             capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert run.returncode == 1
    assert f"cannot start: [Errno 98] admin.listen = 127.0.0.1:{port}: Address already in " \
           "use" in run.stderr
