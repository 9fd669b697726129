"""Call discipline and schema checking end to end (SPEC "Call discipline", "Downstream"):
the ``ocpp`` library as charge point (1.6 and 2.0.1), a paho backend, a real Mosquitto."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets
from ocpp.exceptions import InternalError
from ocpp.routing import on
from ocpp.v16 import ChargePoint as ChargePoint16
from ocpp.v16 import call as call16
from ocpp.v16 import call_result as result16
from ocpp.v201 import ChargePoint as ChargePoint201
from ocpp.v201 import call as call201

# The buffer policy: an unanswered CALL times out with a CALLERROR (SPEC "Call
# discipline"); what the local policy answers instead is tests/test_offline.py's.
TIMEOUTS = ("ocpp.upstream.awaiting_timeout = 1s\n"
            "ocpp.dnstream.awaiting_timeout = 1s\n"
            "ocpp.upstream_down_policy = buffer\n")
NOW = "2026-11-22T10:00:00Z"


async def in_thread(fn, *args, **kwargs):
    return await asyncio.get_running_loop().run_in_executor(None, lambda: fn(*args, **kwargs))


@pytest.fixture
def gw(make_gateway, broker):
    g = make_gateway(broker.port, TIMEOUTS)
    g.wait_log("subscribed to ocpp/cs/+")
    return g


class Silent16(ChargePoint16):
    """Answers RemoteStartTransaction; never answers Reset (no handler → NotImplemented),
    so tests use raw sockets when they need true silence."""

    @on("RemoteStartTransaction")
    async def on_remote_start(self, id_tag, **kwargs):
        return result16.RemoteStartTransaction(status="Accepted")


def test_backend_silent_charge_point_gets_callerror_after_timeout(gw, backend):
    async def scenario():
        async with websockets.connect(f"{gw.url}/CPT1", subprotocols=["ocpp1.6"]) as ws:
            cp = Silent16("CPT1", ws, response_timeout=10)
            runner = asyncio.create_task(cp.start())
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(InternalError) as info:
                await cp.call(call16.Heartbeat(), suppress=False)
            waited = loop.time() - start
            runner.cancel()
            return info.value, waited

    error, waited = asyncio.run(scenario())
    assert "no answer from the central system within 1 s" in str(error)
    assert 0.9 <= waited < 5
    backend.expect("ocpp/cp/CPT1")  # the CALL itself did go up


def test_late_backend_answer_is_dropped(gw, backend):
    async def scenario():
        async with websockets.connect(f"{gw.url}/CPT2", subprotocols=["ocpp1.6"]) as ws:
            await ws.send('[2,"h1","Heartbeat",{}]')
            err = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert err[:3] == [4, "h1", "InternalError"]
            await in_thread(backend.publish, "ocpp/cs/CPT2", {
                "MessageTypeId": 3, "UniqueId": "h1", "Payload": {"currentTime": NOW}})
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(ws.recv(), 1)

    asyncio.run(scenario())
    gw.wait_log("backend reply h1 matches no pending CALL; dropped")


def test_charge_point_silent_backend_gets_callerror_and_queue_moves_on(gw, backend):
    async def scenario():
        async with websockets.connect(f"{gw.url}/CPT3", subprotocols=["ocpp1.6"]) as ws:
            for uid in ("q1", "q2"):
                await in_thread(backend.publish, "ocpp/cs/CPT3", {
                    "MessageTypeId": 2, "UniqueId": uid, "Action": "ClearCache",
                    "Payload": {}})
            first = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert first == [2, "q1", "ClearCache", {}]
            # one CALL in flight at a time: q2 waits until q1 times out (OCPP-J §4.1.1)
            _, err = await in_thread(backend.expect, "ocpp/cp/CPT3/Reply")
            assert err["MessageTypeId"] == 4 and err["UniqueId"] == "q1"
            assert err["Action"] == "ClearCache" and "did not answer" in err["ErrorDescription"]
            second = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert second == [2, "q2", "ClearCache", {}]
            await ws.send('[3,"q2",{"status":"Accepted"}]')
            _, ok = await in_thread(backend.expect, "ocpp/cp/CPT3/Reply")
            assert ok == {"MessageTypeId": 3, "UniqueId": "q2", "Payload": {"status": "Accepted"},
                          "Action": "ClearCache"}

    asyncio.run(scenario())


def test_pending_downstream_call_answered_when_charge_point_disconnects(gw, backend):
    async def scenario():
        async with websockets.connect(f"{gw.url}/CPT4", subprotocols=["ocpp1.6"]) as ws:
            await in_thread(backend.publish, "ocpp/cs/CPT4", {
                "MessageTypeId": 2, "UniqueId": "d1", "Action": "ClearCache", "Payload": {}})
            await asyncio.wait_for(ws.recv(), 5)

    asyncio.run(scenario())
    _, err = backend.expect("ocpp/cp/CPT4/Reply")
    assert err["UniqueId"] == "d1" and "disconnected" in err["ErrorDescription"]


class TestSchemaChecking:
    def test_invalid_call_from_charge_point(self, gw, backend):
        async def scenario():
            async with websockets.connect(f"{gw.url}/CPS1", subprotocols=["ocpp1.6"]) as ws:
                sends = [
                    '[2,"s1","BootNotification",{"chargePointVendor":"V"}]',
                    '[2,"s2","BootNotification",{"chargePointVendor":5,'
                    '"chargePointModel":"M"}]',
                    '[2,"s3","StatusNotification",{"connectorId":1,"errorCode":"NoError",'
                    '"status":"Bogus"}]',
                    '[2,"s4","FlyToTheMoon",{}]',
                ]
                out = []
                for frame in sends:
                    await ws.send(frame)
                    out.append(json.loads(await asyncio.wait_for(ws.recv(), 5)))
                return out

        got = asyncio.run(scenario())
        assert got == [
            [4, "s1", "OccurenceConstraintViolation",
             "BootNotification: required property 'chargePointModel' is missing", {}],
            [4, "s2", "TypeConstraintViolation",
             "BootNotification: 'chargePointVendor' must be of type string", {}],
            [4, "s3", "PropertyConstraintViolation", got[2][3], {}],
            [4, "s4", "NotImplemented", "FlyToTheMoon is not an action of ocpp1.6", {}],
        ]
        assert "'status' violates enum" in got[2][3]
        assert backend.nothing_on("ocpp/cp/CPS1", 0.5) == []  # none went upstream

    def test_invalid_downstream_call_is_not_sent(self, gw, backend):
        async def scenario():
            async with websockets.connect(f"{gw.url}/CPS2", subprotocols=["ocpp1.6"]) as ws:
                await in_thread(backend.publish, "ocpp/cs/CPS2", {
                    "MessageTypeId": 2, "UniqueId": "x1", "Action": "Reset",
                    "Payload": {"type": "Sideways"}})
                _, err = await in_thread(backend.expect, "ocpp/cp/CPS2/Reply")
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(ws.recv(), 0.5)
                return err

        err = asyncio.run(scenario())
        assert err["UniqueId"] == "x1" and err["ErrorCode"] == "PropertyConstraintViolation"
        assert err["Action"] == "Reset" and "not sent to the charge point" in \
            err["ErrorDescription"]

    def test_invalid_callresult_from_charge_point_reported_upstream(self, gw, backend):
        async def scenario():
            async with websockets.connect(f"{gw.url}/CPS3", subprotocols=["ocpp1.6"]) as ws:
                await in_thread(backend.publish, "ocpp/cs/CPS3", {
                    "MessageTypeId": 2, "UniqueId": "x2", "Action": "Reset",
                    "Payload": {"type": "Soft"}})
                await asyncio.wait_for(ws.recv(), 5)
                await ws.send('[3,"x2",{"status":"Maybe"}]')
                return (await in_thread(backend.expect, "ocpp/cp/CPS3/Reply"))[1]

        err = asyncio.run(scenario())
        assert err["MessageTypeId"] == 4 and err["UniqueId"] == "x2"
        assert err["ErrorCode"] == "PropertyConstraintViolation"
        assert err["ErrorDetails"] == {"Payload": {"status": "Maybe"}}

    def test_invalid_backend_reply_answers_both(self, gw, backend):
        async def scenario():
            async with websockets.connect(f"{gw.url}/CPS4", subprotocols=["ocpp1.6"]) as ws:
                await ws.send('[2,"a1","Authorize",{"idTag":"T"}]')
                await in_thread(backend.expect, "ocpp/cp/CPS4")
                await in_thread(backend.publish, "ocpp/cs/CPS4", {
                    "MessageTypeId": 3, "UniqueId": "a1",
                    "Payload": {"idTagInfo": {"status": "Fine"}}})
                to_cp = json.loads(await asyncio.wait_for(ws.recv(), 5))
                _, to_be = await in_thread(backend.expect, "ocpp/cp/CPS4/Reply")
                return to_cp, to_be

        to_cp, to_be = asyncio.run(scenario())
        assert to_cp[:3] == [4, "a1", "InternalError"]
        assert to_be["UniqueId"] == "a1" and to_be["ErrorCode"] == "PropertyConstraintViolation"


def test_ocpp201_boot_and_error_spelling(gw, backend):
    async def scenario():
        async with websockets.connect(f"{gw.url}/CP201", subprotocols=["ocpp2.0.1"]) as ws:
            assert ws.subprotocol == "ocpp2.0.1"
            cp = ChargePoint201("CP201", ws, response_timeout=10)
            runner = asyncio.create_task(cp.start())
            boot = asyncio.create_task(cp.call(call201.BootNotification(
                charging_station={"model": "M1", "vendor_name": "V1"}, reason="PowerUp")))
            topic, up = await in_thread(backend.expect, "ocpp/cp/CP201")
            assert up["Action"] == "BootNotification"
            assert up["Payload"]["chargingStation"] == {"model": "M1", "vendorName": "V1"}
            await in_thread(backend.publish, "ocpp/cs/CP201", {
                "MessageTypeId": 3, "UniqueId": up["UniqueId"],
                "Payload": {"currentTime": NOW, "interval": 300, "status": "Accepted"}})
            result = await asyncio.wait_for(boot, 10)
            assert result.status == "Accepted"
            runner.cancel()
        async with websockets.connect(f"{gw.url}/CP201B", subprotocols=["ocpp2.0.1"]) as ws:
            await ws.send('[2,"z","BootNotification",{"reason":"PowerUp"}]')
            return json.loads(await asyncio.wait_for(ws.recv(), 5))

    err = asyncio.run(scenario())
    assert err[:3] == [4, "z", "OccurrenceConstraintViolation"]  # the 2.x spelling


def test_same_unique_ids_on_two_charge_points_do_not_interfere(gw, backend):
    async def scenario():
        async with websockets.connect(f"{gw.url}/U1", subprotocols=["ocpp1.6"]) as a, \
                websockets.connect(f"{gw.url}/U2", subprotocols=["ocpp1.6"]) as b:
            for ws in (a, b):
                await ws.send('[2,"1","Heartbeat",{}]')
            for _ in range(2):
                await in_thread(backend.expect, None)
            # answer U2 first, then U1: each gets its own
            for cid, when in (("U2", "2026-11-22T10:00:02Z"), ("U1", "2026-11-22T10:00:01Z")):
                await in_thread(backend.publish, f"ocpp/cs/{cid}", {
                    "MessageTypeId": 3, "UniqueId": "1", "Payload": {"currentTime": when}})
            got_b = json.loads(await asyncio.wait_for(b.recv(), 5))
            got_a = json.loads(await asyncio.wait_for(a.recv(), 5))
            return got_a, got_b

    got_a, got_b = asyncio.run(scenario())
    assert got_a == [3, "1", {"currentTime": "2026-11-22T10:00:01Z"}]
    assert got_b == [3, "1", {"currentTime": "2026-11-22T10:00:02Z"}]
