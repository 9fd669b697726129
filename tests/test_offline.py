"""Offline operation end to end (README "When the backend is away"): a charge point built
on the PyPI ``ocpp`` library (1.6 and 2.0.1), the gateway process, a real Mosquitto the
tests stop and start, a paho backend that answers what it receives.

Each test checks what the charge point is told while the backend is away (at once, and
valid: the ``ocpp`` library validates every answer against its schemas), and what the
backend receives afterwards: every message once, in order, with what the charge point
was told (``LocalAnswer``) and with the backend's own transactionId in place of a local
one.
"""

from __future__ import annotations

import asyncio
import json
import queue
import signal
import threading
import time
import urllib.request

import websockets
from conftest import Backend, Broker, free_port
from ocpp.routing import on
from ocpp.v16 import ChargePoint as ChargePoint16
from ocpp.v16 import call, call_result
from ocpp.v201 import ChargePoint as ChargePoint201
from ocpp.v201 import call as call201
from ocpp.v201 import datatypes as dt201

SLOW_RETRY = "mqtt.reconnect_delay_min = 1s\nmqtt.reconnect_delay_max = 1s\n"
LOCAL_IDS = 1_900_000_000
# The backend's persistent session: the gateway replays its backlog the moment the broker
# is back, before a backend that connects only then could subscribe; the broker keeps that
# backlog for this session instead (conftest ``Broker.keep_session``).
CSMS = "test-csms"
EVENTS = "test-events"


def broker_keeping_the_backlog(tmp_path) -> Broker:
    """A broker, down, that keeps what is published under ocpp/cp/ for ``CSMS``."""
    broker = Broker(tmp_path, persistence=True)
    broker.keep_session(CSMS, "ocpp/cp/#")
    return broker


class AnsweringBackend(Backend):
    """A paho backend that answers every CALL from a charge point with ``answer(action,
    payload)`` (None: stay silent) and records everything it receives, in order."""

    def __init__(self, port: int, answer, session: str | None = None) -> None:
        self.answer_call = answer
        self.log: list[tuple[str, dict]] = []
        self.calls: queue.Queue[dict] = queue.Queue()
        self._lock = threading.Lock()
        super().__init__(port, subscribe="ocpp/cp/#", session=session, answer=self._reply)

    def _reply(self, topic: str, body: dict):
        with self._lock:
            self.log.append((topic, body))
        if body.get("MessageTypeId") != 2:
            return None
        self.calls.put(body)
        payload = self.answer_call(body["Action"], body["Payload"])
        if payload is None:
            return None
        return (f"ocpp/cs/{topic.split('/')[2]}",
                {"MessageTypeId": 3, "UniqueId": body["UniqueId"], "Payload": payload})

    def next_call(self, action: str | None = None, timeout: float = 15.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            body = self.calls.get(timeout=max(0.01, deadline - time.monotonic()))
            if action is None or body["Action"] == action:
                return body

    def received(self) -> list[dict]:
        with self._lock:
            return [b for t, b in self.log if b.get("MessageTypeId") == 2]


def csms16(backend_tx: dict):
    """The backend of the 1.6 tests: tags it knows, transaction ids from 4711 upwards."""
    def answer(action: str, p: dict):
        if action == "BootNotification":
            return {"status": "Accepted", "interval": 300, "currentTime": "2026-12-01T10:00:00Z"}
        if action == "Authorize":
            status = {"TAG-OK": "Accepted", "TAG-BLOCKED": "Blocked"}.get(p["idTag"], "Invalid")
            return {"idTagInfo": {"status": status}}
        if action == "StartTransaction":
            tid = backend_tx.setdefault(p["idTag"] + str(p["meterStart"]), 4711 + len(backend_tx))
            return {"idTagInfo": {"status": "Accepted"}, "transactionId": tid}
        if action == "StopTransaction":
            return {"idTagInfo": {"status": "Accepted"}} if "idTag" in p else {}
        if action == "Heartbeat":
            return {"currentTime": "2026-12-01T10:00:00Z"}
        return {}
    return answer


class CP16(ChargePoint16):
    """Records the transactionId of each RemoteStopTransaction it is sent."""

    remote_stops: queue.Queue = queue.Queue()

    @on("RemoteStopTransaction")
    async def on_remote_stop(self, transaction_id, **kwargs):
        self.remote_stops.put(transaction_id)
        return call_result.RemoteStopTransaction(status="Accepted")


async def connect16(url: str, cid: str):
    ws = await websockets.connect(f"{url}/{cid}", subprotocols=["ocpp1.6"])
    cp = CP16(cid, ws, response_timeout=30)
    runner = asyncio.create_task(cp.start())
    return ws, cp, runner


async def timed(coro):
    start = time.monotonic()
    result = await coro
    return result, time.monotonic() - start


def meter(tid: int, value: int) -> call.MeterValues:
    return call.MeterValues(connector_id=1, transaction_id=tid, meter_value=[{
        "timestamp": "2026-12-01T10:05:00Z", "sampledValue": [{"value": str(value)}]}])


def wait_until(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout} s")


# -- 1.6: a whole charging session while the broker is away --------------------------------

def test_charging_session_during_a_broker_outage_16(make_gateway, tmp_path):
    broker = Broker(tmp_path, persistence=True)
    broker.start()
    backend_tx: dict = {}
    be = AnsweringBackend(broker.port, csms16(backend_tx))
    gw = make_gateway(broker.port, SLOW_RETRY)
    gw.wait_log("subscribed to ocpp/cs/+")

    async def online():
        ws, cp, runner = await connect16(gw.url, "CP16")
        boot = await cp.call(call.BootNotification(charge_point_model="M",
                                                   charge_point_vendor="V"))
        assert (boot.status, boot.interval) == ("Accepted", 300)
        assert (await cp.call(call.Authorize(id_tag="TAG-OK"))).id_tag_info["status"] == \
            "Accepted"
        assert (await cp.call(call.Authorize(id_tag="TAG-BLOCKED"))).id_tag_info[
            "status"] == "Blocked"
        runner.cancel()
        await ws.close()

    asyncio.run(online())
    time.sleep(1.5)  # the learnt cache is committed (at most 1 s after learning)
    online_count = len(be.received())
    broker.keep_session(CSMS, "ocpp/cp/#")  # what the outage sends waits there for be2
    be.close()
    broker.stop()
    gw.wait_log("local mode: upstream link down")

    told: dict = {}

    async def outage():
        # The charge point reboots during the outage and runs a whole session.
        ws, cp, runner = await connect16(gw.url, "CP16")
        boot, t_boot = await timed(cp.call(call.BootNotification(
            charge_point_model="M", charge_point_vendor="V")))
        assert (boot.status, boot.interval) == ("Accepted", 300)  # remembered on disk
        ok, t_auth = await timed(cp.call(call.Authorize(id_tag="TAG-OK")))
        assert ok.id_tag_info["status"] == "Accepted"
        blocked = await cp.call(call.Authorize(id_tag="TAG-BLOCKED"))
        assert blocked.id_tag_info["status"] == "Blocked"
        unknown = await cp.call(call.Authorize(id_tag="TAG-NEW"))
        assert unknown.id_tag_info["status"] == "Invalid"  # ocpp.offline.unknown_id = reject
        await cp.call(call.StatusNotification(connector_id=1, error_code="NoError",
                                              status="Charging"))
        start, t_start = await timed(cp.call(call.StartTransaction(
            connector_id=1, id_tag="TAG-OK", meter_start=100,
            timestamp="2026-12-01T10:00:00Z")))
        assert start.id_tag_info["status"] == "Accepted"
        local_id = start.transaction_id
        assert local_id >= LOCAL_IDS
        await cp.call(meter(local_id, 150))
        hb = await cp.call(call.Heartbeat())
        assert hb.current_time.endswith("Z")
        told["local_id"] = local_id
        told["times"] = (t_boot, t_auth, t_start)
        runner.cancel()
        await ws.close()

    asyncio.run(outage())
    assert max(told["times"]) < 1.0, told["times"]  # at once, not after a timeout
    local_id = told["local_id"]

    broker.start()
    be2 = AnsweringBackend(broker.port, csms16(backend_tx), session=CSMS)
    try:
        start_up = be2.next_call("StartTransaction", timeout=20)
        assert start_up["LocalAnswer"]["transactionId"] == local_id
        meter_up = be2.next_call("MeterValues")
        assert meter_up["Payload"]["transactionId"] == 4711  # the backend's own id

        # Online again, transaction still running: a backend command naming 4711 reaches
        # the charge point as the local id, and the charger's StopTransaction goes up
        # with 4711.
        async def online_again():
            ws, cp, runner = await connect16(gw.url, "CP16")
            await asyncio.sleep(0.5)
            be2.publish("ocpp/cs/CP16", {"MessageTypeId": 2, "UniqueId": "rst-1",
                                         "Action": "RemoteStopTransaction",
                                         "Payload": {"transactionId": 4711}})
            assert await asyncio.get_running_loop().run_in_executor(
                None, lambda: CP16.remote_stops.get(timeout=10)) == local_id
            stop = await cp.call(call.StopTransaction(
                meter_stop=200, timestamp="2026-12-01T11:00:00Z",
                transaction_id=local_id, id_tag="TAG-OK"))
            assert stop.id_tag_info["status"] == "Accepted"  # the backend's own answer
            runner.cancel()
            await ws.close()

        asyncio.run(online_again())
        stop_up = be2.next_call("StopTransaction")
        assert stop_up["Payload"]["transactionId"] == 4711
        assert "LocalAnswer" not in stop_up  # answered by the backend itself
        wait_until(lambda: "transaction 4711 at the backend" in gw.log_text(),
                   what="the mapping log line")
    finally:
        be2.close()
        broker.stop()

    # Everything the charge point sent during the outage reached the backend once, in
    # order, each with the answer it was given; no CALL of the outage was forwarded twice.
    outage_calls = [b for b in be2.received()
                    if b["Action"] not in ("StopTransaction",)]
    actions = [b["Action"] for b in outage_calls]
    assert actions == ["BootNotification", "Authorize", "Authorize", "Authorize",
                       "StatusNotification", "StartTransaction", "MeterValues",
                       "Heartbeat"], actions
    assert all("LocalAnswer" in b for b in outage_calls)
    assert [b["LocalAnswer"]["idTagInfo"]["status"] for b in outage_calls
            if b["Action"] == "Authorize"] == ["Accepted", "Blocked", "Invalid"]
    ids = [b["UniqueId"] for b in be2.received()]
    assert len(ids) == len(set(ids))
    assert online_count == 3
    text = gw.log_text()
    assert "local mode ends: the backend is reachable again" in text
    # The backend's answers to the replayed CALLs were reconciled, not orphans.
    assert "matches no pending CALL" not in text
    assert "overrules the local answer" not in text  # the backend agreed on every tag


# -- a backend that overrules the cache ----------------------------------------------------

def test_backend_that_overrules_a_local_answer_is_logged_and_updates_the_cache(
        make_gateway, tmp_path):
    broker = Broker(tmp_path, persistence=True)
    broker.start()
    statuses = {"TAG-X": "Accepted"}

    def answer(action, p):
        if action == "Authorize":
            return {"idTagInfo": {"status": statuses[p["idTag"]]}}
        return {}

    be = AnsweringBackend(broker.port, answer)
    gw = make_gateway(broker.port, SLOW_RETRY + "ocpp.upstream.event_topic = "
                      "sys/${node}/clients/${cid}/${event}\n")
    gw.wait_log("subscribed to ocpp/cs/+")

    async def authorize(expect: str):
        ws, cp, runner = await connect16(gw.url, "CPX")
        result = await cp.call(call.Authorize(id_tag="TAG-X"))
        assert result.id_tag_info["status"] == expect
        runner.cancel()
        await ws.close()

    asyncio.run(authorize("Accepted"))  # learnt: Accepted
    time.sleep(1.5)
    broker.keep_session(CSMS, "ocpp/cp/#")
    broker.keep_session(EVENTS, "ocpp/sys/#")
    broker.stop()
    gw.wait_log("local mode: upstream link down")
    asyncio.run(authorize("Accepted"))  # from the cache
    statuses["TAG-X"] = "Blocked"  # meanwhile the backend blocked the tag
    be.close()
    broker.start()
    be2 = AnsweringBackend(broker.port, answer, session=CSMS)
    events = Backend(broker.port, subscribe="ocpp/sys/#", session=EVENTS)
    try:
        gw.wait_log("overrules the local answer", timeout=20)
        _, event = events.expect(where=lambda b: b.get("event") == "local_answer_overruled")
        assert event["clientid"] == "CPX" and event["action"] == "Authorize"
        assert "Blocked" in event["description"]
        asyncio.run(authorize("Blocked"))  # online: the backend answers
        broker.stop()
        gw.wait_log("local mode: upstream link down")
        asyncio.run(authorize("Blocked"))  # offline: the cache was corrected
    finally:
        events.close()
        be2.close()
        broker.stop()


# -- kill -9 mid-outage and mid-replay ---------------------------------------------------

def test_kill_9_mid_outage_and_mid_replay_changes_nothing(make_gateway, tmp_path):
    broker = broker_keeping_the_backlog(tmp_path)  # never up during the outage part
    gw = make_gateway(broker.port, SLOW_RETRY)
    state: dict = {}

    async def start_transaction():
        ws, cp, runner = await connect16(gw.url, "CPK")
        start = await cp.call(call.StartTransaction(
            connector_id=1, id_tag="TAG-OK", meter_start=0, timestamp="2026-12-01T10:00:00Z"))
        state["local_id"] = start.transaction_id
        await cp.call(meter(start.transaction_id, 10))
        runner.cancel()
        await ws.close()

    asyncio.run(start_transaction())
    gw.proc.send_signal(signal.SIGKILL)  # mid-outage, right after the answers
    gw.proc.wait()
    gw.start()

    async def continue_transaction():
        ws, cp, runner = await connect16(gw.url, "CPK")
        again = await cp.call(call.StartTransaction(  # a second session after the restart
            connector_id=2, id_tag="TAG-OK", meter_start=5, timestamp="2026-12-01T10:01:00Z"))
        state["second_id"] = again.transaction_id
        await cp.call(meter(state["local_id"], 20))
        await cp.call(call.StopTransaction(meter_stop=30, timestamp="2026-12-01T10:30:00Z",
                                           transaction_id=state["local_id"]))
        runner.cancel()
        await ws.close()

    asyncio.run(continue_transaction())
    assert state["second_id"] > state["local_id"]  # never handed out twice

    # Replay: the backend receives the first StartTransaction; the gateway is killed
    # before the backend answers; the backend answers after the restart (by hand, so
    # that a second copy of it, published again after the restart, gets no answer).
    silent_first = {"on": True}
    backend_tx: dict = {}
    answer16 = csms16(backend_tx)

    def answer(action, p):
        if action == "StartTransaction" and silent_first["on"]:
            return None
        return answer16(action, p)

    broker.start()
    be = AnsweringBackend(broker.port, answer, session=CSMS)
    try:
        first = be.next_call("StartTransaction", timeout=20)
        gw.proc.send_signal(signal.SIGKILL)  # mid-replay
        gw.proc.wait()
        gw.start()
        gw.wait_log("subscribed to ocpp/cs/+")
        be.publish("ocpp/cs/CPK", {"MessageTypeId": 3, "UniqueId": first["UniqueId"],
                                   "Payload": {"idTagInfo": {"status": "Accepted"},
                                               "transactionId": 9001}})
        wait_until(lambda: any(b["Action"] == "StopTransaction" for b in be.received()),
                   timeout=40, what="the StopTransaction replayed")
        time.sleep(1)
    finally:
        be.close()
        broker.stop()
    got = be.received()
    meters = [b["Payload"]["transactionId"] for b in got if b["Action"] == "MeterValues"]
    stops = [b["Payload"]["transactionId"] for b in got if b["Action"] == "StopTransaction"]
    assert set(meters) == {9001} and stops == [9001], (meters, stops)
    starts = [b for b in got if b["Action"] == "StartTransaction"]
    # The first StartTransaction may be published twice (at least once: the broker's
    # acknowledgement and the kill raced); the second is the second session's.
    assert {s["LocalAnswer"]["transactionId"] for s in starts} == {
        state["local_id"], state["second_id"]}
    order = [b["Action"] for b in got if b["Action"] != "StartTransaction"]
    assert order[-1] == "StopTransaction"
    assert len(meters) >= 2


# -- the broker is up, the backend silent ------------------------------------------------

def test_silent_backend_answer_after_then_at_once_until_heard(make_gateway, tmp_path):
    broker = Broker(tmp_path)
    broker.start()
    speak = {"on": False}

    def answer(action, p):
        return {"idTagInfo": {"status": "Accepted"}} if speak["on"] else None

    be = AnsweringBackend(broker.port, answer)
    status = Backend(broker.port, subscribe="ocpp/sys/+/status")
    admin_port = free_port()
    gw = make_gateway(broker.port, SLOW_RETRY + "ocpp.offline.answer_after = 2s\n"
                      "ocpp.upstream.status_topic = sys/${node}/status\n"
                      f"admin.listen = 127.0.0.1:{admin_port}\n")
    gw.wait_log("subscribed to ocpp/cs/+")

    def admin_status() -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/api/v1/status") as r:
            return json.load(r)

    def local_mode_published(value: bool):
        return status.expect(where=lambda b: b.get("local_mode") is value)[1]

    async def scenario():
        ws, cp, runner = await connect16(gw.url, "CPS")
        first, t1 = await timed(cp.call(call.Authorize(id_tag="TAG-S")))
        assert first.id_tag_info["status"] == "Invalid"  # unknown tag, backend silent
        assert 1.8 < t1 < 4, t1
        second, t2 = await timed(cp.call(call.Authorize(id_tag="TAG-S")))
        assert t2 < 1.0, t2  # local mode: at once
        # exposed: the retained status, the admin endpoint (ctl status)
        assert local_mode_published(True)["status"] == "online"
        local = admin_status()["local_mode"]
        assert (local["active"], local["reason"], local["answers"]) == (
            True, "backend silent", 2)
        speak["on"] = True
        # the backend answers the next one (and the replay is reconciled): heard again
        await asyncio.sleep(0.5)
        be.publish("ocpp/cs/CPS", {"MessageTypeId": 3,
                                   "UniqueId": be.next_call("Authorize")["UniqueId"],
                                   "Payload": {"idTagInfo": {"status": "Accepted"}}})
        await asyncio.sleep(0.5)
        third, t3 = await timed(cp.call(call.Authorize(id_tag="TAG-S")))
        assert third.id_tag_info["status"] == "Accepted"  # the backend's, forwarded
        assert local_mode_published(False)["status"] == "online"
        assert admin_status()["local_mode"]["active"] is False
        runner.cancel()
        await ws.close()

    try:
        asyncio.run(scenario())
    finally:
        status.close()
        be.close()
        broker.stop()
    text = gw.log_text()
    assert "local mode: backend silent" in text
    # once: the first connection after start-up is no end of a local mode
    assert text.count("local mode ends") == 1


def test_a_clean_stop_is_not_logged_as_local_mode(make_gateway, tmp_path):
    broker = Broker(tmp_path)
    broker.start()
    try:
        gw = make_gateway(broker.port)
        gw.wait_log("subscribed to ocpp/cs/+")
        assert gw.stop() == 0
    finally:
        broker.stop()
    text = gw.log_text()
    assert "MQTT disconnected" in text and "stopped" in text
    assert "local mode" not in text  # the gateway's own disconnect at shutdown is no outage


# -- a backend that never answers the replayed StartTransaction ----------------------------

def test_hold_timeout_publishes_with_the_local_id(make_gateway, tmp_path):
    broker = broker_keeping_the_backlog(tmp_path)
    gw = make_gateway(broker.port, SLOW_RETRY + "ocpp.offline.hold_timeout = 2s\n")
    ids: dict = {}

    async def outage():
        ws, cp, runner = await connect16(gw.url, "CPH")
        start = await cp.call(call.StartTransaction(
            connector_id=1, id_tag="T", meter_start=0, timestamp="2026-12-01T10:00:00Z"))
        ids["local"] = start.transaction_id
        await cp.call(meter(start.transaction_id, 1))
        await cp.call(call.Heartbeat())
        runner.cancel()
        await ws.close()

    asyncio.run(outage())
    # Started with the broker away: logged as local mode once that lasts (5 s).
    gw.wait_log("local mode: upstream link down", timeout=15)
    broker.start()
    be = AnsweringBackend(broker.port, lambda action, p: None, session=CSMS)  # silent
    try:
        be.next_call("StartTransaction", timeout=20)
        t0 = time.monotonic()
        mv = be.next_call("MeterValues", timeout=10)
        waited = time.monotonic() - t0
        hb = be.next_call("Heartbeat", timeout=5)
    finally:
        be.close()
        broker.stop()
    assert mv["Payload"]["transactionId"] == ids["local"]
    # held for hold_timeout (2 s) after the StartTransaction went out; measured from when
    # the backend got that, which may be a little after it went out
    assert 1.0 < waited < 6, waited
    assert hb["Action"] == "Heartbeat"  # behind it, in order
    assert "published with the local one" in gw.log_text()


# -- 2.0.1 --------------------------------------------------------------------------------

class CP201(ChargePoint201):
    pass


def test_charging_session_during_a_broker_outage_201(make_gateway, tmp_path):
    broker = Broker(tmp_path, persistence=True)
    broker.start()

    def answer(action, p):
        if action == "Authorize":
            ok = p["idToken"]["idToken"] == "OK-TOKEN"
            return {"idTokenInfo": {"status": "Accepted" if ok else "Invalid"}}
        if action == "BootNotification":
            return {"status": "Accepted", "interval": 120,
                    "currentTime": "2026-12-01T10:00:00Z"}
        return {}

    be = AnsweringBackend(broker.port, answer)
    gw = make_gateway(broker.port, SLOW_RETRY)
    gw.wait_log("subscribed to ocpp/cs/+")
    token = dt201.IdTokenType(id_token="OK-TOKEN", type="ISO14443")

    async def session(offline: bool):
        ws = await websockets.connect(f"{gw.url}/CP201", subprotocols=["ocpp2.0.1"])
        cp = CP201("CP201", ws, response_timeout=30)
        runner = asyncio.create_task(cp.start())
        boot, t_boot = await timed(cp.call(call201.BootNotification(
            charging_station={"model": "M", "vendor_name": "V"}, reason="PowerUp")))
        assert boot.status == "Accepted" and boot.interval == 120
        auth = await cp.call(call201.Authorize(id_token=token))
        assert auth.id_token_info["status"] == "Accepted"
        if offline:
            other = await cp.call(call201.Authorize(id_token=dt201.IdTokenType(
                id_token="STRANGER", type="ISO14443")))
            assert other.id_token_info["status"] == "Unknown"
            for seq, (event, trigger) in enumerate((("Started", "Authorized"),
                                                    ("Updated", "MeterValuePeriodic"),
                                                    ("Ended", "StopAuthorized"))):
                result, t = await timed(cp.call(call201.TransactionEvent(
                    event_type=event, timestamp="2026-12-01T10:00:00Z",
                    trigger_reason=trigger, seq_no=seq,
                    transaction_info={"transaction_id": "tx-201"},
                    id_token=token if event != "Updated" else None)))
                assert t < 1.0
                if event != "Updated":
                    assert result.id_token_info["status"] == "Accepted"
            assert t_boot < 1.0
        runner.cancel()
        await ws.close()

    asyncio.run(session(offline=False))
    time.sleep(1.5)
    broker.keep_session(CSMS, "ocpp/cp/#")
    broker.stop()
    gw.wait_log("local mode: upstream link down")
    be.close()
    asyncio.run(session(offline=True))
    broker.start()
    be2 = AnsweringBackend(broker.port, answer, session=CSMS)
    try:
        wait_until(lambda: sum(b["Action"] == "TransactionEvent" for b in be2.received()) == 3,
                   timeout=20, what="the three TransactionEvents")
        time.sleep(0.5)
    finally:
        be2.close()
        broker.stop()
    got = be2.received()
    assert [b["Action"] for b in got] == ["BootNotification", "Authorize", "Authorize",
                                          "TransactionEvent", "TransactionEvent",
                                          "TransactionEvent"]
    assert [b["Payload"]["eventType"] for b in got[3:]] == ["Started", "Updated", "Ended"]
    assert all("LocalAnswer" in b for b in got)
    assert got[0]["LocalAnswer"]["status"] == "Accepted"
    assert got[2]["LocalAnswer"]["idTokenInfo"]["status"] == "Unknown"


# -- what a review found: ids a charge point reuses, ids SQLite cannot store ---------------

async def rpc(ws, uid: str, action: str, payload: dict) -> list:
    await ws.send(json.dumps([2, uid, action, payload]))
    return json.loads(await asyncio.wait_for(ws.recv(), 5))


START16 = {"connectorId": 1, "idTag": "T", "meterStart": 0,
           "timestamp": "2026-12-01T10:00:00Z"}


def mv16(tid: int) -> dict:
    return {"connectorId": 1, "transactionId": tid, "meterValue": [
        {"timestamp": "2026-12-01T10:05:00Z", "sampledValue": [{"value": "1"}]}]}


def test_a_charge_point_that_restarts_its_ids_during_the_outage(make_gateway, tmp_path):
    broker = broker_keeping_the_backlog(tmp_path)
    gw = make_gateway(broker.port, SLOW_RETRY + "ocpp.offline.hold_timeout = 20s\n")
    ids: dict = {}

    async def outage():
        ws = await websockets.connect(f"{gw.url}/CPR", subprotocols=["ocpp1.6"])
        ids["local"] = (await rpc(ws, "1", "StartTransaction", START16))[2]["transactionId"]
        await rpc(ws, "2", "MeterValues", mv16(ids["local"]))
        await ws.close()
        ws = await websockets.connect(f"{gw.url}/CPR", subprotocols=["ocpp1.6"])  # reboot
        boot = await rpc(ws, "1", "BootNotification",
                         {"chargePointVendor": "V", "chargePointModel": "M"})
        assert boot[2]["status"] == "Pending"  # never accepted by the backend
        await rpc(ws, "3", "MeterValues", mv16(ids["local"]))
        await rpc(ws, "4", "StopTransaction", {"transactionId": ids["local"], "meterStop": 9,
                                               "timestamp": "2026-12-01T11:00:00Z"})
        await ws.close()

    asyncio.run(outage())
    broker.start()
    be = AnsweringBackend(broker.port, csms16({}), session=CSMS)
    try:
        t0 = time.monotonic()
        be.next_call("StopTransaction", timeout=30)
        took = time.monotonic() - t0
        time.sleep(0.5)
    finally:
        be.close()
        broker.stop()
    got = be.received()
    assert [(b["Action"], b["UniqueId"]) for b in got] == [
        ("StartTransaction", "1"), ("MeterValues", "2"), ("BootNotification", "1~2"),
        ("MeterValues", "3"), ("StopTransaction", "4")]
    assert [b["Payload"]["transactionId"] for b in got if "transactionId" in b["Payload"]
            and b["Action"] != "StartTransaction"] == [4711, 4711, 4711]
    assert took < 10  # no hold ran out
    text = gw.log_text()
    assert "published as 1~2" in text
    assert "matches no pending CALL" not in text


def test_a_lone_surrogate_in_an_id_tag_breaks_nothing(make_gateway, tmp_path):
    gw = make_gateway(Broker(tmp_path).port, SLOW_RETRY)  # the broker never comes

    async def run():
        a = await websockets.connect(f"{gw.url}/CPA", subprotocols=["ocpp1.6"])
        b = await websockets.connect(f"{gw.url}/CPB", subprotocols=["ocpp1.6"])
        assert (await rpc(b, "h0", "Heartbeat", {}))[0] == 3
        await a.send('[2,"1","Authorize",{"idTag":"\\ud800x"}]')
        answer = json.loads(await asyncio.wait_for(a.recv(), 5))
        assert answer[:2] == [3, "1"] and answer[2]["idTagInfo"]["status"] == "Invalid"
        assert (await rpc(b, "h1", "Heartbeat", {}))[0] == 3  # still served
        await a.close()
        await b.close()

    asyncio.run(run())
    assert gw.stop() == 0  # and the store closes cleanly


def test_an_id_reused_after_an_unanswered_replay_gets_the_live_answer(make_gateway, tmp_path):
    broker = broker_keeping_the_backlog(tmp_path)
    gw = make_gateway(broker.port, SLOW_RETRY)

    async def outage():
        ws = await websockets.connect(f"{gw.url}/CPU", subprotocols=["ocpp1.6"])
        await rpc(ws, "7", "Heartbeat", {})
        await ws.close()

    asyncio.run(outage())
    broker.start()
    # This backend never answers Heartbeats: the replayed one stays unanswered.
    be = AnsweringBackend(broker.port, lambda action, p: None if action == "Heartbeat"
                          else csms16({})(action, p), session=CSMS)
    try:
        be.next_call("Heartbeat", timeout=20)

        async def online():
            ws = await websockets.connect(f"{gw.url}/CPU", subprotocols=["ocpp1.6"])
            answer = await rpc(ws, "7", "Authorize", {"idTag": "TAG-OK"})
            await ws.close()
            return answer

        assert asyncio.run(online()) == [3, "7", {"idTagInfo": {"status": "Accepted"}}]
    finally:
        be.close()
        broker.stop()
    assert "UniqueId 7 used again" in gw.log_text()
