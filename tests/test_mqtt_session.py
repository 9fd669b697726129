"""The broker link's session, protocol and reconnection (issue 16, failures 6 and 7, and the
backoff hardening).

* Failure 6: with a clean session, what the backend published while the gateway was
  reconnecting was lost, and charge points got an error instead of the backend's answer.
  The default is now a persistent session; a real Mosquitto keeps the answer (and a
  command) for the gateway while its link is down, and the gateway gets each once.
  The link is broken the way a site's network breaks it: the gateway is frozen
  (SIGSTOP), so the broker drops it after 1.5 keepalives while the process lives on.
* Failure 7: ``mqtt.protocol = 5`` through Mosquitto 2 (which speaks MQTT 5): round trips,
  the retained status and the will, and the session as above with a session expiry.
* Backoff: the default delays are capped at 5 s, with jitter in the upper half.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from types import SimpleNamespace

import pytest
import websockets
from conftest import ROOT, Backend, Broker

from ocpp_edge import config
from ocpp_edge.errors import ConfigError
from ocpp_edge.north import uplink as uplink_mod
from ocpp_edge.north.uplink import MqttUplink


def _known(key: str) -> bool:
    """Does the gateway under test (ROOT) know ``key``? (These tests also run against
    older trees, to show they fail there; unknown keys stop a gateway.)"""
    for rel in ("ocpp_edge/config/configspec.ini", "ocpp_edge/configspec.ini"):
        spec = ROOT / rel
        if spec.exists():
            return any(line.split("=", 1)[0].strip() == key
                       for line in spec.read_text().splitlines())
    return False


# A short keepalive: the broker drops a frozen gateway after 1.5 keepalives (7.5 s).
# Local answers and timeouts far away, so only the broker link decides what arrives.
FROZEN = ("mqtt.keepalive = 5s\nocpp.upstream.awaiting_timeout = 60s\n"
          + ("ocpp.offline.answer_after = 60s\n" if _known("ocpp.offline.answer_after")
             else ""))


def _uplink(**kw) -> MqttUplink:
    s = config.defaults().mqtt
    args = dict(host="127.0.0.1", port=1, client_id="gw", username=None, password=None,
                qos=1, clean_session=s.clean_session, keepalive=s.keepalive,
                reconnect_delay_min=s.reconnect_delay_min,
                reconnect_delay_max=s.reconnect_delay_max, max_inflight=s.max_inflight,
                buffer=None, subscriptions=[("ocpp/cs/+", 1)], on_message=lambda t, p: None)
    args.update(kw)
    return MqttUplink(**args)


# -- reconnect backoff ---------------------------------------------------------------------

def _retry_delays(up: MqttUplink, attempts: int) -> list[tuple[float, float]]:
    """(delay, the cap of that attempt) for ``attempts`` failures in a row, read from the
    timer the uplink sets."""

    async def run() -> list[float]:
        loop = asyncio.get_running_loop()
        delays = []
        for _ in range(attempts):
            before = loop.time()
            up._schedule_retry("test")
            handle = up._retry_handle
            delays.append(handle.when() - before)
            handle.cancel()
        return delays

    return asyncio.run(run())


def test_default_reconnect_backoff_is_capped_at_5s_with_jitter():
    """Failure 4 (operations): the wait grew to 49 s against a local broker, so draining
    began 43 s after it was back. The defaults: 1 s doubling, capped at 5 s, each wait
    drawn from the upper half of its step."""
    s = config.defaults().mqtt
    assert (s.reconnect_delay_min, s.reconnect_delay_max) == (1.0, 5.0)
    caps = [1.0, 2.0, 4.0] + [5.0] * 9
    seen: list[list[float]] = [[] for _ in caps]
    for _ in range(100):
        for i, delay in enumerate(_retry_delays(_uplink(), len(caps))):
            seen[i].append(delay)
    for cap, delays in zip(caps, seen, strict=True):
        assert all(cap / 2 - 0.01 <= d <= cap + 0.01 for d in delays), (cap, delays)
        # jittered: the draws spread over the upper half, not one fixed value
        assert min(delays) < cap * 0.6 and max(delays) > cap * 0.9, (cap, delays)
    assert max(max(d) for d in seen) <= 5.01


def test_backoff_delay_sequence_and_bounds():
    bounds = lambda low, high: (low, high)  # noqa: E731 - uniform() replaced: its bounds
    assert [uplink_mod.backoff_delay(k, 1.0, 5.0, bounds) for k in range(6)] == [
        (0.5, 1.0), (1.0, 2.0), (2.0, 4.0), (2.5, 5.0), (2.5, 5.0), (2.5, 5.0)]
    assert uplink_mod.backoff_delay(10_000, 0.1, 0.5, bounds) == (0.25, 0.5)  # no overflow
    assert uplink_mod.backoff_delay(0, 2.0, 2.0, bounds) == (1.0, 2.0)


def test_a_connection_resets_the_backoff():
    up = _uplink()
    up._attempt = 7
    client = SimpleNamespace(publish=lambda *a, **k: None, subscribe=lambda *a, **k: None)
    up._client = client
    up.buffer = []
    up.kick = lambda: None

    async def connack() -> None:
        up._on_connect(client, None, {"session present": 0}, 0)

    asyncio.run(connack())
    assert up._attempt == 0 and up.reconnects == 1


# -- configuration -------------------------------------------------------------------------

def test_session_and_protocol_settings():
    m = config.defaults().mqtt
    assert (m.protocol, m.clean_session, m.session_expiry) == ("3.1.1", False, 3600.0)
    m = config.load_text("mqtt.protocol = 5\nmqtt.session_expiry = 2d\n").mqtt
    assert (m.protocol, m.session_expiry) == ("5", 2 * 86400.0)
    assert config.load_text("mqtt.clean_session = true\n").mqtt.clean_session is True
    assert config.load_text("mqtt.session_expiry = 0\n").mqtt.session_expiry == 0.0
    for line, words in (("mqtt.protocol = 3.1", "must be one of 3.1.1, 5, got '3.1'"),
                        ("mqtt.session_expiry = 50000d", "must be between 0s and 49710d")):
        with pytest.raises(ConfigError) as info:
            config.load_text(line + "\n")
        assert words in str(info.value), str(info.value)


def test_paho_client_and_connect_options_per_protocol():
    import paho.mqtt.client as mqtt

    c = uplink_mod._new_paho_client("gw", False, "3.1.1")
    assert c._protocol == mqtt.MQTTv311 and c._clean_session is False
    c = uplink_mod._new_paho_client("gw", False, "5")
    assert c._protocol == mqtt.MQTTv5
    up = _uplink(protocol="5", session_expiry=3600.0)
    opts = up._session_options()
    assert opts["clean_start"] is False
    assert opts["properties"].SessionExpiryInterval == 3600
    up = _uplink(protocol="5", clean_session=True, session_expiry=3600.0)
    opts = up._session_options()
    assert opts["clean_start"] is True
    assert not hasattr(opts["properties"], "SessionExpiryInterval")  # ends with the link
    assert _uplink()._session_options() == {}


def test_disconnect_callback_arguments_of_every_paho_and_protocol():
    lost = []
    up = _uplink()
    up._lost = lambda client, why: lost.append(why)
    up._on_disconnect("c", None, 7)                      # paho 1.6, MQTT 3.1.1
    up._on_disconnect("c", None, 7, None)                # paho 1.6, MQTT 5: properties
    up._on_disconnect("c", None, {}, 7, None)            # paho 2.x
    assert lost == ["rc=7"] * 3


def test_receive_maximum_bounds_the_window_and_session_state_is_reported(caplog):
    up = _uplink(protocol="5", max_inflight=200)
    props = SimpleNamespace(ReceiveMaximum=20)
    assert up._check_session({"session present": 0}, props) == "new session"
    assert up.max_inflight == 20
    assert up._check_session(SimpleNamespace(session_present=True), None) == "session resumed"
    assert up.max_inflight == 200
    with caplog.at_level("WARNING"):
        assert up._check_session({"session present": 0}, None) == "new session"
    assert "kept no session" in caplog.text  # after one before: it was lost
    with caplog.at_level("ERROR"):
        up._check_session({"session present": 0}, SimpleNamespace(MaximumQoS=0))
    assert "set mqtt.qos = 1" in caplog.text


def test_a_redelivered_downstream_message_is_handled_once():
    got = []
    up = _uplink(on_message=lambda topic, payload: got.append((topic, payload)))

    def msg(payload: bytes, dup: int) -> SimpleNamespace:
        return SimpleNamespace(topic="ocpp/cs/CP1", payload=payload, dup=dup)

    up._on_message(None, None, msg(b"a", 0))
    up._on_message(None, None, msg(b"a", 1))   # the broker's copy after a lost PUBACK
    up._on_message(None, None, msg(b"a", 0))   # the backend sent it again: passed on
    up._on_message(None, None, msg(b"b", 1))   # a redelivery never seen: passed on
    assert got == [("ocpp/cs/CP1", b"a"), ("ocpp/cs/CP1", b"a"), ("ocpp/cs/CP1", b"b")]
    for i in range(MqttUplink.RECENT + 10):
        up._on_message(None, None, msg(str(i).encode(), 0))
    assert len(up._recent) == MqttUplink.RECENT


# -- a real Mosquitto ----------------------------------------------------------------------

def _wait_file(path, needle: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in path.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} not in {path} within {timeout} s:\n"
                         f"{path.read_text(errors='replace')[-2000:]}")


async def _recv_json(ws, timeout: float) -> list:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def _in_thread(fn, *args, **kwargs):
    return await asyncio.get_running_loop().run_in_executor(None, lambda: fn(*args, **kwargs))


def _link_down_scenario(broker: Broker, backend: Backend, make_gateway, extra: str) -> None:
    """A CALL waits for the backend; the gateway's link dies (frozen until the broker drops
    it); meanwhile the backend sends a command (before the broker noticed) and its answer
    (after). Once the gateway is back, the charge point gets the answer and the command,
    each once, and the backend the command's reply once."""
    gw = make_gateway(broker.port, FROZEN + extra)
    gw.wait_log("subscribed to ocpp/cs/+")
    client_id = f"gw-test-{gw.port}"

    async def scenario() -> None:
        async with websockets.connect(f"{gw.url}/CP001", subprotocols=["ocpp1.6"]) as ws:
            await ws.send(json.dumps([2, "a-1", "Authorize", {"idTag": "TAG01"}]))
            _, up = await _in_thread(backend.expect, "ocpp/cp/CP001")
            assert (up["Action"], up["UniqueId"]) == ("Authorize", "a-1")

            os.kill(gw.proc.pid, signal.SIGSTOP)
            try:
                # Sent to the frozen gateway's socket: unacknowledged when the link dies.
                await _in_thread(backend.publish, "ocpp/cs/CP001", {
                    "MessageTypeId": 2, "UniqueId": "rs-1",
                    "Action": "RemoteStartTransaction", "Payload": {"idTag": "TAG01"}})
                await _in_thread(_wait_file, broker.log,
                                 f"Client {client_id} has exceeded timeout", 20)
                # Published while the gateway has no connection at all.
                await _in_thread(backend.publish, "ocpp/cs/CP001", {
                    "MessageTypeId": 3, "UniqueId": "a-1",
                    "Payload": {"idTagInfo": {"status": "Accepted",
                                              "parentIdTag": "FROM-BACKEND"}}})
            finally:
                os.kill(gw.proc.pid, signal.SIGCONT)

            got: dict[str, list] = {}
            deadline = time.monotonic() + 15
            while len(got) < 2 and time.monotonic() < deadline:
                try:
                    frame = await _recv_json(ws, max(0.1, deadline - time.monotonic()))
                except TimeoutError:
                    break
                got.setdefault(frame[1], []).append(frame)
                if frame[0] == 2:  # the command: the charge point accepts it
                    await ws.send(json.dumps([3, frame[1], {"status": "Accepted"}]))
            assert got.get("a-1") == [[3, "a-1", {"idTagInfo": {
                "status": "Accepted", "parentIdTag": "FROM-BACKEND"}}]], (
                got, gw.log_text()[-3000:])
            assert got.get("rs-1") == [[2, "rs-1", "RemoteStartTransaction",
                                        {"idTag": "TAG01"}]], got
            _, reply = await _in_thread(backend.expect, "ocpp/cp/CP001/Reply")
            assert (reply["UniqueId"], reply["Payload"]) == ("rs-1", {"status": "Accepted"})
            # Each once: no second copy of the command (redelivered by the broker) arrives.
            await asyncio.sleep(1.5)
            try:
                extra_frame = await _recv_json(ws, 0.2)
            except TimeoutError:
                extra_frame = None
            assert extra_frame is None, extra_frame
            assert backend.nothing_on("ocpp/cp/CP001/Reply", 0.1) == []

    asyncio.run(scenario())
    log = gw.log_text()
    assert "session resumed" in log, log[-3000:]


def test_answer_published_while_the_link_is_down_reaches_the_charge_point(
        broker, backend, make_gateway):
    """Failure 6, MQTT 3.1.1 with the default settings (a persistent session)."""
    _link_down_scenario(broker, backend, make_gateway, "")
    connects = [line for line in broker.log.read_text().splitlines()
                if "New client connected" in line and " as gw-test-" in line]
    # Mosquitto writes p2 for MQTT 3.1.1; c0: clean session 0
    assert len(connects) == 2 and all("(p2, c0," in line for line in connects), connects


def test_mqtt5_session_keeps_what_the_backend_sent_while_the_link_was_down(
        broker, backend, make_gateway):
    """Failures 6 and 7: the same with MQTT 5 (clean start 0, a session expiry)."""
    _link_down_scenario(broker, backend, make_gateway, "mqtt.protocol = 5\n")
    connects = [line for line in broker.log.read_text().splitlines()
                if "New client connected" in line and " as gw-test-" in line]
    assert len(connects) == 2 and all("(p5, c0," in line for line in connects), connects


def test_mqtt5_round_trips_status_and_will_through_mosquitto(broker, backend, make_gateway):
    """Failure 7: mqtt.protocol = 5 against Mosquitto 2. Same topics and payloads as with
    3.1.1: a CALL up and its answer down, a command down and its reply up, the retained
    status online, and the will (offline) when the gateway dies."""
    gw = make_gateway(broker.port, "mqtt.protocol = 5\n"
                      "ocpp.upstream.status_topic = sys/${node}/status\n")
    gw.wait_log("subscribed to ocpp/cs/+")
    node = f"gw-test-{gw.port}"
    assert f"as {node} (p5, c0, k60)" in broker.log.read_text()
    _, status = backend.expect(f"ocpp/sys/{node}/status")
    assert status["status"] == "online"

    async def scenario() -> None:
        async with websockets.connect(f"{gw.url}/CP5", subprotocols=["ocpp1.6"]) as ws:
            await ws.send(json.dumps([2, "b-1", "BootNotification", {
                "chargePointModel": "M", "chargePointVendor": "V"}]))
            _, up = await _in_thread(backend.expect, "ocpp/cp/CP5")
            assert up == {"MessageTypeId": 2, "UniqueId": "b-1", "Action": "BootNotification",
                          "Payload": {"chargePointModel": "M", "chargePointVendor": "V"}}
            await _in_thread(backend.publish, "ocpp/cs/CP5", {
                "MessageTypeId": 3, "UniqueId": "b-1", "Payload": {
                    "currentTime": "2026-11-22T10:00:00Z", "interval": 300,
                    "status": "Accepted"}})
            assert await _recv_json(ws, 10) == [3, "b-1", {
                "currentTime": "2026-11-22T10:00:00Z", "interval": 300,
                "status": "Accepted"}]
            await _in_thread(backend.publish, "ocpp/cs/CP5", {
                "MessageTypeId": 2, "UniqueId": "r-1", "Action": "Reset",
                "Payload": {"type": "Soft"}})
            assert await _recv_json(ws, 10) == [2, "r-1", "Reset", {"type": "Soft"}]
            await ws.send(json.dumps([3, "r-1", {"status": "Accepted"}]))
            _, reply = await _in_thread(backend.expect, "ocpp/cp/CP5/Reply")
            assert reply == {"MessageTypeId": 3, "UniqueId": "r-1",
                             "Payload": {"status": "Accepted"}, "Action": "Reset"}

    asyncio.run(scenario())
    gw.proc.kill()  # no DISCONNECT: the broker publishes the will
    gw.proc.wait()
    _, will = backend.expect(f"ocpp/sys/{node}/status")
    assert will["status"] == "offline"
    # retained: a backend that subscribes later sees it too
    late = Backend(broker.port, subscribe=f"ocpp/sys/{node}/status")
    try:
        assert late.expect(f"ocpp/sys/{node}/status")[1]["status"] == "offline"
    finally:
        late.close()


def test_gateway_mqtt_socket_has_tcp_nodelay():
    """Failure 5, the gateway's side: Nagle is off on the MQTT socket (the TLS path wraps
    the same socket)."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        up = _uplink(port=srv.getsockname()[1])

        async def run() -> int:
            sock = await up._open_socket()
            try:
                return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            finally:
                sock.close()

        assert asyncio.run(run()) != 0


class _Answerer(Backend):
    """A backend that answers every CALL from inside paho's callback (so its own answer
    is not held by Nagle behind its PUBACK: only the gateway's side is measured)."""

    def __init__(self, port: int) -> None:
        super().__init__(port, subscribe="ocpp/cp/+", answer=self._reply)

    @staticmethod
    def _reply(topic: str, body: dict):
        if body.get("MessageTypeId") != 2:
            return None
        return "ocpp/cs/" + topic.rsplit("/", 1)[1], {
            "MessageTypeId": 3, "UniqueId": body["UniqueId"],
            "Payload": {"currentTime": "2026-12-01T00:00:00Z"}}


def test_round_trips_through_stock_mosquitto_are_not_held_by_delayed_acks(broker,
                                                                          make_gateway):
    """Failure 5: with Debian's stock Mosquitto (Nagle on: the tests' broker has no
    set_tcp_nodelay), every round trip took ~45 ms, the broker holding the backend's answer
    until the gateway's delayed ACK of its PUBACK. The gateway acknowledges at once."""
    assert "set_tcp_nodelay" not in broker.conf.read_text()
    answerer = _Answerer(broker.port)
    try:
        gw = make_gateway(broker.port)
        gw.wait_log("subscribed to ocpp/cs/+")

        async def heartbeats(count: int) -> list[float]:
            async with websockets.connect(f"{gw.url}/CPRTT", subprotocols=["ocpp1.6"]) as ws:
                rtts = []
                for i in range(count + 5):
                    t0 = time.perf_counter()
                    await ws.send(json.dumps([2, f"h{i}", "Heartbeat", {}]))
                    assert (await _recv_json(ws, 5))[:2] == [3, f"h{i}"]
                    if i >= 5:
                        rtts.append((time.perf_counter() - t0) * 1000)
                    await asyncio.sleep(0.01)
                return rtts

        rtts = sorted(asyncio.run(heartbeats(40)))
    finally:
        answerer.close()
    # A delayed ACK is at least 40 ms (Linux); a round trip on loopback a few ms.
    assert rtts[len(rtts) // 2] < 20, [round(r, 1) for r in rtts]
