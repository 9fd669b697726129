"""Benchmark backend (CSMS stand-in): answers every upstream CALL at once over MQTT.

Benchmark code only.  Subscribes ``ocpp/cp/#`` (QoS 1, ``--sub-qos``) and, for each CALL
published on ``ocpp/cp/<cid>``, publishes the answer on ``ocpp/cs/<cid>`` (QoS 1, ``--qos``):

* gateway mode -- the payload is an EMQX OCPP gateway JSON object
  ``{"MessageTypeId":2,"UniqueId":..,"Action":..,"Payload":{..}}``; the answer is
  ``{"MessageTypeId":3,"UniqueId":..,"Payload":{..}}``;
* floor mode -- the payload is the raw OCPP-J frame ``[2,id,action,{..}]``; the answer is
  the raw frame ``[3,id,{..}]``.

Answers are schema-valid OCPP 1.6 responses for the actions the load generator sends.
Messages on ``ocpp/cp/<cid>/Reply`` (charge points' answers to downstream CALLs) and any
other topic are only counted.

Two MQTT client implementations (``--impl``):

* ``raw`` (default): a minimal MQTT 3.1.1 client on an asyncio Protocol -- CONNECT,
  SUBSCRIBE, PUBLISH QoS 0/1 both ways, PUBACK, PINGREQ.  It parses every packet that
  arrived in one read and sends all answers with one write.  The backend shares CPU 1 with
  Mosquitto and the load generators; measured there, paho cost ~150 us of CPU per
  answered CALL and this client ~30 us (paho reads each packet with three recv() calls and
  builds several objects per message), and with paho the load side could not saturate the
  floor (BENCHMARKS.md).
* ``paho``: the same logic on paho-mqtt (1.6.1 or 2.x) driven by the asyncio loop.

Prints ``READY`` once subscribed; on SIGTERM/SIGINT prints ``STATS {json}`` and exits.
"""

import argparse
import asyncio
import json
import signal
import sys
import time


class Clock:
    """An ISO-8601 UTC timestamp, re-rendered at most once a second."""

    def __init__(self):
        self.sec = None
        self.text = None

    def now(self):
        sec = int(time.time())
        if sec != self.sec:
            self.sec = sec
            self.text = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(sec))
        return self.text


class Answerer:
    """Turns one upstream MQTT message into (answer topic, answer payload) or None."""

    def __init__(self):
        self.clock = Clock()
        self.tx_id = 0
        self.stats = {"calls": 0, "answered_raw": 0, "answered_json": 0, "replies": 0,
                      "other": 0, "bad": 0}

    def answer(self, action):
        """A valid OCPP 1.6 response payload for ``action``."""
        if action == "Heartbeat":
            return {"currentTime": self.clock.now()}
        if action == "BootNotification":
            return {"currentTime": self.clock.now(), "interval": 300, "status": "Accepted"}
        if action in ("Authorize",):
            return {"idTagInfo": {"status": "Accepted"}}
        if action == "StartTransaction":
            self.tx_id += 1
            return {"transactionId": self.tx_id, "idTagInfo": {"status": "Accepted"}}
        if action == "DataTransfer":
            return {"status": "Accepted"}
        return {}       # MeterValues, StatusNotification, StopTransaction, ...

    def handle(self, topic, payload):
        parts = topic.split("/")
        if len(parts) != 3:                       # ocpp/cp/<cid>/Reply or anything else
            if len(parts) == 4 and parts[3] == "Reply":
                self.stats["replies"] += 1
            else:
                self.stats["other"] += 1
            return None
        try:
            obj = json.loads(payload)
            if isinstance(obj, list):             # floor: raw OCPP-J frame
                if obj[0] != 2:
                    self.stats["other"] += 1
                    return None
                out = json.dumps([3, obj[1], self.answer(obj[2])])
                self.stats["answered_raw"] += 1
            else:                                 # gateway: EMQX JSON object
                if obj.get("MessageTypeId") != 2:
                    self.stats["other"] += 1
                    return None
                out = json.dumps({"MessageTypeId": 3, "UniqueId": obj["UniqueId"],
                                  "Payload": self.answer(obj["Action"])})
                self.stats["answered_json"] += 1
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            self.stats["bad"] += 1
            return None
        self.stats["calls"] += 1
        return "ocpp/cs/" + parts[2], out


def _utf8_field(text):
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def _remaining_length(n):
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class RawMqtt(asyncio.Protocol):
    """Minimal MQTT 3.1.1 client for the benchmark backend (``--impl raw``)."""

    def __init__(self, answerer, qos, sub_qos, keepalive=30):
        self.answerer = answerer
        self.qos = qos
        self.sub_qos = sub_qos
        self.keepalive = keepalive
        self.transport = None
        self.buf = bytearray()
        self.next_mid = 0
        self.out = []
        self.lost = asyncio.get_running_loop().create_future()
        self.ping_handle = None

    def _mid(self):
        self.next_mid = self.next_mid % 65535 + 1
        return self.next_mid

    def connection_made(self, transport):
        self.transport = transport
        body = (_utf8_field("MQTT") + bytes((4, 0x02)) + self.keepalive.to_bytes(2, "big")
                + _utf8_field("bench-backend"))
        transport.write(b"\x10" + _remaining_length(len(body)) + body)
        self._schedule_ping()

    def _schedule_ping(self):
        self.ping_handle = asyncio.get_running_loop().call_later(self.keepalive / 2, self._ping)

    def _ping(self):
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"\xc0\x00")               # PINGREQ
            self._schedule_ping()

    def connection_lost(self, exc):
        if self.ping_handle:
            self.ping_handle.cancel()
        if not self.lost.done():
            self.lost.set_result(exc)

    def publish(self, topic, payload):
        body = _utf8_field(topic)
        if self.qos:
            body += self._mid().to_bytes(2, "big")
        body += payload.encode()
        self.out.append(bytes((0x30 | (self.qos << 1),)) + _remaining_length(len(body)) + body)

    @staticmethod
    def _header(buf):
        """(fixed header length, body length) of the packet at buf[0]; None if incomplete."""
        n, shift = 0, 0
        for pos in range(1, min(len(buf), 5)):
            byte = buf[pos]
            n |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return pos + 1, n
            shift += 7
        return None

    def data_received(self, data):
        buf = self.buf
        buf += data
        while True:
            header = self._header(buf)
            if header is None or len(buf) < header[0] + header[1]:
                break
            pos, n = header
            first = buf[0]
            body = bytes(buf[pos:pos + n])
            del buf[:pos + n]
            self._packet(first, body)
        if self.out:                       # every answer and ack of this read, one write
            self.transport.write(b"".join(self.out))
            self.out = []

    def _packet(self, first, body):
        kind = first >> 4
        if kind == 3:                                          # PUBLISH
            qos = (first >> 1) & 3
            tlen = int.from_bytes(body[:2], "big")
            topic = body[2:2 + tlen].decode()
            pos = 2 + tlen
            if qos:
                mid = body[pos:pos + 2]
                pos += 2
                self.out.append((b"\x40\x02" if qos == 1 else b"\x50\x02") + mid)
            reply = self.answerer.handle(topic, body[pos:])
            if reply is not None:
                self.publish(*reply)
        elif kind == 4:                                        # PUBACK
            pass
        elif kind == 6:                                        # PUBREL (QoS 2 in)
            self.out.append(b"\x70\x02" + body[:2])
        elif kind == 5:                                        # PUBREC (QoS 2 out)
            self.out.append(b"\x62\x02" + body[:2])
        elif kind == 7:                                        # PUBCOMP
            pass
        elif kind == 2:                                        # CONNACK
            if body[1] != 0:
                print(f"backend: MQTT connect refused: {body[1]}", file=sys.stderr, flush=True)
                self.transport.close()
                return
            sub = (self._mid().to_bytes(2, "big") + _utf8_field("ocpp/cp/#")
                   + bytes((self.sub_qos,)))
            self.out.append(b"\x82" + _remaining_length(len(sub)) + sub)
        elif kind == 9:                                        # SUBACK
            if body[2:3] == b"\x80":
                print("backend: subscription refused", file=sys.stderr, flush=True)
            else:
                print("READY", flush=True)

    def disconnect(self):
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"\xe0\x00")
            self.transport.close()


class PahoBackend:
    """The same backend on paho-mqtt (``--impl paho``)."""

    def __init__(self, answerer, qos, sub_qos, writes):
        import mqttcompat  # only needed here

        self.answerer = answerer
        self.stats = answerer.stats
        self.qos = qos
        self.sub_qos = sub_qos
        self.mqttcompat = mqttcompat
        self.client = mqttcompat.new_client("bench-backend")
        self.client.on_connect = self.on_connect
        self.client.on_subscribe = self.on_subscribe
        self.client.on_message = self.on_message
        self.writes = writes
        self.driver = None

    def start(self, host, port):
        self.driver = self.mqttcompat.LoopDriver(self.client, self.writes)
        self.client.connect(host, port, keepalive=30)

    def on_connect(self, client, userdata, flags, rc, properties=None):
        if self.mqttcompat.rc_value(rc) != 0:
            print(f"backend: MQTT connect refused: {rc!r}", file=sys.stderr, flush=True)
            return
        client.subscribe("ocpp/cp/#", qos=self.sub_qos)

    def on_subscribe(self, client, userdata, mid, granted, properties=None):
        print("READY", flush=True)

    def on_message(self, client, userdata, msg):
        reply = self.answerer.handle(msg.topic, msg.payload)
        if reply is not None:
            # Inside a paho callback the packet is only queued; LoopDriver flushes it right
            # after loop_read() returns.
            client.publish(reply[0], reply[1], qos=self.qos)

    def disconnect(self):
        self.client.disconnect()


async def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mqtt", default="127.0.0.1:1883", help="broker HOST:PORT")
    ap.add_argument("--qos", type=int, default=1, choices=(0, 1, 2),
                    help="QoS of the answers (what the SUT receives)")
    ap.add_argument("--sub-qos", type=int, default=1, choices=(0, 1, 2),
                    help="QoS of the backend's own subscription (broker -> backend only)")
    ap.add_argument("--impl", choices=("raw", "paho"), default="raw",
                    help="MQTT client: the built-in minimal one (cheapest) or paho-mqtt")
    ap.add_argument("--paho-writes", choices=("register", "direct"), default="register")
    args = ap.parse_args()

    host, _, port = args.mqtt.rpartition(":")
    host = host or "127.0.0.1"
    answerer = Answerer()
    if args.impl == "paho":
        be = PahoBackend(answerer, args.qos, args.sub_qos, args.paho_writes)
        be.start(host, int(port))
    else:
        loop = asyncio.get_running_loop()
        _, be = await loop.create_connection(
            lambda: RawMqtt(answerer, args.qos, args.sub_qos), host, int(port))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waiters = [asyncio.ensure_future(stop.wait())]
    if args.impl == "raw":
        waiters.append(be.lost)
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    print("STATS " + json.dumps(answerer.stats), flush=True)
    be.disconnect()


if __name__ == "__main__":
    asyncio.run(main())
