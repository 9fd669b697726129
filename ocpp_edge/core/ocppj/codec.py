"""OCPP-J wire codec: one WebSocket text frame ⇄ one message object.

The contract, fuzzed in tests/test_codec_fuzz.py: ``decode`` either returns a message or
raises an :class:`~ocpp_edge.ocppj.errors.OcppError` whose ``unique_id`` is the frame's id
when it could be read and ``"-1"`` otherwise. Nothing else escapes.

Frame shapes (OCPP-J 1.6 §4.1.3; OCPP 2.0.1 Part 4 §4.2; OCPP 2.1 Part 4 §4.2):

    CALL            [2, "<id>", "<Action>", {payload}]
    CALLRESULT      [3, "<id>", {payload}]
    CALLERROR       [4, "<id>", "<code>", "<description>", {details}]
    CALLRESULTERROR [5, "<id>", "<code>", "<description>", {details}]   2.1 only
    SEND            [6, "<id>", "<Action>", {payload}]                  2.1 only
"""

from __future__ import annotations

import json
import math
import re

from ocpp_edge.core.ocppj.errors import (
    UNKNOWN_ID,
    FormatViolation,
    MessageTypeNotSupported,
    OcppError,
    RpcFrameworkError,
)
from ocpp_edge.core.ocppj.messages import (
    Call,
    CallError,
    CallResult,
    CallResultError,
    Message,
    MessageType,
    Send,
    Version,
)

MAX_ID_LENGTH = 36  # OCPP-J 1.6 §4.1.4 ("maximum of 36 characters"); 2.0.1 Part 4 §4.1.4
MAX_ACTION_LENGTH = 64

_ARITY = {2: 4, 3: 3, 4: 5, 5: 5, 6: 4}
_TYPES_FOR = {
    Version.V16: frozenset({2, 3, 4}),
    Version.V201: frozenset({2, 3, 4}),
    Version.V21: frozenset({2, 3, 4, 5, 6}),
}
# ASCII output: a lone surrogate (valid as a JSON escape, not as UTF-8) can never break a
# WebSocket text frame or an MQTT payload, and the C encoder is fastest this way.
_encoder = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))


def _no_constants(name: str) -> float:
    # NaN, Infinity and -Infinity are not JSON (RFC 8259 §6); Python accepts them.
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    value = float(text)
    if value in (math.inf, -math.inf):  # 1e999 would come back out as Infinity
        raise ValueError(f"number {text[:20]} is out of range")
    return value


_decoder = json.JSONDecoder(parse_constant=_no_constants, parse_float=_finite)


def dump_json(value: object) -> str:
    """Compact ASCII JSON: the one encoding of everything the gateway writes."""
    return _encoder.encode(value)


def parse_json(text: str | bytes) -> object:
    """Strict JSON (RFC 8259): no NaN/Infinity, no number beyond float range. Raises
    ValueError (UnicodeDecodeError included) or RecursionError."""
    if isinstance(text, bytes | bytearray):
        text = text.decode("utf-8")
    return _decoder.decode(text)


def _is_action(value: object) -> bool:
    # Actions are OCPP message names (e.g. "BootNotification"); a vendor's own names still
    # follow that pattern. Restricting the alphabet keeps actions safe in topics and logs.
    return (isinstance(value, str) and 0 < len(value) <= MAX_ACTION_LENGTH
            and value.isascii() and value.replace("_", "").replace("-", "").isalnum())


# The head of a CALL or SEND frame, up to the comma before its payload; JSON whitespace only
# (RFC 8259 §2), a MessageId without escapes' quotes, an action of plain message-name
# characters. Anything unusual simply does not match.
_WS = "[ \t\n\r]*"
_CALL_HEAD = re.compile(_WS + r"\[" + _WS + "[26]" + _WS + "," + _WS + r'"(?:[^"\\]|\\.)*"'
                        + _WS + "," + _WS + r'"[A-Za-z0-9_-]+"' + _WS + "," + _WS)


def payload_text(text: str) -> str | None:
    """The payload of a CALL or SEND frame as the charge point wrote it, or None.

    Only for a frame ``decode`` accepted as a CALL or SEND: the whole frame is then a valid
    JSON array of four elements, so once the head (type, id, action) is matched token by
    token, what remains up to the closing bracket is exactly the payload's own JSON text.
    It goes upstream as it is instead of being encoded again (the object ``decode`` built
    is what validation checked, and it is the same JSON value). None for a layout the
    head pattern does not cover (an escaped action, say): the caller encodes the object.
    """
    head = _CALL_HEAD.match(text)
    if head is None:
        return None
    end = len(text.rstrip(" \t\n\r")) - 1
    if end <= head.end() or text[end] != "]":
        return None
    raw = text[head.end():end].rstrip(" \t\n\r")
    if raw[:1] != "{" or raw[-1:] != "}":
        return None
    return raw


def decode(text: str, version: str = Version.V16) -> Message:
    """Parse one frame sent by a peer speaking ``version``."""
    try:
        frame = parse_json(text)
    except (ValueError, RecursionError) as exc:
        raise RpcFrameworkError(f"message is not valid JSON: {str(exc)[:80]}") from None
    if not isinstance(frame, list) or not frame:
        raise RpcFrameworkError("message is not a non-empty JSON array")

    uid = frame[1] if len(frame) > 1 else None
    if not isinstance(uid, str) or len(uid) > MAX_ID_LENGTH:
        raise RpcFrameworkError(
            f"MessageId must be a string of at most {MAX_ID_LENGTH} characters")

    type_id = frame[0]
    if type(type_id) is not int:  # bool is an int subclass: true is not a MessageTypeId
        raise RpcFrameworkError("MessageTypeId is not an integer", uid)
    if type_id not in _TYPES_FOR.get(version, _TYPES_FOR[Version.V16]):
        raise MessageTypeNotSupported(
            f"MessageTypeId {type_id} is not supported by {version}", uid)

    try:
        return _decode_typed(frame, type_id, uid)
    except OcppError as exc:
        exc.type_id = type_id
        raise


def _decode_typed(frame: list, type_id: int, uid: str) -> Message:
    n = len(frame)
    if type_id == MessageType.CALLERROR and n == 4:
        # Tolerated quirk: some 1.6 firmware omits the (required) ErrorDetails.
        frame.append({})
        n = 5
    if n != _ARITY[type_id]:
        raise RpcFrameworkError(
            f"a message of type {type_id} has {_ARITY[type_id]} elements, got {n}", uid)

    if type_id == MessageType.CALL or type_id == MessageType.SEND:
        _, _, action, payload = frame
        if not _is_action(action):
            raise RpcFrameworkError("Action must be a message name (letters, digits, _ or -)",
                                    uid)
        if not isinstance(payload, dict):
            raise FormatViolation("payload must be a JSON object", uid)
        return Call(uid, action, payload) if type_id == 2 else Send(uid, action, payload)

    if type_id == MessageType.CALLRESULT:
        payload = frame[2]
        if not isinstance(payload, dict):
            raise FormatViolation("payload must be a JSON object", uid)
        return CallResult(uid, payload)

    _, _, code, description, details = frame
    if details is None:
        details = {}  # tolerated quirk: null instead of {}
    if not isinstance(code, str) or not isinstance(description, str):
        raise FormatViolation("ErrorCode and ErrorDescription must be strings", uid)
    if not isinstance(details, dict):
        raise FormatViolation("ErrorDetails must be a JSON object", uid)
    cls = CallError if type_id == MessageType.CALLERROR else CallResultError
    return cls(uid, code, description, details)


def encode(msg: Message) -> str:
    """The frame text for ``msg``. Error details are always an object (SPEC)."""
    t = msg.type_id
    if t == MessageType.CALL or t == MessageType.SEND:
        return _encoder.encode([int(t), msg.unique_id, msg.action, msg.payload])
    if t == MessageType.CALLRESULT:
        return _encoder.encode([3, msg.unique_id, msg.payload])
    return _encoder.encode([int(t), msg.unique_id, msg.error_code, msg.error_description,
                            msg.error_details or {}])


def error_for(exc: OcppError, version: str) -> CallError:
    """The CALLERROR that answers a decoding failure, spelled for ``version``."""
    # An empty MessageId is still the charge point's id for its CALL: answer with it, or
    # the error would read as the answer to a CALL of its own with the id "-1".
    uid = UNKNOWN_ID if exc.unique_id is None else exc.unique_id
    return CallError(uid, exc.code_for(version), exc.description, exc.details)
