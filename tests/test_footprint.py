"""Per-connection memory that does not depend on timing: the shape of the objects every
connected charge point keeps (issue "Performance": idle memory per charge point)."""

from __future__ import annotations

import asyncio
import sys

import tornado.web
import tornado.websocket
from conftest import ws_open

from ocpp_edge.config import Listen, ListenerSettings
from ocpp_edge.core.session import Session
from ocpp_edge.south.listener import ChargePointHandler, Listener, ServerOptions, make_application


class Hub:
    accepting = True

    def __init__(self):
        self.conns = []

    def authenticate(self, conn):
        return None

    def cp_connected(self, conn):
        self.conns.append(conn)

    def cp_text(self, conn, text):
        pass

    def cp_closed(self, conn):
        pass


class Bare(tornado.websocket.WebSocketHandler):
    """The floor's handler shape: two attributes of its own."""

    seen: list = []

    def initialize(self, fwd):
        self.fwd = fwd
        self.cid = None

    def open(self, cid):
        self.cid = cid
        Bare.seen.append(self)


def test_a_charge_point_handler_costs_no_more_dict_than_a_bare_handler():
    """CPython shares an instance dict's keys up to 30 of them; past that each handler
    gets a dict of its own (~1.3 KB more per connection): ChargePointHandler keeps its
    state in one slotted object to stay under it."""
    async def scenario():
        hub = Hub()
        settings = ListenerSettings(key="ocpp.listener.ws", kind="ws",
                                    listen=Listen("127.0.0.1", 0), max_connections=10,
                                    max_conn_rate=0, allow_anonymous=True, tls=None)
        options = ServerOptions(subprotocols=("ocpp1.6",), default_subprotocol="ocpp1.6",
                                fail_if_no_subprotocol=False, max_frame_size=65536)
        ours = make_application(hub, "/ocpp", options, Listener(settings, None)).listen(
            0, "127.0.0.1")
        bare = tornado.web.Application([(r"/b/(\w+)", Bare, {"fwd": 1})]).listen(
            0, "127.0.0.1")
        try:
            writers = [(await ws_open(next(iter(s._sockets.values())).getsockname()[1], p,
                                      "ocpp1.6"))[1]
                       for s, p in ((ours, "/ocpp/CP1"), (bare, "/b/x"))]
            for _ in range(100):
                if hub.conns and Bare.seen:
                    break
                await asyncio.sleep(0.01)
            conn, plain = hub.conns[0], Bare.seen[0]
            assert isinstance(conn, ChargePointHandler) and conn.cid == "CP1"
            assert sys.getsizeof(conn.__dict__) <= sys.getsizeof(plain.__dict__)
            for w in writers:
                w.close()
        finally:
            ours.stop()
            bare.stop()

    asyncio.run(scenario())


def test_an_idle_session_has_no_dict_and_no_queue_block():
    s = Session("CP1", "ocpp1.6", 0.0)
    assert not hasattr(s, "__dict__")
    assert s._queue == () and s.counters["malformed"] == 0
    s._count("malformed")
    assert s.counters["malformed"] == 1
    assert Session("CP2", "ocpp1.6", 0.0).counters["malformed"] == 0  # not shared after
