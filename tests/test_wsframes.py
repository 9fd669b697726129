"""The batch frame reader (ocpp_edge/south/frames.py) against real sockets.

A Tornado server whose handler uses ``BatchReadProtocol`` (as ``south.listener`` does) and a raw
TCP client that writes RFC 6455 client frames split at arbitrary byte boundaries: every
message arrives whole and in order, whatever the split; every protocol violation ends
the connection the way Tornado's own reader does; a flooding socket does not hold up
another one.
"""

from __future__ import annotations

import asyncio
import os
import random
import struct

import pytest
import tornado.web
import tornado.websocket
from conftest import ws_open
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ocpp_edge.south.frames import YIELD_EVERY, BatchReadProtocol


class Handler(tornado.websocket.WebSocketHandler):
    def initialize(self, sink):
        self.sink = sink

    def get_websocket_protocol(self):
        proto = super().get_websocket_protocol()
        return BatchReadProtocol(self, False, proto.params)

    @property
    def max_message_size(self):
        return 4096

    def open(self, name):
        self.name = name

    def on_message(self, message):
        self.sink.append((self.name, message))
        if message.startswith("echo "):
            self.ws_connection.send_text(message[5:] * 100)

    def on_close(self):
        self.sink.append((self.name, ("closed", self.close_code)))


def frame(opcode: int, payload: bytes, fin: bool = True, rsv: int = 0,
          length: int | None = None) -> bytes:
    """One masked client frame (RFC 6455 §5.2); ``length`` overrides the declared length."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


class Server:
    def __init__(self):
        self.sink: list = []
        app = tornado.web.Application([(r"/(\w+)", Handler, {"sink": self.sink})])
        self.server = app.listen(0, "127.0.0.1")
        self.port = next(iter(self.server._sockets.values())).getsockname()[1]

    async def connect(self, name: str):
        return await ws_open(self.port, f"/{name}")

    async def wait_for(self, predicate, timeout=5.0):
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            assert asyncio.get_running_loop().time() < deadline, self.sink
            await asyncio.sleep(0.005)


def serve(scenario):
    """Run ``scenario(server)`` on a fresh server, stopping it whatever happens."""
    async def main():
        srv = Server()
        try:
            await scenario(srv)
        finally:
            srv.server.stop()

    asyncio.run(main())


async def send_split(writer, data: bytes, cuts: list[int]):
    last = 0
    for cut in sorted(set(c for c in cuts if 0 < c < len(data))) + [len(data)]:
        writer.write(data[last:cut])
        await writer.drain()
        await asyncio.sleep(0.001)  # give the server a chance to read a partial frame
        last = cut


messages = st.lists(st.one_of(st.text(max_size=300),
                              st.text(min_size=126, max_size=3000)), min_size=1, max_size=8)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msgs=messages, data=st.data())
def test_messages_arrive_whole_and_in_order_whatever_the_split(msgs, data):
    """Fragmented messages, pings between fragments and cut points anywhere."""
    wire = b""
    for text in msgs:
        raw = text.encode()
        pieces = data.draw(st.integers(1, 3))
        step = max(1, len(raw) // pieces)
        chunks = [raw[i:i + step] for i in range(0, len(raw), step)] or [b""]
        for i, chunk in enumerate(chunks):
            wire += frame(0x1 if i == 0 else 0x0, chunk, fin=i == len(chunks) - 1)
            if i < len(chunks) - 1 and data.draw(st.booleans()):
                wire += frame(0x9, b"ping")  # control frames may interleave (§5.4)
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=12))

    async def scenario(srv):
        _, writer = await srv.connect("a")
        await send_split(writer, wire, cuts)
        await srv.wait_for(lambda: len(srv.sink) >= len(msgs))
        assert srv.sink == [("a", text) for text in msgs]
        writer.close()

    serve(scenario)


@pytest.mark.parametrize("name, wire", [
    ("reserved_bits", frame(0x1, b"x", rsv=0x40)),
    ("long_control_frame", frame(0x9, b"p" * 126)),
    ("fragmented_control_frame", frame(0x9, b"p", fin=False)),
    ("continuation_without_start", frame(0x0, b"x")),
    ("new_message_inside_fragmented", frame(0x1, b"a", fin=False) + frame(0x1, b"b")),
    ("invalid_utf8", frame(0x1, b"\xff\xfe")),
    ("unknown_opcode", frame(0x3, b"x")),
])
def test_protocol_violations_end_the_connection(name, wire):
    async def scenario(srv):
        reader, writer = await srv.connect("a")
        writer.write(frame(0x1, b"before") + wire + frame(0x1, b"after"))
        await srv.wait_for(lambda: any(m[1] == ("closed", None) or
                                       isinstance(m[1], tuple) for m in srv.sink))
        texts = [m for _, m in srv.sink if isinstance(m, str)]
        assert texts == ["before"]  # nothing after the violation is delivered
        assert await asyncio.wait_for(reader.read(), 5) is not None  # server hung up

    serve(scenario)


def test_oversize_message_is_refused_at_its_header_with_1009():
    """The payload is never sent: the close comes from the header alone (§7.4.1)."""
    async def scenario(srv):
        reader, writer = await srv.connect("a")
        writer.write(frame(0x1, b"", length=4097)[:8])  # header + mask only
        got = await asyncio.wait_for(reader.read(4), 5)
        assert got[0] == 0x88 and struct.unpack("!H", got[2:4])[0] == 1009
        await srv.wait_for(lambda: srv.sink and isinstance(srv.sink[-1][1], tuple))

    serve(scenario)


def test_oversize_across_fragments_is_refused_with_1009():
    async def scenario(srv):
        reader, writer = await srv.connect("a")
        writer.write(frame(0x1, b"x" * 3000, fin=False) + frame(0x0, b"y" * 1200))
        got = await asyncio.wait_for(reader.read(4), 5)
        assert got[0] == 0x88 and struct.unpack("!H", got[2:4])[0] == 1009

    serve(scenario)


def test_close_frame_is_echoed_and_reported():
    async def scenario(srv):
        reader, writer = await srv.connect("a")
        writer.write(frame(0x1, b"hi") + frame(0x8, struct.pack("!H", 1000) + b"bye"))
        got = await asyncio.wait_for(reader.read(4), 5)
        assert got[0] == 0x88 and struct.unpack("!H", got[2:4])[0] == 1000
        await srv.wait_for(lambda: ("a", ("closed", 1000)) in srv.sink)
        assert srv.sink[0] == ("a", "hi")

    serve(scenario)


def test_ping_is_answered_with_pong():
    async def scenario(srv):
        reader, writer = await srv.connect("a")
        writer.write(frame(0x9, b"are you there"))
        got = await asyncio.wait_for(reader.readexactly(2 + 13), 5)
        assert got == bytes([0x8A, 13]) + b"are you there"

    serve(scenario)


def test_a_flooding_socket_does_not_hold_up_another():
    """Thousands of frames in one write on socket A; socket B's single message, sent
    after A's flood was written, is handled long before A's flood is done."""
    flood = 20 * YIELD_EVERY

    async def scenario(srv):
        _, wa = await srv.connect("a")
        _, wb = await srv.connect("b")
        blob = b"".join(frame(0x1, f"{i}".encode()) for i in range(flood))
        wa.write(blob)
        await wa.drain()
        wb.write(frame(0x1, b"b-message"))
        await srv.wait_for(lambda: sum(1 for n, _ in srv.sink if n == "a") == flood)
        order = [n for n, m in srv.sink if isinstance(m, str)]
        assert "b" in order
        # With no yielding, B would come after all of A's frames that were already
        # buffered; with it, B is served within a few batches of A's.
        assert order.index("b") < flood - YIELD_EVERY, order.index("b")
        a_texts = [m for n, m in srv.sink if n == "a"]
        assert a_texts == [str(i) for i in range(flood)]

    serve(scenario)


def test_random_garbage_never_crashes_the_server():
    """Random bytes after the handshake: the connection ends, the server keeps serving."""
    rng = random.Random(1)

    async def scenario(srv):
        for i in range(30):
            reader, writer = await srv.connect(f"g{i}")
            writer.write(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
            writer.write_eof()
            await asyncio.wait_for(reader.read(), 5)
            writer.close()
        _, w = await srv.connect("ok")
        w.write(frame(0x1, b"still here"))
        await srv.wait_for(lambda: ("ok", "still here") in srv.sink)

    serve(scenario)


def test_send_text_writes_one_unmasked_text_frame():
    async def scenario(srv):
        reader, writer = await srv.connect("a")
        writer.write(frame(0x1, "echo é".encode()))
        head = await asyncio.wait_for(reader.readexactly(4), 5)
        assert head[0] == 0x81 and head[1] == 126  # FIN + text, 16-bit length, no mask
        n = struct.unpack("!H", head[2:4])[0]
        body = await asyncio.wait_for(reader.readexactly(n), 5)
        assert body.decode() == "é" * 100

    serve(scenario)
