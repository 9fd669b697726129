"""The reference bridge: what a developer would write on the PyPI ``ocpp`` library and paho.

Benchmark code only, never imported by the product (issue 8: "an asyncio bridge built on
the PyPI ``ocpp`` library's server side and paho").  It is written the way the library's
documentation shows it, with no tuning:

* ``websockets.serve`` on ``ws://HOST:PORT/ocpp/<cid>`` (subprotocol ``ocpp1.6``), one
  ``ocpp.v16.ChargePoint`` per connection, ``await cp.start()``.
* One ``@on(Action.X)`` handler per action the load generator sends (BootNotification,
  Heartbeat, MeterValues, StatusNotification, plus Authorize and DataTransfer).  Each
  publishes the CALL to ``ocpp/cp/<cid>`` at QoS 1 in the EMQX OCPP gateway format that
  ocpp-edge uses (``{"MessageTypeId":2,"UniqueId","Action","Payload"}``), awaits the
  backend's ``{"MessageTypeId":3,"UniqueId","Payload"}`` on ``ocpp/cs/<cid>`` (a future keyed
  by cid and UniqueId) and returns it as the CALLRESULT dataclass.
* The library's own validation stays on (jsonschema, both the CALL and the CALLRESULT).
* paho with ``loop_start()`` -- its network thread -- and ``call_soon_threadsafe`` to hand
  each reply to the asyncio loop: the way paho's documentation and most examples use it
  from asyncio code (running paho on the asyncio loop needs its socket callbacks, which
  few developers write; the floor does that).  TCP_NODELAY is left as the libraries set it
  (websockets sets it on its sockets; paho does not).

Usage: python bench/refbridge.py --ws 127.0.0.1:33033 --mqtt 127.0.0.1:1883
Prints ``READY`` on stdout once the subscription is acknowledged; exits on SIGTERM/SIGINT.
"""

import argparse
import asyncio
import json
import signal
import sys

import mqttcompat
import websockets
from floor import host_port
from ocpp.charge_point import camel_to_snake_case, snake_to_camel_case
from ocpp.routing import on
from ocpp.v16 import ChargePoint as _ChargePoint
from ocpp.v16 import call_result
from ocpp.v16.enums import Action

ACTIONS = ("BootNotification", "Heartbeat", "MeterValues", "StatusNotification",
           "Authorize", "DataTransfer")
TIMEOUT = 30.0


class Bridge:
    """The MQTT side: paho in its own thread, futures keyed by UniqueId on the loop."""

    def __init__(self, loop, client_id):
        self.loop = loop
        self.pending = {}                     # (cid, UniqueId) -> asyncio.Future
        self.ready = asyncio.Event()
        self.client = mqttcompat.new_client(client_id)
        self.client.on_connect = self.on_connect
        self.client.on_subscribe = self.on_subscribe
        self.client.on_message = self.on_message

    def start(self, host, port):
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()

    def stop(self):
        self.client.disconnect()
        self.client.loop_stop()

    # paho's thread
    def on_connect(self, client, userdata, flags, rc, properties=None):
        if mqttcompat.rc_value(rc) != 0:
            print(f"refbridge: MQTT connect refused: {rc!r}", file=sys.stderr, flush=True)
            return
        client.subscribe("ocpp/cs/+", qos=1)

    def on_subscribe(self, client, userdata, mid, granted, properties=None):
        self.loop.call_soon_threadsafe(self.ready.set)

    def on_message(self, client, userdata, msg):
        try:
            obj = json.loads(msg.payload)
        except ValueError:
            return
        self.loop.call_soon_threadsafe(self._resolve, msg.topic[8:], obj)

    # the asyncio loop
    def _resolve(self, cid, obj):
        # UniqueIds are only unique per charge point: key by the cid of the topic too
        fut = self.pending.pop((cid, obj.get("UniqueId")), None)
        if fut is not None and not fut.done():
            fut.set_result(obj.get("Payload") or {})

    async def call(self, cid, unique_id, action, payload):
        fut = self.loop.create_future()
        self.pending[cid, unique_id] = fut
        self.client.publish("ocpp/cp/" + cid, json.dumps(
            {"MessageTypeId": 2, "UniqueId": unique_id, "Action": action,
             "Payload": payload}), qos=1)
        try:
            return await asyncio.wait_for(fut, TIMEOUT)
        finally:
            self.pending.pop((cid, unique_id), None)


def _forwarding_handler(action):
    """``@on(action)``: forward the CALL upstream, return the backend's answer."""
    result_cls = getattr(call_result, action)

    async def handler(self, call_unique_id, **kwargs):
        answer = await self.bridge.call(self.id, call_unique_id, action,
                                        snake_to_camel_case(kwargs))
        return result_cls(**camel_to_snake_case(answer))

    handler.__name__ = "on_" + action
    return on(Action(action))(handler)


class ChargePoint(_ChargePoint):
    bridge = None                              # set in main()


for _action in ACTIONS:
    setattr(ChargePoint, "on_" + _action, _forwarding_handler(_action))


async def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ws", default="127.0.0.1:33033", help="listen HOST:PORT")
    ap.add_argument("--mqtt", default="127.0.0.1:1883", help="broker HOST:PORT")
    ap.add_argument("--client-id", default="bench-refbridge")
    args = ap.parse_args()

    loop = asyncio.get_running_loop()
    bridge = Bridge(loop, args.client_id)
    ChargePoint.bridge = bridge

    async def on_connect(ws, path=None):
        path = path if path is not None else ws.request.path   # websockets < 13 / >= 13
        cid = path.rstrip("/").rsplit("/", 1)[-1]
        cp = ChargePoint(cid, ws)
        try:
            await cp.start()
        except websockets.exceptions.ConnectionClosed:
            pass

    ws_host, ws_port = host_port(args.ws)
    server = await websockets.serve(on_connect, ws_host, ws_port, subprotocols=["ocpp1.6"])
    bridge.start(*host_port(args.mqtt))
    await bridge.ready.wait()
    print("READY", flush=True)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    bridge.stop()


if __name__ == "__main__":
    asyncio.run(main())
