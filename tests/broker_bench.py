"""The figures of README "Supported brokers": round-trip latency and restart loss per broker.

    .venv/bin/python tests/broker_bench.py [--brokers mosquitto,mosquitto-nodelay,rabbitmq,nats]
        [--round-trips 200] [--restart-runs 5] [--kill-runs 2] [--json FILE]

For each broker a private instance (tests/brokers.py), a gateway process (``python -m
ocpp_edge``, this checkout) and a paho backend that answers every Heartbeat:

* **round trip**: a charge point sends ``[2,"<id>","Heartbeat",{}]`` over a raw WebSocket
  and waits for the CALLRESULT: CP → gateway → broker → backend → broker → gateway → CP,
  one at a time, 20 ms apart (back to back, the gateway's ``ocpp.max_message_rate`` of
  100 a second would pace them), ``--round-trips`` of them after 20 to warm up;
  p50/p90/p99 in ms.
* **restart loss**: ``restart_while_flowing`` (the scenario of
  tests/test_brokers.py::test_broker_restart_while_messages_flow): 500 Heartbeats a second,
  the broker stopped with SIGTERM and started again; once the gateway's buffer is empty
  (every message acknowledged by a broker), the messages the backend never received.
  ``--restart-runs`` runs with the backend connected throughout, as many with it away
  across the restart; ``--kill-runs`` with SIGKILL (a crash), backend connected and away.
  NATS runs with ``mqtt { ack_wait: "1s" }`` (``--nats-ack-wait``), so that a message it
  redelivers arrives within the 3 s the scenario waits (late, not lost).

``mosquitto-nodelay`` is Mosquitto with ``set_tcp_nodelay true``; ``mosquitto`` is
Debian's default (Nagle on). Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent))

from brokers import (  # noqa: E402
    BrokerBase,
    Client,
    Mosquitto,
    make_broker,
    restart_while_flowing,
)
from conftest import GatewayProcess, free_port  # noqa: E402


def responder(topic: str, body: dict):
    parts = topic.split("/")
    if len(parts) == 3 and parts[1] == "cp" and body.get("MessageTypeId") == 2:
        return (f"{parts[0]}/cs/{parts[2]}",
                {"MessageTypeId": 3, "UniqueId": body["UniqueId"],
                 "Payload": {"currentTime": "2026-12-04T06:00:00Z"}})
    return None


def make(name: str, workdir: Path, args) -> BrokerBase:
    if name == "mosquitto-nodelay":
        return Mosquitto(workdir, nodelay=True)
    if name == "nats" and args.nats_ack_wait:
        return make_broker(name, workdir, ack_wait=args.nats_ack_wait)
    return make_broker(name, workdir)


def gateway(broker: BrokerBase, workdir: Path, admin: int) -> GatewayProcess:
    workdir.mkdir()
    gw = GatewayProcess(workdir, broker.port, broker.gateway_settings()
                        + "ocpp.upstream_down_policy = buffer\nlog.level = info\n"
                        f"admin.listen = 127.0.0.1:{admin}\n").start()
    gw.wait_log("subscribed to", timeout=15)
    return gw


async def round_trips(url: str, n: int, warmup: int = 20, pause: float = 0.02) -> list[float]:
    times = []
    async with websockets.connect(url, subprotocols=["ocpp1.6"]) as ws:
        for i in range(warmup + n):
            await asyncio.sleep(pause)
            t = time.perf_counter()
            await ws.send(f'[2,"rt{i}","Heartbeat",{{}}]')
            reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
            dt = time.perf_counter() - t
            assert reply[:2] == [3, f"rt{i}"], reply
            if i >= warmup:
                times.append(dt * 1000)
    return times


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def bench(name: str, root: Path, args) -> dict:
    broker = make(name, root / name, args)
    t = time.monotonic()
    broker.start()
    result: dict = {"broker": name, "start_s": round(time.monotonic() - t, 1)}
    seq = iter(range(1000))
    try:
        admin = free_port()
        gw = gateway(broker, root / f"{name}-gw-rt", admin)
        backend = Client(broker, ["ocpp/cp/+"], answer=responder)
        try:
            rt = asyncio.run(round_trips(f"{gw.url}/RT1", args.round_trips))
        finally:
            backend.close()
            gw.stop()
        result["round_trip_ms"] = {"n": len(rt), "p50": round(pct(rt, 50), 2),
                                   "p90": round(pct(rt, 90), 2),
                                   "p99": round(pct(rt, 99), 2),
                                   "mean": round(statistics.fmean(rt), 2)}
        print(f"{name}: round trip {result['round_trip_ms']}", flush=True)
        runs = []
        for signal_name, count in (("SIGTERM", args.restart_runs), ("SIGKILL", args.kill_runs)):
            for away in (False, True):
                for _ in range(count):
                    admin = free_port()
                    i = next(seq)
                    gw = gateway(broker, root / f"{name}-gw-{i}", admin)
                    try:
                        t = time.monotonic()
                        flow = restart_while_flowing(broker, gw.url, admin, f"R{i}",
                                                     backend_away=away,
                                                     kill=signal_name == "SIGKILL")
                    finally:
                        gw.stop()
                    run = {"signal": signal_name, "backend": "away" if away else "connected",
                           "sent": len(flow.sent), "received": len(flow.got),
                           "duplicates": flow.duplicates, "lost": len(flow.lost),
                           "late": flow.late,
                           "lost_ids": flow.lost,
                           "lost_sent_ms_from_signal": flow.offsets_ms(flow.lost),
                           "in_order": flow.firsts == sorted(flow.firsts),
                           "stop_s": round(flow.stopped_at - flow.stop_at, 3),
                           "restart_s": round(flow.started_at - flow.stopped_at, 1),
                           "seconds": round(time.monotonic() - t, 1)}
                    runs.append(run)
                    print(f"{name}: {signal_name}, backend {run['backend']}: "
                          f"{flow.summary()}", flush=True)
        result["restarts"] = runs
    finally:
        broker.close()
    return result


def summary_rows(results: list[dict]) -> str:
    lines = ["| broker | round trip p50 / p90 / p99 (ms) | SIGTERM restart, backend "
             "connected: lost / runs | backend away | SIGKILL, connected | SIGKILL, away |",
             "|---|---|---|---|---|---|"]
    for r in results:
        rt = r["round_trip_ms"]
        cells = []
        for sig, be in (("SIGTERM", "connected"), ("SIGTERM", "away"),
                        ("SIGKILL", "connected"), ("SIGKILL", "away")):
            runs = [x for x in r["restarts"] if x["signal"] == sig and x["backend"] == be]
            if not runs:
                cells.append("–")
                continue
            lost = [x["lost"] for x in runs]
            sent = sum(x["sent"] for x in runs)
            cells.append(f"{sum(lost)} of {sent} ({'/'.join(map(str, lost))})")
        lines.append(f"| {r['broker']} | {rt['p50']} / {rt['p90']} / {rt['p99']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--brokers", default="mosquitto,mosquitto-nodelay,rabbitmq,nats")
    ap.add_argument("--round-trips", type=int, default=200)
    ap.add_argument("--restart-runs", type=int, default=5)
    ap.add_argument("--kill-runs", type=int, default=2)
    ap.add_argument("--nats-ack-wait", default="1s",
                    help="NATS mqtt.ack_wait (its default, 30s, delays redeliveries past "
                         "the 3 s the restart scenario waits for stragglers; '' keeps it)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="broker-bench-") as tmp:
        results = [bench(name, Path(tmp), args) for name in args.brokers.split(",")]
    print()
    print(summary_rows(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
