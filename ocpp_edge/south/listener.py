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
* Open files: every connection is a file descriptor. :func:`fit_to_open_files` shares
  the process's ``RLIMIT_NOFILE``, less :data:`RESERVED_FILES`, among the listeners: past
  it a newcomer is refused like one past ``max_connections`` (reason ``open_files``).
  Should ``accept()`` still run out of descriptors (``EMFILE``), the listener stops
  accepting for :data:`ACCEPT_PAUSE` seconds instead of retrying at once (Tornado's own
  accept handler would spin on it, logging each time), with one line every 10 s at most.
* A TLS handshake that fails (the charge point closes the connection, sends an alert,
  speaks plain HTTP, or is too slow) is logged as one warning per address per minute
  naming the address and the reason, with a count of the rest once a minute
  (Tornado's own ``SSL Error`` lines are replaced by these), and counted as a refusal
  (``tls_handshake``).

Length: the Tornado adapter for charge points: handshake rules, authentication hand-off,
connection and open-file limits, the pausing accept loop and the TLS handshake log; all
of it is the one listener's state.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import resource
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import tornado
import tornado.httpserver
import tornado.ioloop
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

# File descriptors kept for everything but charge point connections: the buffer's and the
# offline state's SQLite files (with WAL and shm), the broker connection, the admin
# endpoint (at most 16 connections on each of its sockets), the listening sockets, the
# event loop, the journal stream, sd_notify, the password and certificate files read on
# a reload, ``getent`` for DNS.
RESERVED_FILES = 64
ACCEPT_PAUSE = 1.0  # seconds without accepting after accept() ran out of descriptors
LOG_EVERY = 10.0  # seconds between two lines about the same listener's refusals or pauses
TLS_LOG_EVERY = 60.0  # seconds between two lines about one address's failed handshakes
TLS_MAX_TRACKED = 1024  # addresses remembered for that; beyond, only the summary counts
# accept() errors of the process or the system running short, not of one connection
_OUT_OF_FILES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# accept() errors that belong to the one connection being accepted (accept(2), "Error
# handling"): skip it and go on
_CONNECTION_ERRORS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM,
                                errno.ENETDOWN, errno.ENOPROTOOPT, errno.EHOSTDOWN,
                                errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP,
                                errno.ENETUNREACH, errno.ETIMEDOUT})


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
        # Connections refused before the upgrade, by reason (metrics: connections_refused).
        self.refused = {"max_connections": 0, "max_conn_rate": 0, "open_files": 0,
                        "tls_handshake": 0}
        self.open_files: OpenFiles | None = None  # shared by the listeners; see fit_to_open_files
        self.accept_pauses = 0
        self._tokens = float(settings.max_conn_rate)
        self._tokens_at = time.monotonic()
        self._last_warning = -1e9
        self._last_pause_warning = -1e9
        self._paused_since: float | None = None
        self._tls_logged: dict[str, float] = {}  # address -> when its last line was logged
        self._tls_untold = 0  # failed handshakes not logged one by one since the summary
        self._tls_untold_from: set[str] = set()
        self._tls_summary: asyncio.TimerHandle | None = None

    @property
    def url(self) -> str:
        return f"{self.settings.kind}://{self.settings.listen.host}:{self.port}"

    @property
    def connections(self) -> int:
        """Connections held now: upgraded, or still in the TLS or HTTP handshake."""
        return self.upgraded + len(getattr(self.server, "_connections", ()))

    def admit(self, handshaking: int) -> str | None:
        """Why a newly accepted connection must be dropped, or None to serve it."""
        if self.upgraded + handshaking >= self.settings.max_connections:
            return "max_connections"
        if self.open_files is not None and self.open_files.full():
            return "open_files"
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
        if now - self._last_warning >= LOG_EVERY:  # one line per 10 s, not one per connection
            self._last_warning = now
            refused = sum(self.refused[k] for k in ("max_connections", "max_conn_rate",
                                                    "open_files"))
            if why == "open_files":
                assert self.open_files is not None
                what = (f"the process holds {self.open_files.capacity} charge point "
                        f"connections at most (open files: RLIMIT_NOFILE "
                        f"{self.open_files.limit} less {RESERVED_FILES} kept)")
            else:
                what = f"{why} = {getattr(self.settings, why)} reached"
            log.warning("%s: refusing connections (from %s and maybe others): %s; %d "
                        "refused so far", self.settings.key,
                        address[0] if address else "?", what, refused)

    # -- accept() out of descriptors -------------------------------------------------------

    def accept_paused(self, exc: OSError) -> None:
        self.accept_pauses += 1
        now = time.monotonic()
        if self._paused_since is None:
            self._paused_since = now
        if now - self._last_pause_warning >= LOG_EVERY:
            self._last_pause_warning = now
            limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            log.warning("%s: cannot accept connections: %s; not accepting for %g s at a "
                        "time (%d pause(s) so far; open files: RLIMIT_NOFILE %s, %d "
                        "charge point connections held)", self.settings.key,
                        f"{errno.errorcode.get(exc.errno or 0, 'error')} "
                        f"({exc.strerror or exc})", ACCEPT_PAUSE, self.accept_pauses,
                        "unlimited" if limit == resource.RLIM_INFINITY else limit,
                        self.open_files.held() if self.open_files else self.connections)

    def accept_resumed(self) -> None:
        if self._paused_since is not None:
            log.info("%s: accepting connections again after %.0f s", self.settings.key,
                     time.monotonic() - self._paused_since)
            self._paused_since = None

    # -- failed TLS handshakes -------------------------------------------------------------

    def tls_failed(self, address: Any, why: str) -> None:
        """A TLS handshake from ``address`` failed: one line per address per minute, the
        rest counted in a summary a minute later."""
        self.refused["tls_handshake"] += 1
        ip = str(address[0]) if isinstance(address, tuple) and address else "?"
        now = time.monotonic()
        last = self._tls_logged.get(ip)
        if last is None and len(self._tls_logged) >= TLS_MAX_TRACKED:
            self._tls_logged = {a: t for a, t in self._tls_logged.items()
                                if now - t < TLS_LOG_EVERY}
            if len(self._tls_logged) >= TLS_MAX_TRACKED:
                last = now  # too many addresses at once: the summary tells
        if last is not None and now - last < TLS_LOG_EVERY:
            self._tls_untold += 1
            if len(self._tls_untold_from) < TLS_MAX_TRACKED:
                self._tls_untold_from.add(ip)
            if self._tls_summary is None:
                self._tls_summary = asyncio.get_running_loop().call_later(
                    TLS_LOG_EVERY, self._tls_summarize)
            return
        self._tls_logged[ip] = now
        log.warning("%s: TLS handshake with %s failed: %s", self.settings.key,
                    _show_address(address), why)

    def _tls_summarize(self) -> None:
        self._tls_summary = None
        n, addresses = self._tls_untold, len(self._tls_untold_from)
        self._tls_untold = 0
        self._tls_untold_from.clear()
        if n:
            log.warning("%s: %d more failed TLS handshake%s from %s address%s in the last "
                        "%g s (logged once per address per minute)", self.settings.key, n,
                        "" if n == 1 else "s",
                        addresses if addresses < TLS_MAX_TRACKED else f"{addresses}+",
                        "" if addresses == 1 else "es", TLS_LOG_EVERY)

    def cancel_timers(self) -> None:
        if self._tls_summary is not None:
            self._tls_summary.cancel()
            self._tls_summary = None


def _show_address(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address) if address else "?"


_TLS_HINTS = {
    "TLSV1_ALERT_UNKNOWN_CA": "the client does not trust the server certificate "
                              "(install the site's ca.pem on it)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the client refused the server certificate (its names "
                                   "or the CA; see ocpp-edge cert init --host/--ip)",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the client refused the server certificate (its "
                                       "names or the CA; see ocpp-edge cert init --host/--ip)",
    "HTTP_REQUEST": "plain HTTP on a TLS port: the client uses ws:// instead of wss://",
    "UNSUPPORTED_PROTOCOL": "the client offers only TLS versions the listener does not "
                            "allow (tls_versions)",
    "WRONG_VERSION_NUMBER": "not TLS, or a TLS version the listener does not allow",
    "NO_SHARED_CIPHER": "no cipher suite in common (ciphers)",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the client sent no certificate "
                                         "(fail_if_no_peer_cert = true)",
    "CERTIFICATE_VERIFY_FAILED": "its certificate was refused",
}
_SSL_TEXT = re.compile(r"^\[[^\]]*\]\s*(.*?)\s*(?:\(_ssl\.c:\d+\))?$")


def tls_failure(exc: BaseException | None) -> str:
    """Why a TLS handshake failed, in words, with OpenSSL's reason code."""
    if isinstance(exc, ssl.SSLEOFError) or getattr(exc, "reason", None) in (
            "UNEXPECTED_EOF_WHILE_READING", "EOF"):
        return ("the client closed the connection during the handshake (UNEXPECTED_EOF; "
                "a charge point that does not trust the server certificate may do this "
                "without an alert, and so does a port scan)")
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None) or ""
        text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
        m = _SSL_TEXT.match(text)
        text = (m[1] if m else text) or reason.lower().replace("_", " ")
        if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
            text += f": {exc.verify_message}"
        hint = _TLS_HINTS.get(reason)
        return f"{text} ({reason})" + (f": {hint}" if hint else "") if reason else text
    if isinstance(exc, tornado.iostream.StreamClosedError):  # an OSError too
        return tls_failure(exc.real_error) if exc.real_error is not None else \
            "not done within ocpp.handshake_timeout; connection closed"
    if isinstance(exc, ConnectionResetError):
        return "the client reset the connection during the handshake"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc) or type(exc).__name__


class _TornadoSslErrorFilter(logging.Filter):
    """Drops Tornado's ``SSL Error on <fd> <peer>: ...`` lines: the listener logs each
    failed handshake itself (:meth:`Listener.tls_failed`), rate-limited."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith("SSL Error on"))


_SSL_ERROR_FILTER = _TornadoSslErrorFilter()


class OpenFiles:
    """The charge point connections the process can hold at once, all listeners
    together: ``RLIMIT_NOFILE`` less :data:`RESERVED_FILES` (None: no limit)."""

    def __init__(self, listeners: Sequence[Listener], limit: int | None) -> None:
        self.listeners = listeners
        self.limit = limit
        self.capacity = None if limit is None else max(0, limit - RESERVED_FILES)

    def held(self) -> int:
        return sum(listener.connections for listener in self.listeners)

    def full(self) -> bool:
        return self.capacity is not None and self.held() >= self.capacity


def fit_to_open_files(listeners: Sequence[Listener]) -> OpenFiles:
    """Share the open-file limit among ``listeners`` (call once, before they listen);
    warns, naming the keys, when their ``max_connections`` add up to more."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    budget = OpenFiles(listeners, None if soft == resource.RLIM_INFINITY else soft)
    for listener in listeners:
        listener.open_files = budget
    asked = sum(listener.settings.max_connections for listener in listeners)
    if budget.capacity is not None and asked > budget.capacity:
        keys = ", ".join(f"{listener.settings.key}.max_connections = "
                         f"{listener.settings.max_connections}" for listener in listeners)
        log.warning("open files: the listeners may hold %d connections at once (%s), but "
                    "the process may open %d files (RLIMIT_NOFILE) and keeps %d of them "
                    "for the buffer, the broker, the admin endpoint and the logs: at most "
                    "%d charge points are served at once, more are refused as if "
                    "max_connections were reached. Raise LimitNOFILE= (systemctl edit "
                    "ocpp-edge) or lower %s", asked, keys, soft, RESERVED_FILES,
                    budget.capacity, "that key" if len(listeners) == 1 else "those keys")
    return budget


class _Acceptor:
    """Tornado's accept loop (``tornado.netutil.add_accept_handler``), except that when
    ``accept()`` fails for want of file descriptors (or memory) the socket is taken off
    the event loop for :data:`ACCEPT_PAUSE` seconds: the pending connection stays in the
    kernel's backlog, and nothing spins. An error of the one connection (reset before
    the TLS wrap, aborted) skips it quietly or reports it, never stops the loop."""

    def __init__(self, sock: socket.socket, callback: Callable[[socket.socket, Any], None],
                 listener: Listener) -> None:
        self.sock = sock
        self.callback = callback
        self.listener = listener
        self.io_loop = tornado.ioloop.IOLoop.current()
        self.removed = False
        self.pause: object | None = None  # the IOLoop timeout that resumes accepting
        self.io_loop.add_handler(sock, self._accept, tornado.ioloop.IOLoop.READ)

    def _accept(self, fd: Any, events: int) -> None:
        for _ in range(128):  # as Tornado: a batch at a time, so others get their turn
            if self.removed or self.pause is not None:
                return
            try:
                conn, address = self.sock.accept()
            except BlockingIOError:
                return  # every pending connection accepted
            except OSError as exc:
                if exc.errno in _CONNECTION_ERRORS:
                    continue
                self._pause(exc)  # EMFILE & co., or anything unexpected: never spin
                return
            self.listener.accept_resumed()
            try:
                self.callback(conn, address)
            except OSError as exc:  # ssl wrap of a connection already reset (tcpserver.py)
                conn.close()
                if self.listener.ssl_ctx is not None:
                    self.listener.tls_failed(address, tls_failure(exc))
                else:
                    log.debug("%s: connection from %s failed at once: %s",
                              self.listener.settings.key, _show_address(address), exc)

    def _pause(self, exc: OSError) -> None:
        self.io_loop.remove_handler(self.sock)
        self.pause = self.io_loop.call_later(ACCEPT_PAUSE, self._resume)
        self.listener.accept_paused(exc)

    def _resume(self) -> None:
        self.pause = None
        if not self.removed:
            self.io_loop.add_handler(self.sock, self._accept, tornado.ioloop.IOLoop.READ)

    def remove(self) -> None:
        """As the callable ``add_accept_handler`` returns (``TCPServer.stop`` calls it)."""
        if self.removed:
            return
        self.removed = True
        if self.pause is not None:
            self.io_loop.remove_timeout(self.pause)
            self.pause = None
        else:
            self.io_loop.remove_handler(self.sock)


class LimitedHTTPServer(tornado.httpserver.HTTPServer):
    """Tornado's HTTP server with the listener's connection limits applied at accept,
    an accept loop that pauses when out of file descriptors, and failed TLS handshakes
    reported to the listener."""

    def initialize(self, *args: Any, listener: Listener, **kwargs: Any) -> None:
        super().initialize(*args, **kwargs)
        self.listener = listener
        if kwargs.get("ssl_options") is not None:
            logging.getLogger("tornado.general").addFilter(_SSL_ERROR_FILTER)  # once

    def add_sockets(self, sockets: Any) -> None:
        # TCPServer.add_sockets with our accept loop; stop() calls the remover.
        for sock in sockets:
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = _Acceptor(sock, self._handle_connection,
                                                      self.listener).remove

    def handle_stream(self, stream: tornado.iostream.IOStream, address: Any) -> None:
        # Connections still in their HTTP phase (Tornado's own bookkeeping) plus the
        # upgraded ones of this listener.
        handshaking = len(getattr(self, "_connections", ()))
        why = self.listener.admit(handshaking)
        if why is not None:
            self.listener.refuse(why, address)
            stream.close()
            return
        if isinstance(stream, tornado.iostream.SSLIOStream):
            listener = self.listener

            def handshake_done(future: asyncio.Future) -> None:
                if not future.cancelled() and future.exception() is not None:
                    listener.tls_failed(address, tls_failure(future.exception()))

            stream.wait_for_handshake().add_done_callback(handshake_done)
        super().handle_stream(stream, address)

    def stop(self) -> None:
        super().stop()
        self.listener.cancel_timers()


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
