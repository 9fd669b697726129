"""Checks between keys, made once every single value is valid: listener addresses and
their TLS files, the broker's password file and TLS files, the admin endpoint's token and
address, the presence topics' ``${node}``, and the relations between ocpp.* and mqtt.*
keys. Each returns the ``Problem``s it found, in no particular order (and what it read:
the listeners, the broker password, the admin token).
"""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Mapping
from typing import NamedTuple

from configobj import ConfigObj

from ocpp_edge.config import tls as _tls
from ocpp_edge.config.keys import ALL_LISTENER_OPTIONS, NAMED_LISTENER
from ocpp_edge.config.settings import ListenerSettings
from ocpp_edge.config.tls import TlsSettings
from ocpp_edge.errors import ConfigError

MIN_TOKEN_LENGTH = 16


class Problem(NamedTuple):
    """One thing wrong with the file: its line (None: not written in it), key, sentence."""
    line: int | None
    key: str | None
    message: str


def listener_checks(v: ConfigObj, written: Mapping[str, object], key_lines: dict[str, int],
                    ) -> tuple[tuple[ListenerSettings, ...], list[Problem]]:
    """The enabled listeners, the unnamed ones first; a named listener's option that is
    not written is inherited from the unnamed listener of the same kind."""
    problems: list[Problem] = []
    bases = [f"ocpp.listener.{kind}" for kind in ("ws", "wss")]
    for key in written:
        m = NAMED_LISTENER.fullmatch(key)
        if m and m[3] is None and m[2] not in ALL_LISTENER_OPTIONS:
            bases.append(key)
    for key in written:  # options of a listener that has no address
        m = NAMED_LISTENER.fullmatch(key)
        if m and m[2] not in ALL_LISTENER_OPTIONS and m[3] is not None \
                and f"ocpp.listener.{m[1]}.{m[2]}" not in written:
            problems.append(Problem(key_lines.get(key), key, f"sets an option of the "
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
            problems.append(Problem(key_lines.get(base), base, f"{listen.host}:{listen.port} "
                                    f"is already the address of {seen[address]}"))
        seen[address] = base
        anonymous = get("allow_anonymous")
        tls = None
        if kind == "wss":
            verify = get("verify") == "verify_peer"
            if get("fail_if_no_peer_cert") and not verify:
                key = source("fail_if_no_peer_cert")
                problems.append(Problem(where(key), key, "has no effect unless "
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
                problems.append(Problem(where(key), key, f"{exc} (needed by the wss "
                                        f"listener {base})"))
        listeners.append(ListenerSettings(
            key=base, kind=kind, listen=listen, max_connections=get("max_connections"),
            max_conn_rate=get("max_conn_rate"),
            allow_anonymous=v["auth.allow_anonymous"] if anonymous is None else anonymous,
            tls=tls))
    return tuple(listeners), problems


def mqtt_checks(v: ConfigObj, key_lines: dict[str, int]) -> tuple[str | None, list[Problem]]:
    """The broker password (from mqtt.password or mqtt.password_file) and the problems
    of the mqtt.* keys that depend on each other."""
    problems: list[Problem] = []
    password = v["mqtt.password"] or None
    password_file = v["mqtt.password_file"]
    if password_file is not None:
        key = "mqtt.password_file"
        if password is not None:
            problems.append(Problem(key_lines.get(key), key, "mqtt.password is set too; "
                                    "keep one of them"))
        try:
            with open(password_file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or "not UTF-8 text"
            problems.append(Problem(key_lines.get(key), key, f"cannot read "
                                    f"{password_file!r}: {why}"))
        else:
            if not lines or not lines[0]:
                problems.append(Problem(key_lines.get(key), key, f"{password_file!r} is "
                                        "empty; its first line is the password"))
            else:
                password = lines[0]
    tls, _host, _port = v["mqtt.server"]
    files = [k for k in ("mqtt.cacertfile", "mqtt.certfile", "mqtt.keyfile") if v[k]]
    if not tls:
        for key in files:
            problems.append(Problem(key_lines.get(key), key, "is only used with TLS: set "
                                    "mqtt.server = mqtts://host:port"))
    else:
        try:
            _tls.client_context(v["mqtt.cacertfile"], v["mqtt.certfile"], v["mqtt.keyfile"],
                                v["mqtt.verify_hostname"])
        except _tls.TlsError as exc:
            key = f"mqtt.{exc.field}"
            problems.append(Problem(key_lines.get(key) or key_lines.get("mqtt.server"), key,
                                    str(exc)))
    return password, problems


def admin_checks(v: ConfigObj, key_lines: dict[str, int]) -> tuple[str | None, list[Problem]]:
    """The admin token (from admin.token_file) and the problems of the admin.* keys and
    of the presence topics' ${node} (the MQTT client id)."""
    problems: list[Problem] = []
    token = None
    listen, token_file = v["admin.listen"], v["admin.token_file"]
    if token_file is not None:
        try:
            token = load_token(token_file)
        except ConfigError as exc:
            key = "admin.token_file"
            problems.append(Problem(key_lines.get(key), key, exc.reason))
    # Issue "Operations": loopback by default; a bearer token when bound elsewhere.
    if listen is not None and token_file is None and not is_loopback(listen.host):
        key = "admin.listen"
        problems.append(Problem(key_lines.get(key), key, (
            f"{listen.host}:{listen.port} can be reached from other machines, and the "
            "admin endpoint lets its callers disconnect charge points: set "
            "admin.token_file (a file holding a random token, e.g. head -c 32 "
            "/dev/urandom | base64 > /etc/ocpp-edge/admin.token; chmod 600) or listen "
            "on 127.0.0.1")))
    node = v["mqtt.client_id"]
    for key in ("ocpp.upstream.status_topic", "ocpp.upstream.event_topic"):
        if v[key] is not None and "${node}" in v[key] and (set(node) & set("/+#\x00")):
            problems.append(Problem(key_lines.get(key) or key_lines.get("mqtt.client_id"),
                                    key, f"uses ${{node}}, the MQTT client id {node!r}, "
                                    "which cannot be a topic level ('/', '+' or '#' in "
                                    "it); change mqtt.client_id or this topic"))
    return token, problems


def cross_checks(v: ConfigObj, key_lines: dict[str, int]) -> list[Problem]:
    problems = []
    if v["ocpp.default_subprotocol"] not in v["ocpp.subprotocols"]:
        key = "ocpp.default_subprotocol"
        line = key_lines.get(key) or key_lines.get("ocpp.subprotocols")
        problems.append(Problem(line, key, f"{v[key]} is not in ocpp.subprotocols "
                                f"({', '.join(v['ocpp.subprotocols'])}); set "
                                f"{key} to one of them"))
    if v["mqtt.reconnect_delay_max"] < v["mqtt.reconnect_delay_min"]:
        key = "mqtt.reconnect_delay_max"
        line = key_lines.get(key) or key_lines.get("mqtt.reconnect_delay_min")
        problems.append(Problem(line, key, "must not be less than mqtt.reconnect_delay_min "
                                f"({v['mqtt.reconnect_delay_min']:g}s), got "
                                f"{v[key]:g}s"))
    # A new paho client per connection restarts packet ids, so QoS 2 releases owed on a
    # persistent session could be matched to new messages by the broker: refuse the pair.
    # Only when written: the default (a persistent session) yields to mqtt.qos = 2.
    if (v["mqtt.qos"] == 2 and not v["mqtt.clean_session"]
            and "mqtt.clean_session" in key_lines):
        key = "mqtt.clean_session"
        line = key_lines.get(key) or key_lines.get("mqtt.qos")
        problems.append(Problem(line, key, "must be true with mqtt.qos = 2 (QoS 2 over a "
                                "resumed session is not supported); use mqtt.qos = 1 for "
                                "a persistent session"))
    if v["auth.known_ids_only"] and v["auth.password_file"] is None:
        key = "auth.known_ids_only"
        problems.append(Problem(key_lines.get(key), key, "needs auth.password_file: the "
                                "known ids are the ones it lists"))
    # A schema directory of one's own replaces the shipped one for every protocol offered.
    schema_dir = v["ocpp.json_schema_dir"]
    if schema_dir is not None and v["ocpp.message_format_checking"] != "disable":
        missing = [f"{p}/" for p in v["ocpp.subprotocols"]
                   if not os.path.isdir(os.path.join(schema_dir, p))]
        if missing:
            key = "ocpp.json_schema_dir"
            needed = ", ".join(f"{p}/" for p in v["ocpp.subprotocols"])
            problems.append(Problem(key_lines.get(key), key, f"{schema_dir!r} has no "
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
        problems.append(Problem(key_lines.get(key), key, "must contain ${cid} (or "
                                "${clientid}) exactly once, as a whole topic level, e.g. "
                                f"cs/${{cid}}, got {topic!r}{hint}"))
    return problems


# ---------------------------------------------------------------------------------------
# The admin endpoint's access rules: its token file, and which addresses need one.


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach: ``127.0.0.0/8``, ``::1``,
    ``localhost``. An empty host, a wildcard (``0.0.0.0``, ``::``) or any other name is
    not loopback: a name could resolve anywhere."""
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_token(path: str) -> str:
    """The bearer token in ``path`` (``admin.token_file``), surrounding whitespace removed.

    Refused with a :class:`ConfigError` saying how to fix it: a missing, unreadable or
    empty file; a file every user may read (the token lets its holder disconnect charge
    points); a token with spaces or control characters (it must fit in an HTTP header);
    a token shorter than 16 characters (guessable).
    """
    key = "admin.token_file"
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"the admin token file {path} is not a regular file", key=key)
            raw = f.read(4096)
    except FileNotFoundError:
        raise ConfigError(f"the admin token file {path} does not exist", key=key) from None
    except PermissionError:
        raise ConfigError(f"cannot read the admin token file {path}: permission denied",
                          key=key) from None
    except IsADirectoryError:
        raise ConfigError(f"the admin token file {path} is a directory", key=key) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the admin token file {path}: {exc.strerror}",
                          key=key) from None
    if st.st_mode & stat.S_IROTH:
        raise ConfigError(
            f"the admin token file {path} is readable by every user "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); make it private: chmod 600 {path}",
            key=key)
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        token = None
    if token is None or any(not ("!" <= c <= "~") for c in token):
        raise ConfigError(f"the admin token in {path} must be one word of printable ASCII "
                          "characters (no spaces)", key=key)
    if not token:
        raise ConfigError(f"the admin token file {path} is empty", key=key)
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(
            f"the admin token in {path} is shorter than {MIN_TOKEN_LENGTH} characters; "
            f"make a random one: head -c 32 /dev/urandom | base64 > {path}", key=key)
    return token
