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
* Authentication (SECURITY.md, ``south/auth.py``) is decided in ``prepare``, before any
  upgrade: a refusal is an HTTP status (401 with ``WWW-Authenticate``, 403, 404, 429).

Limits (issue "Security"), each refusing the newcomer without disturbing anyone else:

* ``max_connections`` and ``max_conn_rate`` per listener: checked when the TCP
  connection is accepted, before TLS or HTTP cost anything; the socket is just closed.
* ``ocpp.handshake_timeout``: the TLS handshake and the whole HTTP request head must
  arrive within it (Tornado's header timeout), so a slow-loris client is cut off.
* ``ocpp.max_frame_size``: a bigger frame closes the connection with 1009.
* ``ocpp.max_message_rate``: a charge point sending faster is not cut off but slowed
  down: the next frame is not read until its token is due, so TCP pushes back on it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from dataclasses import dataclass
from typing import Any, Protocol

import tornado
import tornado.httpserver
import tornado.iostream
import tornado.web
import tornado.websocket

from ocpp_edge.config import ListenerSettings
from ocpp_edge.south.auth import Refusal
from ocpp_edge.south.credentials import cid_problem
from ocpp_edge.south.frames import BatchReadProtocol

log = logging.getLogger("ocpp_edge.cp")

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003  # a binary frame: OCPP-J is text only (OCPP-J 1.6 §4.1.2)
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013


@dataclass(frozen=True)
class ServerOptions:
    subprotocols: tuple[str, ...]
    default_subprotocol: str
    fail_if_no_subprotocol: bool
    max_frame_size: int
    handshake_timeout: float = 10.0
    ping_interval: float = 0.0  # 0: no server pings
    ping_timeout: float = 30.0
    max_message_rate: int = 0  # frames/s per charge point; 0: no limit


class Hub(Protocol):
    """What the listener needs from the gateway."""

    accepting: bool  # False: refuse new charge points (503) for now

    def authenticate(self, conn: ChargePointHandler) -> Refusal | None: ...
    def cp_connected(self, conn: ChargePointHandler) -> None: ...
    def cp_text(self, conn: ChargePointHandler, text: str) -> None: ...
    def cp_closed(self, conn: ChargePointHandler) -> None: ...


class _State:
    """A charge point connection's own state, kept out of the handler's ``__dict__``.

    Tornado's ``WebSocketHandler`` instance already has 27 attributes after the upgrade;
    CPython 3.11 shares one key table among instances only up to 30 keys, and an instance
    past that gets a dict of its own (measured: 296 → 1,584 bytes per connection). So the
    handler adds a single attribute, this slotted object, and reaches each field through
    a property (see ``_delegate`` below).
    """

    __slots__ = ("hub", "options", "listener", "cid", "version", "connected_at", "peer",
                 "auth_method", "_open", "_counted", "_tokens", "_tokens_at")

    def __init__(self, hub: Hub, options: ServerOptions, listener: Listener) -> None:
        self.hub = hub
        self.options = options
        self.listener = listener
        self.cid = ""
        self.version: str | None = None
        self.connected_at = 0.0
        self.peer = ""
        self.auth_method = ""
        self._open = False
        self._counted = False
        self._tokens = float(options.max_message_rate)
        self._tokens_at = 0.0


class ChargePointHandler(tornado.websocket.WebSocketHandler):
    """One charge point's WebSocket."""

    # Declared for readers and type checkers; each is a property reading _State (below).
    hub: Hub
    options: ServerOptions
    listener: Listener
    cid: str
    version: str | None
    connected_at: float
    peer: str
    auth_method: str
    _open: bool
    _counted: bool
    _tokens: float
    _tokens_at: float

    def initialize(self, hub: Hub, options: ServerOptions, listener: Listener) -> None:
        self._state = _State(hub, options, listener)  # the handler's only own attribute

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
        refusal = self.hub.authenticate(self)
        if refusal is not None:
            log.warning("refused charge point %s from %s on %s: %s", cid, self.peer,
                        self.listener.settings.key, refusal.why)
            self.set_status(refusal.status, refusal.reason)
            for name, value in refusal.headers:
                self.set_header(name, value)
            self.finish()  # prepare() finishing the request: get() never runs, no upgrade

    @property
    def authorization(self) -> str | None:
        return self.request.headers.get("Authorization")

    @property
    def peer_cert(self) -> dict | None:
        """The client certificate, verified against the listener's CA; None without one."""
        if self.listener.settings.tls is None or not self.listener.settings.tls.verify:
            return None
        try:
            return self.request.get_ssl_certificate() or None
        except (ssl.SSLError, ValueError):
            return None

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

    def get_websocket_protocol(self) -> Any:
        # Tornado's protocol with the batch frame reader (south/frames.py); any other
        # protocol Tornado might pick is left as it is.
        proto = super().get_websocket_protocol()
        if type(proto) is tornado.websocket.WebSocketProtocol13:
            return BatchReadProtocol(self, False, proto.params)
        return proto

    @property
    def max_message_size(self) -> int:  # type: ignore[override]
        # Tornado closes with 1009 (message too big) past this size.
        return self.options.max_frame_size

    # -- connection ------------------------------------------------------------------------

    def open(self, *args: str) -> None:
        self._counted = True
        self.listener.upgraded += 1
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

    def on_message(self, message: str | bytes) -> Any:
        if not self._open:
            return None
        if isinstance(message, bytes):
            log.warning("cp %s: binary frame received; closing (OCPP-J is text only)",
                        self.cid)
            self.close(CLOSE_UNSUPPORTED_DATA, "binary frames are not supported")
            return None
        self.hub.cp_text(self, message)
        rate = self.options.max_message_rate
        if rate:
            # Token bucket of one second's worth: a burst passes, a flood is paced. Tornado
            # reads the next frame only once the returned awaitable is done.
            now = time.monotonic()
            self._tokens = min(float(rate), self._tokens + (now - self._tokens_at) * rate) - 1
            self._tokens_at = now
            if self._tokens < 0:
                return asyncio.sleep(-self._tokens / rate)
        return None

    def on_close(self) -> None:
        if self._counted:
            self._counted = False
            self.listener.upgraded -= 1
        if self._open:
            self._open = False
            self.hub.cp_closed(self)

    # -- used by the gateway ---------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._open

    def send_text(self, text: str) -> bool:
        """Queue a frame for the charge point; False if the socket is already gone."""
        ws = self.ws_connection
        if not self._open or ws is None or ws.is_closing():
            return False
        try:
            if type(ws) is BatchReadProtocol:
                ws.send_text(text)
            else:
                self.write_message(text)
        except (tornado.websocket.WebSocketClosedError, tornado.iostream.StreamClosedError):
            return False
        return True

    def close_and_forget(self, code: int, reason: str) -> None:
        """Close from our side; the hub is not told again (it already knows)."""
        self._open = False
        self.close(code, reason)


def _delegate(name: str) -> property:
    def get(self: ChargePointHandler) -> Any:
        return getattr(self._state, name)

    def put(self: ChargePointHandler, value: Any) -> None:
        setattr(self._state, name, value)

    return property(get, put)


for _name in _State.__slots__:
    setattr(ChargePointHandler, _name, _delegate(_name))
del _name


class Listener:
    """One listening address and its limits; ``server`` serves it."""

    def __init__(self, settings: ListenerSettings, ssl_ctx: ssl.SSLContext | None) -> None:
        self.settings = settings
        self.ssl_ctx = ssl_ctx
        self.upgraded = 0  # WebSocket connections of this listener open now
        self.server: LimitedHTTPServer | None = None
        self.port = 0
        self.refused = {"max_connections": 0, "max_conn_rate": 0}
        self._tokens = float(settings.max_conn_rate)
        self._tokens_at = time.monotonic()
        self._last_warning = 0.0

    @property
    def url(self) -> str:
        return f"{self.settings.kind}://{self.settings.listen.host}:{self.port}"

    def admit(self, handshaking: int) -> str | None:
        """Why a newly accepted connection must be dropped, or None to serve it."""
        if self.upgraded + handshaking >= self.settings.max_connections:
            return "max_connections"
        rate = self.settings.max_conn_rate
        if rate:
            now = time.monotonic()
            self._tokens = min(float(rate), self._tokens + (now - self._tokens_at) * rate)
            self._tokens_at = now
            if self._tokens < 1:
                return "max_conn_rate"
            self._tokens -= 1
        return None

    def refuse(self, why: str, address: Any) -> None:
        self.refused[why] += 1
        now = time.monotonic()
        if now - self._last_warning >= 10:  # one line per 10 s, not one per connection
            self._last_warning = now
            value = getattr(self.settings, why)
            log.warning("%s: refusing connections (from %s and maybe others): %s = %d "
                        "reached; %d refused so far", self.settings.key,
                        address[0] if address else "?", why, value,
                        sum(self.refused.values()))


class LimitedHTTPServer(tornado.httpserver.HTTPServer):
    """Tornado's HTTP server with the listener's connection limits applied at accept."""

    def initialize(self, *args: Any, listener: Listener, **kwargs: Any) -> None:
        super().initialize(*args, **kwargs)
        self.listener = listener

    def handle_stream(self, stream: tornado.iostream.IOStream, address: Any) -> None:
        # Connections still in their HTTP phase (Tornado's own bookkeeping) plus the
        # upgraded ones of this listener.
        handshaking = len(getattr(self, "_connections", ()))
        why = self.listener.admit(handshaking)
        if why is not None:
            self.listener.refuse(why, address)
            stream.close()
            return
        super().handle_stream(stream, address)


def make_application(hub: Hub, path: str, options: ServerOptions,
                     listener: Listener) -> tornado.web.Application:
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
        [(pattern, ChargePointHandler, {"hub": hub, "options": options, "listener": listener})],
        **ping)
