"""Topic router: OCPP-J messages ⇄ MQTT (topic, payload) in the EMQX OCPP gateway format.

Pure: no I/O, no configobj, no tornado, no paho. The gateway builds one ``Router`` from the
settings and asks it two questions per message:

* upstream: which topic and which bytes does this charge point message become?
* downstream: which charge point does this topic address, and which OCPP-J message does
  this payload describe?

Topic contract (EMQX ``emqx_ocpp.conf``; SPEC "Upstream" and "Downstream"):
topic = mountpoint + rendered template. Placeholders: ``${cid}``/``${clientid}`` (the
charge point id), ``${action}``, ``${id}`` (UniqueId), ``${type}`` (MessageTypeId),
``${proto}`` (e.g. ``ocpp1.6``). The charge point id is written as a topic level safe on
every supported broker (``encode_id``, ``ocpp.topic_id_encoding``) and read back from a
downstream topic with ``decode_id``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from ocpp_edge.core.ocppj.codec import dump_json, parse_json
from ocpp_edge.core.ocppj.messages import (
    Call,
    CallError,
    CallResult,
    Message,
    MessageType,
    Send,
)

UPSTREAM_PLACEHOLDERS = frozenset({"cid", "clientid", "action", "id", "type", "proto"})
DNSTREAM_PLACEHOLDERS = frozenset({"cid", "clientid"})
# The presence topics (ocpp_edge/north/presence.py): gateway status, charge point events.
STATUS_PLACEHOLDERS = frozenset({"node"})
EVENT_PLACEHOLDERS = frozenset({"cid", "clientid", "node", "event"})

_PLACEHOLDER = re.compile(r"\$\{([^{}]*)\}")
# Characters that may never appear in a topic we publish to (MQTT 3.1.1 §4.7.1, §1.5.3).
_TOPIC_FORBIDDEN = frozenset("+#\x00")
_ALIASES = {"clientid": "cid"}


class TopicError(ValueError):
    """A value cannot be placed in a topic (it would change the topic's levels)."""


# ---------------------------------------------------------------------------------------
# Charge point ids as topic levels (README "Charge point ids in topics").
#
# An id that is legal in OCPP may hold characters some supported broker treats specially
# in a topic: RabbitMQ turns '.' into a level separator and '*' into '+'; NATS drops the
# connection of a client that publishes a topic with '.' or ' ', and '*' and '>' are its
# wildcards; '+', '#' and '/' are MQTT's own; a topic starting with '$' is the broker's.
# ``percent`` (the default of ocpp.topic_id_encoding) writes each of them, and '%' itself
# so that the encoding stays reversible, as '%' and two upper-case hex digits. Every other
# character is left as it is, so plain ids (CP001, DE-ABC-123) look as they always did.

ID_ENCODINGS = ("percent", "none")
_ID_ESCAPES = {c: f"%{ord(c):02X}" for c in "%.*> +#/"}
_ID_TABLE = str.maketrans(_ID_ESCAPES)
_ID_UNESCAPE = re.compile("%(" + "|".join(f"{ord(c):02X}" for c in "%.*> +#/$") + ")",
                          re.IGNORECASE)


def encode_id(cid: str) -> str:
    """``cid`` as a topic level safe on every supported broker (reversible)."""
    out = cid.translate(_ID_TABLE)
    return "%24" + out[1:] if out.startswith("$") else out


def decode_id(level: str) -> str:
    """The charge point id a topic level written by :func:`encode_id` stands for.

    Hex digits are read in either case, ``%24`` anywhere, and characters a backend wrote
    without escaping are taken as they are (``CP.dot`` on Mosquitto); a ``%`` that starts
    no escape of the table stays a ``%``."""
    if "%" not in level:
        return level
    return _ID_UNESCAPE.sub(lambda m: chr(int(m[1], 16)), level)


def id_codec(encoding: str) -> tuple[Callable[[str], str], Callable[[str], str]]:
    """(encode, decode) for an ``ocpp.topic_id_encoding`` value."""
    if encoding == "percent":
        return encode_id, decode_id
    if encoding == "none":
        return _same, _same
    raise ValueError(f"unknown topic id encoding {encoding!r} (known: {', '.join(ID_ENCODINGS)})")


def _same(text: str) -> str:
    return text


@dataclass(frozen=True, slots=True)
class TopicTemplate:
    """A compiled template: alternating literal text and placeholder names."""

    text: str
    parts: tuple[tuple[bool, str], ...]  # (is_placeholder, literal-or-name)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(value for is_var, value in self.parts if is_var)

    def render(self, values: Mapping[str, str]) -> str:
        return "".join(values[v] if is_var else v for is_var, v in self.parts)


def compile_template(text: str, allowed: frozenset[str]) -> TopicTemplate:
    """Parse ``text``; raise ``ValueError`` naming what is wrong.

    An unknown placeholder is an error here, at start-up, never a literal ``undefined``
    in a topic at run time (SPEC "Upstream").
    """
    if not text:
        raise ValueError("a topic template cannot be empty")
    bad = sorted(set(text) & _TOPIC_FORBIDDEN)
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        raise ValueError(f"a topic template cannot contain {shown}")
    parts: list[tuple[bool, str]] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(text):
        literal = text[pos:m.start()]
        if "${" in literal:
            raise ValueError(f"unterminated placeholder in {text!r}")
        if literal:
            parts.append((False, literal))
        name = m.group(1)
        if name not in allowed:
            known = ", ".join(f"${{{n}}}" for n in sorted(allowed))
            raise ValueError(f"unknown placeholder ${{{name}}} (known: {known})")
        parts.append((True, _ALIASES.get(name, name)))
        pos = m.end()
    tail = text[pos:]
    if "${" in tail:
        raise ValueError(f"unterminated placeholder in {text!r}")
    if tail:
        parts.append((False, tail))
    return TopicTemplate(text, tuple(parts))


def _safe_level_value(name: str, value: str) -> str:
    # A value may not add or remove topic levels, nor wildcards: nothing a charge point
    # sends can reach another charge point's topics (SPEC "Security").
    if not value or "/" in value or any(c in _TOPIC_FORBIDDEN for c in value):
        raise TopicError(f"{name} {value!r} cannot be used in a topic")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape
        raise TopicError(f"{name} {value!r} cannot be used in a topic") from None
    return value


# ---------------------------------------------------------------------------------------
# Payloads (EMQX format). Keys are spelled as EMQX spells them.

def upstream_payload(msg: Message, action: str | None = None) -> dict:
    """The EMQX JSON object for a charge point message.

    Replies carry ``Action`` when the gateway knows the CALL they answer (an extension;
    EMQX omits it and consumers ignore unknown keys). CALLERRORs carry ``ErrorDetails``
    (EMQX drops it; SPEC keeps it).
    """
    if isinstance(msg, Call | Send):
        return {"MessageTypeId": int(msg.type_id), "UniqueId": msg.unique_id,
                "Action": msg.action, "Payload": msg.payload}
    if isinstance(msg, CallResult):
        obj: dict = {"MessageTypeId": 3, "UniqueId": msg.unique_id, "Payload": msg.payload}
    else:  # CallError / CallResultError
        obj = {"MessageTypeId": int(msg.type_id), "UniqueId": msg.unique_id,
               "ErrorCode": msg.error_code, "ErrorDescription": msg.error_description,
               "ErrorDetails": msg.error_details}
    if action is not None:
        obj["Action"] = action
    return obj


def upstream_text(msg: Message, action: str | None = None,
                  payload_text: str | None = None) -> str:
    """``upstream_payload`` as JSON text. With ``payload_text`` (a CALL/SEND payload as
    the charge point wrote it, codec.payload_text) only the envelope is encoded; the
    members are in the same order as ``upstream_payload``'s."""
    if payload_text is not None and isinstance(msg, Call | Send):
        # The action is plain message-name characters (codec._is_action): no escaping.
        return (f'{{"MessageTypeId":{int(msg.type_id)},"UniqueId":{dump_json(msg.unique_id)},'
                f'"Action":"{msg.action}","Payload":{payload_text}}}')
    return dump_json(upstream_payload(msg, action))


class DownstreamError(ValueError):
    """A downstream MQTT payload is not a valid EMQX-format OCPP message.

    ``unique_id`` is set when the UniqueId could be read, so the gateway can answer the
    backend on the error topic.
    """

    def __init__(self, message: str, unique_id: str | None = None,
                 action: str | None = None) -> None:
        super().__init__(message)
        self.unique_id = unique_id
        self.action = action


_DOWN_REQUIRED = {
    MessageType.CALL: ("UniqueId", "Action", "Payload"),
    MessageType.CALLRESULT: ("UniqueId", "Payload"),
    MessageType.CALLERROR: ("UniqueId", "ErrorCode", "ErrorDescription"),
}


def parse_downstream(payload: bytes | str) -> Message:
    """Turn a backend's EMQX-format JSON object into an OCPP-J message.

    SPEC "Downstream": MessageTypeId 2 needs UniqueId, Action, Payload; 3 needs UniqueId,
    Payload; 4 needs UniqueId, ErrorCode, ErrorDescription (ErrorDetails optional).
    """
    try:
        obj = parse_json(payload)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise DownstreamError(f"payload is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise DownstreamError("payload is not a JSON object")
    uid = obj.get("UniqueId")
    if not isinstance(uid, str) or len(uid) > 36:
        raise DownstreamError("UniqueId is missing, not a string or longer than 36 characters")
    action = obj.get("Action") if isinstance(obj.get("Action"), str) else None
    type_id = obj.get("MessageTypeId")
    if type(type_id) is not int or type_id not in _DOWN_REQUIRED:
        raise DownstreamError(f"MessageTypeId must be 2, 3 or 4, got {type_id!r}", uid, action)
    missing = [k for k in _DOWN_REQUIRED[MessageType(type_id)] if k not in obj]
    if missing:
        raise DownstreamError(f"missing {', '.join(missing)} for MessageTypeId {type_id}",
                              uid, action)
    if type_id == MessageType.CALL:
        if not isinstance(obj["Action"], str) or not obj["Action"]:
            raise DownstreamError("Action must be a non-empty string", uid)
        if not isinstance(obj["Payload"], dict):
            raise DownstreamError("Payload must be a JSON object", uid, action)
        return Call(uid, obj["Action"], obj["Payload"])
    if type_id == MessageType.CALLRESULT:
        if not isinstance(obj["Payload"], dict):
            raise DownstreamError("Payload must be a JSON object", uid, action)
        return CallResult(uid, obj["Payload"])
    code, desc = obj["ErrorCode"], obj["ErrorDescription"]
    details = obj.get("ErrorDetails", {})
    if not isinstance(code, str) or not isinstance(desc, str):
        raise DownstreamError("ErrorCode and ErrorDescription must be strings", uid, action)
    if details is None:
        details = {}
    if not isinstance(details, dict):
        raise DownstreamError("ErrorDetails must be a JSON object", uid, action)
    return CallError(uid, code, desc, details)


# ---------------------------------------------------------------------------------------

class Router:
    """Renders upstream topics and parses downstream ones for one configuration."""

    def __init__(self, *, mountpoint: str, upstream_topic: str,
                 upstream_topic_overrides: Mapping[str, str], reply_topic: str,
                 error_topic: str, dnstream_topic: str, id_encoding: str = "percent") -> None:
        self.mountpoint = mountpoint
        # ocpp.topic_id_encoding: how ${cid} is written in a topic and read back.
        self.encode_id, self.decode_id = id_codec(id_encoding)
        self._call = compile_template(upstream_topic, UPSTREAM_PLACEHOLDERS)
        self._per_action = {a: compile_template(t, UPSTREAM_PLACEHOLDERS)
                            for a, t in upstream_topic_overrides.items()}
        self._reply = compile_template(reply_topic, UPSTREAM_PLACEHOLDERS)
        self._error = compile_template(error_topic, UPSTREAM_PLACEHOLDERS)
        down = compile_template(dnstream_topic, DNSTREAM_PLACEHOLDERS)
        levels = (mountpoint + dnstream_topic.replace("${clientid}", "${cid}")).split("/")
        cid_levels = [i for i, level in enumerate(levels) if level == "${cid}"]
        n_cid = sum(1 for is_var, _ in down.parts if is_var)
        if len(cid_levels) != 1 or n_cid != 1:
            raise ValueError("the downstream topic must hold ${cid} exactly once, as a whole level")
        self._down_level = cid_levels[0]
        self._down_levels = levels
        self.dnstream_filter = "/".join("+" if i == self._down_level else lvl
                                        for i, lvl in enumerate(levels))
        # Values that never vary per message are checked once per charge point, not per
        # message: see ``values_for``.
        self._uses_id = any("id" in t.names for t in
                            (self._call, self._reply, self._error, *self._per_action.values()))

    # -- upstream ----------------------------------------------------------------------

    def upstream_topic(self, cid: str, proto: str, msg: Message,
                       action: str | None = None) -> str:
        """The topic for ``msg`` from charge point ``cid``; ``action`` names the CALL a
        reply answers when known. Raises ``TopicError`` if a value would break the topic."""
        if isinstance(msg, Call | Send):
            template = self._per_action.get(msg.action, self._call)
            action = msg.action
        elif isinstance(msg, CallResult):
            template = self._reply
        else:
            template = self._error
        values = {"cid": self.encode_id(cid), "proto": proto, "type": str(int(msg.type_id)),
                  "action": action if action is not None else "", "id": msg.unique_id}
        if "action" in template.names:
            _safe_level_value("Action", values["action"])
        if self._uses_id and "id" in template.names:
            _safe_level_value("UniqueId", msg.unique_id)
        return self.mountpoint + template.render(values)

    # -- downstream --------------------------------------------------------------------

    def downstream_cid(self, topic: str) -> str | None:
        """The charge point id a downstream topic addresses, or None if it is not ours."""
        levels = topic.split("/")
        if len(levels) != len(self._down_levels):
            return None
        for i, (got, want) in enumerate(zip(levels, self._down_levels, strict=True)):
            if i != self._down_level and got != want:
                return None
        return self.decode_id(levels[self._down_level]) or None

    # -- logs --------------------------------------------------------------------------

    def charge_point_of(self, topic: str, also: Iterable[str] = ()) -> str | None:
        """The charge point id in an upstream ``topic`` (for log lines), by the
        upstream templates and the templates ``also`` names (e.g. the event topic's);
        None if none of them matches or has ``${cid}``."""
        if not topic.startswith(self.mountpoint):
            return None
        rest = topic[len(self.mountpoint):]
        extra = []
        for text in also:
            try:
                extra.append(compile_template(text, UPSTREAM_PLACEHOLDERS | EVENT_PLACEHOLDERS
                                              | STATUS_PLACEHOLDERS))
            except ValueError:
                continue
        for template in (*self._per_action.values(), self._call, self._reply, self._error,
                         *extra):
            m = _matcher(template).fullmatch(rest)
            if m is not None and "cid" in m.groupdict():
                return self.decode_id(m["cid"])
        return None


def _matcher(template: TopicTemplate) -> re.Pattern[str]:
    """A regular expression matching what ``template`` renders; each placeholder is one
    group named after it (the first occurrence), matching within one topic level."""
    pattern, seen = [], set()
    for is_var, value in template.parts:
        if not is_var:
            pattern.append(re.escape(value))
        elif value in seen:
            pattern.append("[^/]*")
        else:
            seen.add(value)
            pattern.append(f"(?P<{value}>[^/]*)")
    return re.compile("".join(pattern))
