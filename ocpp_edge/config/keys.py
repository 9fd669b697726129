"""The keys of ocpp-edge.conf: the spec, the check functions it names, the key families.

Types, ranges and defaults are in ``configspec.ini`` next to this module (read once, at
import); the check functions it names are defined here and handed to configobj's
Validator by ``validator``. Besides the spec's keys: the keys of named listeners
(``ocpp.listener.<kind>.<name>`` and its options, see ``named_listener_spec``), the
per-action topics ``ocpp.upstream.topic.<Action>`` and EMQX's spellings ``strit_mode``.
"""

from __future__ import annotations

import os
import re
import socket
from importlib import resources
from urllib.parse import urlsplit

from configobj import ConfigObj

try:  # configobj 5.0.9 (and the 5.0.8 wheels) ship validate inside the package,
    from configobj import validate as _validate
except ImportError:  # older layouts as a top-level module.
    import validate as _validate

from ocpp_edge.config import tls as _tls
from ocpp_edge.config.settings import Listen
from ocpp_edge.core.router import (
    DNSTREAM_PLACEHOLDERS,
    EVENT_PLACEHOLDERS,
    STATUS_PLACEHOLDERS,
    UPSTREAM_PLACEHOLDERS,
    compile_template,
)

SUBPROTOCOLS = ("ocpp1.6", "ocpp2.0.1", "ocpp2.1")


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


def check_optional_duration(value, min=None, max=None):
    """``off`` (or ``0``) -> None; otherwise a duration."""
    text = _scalar(value)
    if text.lower() == "off" or (text and parse_duration(text) == 0):
        return None
    return check_duration(value, min, max)


_ID_RANGE = re.compile(r"(\d+)\s*-\s*(\d+)")
INT32_MAX = 2_147_483_647


def check_id_range(value):
    """``first-last`` -> (first, last): positive integers an OCPP 1.6 transactionId (a
    JSON integer, 32-bit in most charge points and backends) can hold."""
    text = _scalar(value)
    m = _ID_RANGE.fullmatch(text.strip())
    if not m:
        raise Invalid(f"must be a range like 1900000000-2147483647, got {text!r}")
    first, last = int(m[1]), int(m[2])
    if not 1 <= first < last <= INT32_MAX:
        raise Invalid(f"must run upwards within 1-{INT32_MAX}, got {text!r}")
    if last - first < 1000:
        raise Invalid(f"must hold at least 1000 ids, got {text!r}")
    return first, last


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
    an address says so (and then a token is required, see ``checks.admin_checks``)."""
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
    checked once it is known to be used (see ``checks``)."""
    text = _scalar(value)
    if not text:
        return None
    _absolute(text)
    return text


def check_socket_path(value):
    """``off`` (or empty) -> None; otherwise an absolute path, at most 107 bytes (the
    size of ``sun_path``). The directory must exist when the daemon starts (systemd makes
    /run/ocpp-edge: ``RuntimeDirectory=``)."""
    text = _scalar(value)
    if text.lower() in ("", "off"):
        return None
    _absolute(text)
    if len(os.fsencode(text)) > 107:
        raise Invalid(f"a Unix socket path has at most 107 bytes, got {text!r}")
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


# Characters some supported broker refuses or rewrites where the client id goes: in the
# will and status topics (${node}) NATS drops the connection for '.' and ' ' and takes
# '*' and '>' as wildcards, RabbitMQ turns '.' into '/' and '*' into '+', '+', '#' and '/'
# are MQTT's own; control characters are refused in client ids (MQTT 3.1.1 §1.5.3).
_CLIENT_ID_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f .*>+#/]|^\$")


def safe_hostname(name: str) -> str:
    """The host name as ``${hostname}`` in mqtt.client_id: every character but letters,
    digits, '-' and '_' becomes '-' (a dotted name would put '.' in the will topic)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", name) or "localhost"


def check_client_id(value):
    """Replace ``${hostname}``; no other placeholder is known."""
    text = _scalar(value)
    bad = re.search(r"\$\{[^}]*\}?", text.replace("${hostname}", ""))
    if bad:
        raise Invalid(f"unknown placeholder {bad[0]} (known: ${{hostname}})")
    rendered = text.replace("${hostname}", safe_hostname(socket.gethostname()))
    if not 1 <= len(rendered) <= 128:
        raise Invalid(f"must be 1 to 128 characters once ${{hostname}} is replaced, "
                      f"got {len(rendered)}")
    unsafe = _CLIENT_ID_UNSAFE.search(rendered)
    if unsafe:
        what = "a leading '$'" if unsafe[0] == "$" else repr(unsafe[0])
        raise Invalid(f"{rendered!r} contains {what}, which some brokers refuse or rewrite "
                      "(NATS closes the connection for '.' or ' ' in the will topic, where "
                      "the client id is ${node}; RabbitMQ turns '.' into '/'): use "
                      "letters, digits, '-', '_' and ':'")
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
    "admin_listen": check_admin_listen, "optional_duration": check_optional_duration,
    "id_range": check_id_range, "socket_path": check_socket_path,
}


def validator() -> _validate.Validator:
    """configobj's Validator, with the check functions above under the spec's names."""
    return _validate.Validator(_CHECKS)


SPEC_LINES = (resources.files("ocpp_edge.config") / "configspec.ini").read_text(
    "utf-8").splitlines()
_SPEC = ConfigObj(SPEC_LINES, list_values=False, interpolation=False)
SPEC_KEYS = tuple(_SPEC.scalars)

# Options of the two listener kinds, as written after ``ocpp.listener.<kind>.``.
_LISTENER_OPTIONS = {
    kind: tuple(k[len(f"ocpp.listener.{kind}."):] for k in SPEC_KEYS
                if k.startswith(f"ocpp.listener.{kind}."))
    for kind in ("ws", "wss")
}
ALL_LISTENER_OPTIONS = frozenset(_LISTENER_OPTIONS["ws"] + _LISTENER_OPTIONS["wss"])
NAMED_LISTENER = re.compile(r"ocpp\.listener\.(ws|wss)\.([^.]+)(?:\.(.*))?", re.DOTALL)
_LISTENER_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")

# ---------------------------------------------------------------------------------------
# Keys not in the spec.

# EMQX 4.x spells these keys ``strit_mode``; either spelling sets the same value.
ALIASES = {
    "ocpp.upstream.strit_mode": "ocpp.upstream.strict_mode",
    "ocpp.dnstream.strit_mode": "ocpp.dnstream.strict_mode",
}
OVERRIDE = re.compile(r"ocpp\.upstream\.topic\.(.*)", re.DOTALL)
ACTION = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def named_listener_spec(key: str) -> tuple[str | None, str | None]:
    """(check, None) for a key of a named listener, (None, problem) for a malformed one,
    (None, None) when ``key`` is not about listeners at all."""
    m = NAMED_LISTENER.fullmatch(key)
    if not m:
        return None, None
    kind, name, option = m.groups()
    if name in ALL_LISTENER_OPTIONS:
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

