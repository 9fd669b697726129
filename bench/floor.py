"""The floor: a bare Tornado WebSocket <-> paho-mqtt forwarder that does no OCPP work.

Benchmark code only, never imported by the product.  It is what ocpp-edge's throughput and
latency are compared against: the same libraries, the same single thread, the same
messages on the wire (one WebSocket frame in, one QoS 1 PUBLISH out, one QoS 1 PUBLISH in,
one frame out per CALL), and nothing else.

* ``ws://HOST:PORT/ocpp/<cid>`` with subprotocol ``ocpp1.6``; each inbound text frame is
  published verbatim to ``ocpp/cp/<cid>`` at QoS 1.
* One subscription ``ocpp/cs/+``; each message's payload is written verbatim as a text
  frame to the socket of the ``<cid>`` in its topic (dropped if that charge point is gone).
* TCP_NODELAY on both sides; paho runs on the IOLoop (see mqttcompat.LoopDriver).

Usage: python bench/floor.py --ws 127.0.0.1:33033 --mqtt 127.0.0.1:1883
Prints ``READY`` on stdout once the subscription is acknowledged; exits on SIGTERM/SIGINT.
"""

import argparse
import asyncio
import signal
import sys

import mqttcompat
import tornado.web
import tornado.websocket

SUBPROTOCOLS = ("ocpp1.6", "ocpp2.0.1", "ocpp2.1")


def host_port(text):
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


class Forwarder:
    """Holds the cid -> handler map and the MQTT client."""

    def __init__(self, client_id, writes):
        self.sockets = {}
        self.client = mqttcompat.new_client(client_id)
        self.client.on_connect = self.on_connect
        self.client.on_subscribe = self.on_subscribe
        self.client.on_message = self.on_message
        self.writes = writes
        self.driver = None

    def start(self, host, port):
        self.driver = mqttcompat.LoopDriver(self.client, self.writes)
        self.client.connect(host, port, keepalive=30)   # CONNACK arrives via the loop

    # -- MQTT side ---------------------------------------------------------------------------
    def on_connect(self, client, userdata, flags, rc, properties=None):
        if mqttcompat.rc_value(rc) != 0:
            print(f"floor: MQTT connect refused: {rc!r}", file=sys.stderr, flush=True)
            return
        client.subscribe("ocpp/cs/+", qos=1)

    def on_subscribe(self, client, userdata, mid, granted, properties=None):
        print("READY", flush=True)

    def on_message(self, client, userdata, msg):
        cid = msg.topic[8:]                       # strip "ocpp/cs/"
        handler = self.sockets.get(cid)
        if handler is None:
            return
        try:
            # bytes with binary=False go out as a text frame, without a decode/encode trip
            handler.write_message(msg.payload, binary=False)
        except tornado.websocket.WebSocketClosedError:
            pass

    def publish(self, cid, text):
        self.client.publish("ocpp/cp/" + cid, text, qos=1)
        self.driver.kick()


class OcppSocket(tornado.websocket.WebSocketHandler):
    def initialize(self, fwd):
        self.fwd = fwd
        self.cid = None

    def check_origin(self, origin):
        return True

    def select_subprotocol(self, subprotocols):
        for proto in SUBPROTOCOLS:
            if proto in subprotocols:
                return proto
        return None

    def open(self, cid):
        self.set_nodelay(True)
        self.cid = cid
        old = self.fwd.sockets.get(cid)
        self.fwd.sockets[cid] = self
        if old is not None:
            old.close(1000)

    def on_message(self, message):
        self.fwd.publish(self.cid, message)

    def on_close(self):
        if self.fwd.sockets.get(self.cid) is self:
            del self.fwd.sockets[self.cid]


async def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ws", default="127.0.0.1:33033", help="listen HOST:PORT")
    ap.add_argument("--mqtt", default="127.0.0.1:1883", help="broker HOST:PORT")
    ap.add_argument("--client-id", default="bench-floor")
    ap.add_argument("--paho-writes", choices=("register", "direct"), default="register",
                    help="how paho's writes are driven (see mqttcompat.LoopDriver)")
    args = ap.parse_args()

    fwd = Forwarder(args.client_id, args.paho_writes)
    app = tornado.web.Application([(r"/ocpp/([^/]+)", OcppSocket, {"fwd": fwd})])
    ws_host, ws_port = host_port(args.ws)
    app.listen(ws_port, ws_host)
    fwd.start(*host_port(args.mqtt))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    fwd.client.disconnect()


if __name__ == "__main__":
    asyncio.run(main())
