"""Read and check ocpp-edge.conf. The only module that imports configobj.

The file holds flat ``key = value`` lines with dotted keys, as EMQX 4.x ``emqx_ocpp.conf``.
Types, ranges and defaults are in ``configspec.ini`` next to this module; the check
functions it names are defined here.

Errors: every problem in the file is reported at once, in file order, one per line of the
message; the ``ConfigError`` carries the first one's key and line. Relations between keys
(``ocpp.default_subprotocol`` in ``ocpp.subprotocols``, ...) are checked once every single
value is valid. A syntax error stops before the values are checked.

EMQX's spellings ``ocpp.upstream.strit_mode`` and ``ocpp.dnstream.strit_mode`` set the
same values as ``ocpp.*.strict_mode`` (both spellings of one key: an error); errors name
the key as it is written in the file.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import types
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import NamedTuple, NoReturn
from urllib.parse import urlsplit

from configobj import ConfigObj, ConfigObjError, DuplicateError, NestingError

try:  # configobj 5.0.9 (and the 5.0.8 wheels) ship validate inside the package,
    from configobj import validate as _validate
except ImportError:  # older layouts as a top-level module.
    import validate as _validate

from ocpp_edge.config import tls as _tls
from ocpp_edge.errors import ConfigError
from ocpp_edge.north.presence import EVENT_PLACEHOLDERS, STATUS_PLACEHOLDERS
from ocpp_edge.core.router import DNSTREAM_PLACEHOLDERS, UPSTREAM_PLACEHOLDERS, compile_template
from ocpp_edge.config.tls import TlsSettings

SUBPROTOCOLS = ("ocpp1.6", "ocpp2.0.1", "ocpp2.1")


@dataclass(frozen=True)
class Listen:
    host: str
    port: int


@dataclass(frozen=True)
class ListenerSettings:
    """One charge point listener: ``ocpp.listener.<kind>`` or ``ocpp.listener.<kind>.<name>``."""
    key: str                    # the address key, e.g. "ocpp.listener.wss.vlan"
    kind: str                   # "ws" | "wss"
    listen: Listen
    max_connections: int        # open connections (handshaking or upgraded) at once
    max_conn_rate: int          # new connections per second; 0: no limit
    allow_anonymous: bool       # resolved: the listener's own value or auth.allow_anonymous
    tls: TlsSettings | None     # wss only

    @property
    def scheme(self) -> str:
        return self.kind

    @property
    def profile(self) -> int:
        """The OCPP security profile this listener offers at most (SECURITY.md)."""
        if self.tls is None:
            return 1
        return 3 if self.tls.verify else 2


@dataclass(frozen=True)
class AuthSettings:
    password_file: str | None   # charge point credentials (ocpp-edge passwd)
    allow_anonymous: bool       # default of the listeners' allow_anonymous
    known_ids_only: bool        # 404 for an id without an entry in password_file
    max_failures: int           # failed authentications per address ...
    failure_window: float       # ... within this many seconds before 429


@dataclass(frozen=True)
class OcppSettings:
    listeners: tuple[ListenerSettings, ...]
    path: str
    subprotocols: tuple[str, ...]
    default_subprotocol: str
    fail_if_no_subprotocol: bool
    max_frame_size: int
    max_message_rate: int                       # frames/s per charge point; 0: no limit
    mountpoint: str
    upstream_topic: str                         # raw template text, validated
    upstream_topic_overrides: Mapping[str, str]  # Action -> template text
    upstream_reply_topic: str
    upstream_error_topic: str
    dnstream_topic: str
    handshake_timeout: float                    # seconds (all durations below too)
    ping_interval: float                        # 0: no server pings
    ping_timeout: float
    default_heartbeat_interval: float
    heartbeat_checking_times_backoff: int       # 0: no heartbeat checking
    upstream_strict_mode: bool                  # also read from ocpp.upstream.strit_mode
    upstream_awaiting_timeout: float
    dnstream_strict_mode: bool                  # also read from ocpp.dnstream.strit_mode
    dnstream_max_mqueue_len: int
    dnstream_awaiting_timeout: float
    dnstream_retry_interval: float
    dnstream_max_retries: int
    message_format_checking: str    # "all" | "upstream_only" | "dnstream_only" | "disable"
    json_schema_dir: str | None                 # None: the schemas shipped with ocpp-edge
    json_schema_id_prefix: str
    upstream_down_policy: str                   # "buffer" | "close_stations"
    status_topic: str | None                    # gateway status (retained); None: off
    event_topic: str | None                     # charge point events; None: off


@dataclass(frozen=True)
class MqttSettings:
    host: str
    port: int
    client_id: str              # ${hostname} already replaced
    username: str | None
    password: str | None        # mqtt.password, or the content of mqtt.password_file
    tls: bool                   # mqtts://
    cacertfile: str | None      # None: the system's CAs
    certfile: str | None
    keyfile: str | None
    verify_hostname: bool
    qos: int
    clean_session: bool
    keepalive: float            # seconds
    reconnect_delay_min: float
    reconnect_delay_max: float
    max_inflight: int


@dataclass(frozen=True)
class BufferSettings:
    dir: str                    # absolute; may not exist yet (the daemon creates it)
    max_messages: int
    max_bytes: int
    overflow: str               # "drop_oldest" | "drop_newest"
    fsync_interval: float       # seconds: group commit at most this often
    replay_rate: int            # messages per second from a backlog; 0: no limit


@dataclass(frozen=True)
class LogSettings:
    level: str                  # "debug" | "info" | "warning" | "error"


@dataclass(frozen=True)
class AdminSettings:
    listen: Listen | None       # None: the admin endpoint is off
    token_file: str | None
    token: str | None           # read from token_file; None: loopback without a token


@dataclass(frozen=True)
class Settings:
    ocpp: OcppSettings
    mqtt: MqttSettings
    buffer: BufferSettings
    auth: AuthSettings
    log: LogSettings
    admin: AdminSettings
    source: str                 # path of the file, or "<string>"


# ---------------------------------------------------------------------------------------
# Check functions named in configspec.ini. Each takes the value as configobj parsed it
# (a str, or a list when an unquoted value holds a comma) and the arguments written in
# the spec (always strings), and returns the converted value or raises Invalid with a
# sentence for the operator.

Invalid = _validate.ValidateError


def _scalar(value: str | list[str]) -> str:
    if isinstance(value, list):
        raise Invalid("a comma makes this a list; put the value in quotes if the comma "
                      "belongs to it")
    return value


def _check_range(number: float, text: str, low: float | None, high: float | None,
                 low_text: str | None, high_text: str | None) -> None:
    if low is not None and high is not None and not low <= number <= high:
        raise Invalid(f"must be between {low_text} and {high_text}, got {text!r}")
    if low is not None and number < low:
        raise Invalid(f"must be at least {low_text}, got {text!r}")
    if high is not None and number > high:
        raise Invalid(f"must be at most {high_text}, got {text!r}")


def check_string(value):
    return _scalar(value)


def check_integer(value, min=None, max=None):  # min/max: the names used in the spec
    text = _scalar(value)
    if not re.fullmatch(r"[+-]?\d+", text):
        raise Invalid(f"must be a whole number, got {text!r}")
    low = None if min is None else int(min)
    high = None if max is None else int(max)
    number = int(text)
    if low is not None and high == low + 1 and number not in (low, high):
        raise Invalid(f"must be {low} or {high}, got {text!r}")
    _check_range(number, text, low, high, min, max)
    return number


_BOOLEANS = {"true": True, "yes": True, "on": True, "1": True,
             "false": False, "no": False, "off": False, "0": False}


def check_boolean(value):
    text = _scalar(value)
    try:
        return _BOOLEANS[text.lower()]
    except KeyError:
        raise Invalid(f"must be true or false, got {text!r}") from None


def check_option(value, *choices):
    """One of ``choices``, matched ignoring case; returns the spelling in the spec."""
    text = _scalar(value)
    for choice in choices:
        if text.lower() == choice.lower():
            return choice
    raise Invalid(f"must be one of {', '.join(choices)}, got {text!r}")


def check_optional_boolean(value):
    """Empty -> None (another key decides); otherwise a boolean."""
    return None if _scalar(value) == "" else check_boolean(value)


_DURATION = re.compile(r"([+-]?\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?", re.IGNORECASE)
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``30s``, ``5m``, ``100ms``, ``1h``, ``2d`` or a bare number of seconds -> seconds."""
    m = _DURATION.fullmatch(text)
    if not m:
        raise Invalid("must be a duration like 30s, 5m, 100ms, 1h or 2d (a bare number "
                      f"is seconds), got {text!r}")
    number = float(m[1])
    if number < 0:
        raise Invalid(f"must not be negative, got {text!r}")
    return number * _SECONDS[(m[2] or "s").lower()]


def check_duration(value, min=None, max=None):
    text = _scalar(value)
    seconds = parse_duration(text)
    _check_range(seconds, text, min and parse_duration(min), max and parse_duration(max),
                 min, max)
    return seconds


_SIZE = re.compile(r"([+-]?\d+(?:\.\d+)?)\s*(b|kb|kib|mb|mib|gb|gib)?", re.IGNORECASE)
_BYTES = {"b": 1, "kb": 1 << 10, "kib": 1 << 10, "mb": 1 << 20, "mib": 1 << 20,
          "gb": 1 << 30, "gib": 1 << 30}


def parse_size(text: str) -> int:
    """``512B``, ``64KB``, ``256MB``, ``1GB`` (or ``KiB``...; 1KB = 1024 bytes) or a bare
    number of bytes -> bytes."""
    m = _SIZE.fullmatch(text)
    if not m:
        raise Invalid("must be a size like 512B, 64KB, 256MB or 1GB (a bare number is "
                      f"bytes), got {text!r}")
    number = float(m[1])
    if number < 0:
        raise Invalid(f"must not be negative, got {text!r}")
    return int(number * _BYTES[(m[2] or "b").lower()])


def check_size(value, min=None, max=None):
    text = _scalar(value)
    size = parse_size(text)
    _check_range(size, text, min and parse_size(min), max and parse_size(max), min, max)
    return size


_LISTEN = re.compile(r"(?:(?:\[(?P<v6>[^\[\]\s]+)\]|(?P<host>[^:\[\]\s]+)):)?(?P<port>\d+)")


def check_listen(value):
    """``off`` -> None; ``port``, ``host:port`` or ``[IPv6]:port`` -> Listen."""
    text = _scalar(value)
    if text.lower() == "off":
        return None
    m = _LISTEN.fullmatch(text)
    if not m:
        raise Invalid(f"must be off, a port, host:port or [IPv6]:port, got {text!r}")
    if int(m["port"]) > 65535:
        raise Invalid(f"the port must be 0 to 65535, got {text!r}")
    return Listen(m["v6"] or m["host"] or "0.0.0.0", int(m["port"]))


def check_admin_listen(value):
    """As ``check_listen``, but a bare port is on loopback (127.0.0.1): the admin
    endpoint can disconnect charge points, so it is reachable from elsewhere only when
    an address says so (and then a token is required, see ``_admin_checks``)."""
    text = _scalar(value)
    listen = check_listen(text)
    if listen is not None and text.isdigit():
        return Listen("127.0.0.1", listen.port)
    return listen


def check_url_path(value):
    text = _scalar(value)
    if not text.startswith("/"):
        raise Invalid(f"must start with '/', got {text!r}")
    if text.endswith("/"):
        raise Invalid(f"must not end with '/' (charge points connect to <path>/<id>), "
                      f"got {text!r}")
    if "//" in text or re.search(r"[%?#\s]", text):
        raise Invalid(f"must be a plain URL path without '//', '%', '?', '#' or spaces, "
                      f"got {text!r}")
    return text


def check_subprotocols(value):
    """A list (``a, b``), or one quoted string (``"a, b"``) -> tuple in the given order."""
    names = value if isinstance(value, list) else value.split(",")
    names = [name.strip() for name in names if name.strip()]
    if not names:
        raise Invalid(f"must list at least one of {', '.join(SUBPROTOCOLS)}")
    chosen: list[str] = []
    for name in names:
        try:
            name = check_option(name, *SUBPROTOCOLS)
        except Invalid:
            raise Invalid(f"{name!r} is not one of {', '.join(SUBPROTOCOLS)}") from None
        if name in chosen:
            raise Invalid(f"lists {name} twice")
        chosen.append(name)
    return tuple(chosen)


def check_mountpoint(value):
    text = _scalar(value)
    bad = sorted(set(text) & set("+#\x00"))
    if bad:
        raise Invalid(f"cannot contain {', '.join(repr(c) for c in bad)}")
    if "${" in text:
        raise Invalid("cannot contain placeholders")
    return text


def check_topic_template(value, kind):
    """A topic template (``kind`` is ``upstream`` or ``dnstream``); returns the text."""
    text = _scalar(value)
    if kind in ("status", "event") and text.lower() == "off":
        return None  # the presence topics can be turned off (see presence.py)
    allowed = {"upstream": UPSTREAM_PLACEHOLDERS, "dnstream": DNSTREAM_PLACEHOLDERS,
               "status": STATUS_PLACEHOLDERS, "event": EVENT_PLACEHOLDERS}[kind]
    try:
        compile_template(text, allowed)
    except ValueError as exc:
        hint = ""
        if kind == "dnstream" and "+" in text:
            hint = ("; the gateway subscribes to it with ${cid} replaced by '+' and "
                    "routes by that level")
        raise Invalid(f"{exc}{hint}") from None
    return text


def check_file(value):
    """Empty -> None; otherwise an absolute path. Whether the file can be read is
    checked once it is known to be used (see ``_cross_checks``)."""
    text = _scalar(value)
    if not text:
        return None
    _absolute(text)
    return text


def check_tls_versions(value):
    names = value if isinstance(value, list) else value.split(",")
    names = [name.strip().lower() for name in names if name.strip()]
    if not names:
        raise Invalid("must list tlsv1.3, tlsv1.2 or both")
    for name in names:
        if name not in _tls.TLS_VERSIONS:
            raise Invalid(f"{name!r} is not tlsv1.2 or tlsv1.3 (OCPP requires TLS 1.2 or "
                          "newer; older versions are never offered)")
    return tuple(dict.fromkeys(names))


def check_ciphers(value):
    """An OpenSSL cipher list for TLS 1.2 (``ECDHE-ECDSA-AES128-GCM-SHA256:...``);
    empty -> the OCPP set (see tls.py)."""
    text = ":".join(value) if isinstance(value, list) else value
    if text and _ssl_ciphers_unknown(text):
        raise Invalid(f"OpenSSL knows none of the ciphers in {text!r}")
    return text


def _ssl_ciphers_unknown(text: str) -> bool:
    import ssl
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(text)
    except ssl.SSLError:
        return True
    return False


def check_mqtt_url(value):
    """``mqtt://host[:port]`` or ``mqtts://host[:port]`` -> (tls, host, port)."""
    text = _scalar(value)
    try:
        url = urlsplit(text)
        port = url.port
    except ValueError:  # bad port or bracket; the text holds no password (checked below)
        url, port = None, None
    if url is not None and (url.username is not None or url.password is not None):
        # Never echo the URL: it would put the password in the journal.
        raise Invalid("put the user name and password in mqtt.username and "
                      "mqtt.password, not in the URL")
    if (url is None or url.scheme not in ("mqtt", "mqtts") or not url.hostname or port == 0
            or url.path not in ("", "/") or url.query or url.fragment):
        raise Invalid(f"must look like mqtt://host:port (the port defaults to 1883) or "
                      f"mqtts://host:port (TLS, port 8883), got {text!r}")
    try:
        url.hostname.encode("idna")  # what the resolver will be asked
    except UnicodeError:
        raise Invalid(f"{url.hostname!r} is not a valid host name") from None
    tls = url.scheme == "mqtts"
    return tls, url.hostname, port or (8883 if tls else 1883)


def check_client_id(value):
    """Replace ``${hostname}``; no other placeholder is known."""
    text = _scalar(value)
    bad = re.search(r"\$\{[^}]*\}?", text.replace("${hostname}", ""))
    if bad:
        raise Invalid(f"unknown placeholder {bad[0]} (known: ${{hostname}})")
    rendered = text.replace("${hostname}", socket.gethostname())
    if not 1 <= len(rendered) <= 128:
        raise Invalid(f"must be 1 to 128 characters once ${{hostname}} is replaced, "
                      f"got {len(rendered)}")
    return rendered


def _absolute(text: str) -> None:
    """Paths are absolute so that ``--check-config`` run from a shell and the service
    agree on them."""
    if not os.path.isabs(text):
        raise Invalid(f"must be an absolute path (the service does not run from the "
                      f"directory you are in), got {text!r}")


def check_schema_dir(value):
    """Empty -> None (the shipped schemas); otherwise an existing absolute directory."""
    text = _scalar(value)
    if not text:
        return None
    _absolute(text)
    if not os.path.exists(text):
        raise Invalid(f"{text!r} does not exist")
    if not os.path.isdir(text):
        raise Invalid(f"{text!r} is not a directory")
    return text


def check_state_dir(value):
    """An absolute directory that the daemon creates when it is missing. Whatever is
    already there must be a directory (or a symbolic link to one), and so must the
    nearest existing parent, or the daemon could not create it. Permissions are not
    checked: ``--check-config`` may run as another user than the service."""
    text = _scalar(value)
    _absolute(text)
    path = text.rstrip("/") or "/"  # not normpath: '/file/../x' cannot be created
    if os.path.lexists(path):
        if os.path.islink(path) and not os.path.exists(path):
            raise Invalid(f"{text!r} is a symbolic link to {os.readlink(path)!r}, which "
                          "does not exist")
        if not os.path.isdir(path):
            raise Invalid(f"{text!r} is not a directory")
        return text
    parent = os.path.dirname(path)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise Invalid(f"cannot be created: {parent!r} is not a directory")
    return text


_CHECKS = {
    "string": check_string, "integer": check_integer, "boolean": check_boolean,
    "option": check_option, "duration": check_duration, "size": check_size,
    "listen": check_listen, "url_path": check_url_path, "subprotocols": check_subprotocols,
    "mountpoint": check_mountpoint, "topic_template": check_topic_template,
    "mqtt_url": check_mqtt_url, "client_id": check_client_id,
    "schema_dir": check_schema_dir, "state_dir": check_state_dir,
    "optional_boolean": check_optional_boolean, "file": check_file,
    "tls_versions": check_tls_versions, "ciphers": check_ciphers,
    "admin_listen": check_admin_listen,
}

_SPEC_LINES = (resources.files("ocpp_edge.config") / "configspec.ini").read_text("utf-8").splitlines()
_SPEC = ConfigObj(_SPEC_LINES, list_values=False, interpolation=False)
_SPEC_KEYS = tuple(_SPEC.scalars)

# Options of the two listener kinds, as written after ``ocpp.listener.<kind>.``.
_LISTENER_OPTIONS = {
    kind: tuple(k[len(f"ocpp.listener.{kind}."):] for k in _SPEC_KEYS
                if k.startswith(f"ocpp.listener.{kind}."))
    for kind in ("ws", "wss")
}
_ALL_LISTENER_OPTIONS = frozenset(_LISTENER_OPTIONS["ws"] + _LISTENER_OPTIONS["wss"])
_NAMED_LISTENER = re.compile(r"ocpp\.listener\.(ws|wss)\.([^.]+)(?:\.(.*))?", re.DOTALL)
_LISTENER_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")

# ---------------------------------------------------------------------------------------
# Reading the file.

# EMQX 4.x spells these keys ``strit_mode``; either spelling sets the same value.
_ALIASES = {
    "ocpp.upstream.strit_mode": "ocpp.upstream.strict_mode",
    "ocpp.dnstream.strit_mode": "ocpp.dnstream.strict_mode",
}
_OVERRIDE = re.compile(r"ocpp\.upstream\.topic\.(.*)", re.DOTALL)
_ACTION = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
# The key of a ``key = value`` line and the name of a ``[section]`` line, as configobj
# reads them (configobj keeps no line numbers, so we find them in the text ourselves).
_KEY_LINE = re.compile(r"""\s*(?:"([^"]*)"|'([^']*)'|([^\s'"=\[#][^=]*?))\s*=""")
_SECTION_LINE = re.compile(r"""\s*\[+\s*(?:"([^"]*)"|'([^']*)'|([^\]]*?))\s*\]""")


class _Problem(NamedTuple):
    line: int | None
    key: str | None
    message: str


def _first_lines(lines: list[str], pattern: re.Pattern) -> dict[str, int]:
    found: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        m = pattern.match(line)
        if m:
            found.setdefault(next(g for g in m.groups() if g is not None), number)
    return found


def _cut_by_comment(raw: str, value: object, comment: str | None) -> bool:
    """True when an unquoted ``#`` right after the value (``secret#2``) made configobj
    cut it short; a comment after a space (``value  # note``) is fine."""
    comment = (comment or "").rstrip()
    raw = raw.rstrip()
    if not comment or not isinstance(value, str) or not raw.endswith(comment):
        return False
    before = raw[:-len(comment)]
    return not (before[-1:].isspace() or before[-1:] in ("", "=", '"', "'"))


def _parse_problem(error: ConfigObjError, key_lines: dict[str, int]) -> _Problem:
    m = _KEY_LINE.match(error.line)
    key = next((g for g in m.groups() if g is not None), None) if m else None
    if isinstance(error, DuplicateError) and key is not None:
        return _Problem(error.line_number, key,
                        f"is set twice (first on line {key_lines[key]})")
    if isinstance(error, NestingError | DuplicateError):
        return _Problem(error.line_number, None, "sections are not used; write dotted keys "
                        "like ocpp.mountpoint = ocpp/")
    if key is not None:
        return _Problem(error.line_number, key, "cannot read the value: check its quotes "
                        "(a value holding a quote, ',' or '#' must be quoted as a whole)")
    # The line is not echoed: it may hold a password.
    return _Problem(error.line_number, None, "expected a 'key = value' line")


def _raise(problems: list[_Problem], source: str) -> NoReturn:
    problems = sorted(problems, key=lambda p: (p.line is None, p.line or 0))
    first = problems[0]
    message = first.message + "".join(
        f"\n{ConfigError(p.message, key=p.key, line=p.line, path=source)}"
        for p in problems[1:])
    raise ConfigError(message, key=first.key, line=first.line, path=source)


def load(path: str) -> Settings:
    """Read and check the file at ``path``; raise ConfigError naming every problem."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read the configuration file: {exc.strerror}",
                          path=path) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError("the file is not UTF-8 text", path=path,
                          line=data[:exc.start].count(b"\n") + 1) from None
    return load_text(text, source=path)


def defaults() -> Settings:
    return load_text("")


def load_text(text: str, source: str = "<string>") -> Settings:
    """Check ``text`` as if read from the file ``source``."""
    lines = text.splitlines()
    key_lines = _first_lines(lines, _KEY_LINE)
    problems: list[_Problem] = []

    try:
        parsed = ConfigObj(lines, interpolation=False, raise_errors=False, file_error=False)
    except ConfigObjError as exc:
        problems = [_parse_problem(e, key_lines) for e in exc.errors]
    if problems:
        _raise(problems, source)

    section_lines = _first_lines(lines, _SECTION_LINE)
    for name in parsed.sections:
        problems.append(_Problem(section_lines.get(name), None, f"sections like [{name}] are "
                                 "not used; write dotted keys like ocpp.mountpoint = ocpp/"))

    values: dict[str, str | list[str]] = {}
    overrides: dict[str, str] = {}
    written: dict[str, str] = {}  # spec key -> the key as written (it may be an alias)
    extra_spec: list[str] = []  # checks for the keys of named listeners
    for key in parsed.scalars:
        line, value = key_lines.get(key), parsed[key]
        override = _OVERRIDE.fullmatch(key)
        name = _ALIASES.get(key, key)
        known = name in _SPEC_KEYS
        if not known and not override:
            spec, problem = _named_listener_spec(key)
            if problem is not None:
                problems.append(_Problem(line, key, problem))
                continue
            if spec is not None:
                extra_spec.append(f"{key} = {spec}")
                known = True
        if not known and not override:
            near = difflib.get_close_matches(key, _SPEC_KEYS, n=1, cutoff=0.85)
            hint = f" (did you mean {near[0]}?)" if near else ""
            problems.append(_Problem(line, key, f"unknown key{hint}"))
        elif name in written:  # both spellings of one key (configobj caught exact repeats)
            other = written[name]
            first = f"line {key_lines[other]}" if other in key_lines else "another line"
            if name == key:
                message = (f"is already set on {first} as {other} (EMQX's spelling of "
                           "this key); keep one of them")
            else:
                message = (f"is EMQX's spelling of {name}, which is already set on "
                           f"{first}; keep one of them")
            problems.append(_Problem(line, key, message))
        elif line and _cut_by_comment(lines[line - 1], value, parsed.inline_comments.get(key)):
            written[name] = key
            problems.append(_Problem(line, key, "'#' starts a comment and cut this value "
                                     "short; put the value in quotes if '#' belongs to it"))
        elif not override:
            written[name] = key
            values[name] = value
        elif not _ACTION.fullmatch(override[1]):
            problems.append(_Problem(line, key, f"{override[1]!r} is not an OCPP action name "
                                     "(letters, digits and '_', e.g. BootNotification)"))
        else:
            try:
                overrides[override[1]] = check_topic_template(value, "upstream")
            except Invalid as exc:
                problems.append(_Problem(line, key, str(exc)))

    checked = ConfigObj(values, configspec=_SPEC_LINES + extra_spec, interpolation=False)
    results = checked.validate(_validate.Validator(_CHECKS), preserve_errors=True)
    if results is not True:
        problems += [_Problem(key_lines.get(written.get(key, key)), written.get(key, key),
                              str(result))
                     for key, result in results.items() if result is not True]
    listeners: tuple[ListenerSettings, ...] = ()
    mqtt_password: str | None = None
    admin_token: str | None = None
    if not problems:
        problems = _cross_checks(checked, key_lines)
        listeners, more = _listeners(checked, values, key_lines)
        problems += more
        mqtt_password, more = _mqtt_checks(checked, key_lines)
        problems += more
        admin_token, more = _admin_checks(checked, key_lines)
        problems += more
    if problems:
        _raise(problems, source)
    return _settings(checked, overrides, listeners, mqtt_password, source, admin_token)


def _named_listener_spec(key: str) -> tuple[str | None, str | None]:
    """(check, None) for a key of a named listener, (None, problem) for a malformed one,
    (None, None) when ``key`` is not about listeners at all."""
    m = _NAMED_LISTENER.fullmatch(key)
    if not m:
        return None, None
    kind, name, option = m.groups()
    if name in _ALL_LISTENER_OPTIONS:
        return None, (f"unknown key: {name} is an option of "
                      f"{'wss listeners only' if kind == 'ws' else 'another listener kind'}")
    if not _LISTENER_NAME.fullmatch(name):
        return None, (f"{name!r} is not a listener name (1 to 32 letters, digits, '_' or "
                      f"'-'), as in ocpp.listener.{kind}.vlan = 10.0.0.1:33033")
    if option is None:
        return 'listen(default="off")', None
    if option not in _LISTENER_OPTIONS[kind]:
        known = ", ".join(_LISTENER_OPTIONS[kind])
        return None, f"unknown key: {kind} listeners have the options {known}"
    return _SPEC[f"ocpp.listener.{kind}.{option}"], None


def _listeners(v: ConfigObj, written: Mapping[str, object],
               key_lines: dict[str, int]) -> tuple[tuple[ListenerSettings, ...], list[_Problem]]:
    """The enabled listeners, the unnamed ones first; a named listener's option that is
    not written is inherited from the unnamed listener of the same kind."""
    problems: list[_Problem] = []
    bases = [f"ocpp.listener.{kind}" for kind in ("ws", "wss")]
    for key in written:
        m = _NAMED_LISTENER.fullmatch(key)
        if m and m[3] is None and m[2] not in _ALL_LISTENER_OPTIONS:
            bases.append(key)
    for key in written:  # options of a listener that has no address
        m = _NAMED_LISTENER.fullmatch(key)
        if m and m[2] not in _ALL_LISTENER_OPTIONS and m[3] is not None \
                and f"ocpp.listener.{m[1]}.{m[2]}" not in written:
            problems.append(_Problem(key_lines.get(key), key, f"sets an option of the "
                                     f"listener ocpp.listener.{m[1]}.{m[2]}, which has no "
                                     "address; add a line like "
                                     f"ocpp.listener.{m[1]}.{m[2]} = 0.0.0.0:33035"))
    listeners: list[ListenerSettings] = []
    seen: dict[tuple[str, int], str] = {}
    for base in bases:
        listen = v[base]
        if listen is None:
            continue
        kind = base.split(".")[2]

        def source(option: str, base: str = base, kind: str = kind) -> str:
            own = f"{base}.{option}"
            return own if own in written else f"ocpp.listener.{kind}.{option}"

        def get(option: str) -> object:
            return v[source(option)]

        def where(key: str, base: str = base) -> int | None:
            return key_lines.get(key) or key_lines.get(base)

        address = (listen.host, listen.port)
        if listen.port and address in seen:
            problems.append(_Problem(key_lines.get(base), base, f"{listen.host}:{listen.port} "
                                     f"is already the address of {seen[address]}"))
        seen[address] = base
        anonymous = get("allow_anonymous")
        tls = None
        if kind == "wss":
            verify = get("verify") == "verify_peer"
            if get("fail_if_no_peer_cert") and not verify:
                key = source("fail_if_no_peer_cert")
                problems.append(_Problem(where(key), key, "has no effect unless "
                                         f"{source('verify')} = verify_peer"))
            tls = TlsSettings(
                certfile=get("certfile") or "", keyfile=get("keyfile") or "",
                cacertfile=get("cacertfile"), verify=verify,
                fail_if_no_peer_cert=get("fail_if_no_peer_cert"),
                peer_cert_id=get("peer_cert_id"), tls_versions=get("tls_versions"),
                ciphers=get("ciphers"))
            try:
                _tls.server_context(tls)  # the daemon builds the same context
            except _tls.TlsError as exc:
                key = source(exc.field)
                problems.append(_Problem(where(key), key, f"{exc} (needed by the wss "
                                         f"listener {base})"))
        listeners.append(ListenerSettings(
            key=base, kind=kind, listen=listen, max_connections=get("max_connections"),
            max_conn_rate=get("max_conn_rate"),
            allow_anonymous=v["auth.allow_anonymous"] if anonymous is None else anonymous,
            tls=tls))
    return tuple(listeners), problems


def _mqtt_checks(v: ConfigObj, key_lines: dict[str, int]) -> tuple[str | None, list[_Problem]]:
    """The broker password (from mqtt.password or mqtt.password_file) and the problems
    of the mqtt.* keys that depend on each other."""
    problems: list[_Problem] = []
    password = v["mqtt.password"] or None
    password_file = v["mqtt.password_file"]
    if password_file is not None:
        key = "mqtt.password_file"
        if password is not None:
            problems.append(_Problem(key_lines.get(key), key, "mqtt.password is set too; "
                                     "keep one of them"))
        try:
            with open(password_file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or "not UTF-8 text"
            problems.append(_Problem(key_lines.get(key), key, f"cannot read "
                                     f"{password_file!r}: {why}"))
        else:
            if not lines or not lines[0]:
                problems.append(_Problem(key_lines.get(key), key, f"{password_file!r} is "
                                         "empty; its first line is the password"))
            else:
                password = lines[0]
    tls, _host, _port = v["mqtt.server"]
    files = [k for k in ("mqtt.cacertfile", "mqtt.certfile", "mqtt.keyfile") if v[k]]
    if not tls:
        for key in files:
            problems.append(_Problem(key_lines.get(key), key, "is only used with TLS: set "
                                     "mqtt.server = mqtts://host:port"))
    else:
        try:
            _tls.client_context(v["mqtt.cacertfile"], v["mqtt.certfile"], v["mqtt.keyfile"],
                                v["mqtt.verify_hostname"])
        except _tls.TlsError as exc:
            key = f"mqtt.{exc.field}"
            problems.append(_Problem(key_lines.get(key) or key_lines.get("mqtt.server"), key,
                                     str(exc)))
    return password, problems


def _admin_checks(v: ConfigObj, key_lines: dict[str, int]) -> tuple[str | None, list[_Problem]]:
    """The admin token (from admin.token_file) and the problems of the admin.* keys and
    of the presence topics' ${node} (the MQTT client id)."""
    from ocpp_edge.ops.admin import is_loopback, load_token  # tornado: only when needed

    problems: list[_Problem] = []
    token = None
    listen, token_file = v["admin.listen"], v["admin.token_file"]
    if token_file is not None:
        try:
            token = load_token(token_file)
        except ConfigError as exc:
            key = "admin.token_file"
            problems.append(_Problem(key_lines.get(key), key, exc.reason))
    # Issue "Operations": loopback by default; a bearer token when bound elsewhere.
    if listen is not None and token_file is None and not is_loopback(listen.host):
        key = "admin.listen"
        problems.append(_Problem(key_lines.get(key), key, (
            f"{listen.host}:{listen.port} can be reached from other machines, and the "
            "admin endpoint lets its callers disconnect charge points: set "
            "admin.token_file (a file holding a random token, e.g. head -c 32 "
            "/dev/urandom | base64 > /etc/ocpp-edge/admin.token; chmod 600) or listen "
            "on 127.0.0.1")))
    node = v["mqtt.client_id"]
    for key in ("ocpp.upstream.status_topic", "ocpp.upstream.event_topic"):
        if v[key] is not None and "${node}" in v[key] and (set(node) & set("/+#\x00")):
            problems.append(_Problem(key_lines.get(key) or key_lines.get("mqtt.client_id"),
                                     key, f"uses ${{node}}, the MQTT client id {node!r}, "
                                     "which cannot be a topic level ('/', '+' or '#' in "
                                     "it); change mqtt.client_id or this topic"))
    return token, problems


def _cross_checks(v: ConfigObj, key_lines: dict[str, int]) -> list[_Problem]:
    problems = []
    if v["ocpp.default_subprotocol"] not in v["ocpp.subprotocols"]:
        key = "ocpp.default_subprotocol"
        line = key_lines.get(key) or key_lines.get("ocpp.subprotocols")
        problems.append(_Problem(line, key, f"{v[key]} is not in ocpp.subprotocols "
                                 f"({', '.join(v['ocpp.subprotocols'])}); set "
                                 f"{key} to one of them"))
    if v["mqtt.reconnect_delay_max"] < v["mqtt.reconnect_delay_min"]:
        key = "mqtt.reconnect_delay_max"
        line = key_lines.get(key) or key_lines.get("mqtt.reconnect_delay_min")
        problems.append(_Problem(line, key, "must not be less than mqtt.reconnect_delay_min "
                                 f"({v['mqtt.reconnect_delay_min']:g}s), got "
                                 f"{v[key]:g}s"))
    # A new paho client per connection restarts packet ids, so QoS 2 releases owed on a
    # persistent session could be matched to new messages by the broker: refuse the pair.
    if v["mqtt.qos"] == 2 and not v["mqtt.clean_session"]:
        key = "mqtt.clean_session"
        line = key_lines.get(key) or key_lines.get("mqtt.qos")
        problems.append(_Problem(line, key, "must be true with mqtt.qos = 2 (QoS 2 over a "
                                 "resumed session is not supported); use mqtt.qos = 1 for "
                                 "a persistent session"))
    if v["auth.known_ids_only"] and v["auth.password_file"] is None:
        key = "auth.known_ids_only"
        problems.append(_Problem(key_lines.get(key), key, "needs auth.password_file: the "
                                 "known ids are the ones it lists"))
    # A schema directory of one's own replaces the shipped one for every protocol offered.
    schema_dir = v["ocpp.json_schema_dir"]
    if schema_dir is not None and v["ocpp.message_format_checking"] != "disable":
        missing = [f"{p}/" for p in v["ocpp.subprotocols"]
                   if not os.path.isdir(os.path.join(schema_dir, p))]
        if missing:
            key = "ocpp.json_schema_dir"
            needed = ", ".join(f"{p}/" for p in v["ocpp.subprotocols"])
            problems.append(_Problem(key_lines.get(key), key, f"{schema_dir!r} has no "
                                     f"{' or '.join(missing)} (it needs a sub-directory "
                                     "of JSON schemas for each protocol in "
                                     f"ocpp.subprotocols: {needed})"))
    # The gateway subscribes to mountpoint + topic with the ${cid} level replaced by '+'
    # and reads the charge point id from that level (SPEC "Downstream").
    mountpoint, topic = v["ocpp.mountpoint"], v["ocpp.dnstream.topic"]
    levels = (mountpoint + topic.replace("${clientid}", "${cid}")).split("/")
    if levels.count("${cid}") != 1 or topic.count("${") != 1:
        key = "ocpp.dnstream.topic"
        hint = ""
        if topic.startswith("${") and mountpoint and not mountpoint.endswith("/"):
            hint = f" (ocpp.mountpoint {mountpoint!r} does not end with '/')"
        problems.append(_Problem(key_lines.get(key), key, "must contain ${cid} (or "
                                 "${clientid}) exactly once, as a whole topic level, e.g. "
                                 f"cs/${{cid}}, got {topic!r}{hint}"))
    return problems


def _settings(v: ConfigObj, overrides: dict[str, str], listeners: tuple[ListenerSettings, ...],
              mqtt_password: str | None, source: str,
              admin_token: str | None = None) -> Settings:
    tls, host, port = v["mqtt.server"]
    return Settings(
        ocpp=OcppSettings(
            listeners=listeners,
            path=v["ocpp.path"],
            subprotocols=v["ocpp.subprotocols"],
            default_subprotocol=v["ocpp.default_subprotocol"],
            fail_if_no_subprotocol=v["ocpp.fail_if_no_subprotocol"],
            max_frame_size=v["ocpp.max_frame_size"],
            max_message_rate=v["ocpp.max_message_rate"],
            mountpoint=v["ocpp.mountpoint"],
            upstream_topic=v["ocpp.upstream.topic"],
            upstream_topic_overrides=types.MappingProxyType(overrides),
            upstream_reply_topic=v["ocpp.upstream.reply_topic"],
            upstream_error_topic=v["ocpp.upstream.error_topic"],
            dnstream_topic=v["ocpp.dnstream.topic"],
            handshake_timeout=v["ocpp.handshake_timeout"],
            ping_interval=v["ocpp.ping_interval"],
            ping_timeout=v["ocpp.ping_timeout"],
            default_heartbeat_interval=v["ocpp.default_heartbeat_interval"],
            heartbeat_checking_times_backoff=v["ocpp.heartbeat_checking_times_backoff"],
            upstream_strict_mode=v["ocpp.upstream.strict_mode"],
            upstream_awaiting_timeout=v["ocpp.upstream.awaiting_timeout"],
            dnstream_strict_mode=v["ocpp.dnstream.strict_mode"],
            dnstream_max_mqueue_len=v["ocpp.dnstream.max_mqueue_len"],
            dnstream_awaiting_timeout=v["ocpp.dnstream.awaiting_timeout"],
            dnstream_retry_interval=v["ocpp.dnstream.retry_interval"],
            dnstream_max_retries=v["ocpp.dnstream.max_retries"],
            message_format_checking=v["ocpp.message_format_checking"],
            json_schema_dir=v["ocpp.json_schema_dir"],
            json_schema_id_prefix=v["ocpp.json_schema_id_prefix"],
            upstream_down_policy=v["ocpp.upstream_down_policy"],
            status_topic=v["ocpp.upstream.status_topic"],
            event_topic=v["ocpp.upstream.event_topic"],
        ),
        mqtt=MqttSettings(
            host=host,
            port=port,
            client_id=v["mqtt.client_id"],
            username=v["mqtt.username"] or None,
            password=mqtt_password,
            tls=tls,
            cacertfile=v["mqtt.cacertfile"],
            certfile=v["mqtt.certfile"],
            keyfile=v["mqtt.keyfile"],
            verify_hostname=v["mqtt.verify_hostname"],
            qos=v["mqtt.qos"],
            clean_session=v["mqtt.clean_session"],
            keepalive=v["mqtt.keepalive"],
            reconnect_delay_min=v["mqtt.reconnect_delay_min"],
            reconnect_delay_max=v["mqtt.reconnect_delay_max"],
            max_inflight=v["mqtt.max_inflight"],
        ),
        buffer=BufferSettings(
            dir=v["buffer.dir"],
            max_messages=v["buffer.max_messages"],
            max_bytes=v["buffer.max_bytes"],
            overflow=v["buffer.overflow"],
            fsync_interval=v["buffer.fsync_interval"],
            replay_rate=v["buffer.replay_rate"],
        ),
        auth=AuthSettings(
            password_file=v["auth.password_file"],
            allow_anonymous=v["auth.allow_anonymous"],
            known_ids_only=v["auth.known_ids_only"],
            max_failures=v["auth.max_failures"],
            failure_window=v["auth.failure_window"],
        ),
        log=LogSettings(level=v["log.level"]),
        admin=AdminSettings(listen=v["admin.listen"], token_file=v["admin.token_file"],
                            token=admin_token),
        source=source,
    )
