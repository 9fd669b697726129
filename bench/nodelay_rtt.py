"""Round trip through the gateway with Mosquitto's Nagle on and off (README "Broker
settings", issue 16 failure 5), for MQTT 3.1.1 and 5.

For each combination this starts a private Mosquitto (``set_tcp_nodelay true`` or
Debian's stock setting, i.e. none), ``python -m ocpp_edge`` from this tree, a paho backend
that answers every CALL at once (paho sets no TCP_NODELAY, like most backends), and one
charge point that sends ``--calls`` Heartbeats one after the other; the round trip is
from the charge point's send to its receipt of the answer. Prints one markdown table.

    .venv/bin/python bench/nodelay_rtt.py [--calls 400] [--mosquitto /usr/sbin/mosquitto]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import harness as h
import paho.mqtt
import paho.mqtt.client as mqtt
from harness import ROOT
from tornado.websocket import websocket_connect


def wait_port(port: int) -> None:
    if not h.wait_port(port, 10.0):
        raise TimeoutError(f"nothing on port {port}")


class Backend:
    """Answers every CALL on ocpp/cp/+ with an empty-ish CALLRESULT on ocpp/cs/<id>."""

    def __init__(self, port: int, protocol: int) -> None:
        kw = {"client_id": f"bench-backend-{os.getpid()}", "protocol": protocol}
        self.client = (mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **kw)
                       if hasattr(mqtt, "CallbackAPIVersion") else mqtt.Client(**kw))
        ready = threading.Event()
        self.client.on_message = self._answer
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe("ocpp/cp/+", 1)
        if not ready.wait(5):
            raise RuntimeError("backend not subscribed")

    def _answer(self, client, userdata, msg) -> None:
        body = json.loads(msg.payload)
        if body.get("MessageTypeId") == 2:
            cid = msg.topic.rsplit("/", 1)[1]
            client.publish(f"ocpp/cs/{cid}", json.dumps({
                "MessageTypeId": 3, "UniqueId": body["UniqueId"],
                "Payload": {"currentTime": "2026-12-01T00:00:00Z"}}), qos=1)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


async def charge_point(url: str, calls: int) -> list[float]:
    ws = await websocket_connect(url, subprotocols=["ocpp1.6"])
    rtts = []
    for i in range(calls + 20):  # the first 20: warm-up
        t0 = time.perf_counter()
        await ws.write_message(json.dumps([2, f"h{i}", "Heartbeat", {}]))
        answer = json.loads(await asyncio.wait_for(ws.read_message(), 10))
        assert answer[:2] == [3, f"h{i}"], answer
        if i >= 20:
            rtts.append((time.perf_counter() - t0) * 1000)
        await asyncio.sleep(0.01)  # a charge point is not a closed loop
    ws.close()
    return rtts


def run(mosquitto: str, nodelay: bool, protocol: str, calls: int, work: str) -> list[float]:
    mport, wsport = h.free_port(), h.free_port()
    conf = os.path.join(work, f"mosquitto-{mport}.conf")
    with open(conf, "w") as f:
        f.write(f"listener {mport} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                + ("set_tcp_nodelay true\n" if nodelay else ""))
    gwconf = os.path.join(work, f"gw-{wsport}.conf")
    with open(gwconf, "w") as f:
        f.write(f"ocpp.listener.ws = 127.0.0.1:{wsport}\n"
                f"mqtt.server = mqtt://127.0.0.1:{mport}\n"
                f"mqtt.client_id = bench-gw-{wsport}\n"
                + (f"mqtt.protocol = {protocol}\n" if protocol != "3.1.1" else "")
                + f"buffer.dir = {work}/buffer-{wsport}\nauth.allow_anonymous = true\n"
                "auth.password_file =\nadmin.listen = off\n"
                "ocpp.upstream.status_topic = off\nocpp.upstream.event_topic = off\n"
                "log.level = warning\n")
    procs = []
    backend = None
    try:
        procs.append(subprocess.Popen([mosquitto, "-c", conf], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        wait_port(mport)
        env = dict(os.environ, PYTHONPATH=ROOT)
        procs.append(subprocess.Popen([sys.executable, "-m", "ocpp_edge", "--config", gwconf],
                                      env=env, stdout=subprocess.DEVNULL,
                                      stderr=open(os.path.join(work, f"gw-{wsport}.log"), "w")))
        wait_port(wsport)
        backend = Backend(mport, mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311)
        time.sleep(0.5)  # the gateway has connected and subscribed
        return asyncio.run(charge_point(f"ws://127.0.0.1:{wsport}/ocpp/CP1", calls))
    finally:
        if backend is not None:
            backend.close()
        for p in reversed(procs):
            p.terminate()
            p.wait(10)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--mosquitto", default=shutil.which("mosquitto") or "/usr/sbin/mosquitto")
    ap.add_argument("--protocols", default="3.1.1,5",
                    help="MQTT versions, comma-separated (a gateway before issue 16: 3.1.1)")
    args = ap.parse_args()
    version = subprocess.run([args.mosquitto, "-h"], capture_output=True, text=True)
    print(f"# {version.stdout.splitlines()[0]}, paho {paho.mqtt.__version__}, "
          f"{args.calls} Heartbeats one at a time, 10 ms apart\n")
    print("| Mosquitto set_tcp_nodelay | MQTT | p50 ms | p90 ms | p99 ms |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="nodelay-rtt-") as work:
        for nodelay in (False, True):
            for protocol in args.protocols.split(","):
                rtts = run(args.mosquitto, nodelay, protocol, args.calls, work)
                print(f"| {'true' if nodelay else 'false (Debian default)'} | {protocol} | "
                      f"{pct(rtts, 0.5):.2f} | {pct(rtts, 0.9):.2f} | {pct(rtts, 0.99):.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
