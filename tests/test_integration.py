"""End to end: a charge point built on the PyPI ``ocpp`` library, the gateway process, a
real Mosquitto, and a paho backend — the worked example of README "Topics and payloads"."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import websockets
from conftest import Backend, GatewayProcess
from ocpp.routing import on
from ocpp.v16 import ChargePoint as ChargePoint16
from ocpp.v16 import call, call_result
from ocpp.v16.enums import RegistrationStatus

# Retries 1–2 s apart: after the broker (re)starts, the test's backend subscribes well
# before the gateway's next attempt, so it sees the whole backlog.
SLOW_RETRY = "mqtt.reconnect_delay_min = 2s\nmqtt.reconnect_delay_max = 2s\n"


class ChargePoint(ChargePoint16):
    @on("RemoteStartTransaction")
    async def on_remote_start(self, id_tag, **kwargs):
        return call_result.RemoteStartTransaction(status="Accepted")


async def in_thread(fn, *args, **kwargs):
    return await asyncio.get_running_loop().run_in_executor(None, lambda: fn(*args, **kwargs))


def test_boot_notification_and_remote_start_through_mosquitto(gateway: GatewayProcess,
                                                              backend: Backend):
    async def scenario():
        async with websockets.connect(f"{gateway.url}/CP001",
                                      subprotocols=["ocpp1.6"]) as ws:
            assert ws.subprotocol == "ocpp1.6"
            cp = ChargePoint("CP001", ws, response_timeout=10)
            runner = asyncio.create_task(cp.start())

            boot = asyncio.create_task(cp.call(call.BootNotification(
                charge_point_model="Optimus", charge_point_vendor="The Mobility House")))
            topic, up = await in_thread(backend.expect, "ocpp/cp/CP001")
            assert up["MessageTypeId"] == 2
            assert up["Action"] == "BootNotification"
            assert up["Payload"] == {"chargePointModel": "Optimus",
                                     "chargePointVendor": "The Mobility House"}
            assert isinstance(up["UniqueId"], str)
            await in_thread(backend.publish, "ocpp/cs/CP001", {
                "MessageTypeId": 3, "UniqueId": up["UniqueId"],
                "Payload": {"currentTime": "2026-11-22T10:00:00Z", "interval": 300,
                            "status": "Accepted"}})
            result = await asyncio.wait_for(boot, 10)
            assert result.status == RegistrationStatus.accepted
            assert result.interval == 300

            # The backend's command reaches the charge point; its reply comes back up.
            await in_thread(backend.publish, "ocpp/cs/CP001", {
                "MessageTypeId": 2, "UniqueId": "rs-1", "Action": "RemoteStartTransaction",
                "Payload": {"idTag": "TAG01", "connectorId": 1}})
            topic, reply = await in_thread(backend.expect, "ocpp/cp/CP001/Reply")
            assert reply == {"MessageTypeId": 3, "UniqueId": "rs-1",
                             "Payload": {"status": "Accepted"},
                             "Action": "RemoteStartTransaction"}
            runner.cancel()

    asyncio.run(scenario())


async def _raw(url: str, frames: list[str], expect: int = 1, protocol: str = "ocpp1.6"):
    async with websockets.connect(url, subprotocols=[protocol]) as ws:
        got = []
        for frame in frames:
            await ws.send(frame)
        for _ in range(expect):
            got.append(json.loads(await asyncio.wait_for(ws.recv(), 5)))
        return got


def test_malformed_frames_are_answered_and_never_published(gateway, backend):
    frames = ["not json", '{"a":1}', '[2,"x"]', '[2,"' + "i" * 37 + '","Heartbeat",{}]',
              '[9,"t9",{}]', '[2,"a9",7,{}]', '[2,"p9","Heartbeat",[]]']
    got = asyncio.run(_raw(f"{gateway.url}/CPBAD", frames, expect=len(frames)))
    assert [g[:3] for g in got] == [
        [4, "-1", "FormationViolation"], [4, "-1", "FormationViolation"],
        [4, "x", "FormationViolation"], [4, "-1", "FormationViolation"],
        [4, "t9", "FormationViolation"], [4, "a9", "FormationViolation"],
        [4, "p9", "FormationViolation"]]
    assert all(isinstance(g[3], str) and g[4] == {} for g in got)
    assert backend.nothing_on("ocpp/cp/CPBAD", 0.5) == []


def test_malformed_frames_in_201_use_201_codes(gateway, backend):
    got = asyncio.run(_raw(f"{gateway.url}/CP2", ["nope", '[7,"u",{}]'], expect=2,
                           protocol="ocpp2.0.1"))
    assert [g[:3] for g in got] == [[4, "-1", "RpcFrameworkError"],
                                    [4, "u", "MessageTypeNotSupported"]]


def test_downstream_for_unknown_charge_point_is_answered(gateway, backend):
    backend.publish("ocpp/cs/NOBODY", {"MessageTypeId": 2, "UniqueId": "q1",
                                       "Action": "Reset", "Payload": {"type": "Soft"}})
    _, err = backend.expect("ocpp/cp/NOBODY/Reply")
    assert err["MessageTypeId"] == 4 and err["UniqueId"] == "q1"
    assert err["Action"] == "Reset"
    assert "not connected" in err["ErrorDescription"]


def test_malformed_downstream_is_answered_on_the_error_topic(gateway, backend):
    backend.publish("ocpp/cs/CPX", {"MessageTypeId": 2, "UniqueId": "m1", "Payload": {}})
    _, err = backend.expect("ocpp/cp/CPX/Reply")
    assert err["UniqueId"] == "m1" and err["ErrorCode"] == "FormationViolation"
    assert "Action" in err["ErrorDescription"]
    backend.publish("ocpp/cs/CPX", b"\x00not json")
    gateway.wait_log("malformed downstream message")


def test_two_charge_points_are_routed_by_id(gateway, backend):
    async def scenario():
        async with websockets.connect(f"{gateway.url}/A", subprotocols=["ocpp1.6"]) as a, \
                websockets.connect(f"{gateway.url}/B", subprotocols=["ocpp1.6"]) as b:
            await a.send('[2,"same","Heartbeat",{}]')
            await b.send('[2,"same","Heartbeat",{}]')
            seen = {(await in_thread(backend.expect, None))[0] for _ in range(2)}
            assert seen == {"ocpp/cp/A", "ocpp/cp/B"}
            await in_thread(backend.publish, "ocpp/cs/B", {
                "MessageTypeId": 3, "UniqueId": "same",
                "Payload": {"currentTime": "2026-11-22T10:00:00Z"}})
            assert json.loads(await asyncio.wait_for(b.recv(), 5)) == [
                3, "same", {"currentTime": "2026-11-22T10:00:00Z"}]
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(a.recv(), 0.5)

    asyncio.run(scenario())


def test_gateway_runs_without_broker_and_delivers_once_it_appears(make_gateway, tmp_path):
    from conftest import Broker

    broker = Broker(tmp_path, persistence=True)  # port reserved, not started
    # the broker keeps for the backend what the gateway replays before it subscribes
    broker.keep_session("test-backend", "ocpp/#")
    gw = make_gateway(broker.port, SLOW_RETRY)

    async def send_while_down():
        async with websockets.connect(f"{gw.url}/CPOFF", subprotocols=["ocpp1.6"]) as ws:
            for i in range(5):
                await ws.send(f'[2,"m{i}","Heartbeat",{{}}]')
            await asyncio.sleep(0.3)  # still connected, still served

    asyncio.run(send_while_down())
    gw.wait_log("cannot reach")
    broker.start()
    try:
        be = Backend(broker.port, session="test-backend")
        try:
            ids = [be.expect("ocpp/cp/CPOFF", timeout=15)[1]["UniqueId"] for _ in range(5)]
            assert ids == [f"m{i}" for i in range(5)]  # all of them, in order
        finally:
            be.close()
    finally:
        broker.stop()


def test_daemon_is_single_threaded(gateway, backend):
    # paho runs on the IOLoop: no loop_start() thread, no resolver threads.
    asyncio.run(_raw(f"{gateway.url}/T1", ['[2,"1","Heartbeat",{}]'], expect=0))
    backend.expect("ocpp/cp/T1")
    time.sleep(0.2)
    status = open(f"/proc/{gateway.proc.pid}/status").read()
    threads = [line for line in status.splitlines() if line.startswith("Threads:")]
    assert threads == ["Threads:\t1"], threads


def test_broker_outage_mid_stream_loses_nothing_and_keeps_order(make_gateway, tmp_path):
    from conftest import Broker

    broker = Broker(tmp_path, persistence=True)
    broker.start()
    # The buffer policy: during the outage nothing answers the Heartbeats, so the next
    # frame is the error (the local policy's answers: tests/test_offline.py).
    gw = make_gateway(broker.port, SLOW_RETRY + "ocpp.upstream_down_policy = buffer\n")
    gw.wait_log("subscribed to")
    be = Backend(broker.port)

    async def send(ws, first, last):
        for i in range(first, last):
            await ws.send(f'[2,"m{i}","Heartbeat",{{}}]')
        await asyncio.sleep(0.2)

    async def scenario():
        async with websockets.connect(f"{gw.url}/OUT", subprotocols=["ocpp1.6"]) as ws:
            await send(ws, 0, 20)
            ids = [be.expect("ocpp/cp/OUT")[1]["UniqueId"] for _ in range(20)]
            assert ids == [f"m{i}" for i in range(20)]
            be.close()
            broker.keep_session("test-backend", "ocpp/#")  # the replay waits there for be2
            broker.stop()
            await send(ws, 20, 50)  # the charge point is still served while the broker is away
            await ws.send("garbage")
            assert json.loads(await asyncio.wait_for(ws.recv(), 5))[0] == 4
            broker.start()
            be2 = Backend(broker.port, session="test-backend")
            try:
                got = [(await in_thread(be2.expect, "ocpp/cp/OUT", 20))[1]["UniqueId"]
                       for _ in range(30)]
            finally:
                be2.close()
            assert got == [f"m{i}" for i in range(20, 50)]

    try:
        asyncio.run(scenario())
    finally:
        broker.stop()
    assert "MQTT connection to 127.0.0.1" in gw.log_text() and "lost" in gw.log_text()
