"""The local admin endpoint: status, charge point listing and kick, metrics, health.

Served by the gateway's own IOLoop on ``admin.listen`` (``127.0.0.1:33080`` by default,
``off`` disables it). Glue only: every answer comes from an :class:`AdminView` the gateway
provides, so this module knows HTTP and nothing about sessions or sockets.

======================================  ================================================
``GET /api/v1/status``                  version, uptime, upstream link, buffer, config
``GET /api/v1/clients``                 ``{"data": [client, ...], "meta": {"count": n}}``
``GET /api/v1/clients/<cid>``           one client, or 404 ``CLIENTID_NOT_FOUND``
``DELETE /api/v1/clients/<cid>``        kick: the connection is closed with 1000; 204
``GET /metrics``                        Prometheus text exposition format 0.0.4
``GET /healthz``                        ``ok`` (200) or the reason (503), plain text
======================================  ================================================

``<cid>`` is percent-decoded, so ids holding ``:``, ``%``, spaces or non-ASCII letters
are written percent-encoded in the URL (``urllib.parse.quote(cid, safe="")``).

JSON is ``application/json`` (UTF-8). Errors are ``{"code": "...", "message": "..."}``
with the HTTP status: 400 ``BAD_REQUEST``, 401 ``UNAUTHORIZED``, 403 ``FORBIDDEN``, 404
``NOT_FOUND`` / ``CLIENTID_NOT_FOUND``, 405 ``METHOD_NOT_ALLOWED`` (with ``Allow``), 500
``INTERNAL_ERROR``.

Kicking follows EMQX 5's ``DELETE /api/v5/clients/{clientid}``: 204 without a body when
the client was connected, 404 ``{"code": "CLIENTID_NOT_FOUND", "message": "Client ID not
found"}`` when it was not. Deliberate differences from EMQX:

* EMQX 4.x answered a kick with HTTP 200 and ``{"code": 0}`` (``{"code": 112}`` when not
  found); ocpp-edge uses the HTTP status, as EMQX 5 does.
* The prefix is ``/api/v1``: the resources are ocpp-edge's own (OCPP fields, no nodes,
  no pagination — a site gateway serves hundreds of charge points, not millions), so
  borrowing EMQX's version number would promise a compatibility that is not there.
* Authentication is one bearer token from a file (no API keys, no dashboard users), and
  none on loopback.

Access control. Two ways in, each with its own rule:

* The Unix socket ``admin.socket`` (``/run/ocpp-edge/admin.sock``, mode 0660 in a 0750
  directory of the service's user and group): whoever may connect to it may do
  everything, with no token. The kernel checks the file's permissions, so that is root
  and the members of the ``ocpp-edge`` group; a browser cannot reach it, and nobody can
  take its place while the gateway is down (a TCP port above 1024 could be taken by
  any user, who would then receive ``ctl``'s requests and a token). Each change made
  through it is logged with the caller's uid and pid (``SO_PEERCRED``).
* TCP, ``admin.listen``. Without a token (allowed only on a loopback address; the
  configuration check refuses a non-loopback ``admin.listen`` without
  ``admin.token_file``) every local user may *read* (GET): status, charge points,
  metrics. Requests that change something (``DELETE``, kick) get 403 ``FORBIDDEN`` naming
  the socket: on a shared controller any local user, ``nobody`` included, could otherwise
  disconnect charge points. A web page in a browser on the same host could reach a
  loopback port by DNS rebinding, so tokenless requests must name the host by IP address
  or ``localhost`` in ``Host`` (403 otherwise). With a token, every endpoint but
  ``/healthz`` requires ``Authorization: Bearer <token>`` (401 with ``WWW-Authenticate:
  Bearer`` otherwise), and the token allows changes too; ``/healthz`` stays open so that
  probes need no secret, and tells nothing but ok / why not. The token travels in clear
  over plain HTTP: on an untrusted network, reach the endpoint through an SSH tunnel or a
  VPN.

Each server holds :data:`MAX_CONNECTIONS` connections at most (more are closed at once):
the admin endpoint must not use up the file descriptors the charge points need.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import socket
import struct
from datetime import UTC, datetime
from typing import Any, Protocol

import tornado.httpserver
import tornado.iostream
import tornado.web
from tornado.netutil import bind_sockets, bind_unix_socket

from ocpp_edge.ops.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

log = logging.getLogger("ocpp_edge.admin")

API = "/api/v1"
MAX_CONNECTIONS = 16  # per server (TCP, Unix socket): a few ctl calls and a scraper
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")  # the others change something: see the docstring


class AdminView(Protocol):
    """What the admin endpoint asks the gateway. Called on the IOLoop; must not block.

    The dicts are sent as JSON as they are: plain str / int / float / bool / None /
    list / dict values, timestamps as RFC 3339 strings (see :func:`rfc3339`). The fields
    ``ocpp-edge ctl`` shows are listed in ``ocpp_edge/ctl.py``; more may be added.
    """

    def status(self) -> dict[str, Any]: ...

    def clients(self) -> list[dict[str, Any]]: ...

    def client(self, cid: str) -> dict[str, Any] | None:
        """One connected charge point, or None if ``cid`` is not connected."""
        ...

    def kick(self, cid: str) -> bool:
        """Close ``cid``'s connection with 1000; False if it is not connected."""
        ...

    def metrics_text(self) -> str: ...

    def healthy(self) -> tuple[bool, str]:
        """(True, "ok") or (False, why): listeners up, IOLoop responsive, ..."""
        ...


def rfc3339(unix_time: float | None) -> str | None:
    """``2024-05-01T10:00:00.123Z`` (UTC, milliseconds) for a ``time.time()`` value."""
    if unix_time is None:
        return None
    dt = datetime.fromtimestamp(unix_time, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


# -- handlers ----------------------------------------------------------------------------


class ApiError(tornado.web.HTTPError):
    """An error answered as ``{"code": ..., "message": ...}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status, reason=None)
        self.code = code
        self.message = message


_CODES = {400: "BAD_REQUEST", 401: "UNAUTHORIZED", 403: "FORBIDDEN", 404: "NOT_FOUND",
          405: "METHOD_NOT_ALLOWED", 500: "INTERNAL_ERROR", 503: "SERVICE_UNAVAILABLE"}


def _json(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, default=str).encode()


def _ip_or_localhost(host_header: str) -> bool:
    host = host_header.strip()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class _Handler(tornado.web.RequestHandler):
    public = False  # True: no token needed (/healthz)

    def initialize(self, view: AdminView, token: bytes | None, unix_socket: str | None,
                   via_socket: bool = False) -> None:
        self.view = view
        self.token = token
        self.unix_socket = unix_socket  # admin.socket, to name in refusals
        self.via_socket = via_socket  # this request came through it: its mode decided

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")

    def prepare(self) -> None:
        if self.public or self.via_socket:
            return
        if self.token is None:
            if not _ip_or_localhost(self.request.host):
                raise ApiError(403, "FORBIDDEN", "address the gateway by IP address or "
                               "localhost (requests by host name need admin.token_file)")
            method = self.request.method or ""
            if method not in SAFE_METHODS and method in self.allowed_methods():
                where = f"the admin socket {self.unix_socket}" if self.unix_socket else \
                    "the admin socket (admin.socket)"
                raise ApiError(403, "FORBIDDEN", f"{method} changes the gateway: use {where}"
                               " as root or a member of its group (sudo ocpp-edge ctl ...), "
                               "or set admin.token_file and send the token")
            return
        header = self.request.headers.get("Authorization", "")
        if not header:
            raise ApiError(401, "UNAUTHORIZED", "this endpoint needs the admin token: "
                           "send 'Authorization: Bearer <token>'")
        scheme, _, credentials = header.partition(" ")
        given = credentials.strip().encode("latin-1", "replace")
        # Constant time: the comparison must not tell how much of a guess was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self.token):
            raise ApiError(401, "UNAUTHORIZED", "wrong admin token")

    def caller(self) -> str:
        """Who sent this request, for the log: the address, or through the socket the
        peer's uid and pid (SO_PEERCRED)."""
        if not self.via_socket:
            return f"from {self.request.remote_ip}"
        try:
            sock = self.request.connection.stream.socket  # type: ignore[union-attr]
            pid, uid, _gid = struct.unpack("3i", sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        except (AttributeError, OSError):
            return f"through {self.unix_socket}"
        try:
            import pwd

            name = f" ({pwd.getpwuid(uid).pw_name})"
        except (ImportError, KeyError):
            name = ""
        return f"through {self.unix_socket} by uid {uid}{name}, pid {pid}"

    def send_json(self, obj: object, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(_json(obj))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ApiError):
            code, message = exc.code, exc.message
        else:
            code = _CODES.get(status_code, "ERROR")
            message = self._reason
            if status_code == 405:
                message = f"{self.request.method} is not allowed on {self.request.path}"
            elif status_code == 404:
                message = f"no such resource: {self.request.path}"
            elif status_code == 500:
                message = "internal error; see the gateway's log"
        if status_code == 401:
            challenge = 'Bearer realm="ocpp-edge"'
            if self.request.headers.get("Authorization"):
                challenge += ', error="invalid_token"'  # RFC 6750 §3.1
            self.set_header("WWW-Authenticate", challenge)
        if status_code == 405:
            self.set_header("Allow", ", ".join(self.allowed_methods()))
        self.set_header("Content-Type", "application/json")
        self.finish(_json({"code": code, "message": message}))

    def allowed_methods(self) -> list[str]:
        base = tornado.web.RequestHandler
        return [m for m in ("GET", "DELETE", "POST", "PUT", "PATCH")
                if getattr(type(self), m.lower()) is not getattr(base, m.lower())]


class _StatusHandler(_Handler):
    def get(self) -> None:
        self.send_json(self.view.status())


class _ClientsHandler(_Handler):
    def get(self) -> None:
        clients = self.view.clients()
        self.send_json({"data": clients, "meta": {"count": len(clients)}})


_CLIENT_NOT_FOUND = ("CLIENTID_NOT_FOUND", "Client ID not found")  # EMQX 5's words


class _ClientHandler(_Handler):
    def get(self, cid: str) -> None:
        info = self.view.client(cid)
        if info is None:
            raise ApiError(404, *_CLIENT_NOT_FOUND)
        self.send_json(info)

    def delete(self, cid: str) -> None:
        if not self.view.kick(cid):
            raise ApiError(404, *_CLIENT_NOT_FOUND)
        log.info("cp %s: kicked through the admin endpoint (%s)", cid, self.caller())
        self.set_status(204)
        self.finish()


class _MetricsHandler(_Handler):
    def get(self) -> None:
        text = self.view.metrics_text()
        self.set_header("Content-Type", METRICS_CONTENT_TYPE)
        self.finish(text.encode("utf-8"))


class _HealthHandler(_Handler):
    """Plain text so that a probe is ``curl -fsS http://127.0.0.1:33080/healthz``."""

    public = True

    def get(self) -> None:
        ok, reason = self.view.healthy()
        self.set_status(200 if ok else 503)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(("ok" if ok else (reason or "unhealthy")) + "\n")


class _NotFoundHandler(_Handler):
    def prepare(self) -> None:
        super().prepare()  # without the token, unknown and known paths look the same
        raise tornado.web.HTTPError(404)

    def allowed_methods(self) -> list[str]:
        return []


def _log_request(handler: tornado.web.RequestHandler) -> None:
    # Scrapes every few seconds must not flood the journal: successes at debug level.
    status = handler.get_status()
    level = logging.DEBUG if status < 400 else logging.INFO if status < 500 else logging.WARNING
    if log.isEnabledFor(level):
        log.log(level, "admin: %d %s %s (%s) %.1f ms", status, handler.request.method,
                handler.request.path, handler.request.remote_ip,
                1000.0 * handler.request.request_time())


def make_admin_app(view: AdminView, token: str | None, unix_socket: str | None = None,
                   via_socket: bool = False) -> tornado.web.Application:
    """The admin endpoint's routes; ``token`` None means loopback without a token (reads
    only). ``via_socket``: the application of the Unix socket ``unix_socket``."""
    args = {"view": view, "token": token.encode() if token is not None else None,
            "unix_socket": unix_socket, "via_socket": via_socket}
    cid = r"/([^/]+)"  # one path segment, percent-decoded by Tornado
    return tornado.web.Application(
        [
            (API + "/status", _StatusHandler, args),
            (API + "/clients", _ClientsHandler, args),
            (API + "/clients" + cid, _ClientHandler, args),
            ("/metrics", _MetricsHandler, args),
            ("/healthz", _HealthHandler, args),
        ],
        default_handler_class=_NotFoundHandler, default_handler_args=args,
        log_function=_log_request)


class _AdminHTTPServer(tornado.httpserver.HTTPServer):
    """At most :data:`MAX_CONNECTIONS` connections at once; more are closed at once."""

    def handle_stream(self, stream: tornado.iostream.IOStream, address: Any) -> None:
        if len(getattr(self, "_connections", ())) >= MAX_CONNECTIONS:
            log.debug("admin: %d connections open; closing a new one", MAX_CONNECTIONS)
            stream.close()
            return
        super().handle_stream(stream, address)


def _server(app: tornado.web.Application) -> tornado.httpserver.HTTPServer:
    return _AdminHTTPServer(app, xheaders=False, idle_connection_timeout=60.0,
                            body_timeout=10.0, max_body_size=64 * 1024,
                            max_header_size=16 * 1024)


def start_admin_server(view: AdminView, host: str, port: int, token: str | None,
                       unix_socket: str | None = None,
                       ) -> tuple[tornado.httpserver.HTTPServer, int]:
    """Listen on ``host:port`` (port 0: any free port) in the running IOLoop; returns the
    server (``stop()`` it on shutdown) and the bound port. Raises OSError (port taken).
    ``unix_socket``: the admin socket's path, named in refusals of changes."""
    server = _server(make_admin_app(view, token, unix_socket))
    sockets = bind_sockets(port, address=host or None)
    server.add_sockets(sockets)
    return server, sockets[0].getsockname()[1]


class AdminSocket:
    """The admin endpoint on the Unix socket ``path``, mode 0660: root and the group may
    do everything (module docstring). ``close()`` stops it and removes the file."""

    def __init__(self, view: AdminView, path: str) -> None:
        self.path = path
        # Replaces a socket a previous run left behind; ValueError for any other file.
        sock = bind_unix_socket(path, mode=0o660)
        st = os.stat(path)
        self._identity = (st.st_dev, st.st_ino)
        self.server = _server(make_admin_app(view, None, path, via_socket=True))
        self.server.add_sockets([sock])

    def close(self) -> None:
        self.server.stop()
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:  # ours, not a newer gateway's
                os.unlink(self.path)
        except OSError:
            pass
