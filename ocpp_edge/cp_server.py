"""South side: the Tornado WebSocket listener the charge points connect to.

Glue only. The handshake rules live here (they are HTTP); everything about OCPP-J
messages is the session's business, reached through the ``Hub`` the gateway provides.

Handshake (SPEC "Connection"):

* ``ws://host:port<path>/<cid>``: ``<cid>`` is the last path segment, percent-decoded;
  empty, longer than 48 characters, or holding ``/``, ``+``, ``#``, NUL or another
  control character after decoding → HTTP 400 before any upgrade.
* Subprotocol (OCPP-J 1.6 §3.1.2, 2.0.1 Part 4 §3.1.2): the first of the server's
  protocols (in preference order) that the client offered is chosen and echoed. A protocol
  the client did not offer is never answered. No offer at all: ``default_subprotocol`` is
  used, unechoed, unless ``fail_if_no_subprotocol``. When nothing fits, the handshake
  completes without the header and the socket is closed at once (OCPP-J 1.6 §3.1.2).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Protocol

import tornado
import tornado.web
import tornado.websocket

log = logging.getLogger("ocpp_edge.cp")

MAX_CID_LENGTH = 48
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003  # a binary frame: OCPP-J is text only (OCPP-J 1.6 §4.1.2)
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013
_FORBIDDEN_IN_CID = re.compile(r"[/+#\x00-\x1f\x7f-\x9f]")  # C0 and C1 controls


def cid_problem(cid: str | None) -> str | None:
    """Why ``cid`` (already percent-decoded) is not acceptable, or None if it is."""
    if not cid:
        return "the charge point id (last path segment) is empty"
    if len(cid) > MAX_CID_LENGTH:
        return f"the charge point id is longer than {MAX_CID_LENGTH} characters"
    if _FORBIDDEN_IN_CID.search(cid):
        return "the charge point id contains '/', '+', '#' or a control character"
    return None


@dataclass(frozen=True)
class ServerOptions:
    subprotocols: tuple[str, ...]
    default_subprotocol: str
    fail_if_no_subprotocol: bool
    max_frame_size: int
    handshake_timeout: float = 10.0
    ping_interval: float = 0.0  # 0: no server pings
    ping_timeout: float = 30.0


class Hub(Protocol):
    """What the listener needs from the gateway."""

    accepting: bool  # False: refuse new charge points (503) for now

    def cp_connected(self, conn: ChargePointHandler) -> None: ...
    def cp_text(self, conn: ChargePointHandler, text: str) -> None: ...
    def cp_closed(self, conn: ChargePointHandler) -> None: ...


class ChargePointHandler(tornado.websocket.WebSocketHandler):
    """One charge point's WebSocket."""

    def initialize(self, hub: Hub, options: ServerOptions) -> None:
        self.hub = hub
        self.options = options
        self.cid = ""
        self.version: str | None = None
        self.connected_at = 0.0
        self.peer = ""
        self._open = False

    # -- handshake -------------------------------------------------------------------------

    def prepare(self) -> None:
        # Tornado has percent-decoded the captured segment (so %2F arrives as "/").
        cid = self.path_args[0] if self.path_args else None
        problem = cid_problem(cid)
        if problem:
            log.info("refused connection from %s to %r: %s", self.request.remote_ip,
                     self.request.path, problem)
            raise tornado.web.HTTPError(400, reason="Invalid charge point id")
        self.cid = cid  # type: ignore[assignment]
        self.peer = self.request.remote_ip or ""
        if not self.hub.accepting:
            # ocpp.upstream_down_policy = close_stations while the broker is away
            raise tornado.web.HTTPError(503, reason="Upstream link down")

    def check_origin(self, origin: str) -> bool:
        return True  # charge points are not browsers; Origin carries no meaning here

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        offered = [p for p in subprotocols if p]
        for proto in self.options.subprotocols:
            if proto in offered:
                self.version = proto
                return proto  # echoed in Sec-WebSocket-Protocol
        if not offered and not self.options.fail_if_no_subprotocol:
            self.version = self.options.default_subprotocol  # used, never echoed
        return None

    @property
    def max_message_size(self) -> int:  # type: ignore[override]
        # Tornado closes with 1009 (message too big) past this size.
        return self.options.max_frame_size

    # -- connection ------------------------------------------------------------------------

    def open(self, *args: str) -> None:
        if self.version is None:
            offered = self.request.headers.get("Sec-WebSocket-Protocol", "")
            log.info("cp %s: no supported OCPP subprotocol offered (%r); closing",
                     self.cid, offered)
            self.close(CLOSE_PROTOCOL_ERROR, "no supported OCPP subprotocol")
            return
        self.set_nodelay(True)  # Nagle adds tens of ms per reply (notes/performance.md)
        self.connected_at = time.time()
        self._open = True
        self.hub.cp_connected(self)

    def on_message(self, message: str | bytes) -> None:
        if not self._open:
            return
        if isinstance(message, bytes):
            log.warning("cp %s: binary frame received; closing (OCPP-J is text only)",
                        self.cid)
            self.close(CLOSE_UNSUPPORTED_DATA, "binary frames are not supported")
            return
        self.hub.cp_text(self, message)

    def on_close(self) -> None:
        if self._open:
            self._open = False
            self.hub.cp_closed(self)

    # -- used by the gateway ---------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._open

    def send_text(self, text: str) -> bool:
        """Queue a frame for the charge point; False if the socket is already gone."""
        if not self._open or self.ws_connection is None:
            return False
        try:
            self.write_message(text)
        except tornado.websocket.WebSocketClosedError:
            return False
        return True

    def close_and_forget(self, code: int, reason: str) -> None:
        """Close from our side; the hub is not told again (it already knows)."""
        self._open = False
        self.close(code, reason)


def make_application(hub: Hub, path: str, options: ServerOptions) -> tornado.web.Application:
    pattern = re.escape(path) + r"(?:/([^/]*))?"
    ping: dict[str, float] = {}
    if options.ping_interval > 0:
        # Tornado < 6.5 checks at each ping whether the last pong is older than the
        # timeout, so a healthy socket's last pong is about one interval old: the timeout
        # must clearly exceed the interval. 6.5+ waits for each ping's own pong and
        # refuses a timeout longer than the interval.
        if tornado.version_info >= (6, 5):
            timeout = min(options.ping_timeout, options.ping_interval)
        else:
            timeout = max(options.ping_timeout, 1.5 * options.ping_interval)
        ping = {"websocket_ping_interval": options.ping_interval,
                "websocket_ping_timeout": timeout}
    return tornado.web.Application(
        [(pattern, ChargePointHandler, {"hub": hub, "options": options})], **ping)
