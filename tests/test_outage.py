"""Store and forward end to end (SPEC "When the upstream link is down"): a real gateway
process, a real Mosquitto the tests stop and start, the disk buffer on a real disk."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import pytest
import websockets
from conftest import Backend, Broker, tmpfs

SLOW_RETRY = "mqtt.reconnect_delay_min = 2s\nmqtt.reconnect_delay_max = 2s\n"
COLLECTOR = "test-collector"


def broker_keeping_the_backlog(tmp_path) -> Broker:
    """A broker, down, that keeps what the gateway publishes for ``collect``: the gateway
    replays its backlog the moment the broker is back, before a backend connecting only
    then could subscribe (conftest ``Broker.keep_session``)."""
    broker = Broker(tmp_path, persistence=True)
    broker.keep_session(COLLECTOR, "ocpp/#")
    return broker


def heartbeat(i: int) -> str:
    return f'[2,"h{i}","Heartbeat",{{}}]'


def meter_values(i: int) -> str:
    return (f'[2,"t{i}","MeterValues",{{"connectorId":1,"meterValue":[{{"timestamp":'
            f'"2026-11-22T10:00:00Z","sampledValue":[{{"value":"{i}"}}]}}]}}]')


async def send_all(url: str, frames: list[str], pause: float = 0.0) -> None:
    async with websockets.connect(url, subprotocols=["ocpp1.6"]) as ws:
        for frame in frames:
            await ws.send(frame)
            if pause:
                await asyncio.sleep(pause)
        await asyncio.sleep(0.5)  # past the group commit


def collect(broker: Broker, topic: str, count: int, timeout: float = 30) -> list[str]:
    be = Backend(broker.port, session=COLLECTOR)
    try:
        return [be.expect(topic, timeout)[1]["UniqueId"] for _ in range(count)]
    finally:
        be.close()


def test_kill_9_loses_nothing_committed(make_gateway, tmp_path):
    broker = broker_keeping_the_backlog(tmp_path)  # down: everything accumulates on disk
    gw = make_gateway(broker.port, SLOW_RETRY + "buffer.fsync_interval = 50ms\n"
                      # a frame every 2 ms: read at once, not paced by the rate limit
                      "ocpp.max_message_rate = 0\n")
    sent_at: list[float] = []

    async def stream():
        async with websockets.connect(f"{gw.url}/K9", subprotocols=["ocpp1.6"]) as ws:
            for i in range(400):
                await ws.send(heartbeat(i))
                sent_at.append(time.monotonic())
                if i == 300:
                    gw.proc.send_signal(signal.SIGKILL)  # mid-stream, no warning
                    killed = time.monotonic()
                await asyncio.sleep(0.002)
        return killed

    try:
        killed = asyncio.run(stream())
    except websockets.ConnectionClosed:
        killed = time.monotonic()
    gw.proc.wait()
    committed = [i for i, t in enumerate(sent_at) if t < killed - 0.3]  # older than 6 commits
    gw.start()  # same buffer directory
    broker.start()
    try:
        got = collect(broker, "ocpp/cp/K9", len(committed))
    finally:
        broker.stop()
    assert got == [f"h{i}" for i in committed]  # all of them, in order, none twice
    assert len(committed) > 100  # the test did exercise a stream


def test_close_stations_policy(make_gateway, tmp_path):
    broker = Broker(tmp_path)
    gw = make_gateway(broker.port, "ocpp.upstream_down_policy = close_stations\n")

    async def try_connect():
        async with websockets.connect(f"{gw.url}/LC1", subprotocols=["ocpp1.6"]) as ws:
            return ws

    with pytest.raises(websockets.InvalidStatus) as info:  # broker never seen yet: refused
        asyncio.run(try_connect())
    assert info.value.response.status_code == 503
    broker.start()
    gw.wait_log("subscribed to")

    async def connected_then_dropped():
        async with websockets.connect(f"{gw.url}/LC1", subprotocols=["ocpp1.6"]) as ws:
            broker.stop()
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 20)
            return closed.value.rcvd

    rcvd = asyncio.run(connected_then_dropped())
    assert (rcvd.code, rcvd.reason) == (1013, "upstream link down")


@pytest.mark.parametrize("policy,expected_heartbeats", [
    ("drop_oldest", [f"h{i}" for i in range(14, 20)]),
    ("drop_newest", [f"h{i}" for i in range(6)]),
])
def test_overflow_policies_keep_transactions(make_gateway, tmp_path, policy,
                                             expected_heartbeats):
    broker = broker_keeping_the_backlog(tmp_path)
    gw = make_gateway(broker.port, SLOW_RETRY + f"buffer.max_messages = 10\n"
                                                f"buffer.overflow = {policy}\n")
    frames = [meter_values(i) for i in range(4)] + [heartbeat(i) for i in range(20)]
    asyncio.run(send_all(f"{gw.url}/OV", frames))
    gw.wait_log("upstream buffer full")
    broker.start()
    try:
        got = collect(broker, "ocpp/cp/OV", 10)
    finally:
        broker.stop()
    assert got == [f"t{i}" for i in range(4)] + expected_heartbeats


def test_full_filesystem_is_survived(make_gateway, tmp_path):
    with tmpfs(tmp_path / "tiny", "1m") as mnt:
        broker = broker_keeping_the_backlog(tmp_path)
        gw = make_gateway(broker.port, SLOW_RETRY + f"buffer.dir = {mnt}\n")
        big = "x" * 2000
        frames = [f'[2,"d{i}","DataTransfer",{{"vendorId":"V","data":"{big}"}}]'
                  for i in range(1500)]  # 3 MB into 1 MB
        asyncio.run(send_all(f"{gw.url}/FULL", frames))
        gw.wait_log("cannot write")
        assert gw.proc.poll() is None  # still running

        async def still_served():
            async with websockets.connect(f"{gw.url}/FULL", subprotocols=["ocpp1.6"]) as ws:
                await ws.send("garbage")
                return json.loads(await asyncio.wait_for(ws.recv(), 5))[0]

        assert asyncio.run(still_served()) == 4
        broker.start()
        try:
            got = collect(broker, "ocpp/cp/FULL", 50)
        finally:
            broker.stop()
        gw.stop()  # before the file system goes away
        ids = [int(u[1:]) for u in got]
        assert ids == sorted(ids)  # what was kept goes out in order
