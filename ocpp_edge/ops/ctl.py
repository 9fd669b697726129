"""``ocpp-edge ctl``: ask a running gateway through its admin endpoint.

::

    ocpp-edge ctl [--url URL] [--socket PATH] [--token-file FILE] [--config FILE] [--json]
                  [--timeout S] status | clients | client CID | kick CID

Standard library only, so that it starts fast and works wherever the gateway runs. The
admin socket (``--socket``, else ``admin.socket`` in the configuration file, else
``/run/ocpp-edge/admin.sock``) is used when this user may connect to it: root and the
members of the service's group, who may also kick. Otherwise (and always with ``--url``
but no ``--socket``) the TCP endpoint is asked, found in this order: ``--url``;
``admin.listen`` (and ``admin.token_file``) in the configuration file,
``/etc/ocpp-edge.conf`` by default; ``http://127.0.0.1:33080``. Over TCP anyone local may
read, but a kick needs the admin token (ops/admin.py). A configuration file this user may
not read (it holds the MQTT password and is often ``0640``) is not an error: the defaults
are tried.

Output is for people by default (durations like ``3h12m``, sizes like ``1.5 MB`` with
1 MB = 1024 KB as in the configuration file); ``--json`` prints the endpoint's JSON
instead (for ``kick``: ``{"clientid": CID, "kicked": true}``).

Exit codes: 0 done; 1 the gateway could not be reached or answered with an error; 2 usage;
3 no charge point with that id is connected (``client``, ``kick``).

The fields shown (missing ones print as ``-``):

* status: ``version``, ``started_at``, ``uptime_seconds``, ``config.file``,
  ``config.loaded_at``, ``upstream.state`` / ``.server`` / ``.since`` / ``.reconnects`` /
  ``.replay_rate``, ``charge_points.connected``, ``buffer.messages`` / ``.events`` /
  ``.bytes`` /
  ``.oldest_age_seconds`` / ``.dropped`` / ``.dead_letters`` / ``.max_messages`` /
  ``.max_bytes``,
  ``listeners[].name`` / ``.url`` / ``.connections``, and with the local policy
  ``local_mode.active`` / ``.reason`` / ``.since`` / ``.answers`` /
  ``.answered_awaiting_backend`` / ``.disagreements`` / ``.transactions_open`` / ``.held``.
* client: ``clientid``, ``username``, ``protocol``, ``listener``, ``ip_address``, ``port``,
  ``connected_at``, ``last_message_at``, ``messages_in``, ``messages_out``,
  ``pending_upstream``, ``pending_dnstream``, ``queue_len``.

Length: a self-contained command (argument parsing, HTTP and Unix-socket transport, and
the renderers of status, clients and client), run in its own process without importing
the daemon.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from typing import Any

DEFAULT_CONFIG = "/etc/ocpp-edge.conf"
DEFAULT_LISTEN = "127.0.0.1:33080"
DEFAULT_URL = "http://127.0.0.1:33080"
DEFAULT_SOCKET = "/run/ocpp-edge/admin.sock"

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNKNOWN_CLIENT = 0, 1, 2, 3


class CtlError(Exception):
    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


# -- formatting --------------------------------------------------------------------------


def fmt_duration(seconds: float | None) -> str:
    """``42s``, ``5m03s``, ``3h12m``, ``2d03h``: two units at most, the larger first."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def fmt_bytes(n: float | None) -> str:
    """``512 B``, ``1.5 KB``, ``256.0 MB`` (1 KB = 1024 bytes, as in the config file)."""
    if n is None:
        return "-"
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1024
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}"
    raise AssertionError  # unreachable


def _parse_time(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _when(text: Any) -> str:
    """A timestamp from the endpoint in this host's local time, as the journal shows it."""
    t = _parse_time(text)
    if t is None:
        return _show(text)
    return datetime.fromtimestamp(t).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _ago(text: Any, now: float) -> str:
    t = _parse_time(text)
    return "-" if t is None else f"{fmt_duration(now - t)} ago"


def _since(text: Any, now: float) -> str:
    t = _parse_time(text)
    return "-" if t is None else fmt_duration(now - t)


def _show(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _address(client: dict) -> str:
    ip, port = client.get("ip_address"), client.get("port")
    if not ip:
        return "-"
    if port is None:
        return str(ip)
    return f"[{ip}]:{port}" if ":" in str(ip) else f"{ip}:{port}"


def _pending(client: dict) -> int | None:
    up, dn = client.get("pending_upstream"), client.get("pending_dnstream")
    if up is None and dn is None:
        return None
    return (up or 0) + (dn or 0)


def _pairs(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "".join(f"{k.ljust(width)}  {v}\n" for k, v in rows)


def render_status(st: dict, now: float) -> str:
    up = st.get("upstream") or {}
    cfg = st.get("config") or {}
    buf = st.get("buffer") or {}
    cps = st.get("charge_points") or {}
    state = up.get("state") or ("connected" if up.get("connected") else None)
    link = _show(state)
    if up.get("server"):
        link += f" ({up['server']})" if state != "connected" else f" to {up['server']}"
    if up.get("since"):
        link += f" for {_since(up['since'], now)}"
    if up.get("reconnects") is not None:
        link += f", {up['reconnects']} reconnect{'s' if up['reconnects'] != 1 else ''}"
    rate = up.get("replay_rate")
    if state == "connected" and isinstance(rate, int | float) and rate >= 0.05:
        link += f", publishing {rate:.1f} msg/s" if rate < 10 else \
            f", publishing {rate:.0f} msg/s"
    messages, events = buf.get("messages"), buf.get("events")
    buffer = f"{_show(messages)} message{'s' if messages != 1 else ''}, "
    if events:  # presence and offline events, counted apart from the OCPP messages
        buffer += f"{events} event{'s' if events != 1 else ''}, "
    buffer += fmt_bytes(buf.get("bytes"))
    if buf.get("oldest_age_seconds") is not None:
        buffer += f", oldest {fmt_duration(buf['oldest_age_seconds'])}"
    buffer += f", {_show(buf.get('dropped'))} dropped"
    if buf.get("dead_letters") is not None:  # messages the broker would not take
        dead = buf["dead_letters"]
        buffer += f", {dead} dead letter{'' if dead == 1 else 's'}"
    if buf.get("max_messages") is not None or buf.get("max_bytes") is not None:
        buffer += f" (limits {_show(buf.get('max_messages'))} messages, " \
                  f"{fmt_bytes(buf.get('max_bytes'))})"
    rows = [
        ("version", f"ocpp-edge {_show(st.get('version'))}"),
        ("uptime", f"{fmt_duration(st.get('uptime_seconds'))}"
                   + (f" (since {_when(st['started_at'])})" if st.get("started_at") else "")),
        ("config", _show(cfg.get("file")) + (f", loaded {_ago(cfg['loaded_at'], now)}"
                                             if cfg.get("loaded_at") else "")),
        ("upstream", link),
        ("charge points", f"{_show(cps.get('connected'))} connected"),
        ("buffer", buffer),
    ]
    local = st.get("local_mode")
    if isinstance(local, dict):
        rows.append(("local mode", render_local_mode(local, now)))
    for lst in st.get("listeners") or []:
        rows.append(("listener", f"{_show(lst.get('name'))} {_show(lst.get('url'))}, "
                                 f"{_show(lst.get('connections'))} connected"))
    return _pairs(rows)


def render_local_mode(local: dict, now: float) -> str:
    """``local mode`` row: on (why, since when) or off, and what it did."""
    if local.get("active"):
        text = f"ON ({_show(local.get('reason'))})"
    else:
        text = "off"
    if local.get("since"):
        text += f" for {_since(local['since'], now)}"
    text += (f"; {_show(local.get('answers'))} answered locally, "
             f"{_show(local.get('answered_awaiting_backend'))} awaiting the backend, "
             f"{_show(local.get('disagreements'))} overruled, "
             f"{_show(local.get('transactions_open'))} local transaction(s)")
    if local.get("held"):
        text += ", a message held for its transaction id"
    return text


CLIENT_COLUMNS = ("ID", "PROTOCOL", "ADDRESS", "CONNECTED", "LAST MSG", "IN", "OUT",
                  "PENDING", "QUEUE")
_RIGHT = {"IN", "OUT", "PENDING", "QUEUE"}


def render_clients(clients: list[dict], now: float) -> str:
    if not clients:
        return "no charge points connected\n"
    rows = [CLIENT_COLUMNS]
    for c in sorted(clients, key=lambda c: str(c.get("clientid"))):
        rows.append((
            _show(c.get("clientid")), _show(c.get("protocol")), _address(c),
            _since(c.get("connected_at"), now), _ago(c.get("last_message_at"), now),
            _show(c.get("messages_in")), _show(c.get("messages_out")),
            _show(_pending(c)), _show(c.get("queue_len"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(CLIENT_COLUMNS))]
    lines = []
    for row in rows:
        cells = [cell.rjust(w) if name in _RIGHT else cell.ljust(w)
                 for cell, w, name in zip(row, widths, CLIENT_COLUMNS, strict=True)]
        lines.append("  ".join(cells).rstrip())
    n = len(clients)
    lines.append(f"{n} charge point{'s' if n != 1 else ''} connected")
    return "\n".join(lines) + "\n"


def render_client(c: dict, now: float) -> str:
    connected = _since(c.get("connected_at"), now)
    if c.get("connected_at"):
        connected = f"{connected} ago ({_when(c['connected_at'])})"
    return _pairs([
        ("id", _show(c.get("clientid"))),
        ("protocol", _show(c.get("protocol"))),
        ("listener", _show(c.get("listener"))),
        ("address", _address(c)),
        ("username", _show(c.get("username"))),
        ("connected", connected),
        ("last message", _ago(c.get("last_message_at"), now)),
        ("messages", f"{_show(c.get('messages_in'))} in, {_show(c.get('messages_out'))} out"),
        ("pending calls", f"{_show(c.get('pending_upstream'))} from the charge point "
                          f"awaiting the backend, {_show(c.get('pending_dnstream'))} to the "
                          "charge point awaiting its answer"),
        ("queue", f"{_show(c.get('queue_len'))} backend CALLs waiting"),
    ])


# -- finding the endpoint ----------------------------------------------------------------


def url_from_listen(value: str) -> str | None:
    """``admin.listen`` → the URL to reach it, None for ``off``. A wildcard address
    (``0.0.0.0``, ``::``) is reached on loopback."""
    text = value.strip()
    if text.lower() in ("off", "false", "no", "disabled", ""):
        return None
    if text.isdigit():
        host, port = "", text
    elif text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":")
    else:
        host, _, port = text.rpartition(":")
    if not port.isdigit():
        raise CtlError(f"admin.listen = {value!r} is not host:port or port", EXIT_USAGE)
    if host in ("", "0.0.0.0", "*"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{int(port)}"


def _read_config(path: str, explicit: bool) -> tuple[str | None, str | None, str | None]:
    """(admin.listen, admin.token_file, admin.socket) from the configuration file, or
    (None, None, DEFAULT_SOCKET); admin.socket None: off."""
    try:
        import configobj

        cfg = configobj.ConfigObj(path, interpolation=False, file_error=True)
    except Exception as exc:  # missing, unreadable, unparsable: the defaults will do
        if explicit:
            why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            print(f"ocpp-edge ctl: cannot read {path} ({why}); trying {DEFAULT_SOCKET}, "
                  f"then {DEFAULT_URL}", file=sys.stderr)
        return None, None, DEFAULT_SOCKET
    listen, token_file = cfg.get("admin.listen", DEFAULT_LISTEN), cfg.get("admin.token_file")
    sock = cfg.get("admin.socket", DEFAULT_SOCKET)
    sock = sock.strip() if isinstance(sock, str) else DEFAULT_SOCKET
    return (listen if isinstance(listen, str) else DEFAULT_LISTEN,
            token_file if isinstance(token_file, str) and token_file.strip() else None,
            None if sock.lower() in ("", "off") else sock)


def read_token(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            token = f.read(4096).strip()
    except PermissionError:
        raise CtlError(f"cannot read the token file {path}: permission denied (run as "
                       "root or as a member of the group that owns it)") from None
    except OSError as exc:
        raise CtlError(f"cannot read the token file {path}: {exc.strerror}") from None
    if not token:
        raise CtlError(f"the token file {path} is empty")
    return token


# -- talking to the gateway --------------------------------------------------------------


class _Answer:
    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.body = body
        self.note = ""  # added to an error message: why the admin socket was not used

    def json(self, url: str) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            raise CtlError(f"unexpected answer from {url} (HTTP {self.status}, not JSON): "
                           "is that ocpp-edge's admin endpoint?") from None


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over the admin socket (``Host: localhost``)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def socket_problem(path: str, timeout: float) -> str | None:
    """Why this user cannot use the admin socket ``path`` (None: it can)."""
    try:
        conn = _UnixConnection(path, timeout)
        conn.connect()
        conn.close()
    except PermissionError:
        return "permission denied (root and the members of its group may use it)"
    except FileNotFoundError:
        return "it does not exist (is ocpp-edge running?)"
    except OSError as exc:
        return (exc.strerror or str(exc)).lower()
    return None


def _request_unix(path: str, method: str, url_path: str, timeout: float) -> _Answer:
    conn = _UnixConnection(path, timeout)
    try:
        conn.request(method, url_path, headers={"Accept": "application/json",
                                                "User-Agent": "ocpp-edge-ctl"})
        resp = conn.getresponse()
        return _Answer(resp.status, resp.read())
    except (OSError, http.client.HTTPException) as exc:
        raise _unreachable(f"the admin socket {path}", exc, timeout) from None
    finally:
        conn.close()


def _request(base: str, method: str, path: str, token: str | None,
             timeout: float) -> _Answer:
    headers = {"Accept": "application/json", "User-Agent": "ocpp-edge-ctl"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(base + path, method=method, headers=headers)
    # No proxy: an http_proxy meant for the internet must not receive local requests
    # (and the token).
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as resp:
            return _Answer(resp.status, resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return _Answer(exc.code, exc.read())
    except urllib.error.URLError as exc:
        raise _unreachable(base, exc.reason, timeout) from None
    except (OSError, http.client.HTTPException) as exc:
        raise _unreachable(base, exc, timeout) from None


def _unreachable(base: str, reason: object, timeout: float) -> CtlError:
    if isinstance(reason, ConnectionRefusedError):
        why = "connection refused"
    elif isinstance(reason, TimeoutError | socket.timeout):
        why = f"no answer within {timeout:g} s"
    elif isinstance(reason, socket.gaierror):
        why = "unknown host name"
    elif isinstance(reason, http.client.RemoteDisconnected | ConnectionResetError):
        why = "the connection was closed without an answer"
    elif isinstance(reason, OSError) and reason.strerror:
        why = reason.strerror[0].lower() + reason.strerror[1:]
    else:
        why = str(reason)
    return CtlError(f"cannot reach the gateway at {base}: {why} — is ocpp-edge running "
                    "and admin.listen enabled?")


def _error_code(answer: _Answer) -> str | None:
    try:
        body = json.loads(answer.body)
    except ValueError:
        return None
    return body.get("code") if isinstance(body, dict) else None


def _error_message(answer: _Answer, base: str, had_token: bool) -> CtlError:
    try:
        body = json.loads(answer.body)
        message = body.get("message") if isinstance(body, dict) else None
    except ValueError:
        message = None
    if answer.status == 401:
        if had_token:
            return CtlError(f"the gateway at {base} refused the token (HTTP 401): check "
                            "--token-file or admin.token_file")
        return CtlError(f"the gateway at {base} requires the admin token (HTTP 401): pass "
                        "--token-file FILE, or --config FILE with admin.token_file")
    detail = message or answer.body[:200].decode("utf-8", "replace").strip() or "no details"
    return CtlError(f"the gateway at {base} answered HTTP {answer.status}: {detail}"
                    f"{answer.note}")


# -- command line ------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    # Options are accepted before and after the command (`ctl --json clients` and
    # `ctl clients --json`); SUPPRESS keeps a subcommand's unset option from overriding.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS,
                        help=f"admin endpoint (default: from admin.listen, else {DEFAULT_URL})")
    common.add_argument("--socket", default=argparse.SUPPRESS, metavar="PATH",
                        help=f"admin socket (default: admin.socket, else {DEFAULT_SOCKET}); "
                             "used when this user may connect to it")
    common.add_argument("--token-file", default=argparse.SUPPRESS, metavar="FILE",
                        help="file holding the admin token (default: admin.token_file)")
    common.add_argument("--config", "-c", default=argparse.SUPPRESS, metavar="FILE",
                        help=f"gateway configuration file (default: {DEFAULT_CONFIG})")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the endpoint's JSON instead of text")
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS, metavar="S",
                        help="seconds to wait for the gateway (default: 5)")
    p = argparse.ArgumentParser(
        prog="ocpp-edge ctl", parents=[common],
        description="Query and manage a running ocpp-edge through its admin endpoint.",
        epilog="exit codes: 0 ok, 1 gateway unreachable or error, 2 usage, "
               "3 unknown charge point")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("status", parents=[common], help="gateway, upstream link and buffer")
    sub.add_parser("clients", parents=[common], help="list the connected charge points")
    one = sub.add_parser("client", parents=[common], help="one connected charge point")
    one.add_argument("cid", metavar="CID", help="charge point id")
    kick = sub.add_parser("kick", parents=[common],
                          help="disconnect a charge point (WebSocket close 1000)")
    kick.add_argument("cid", metavar="CID", help="charge point id")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return _run(args)
    except CtlError as exc:
        print(f"ocpp-edge ctl: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    as_json = getattr(args, "json", False)
    timeout = getattr(args, "timeout", 5.0)
    if not timeout > 0:
        raise CtlError("--timeout must be a positive number of seconds", EXIT_USAGE)
    url = getattr(args, "url", None)
    token_file = getattr(args, "token_file", None)
    sock = getattr(args, "socket", None)
    explicit_socket = sock is not None
    listen: str | None = None
    config = getattr(args, "config", None)
    if url is None or token_file is None or sock is None:
        listen, config_token, config_socket = _read_config(config or DEFAULT_CONFIG,
                                                           config is not None)
        if token_file is None:
            token_file = config_token
        if sock is None and url is None:  # an explicit --url means TCP
            sock = config_socket
    # The admin socket when this user may use it (it also allows kicks), else TCP.
    unusable = None
    if sock is not None:
        unusable = socket_problem(sock, timeout)
        if unusable is not None and explicit_socket:
            raise CtlError(f"cannot use the admin socket {sock}: {unusable}")
    if sock is not None and unusable is None:
        base = f"the admin socket {sock}"
        token = None

        def call(method: str, path: str) -> _Answer:
            return _request_unix(sock, method, path, timeout)
    else:
        if url is None:
            url = DEFAULT_URL if listen is None else url_from_listen(listen)
            if url is None:
                raise CtlError(f"the admin endpoint is disabled in {config or DEFAULT_CONFIG}"
                               " (admin.listen = off) and the admin socket cannot be used"
                               + (f" ({sock}: {unusable})" if sock else "")
                               + "; enable one or pass --url")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise CtlError(f"--url {url!r} is not an http:// URL", EXIT_USAGE)
        base = url.rstrip("/")
        token = read_token(token_file) if token_file else None

        def call(method: str, path: str) -> _Answer:
            answer = _request(base, method, path, token, timeout)
            if answer.status == 403 and method != "GET" and sock is not None and unusable:
                answer.note = f" (cannot use the admin socket {sock}: {unusable})"
            return answer

    out = sys.stdout
    if args.command in ("status", "clients"):
        answer = call("GET", f"/api/v1/{args.command}")
        if answer.status != 200:
            raise _error_message(answer, base, token is not None)
        body = answer.json(base)
        now = time.time()  # after the answer: the gateway's clock read before it
        if as_json:
            out.write(json.dumps(body, indent=2, ensure_ascii=False) + "\n")
        elif args.command == "status":
            out.write(render_status(body, now))
        else:
            out.write(render_clients(body.get("data") or [], now))
        return EXIT_OK

    cid = args.cid
    path = "/api/v1/clients/" + urllib.parse.quote(cid, safe="")
    answer = call("GET" if args.command == "client" else "DELETE", path)
    if answer.status == 404 and _error_code(answer) == "CLIENTID_NOT_FOUND":
        raise CtlError(f"no charge point {cid!r} is connected", EXIT_UNKNOWN_CLIENT)
    if args.command == "client":
        if answer.status != 200:
            raise _error_message(answer, base, token is not None)
        body = answer.json(base)
        if as_json:
            out.write(json.dumps(body, indent=2, ensure_ascii=False) + "\n")
        else:
            out.write(render_client(body, time.time()))
        return EXIT_OK
    if answer.status not in (200, 204):
        raise _error_message(answer, base, token is not None)
    if as_json:
        out.write(json.dumps({"clientid": cid, "kicked": True}, ensure_ascii=False) + "\n")
    else:
        out.write(f"kicked {cid}: its connection was closed (1000)\n")
    return EXIT_OK
