"""OCPP-J RPC messages (OCPP-J 1.6 §4, OCPP 2.0.1 Part 4 §4, OCPP 2.1 Part 4 §4)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class MessageType(IntEnum):
    CALL = 2
    CALLRESULT = 3
    CALLERROR = 4
    CALLRESULTERROR = 5  # OCPP 2.1 only
    SEND = 6  # OCPP 2.1 only: never answered


class Version:
    """Subprotocol names (OCPP-J 1.6 §3.1.2; 2.0.1 Part 4 §3.1.2)."""

    V16 = "ocpp1.6"
    V201 = "ocpp2.0.1"
    V21 = "ocpp2.1"
    ALL = (V16, V201, V21)


@dataclass(frozen=True, slots=True)
class Call:
    unique_id: str
    action: str
    payload: dict
    type_id = MessageType.CALL


@dataclass(frozen=True, slots=True)
class CallResult:
    unique_id: str
    payload: dict
    type_id = MessageType.CALLRESULT


@dataclass(frozen=True, slots=True)
class CallError:
    unique_id: str
    error_code: str
    error_description: str
    error_details: dict
    type_id = MessageType.CALLERROR


@dataclass(frozen=True, slots=True)
class CallResultError:
    """OCPP 2.1: the answer to a CALLRESULT that could not be processed."""

    unique_id: str
    error_code: str
    error_description: str
    error_details: dict
    type_id = MessageType.CALLRESULTERROR


@dataclass(frozen=True, slots=True)
class Send:
    """OCPP 2.1: an unconfirmed message; it is never answered."""

    unique_id: str
    action: str
    payload: dict
    type_id = MessageType.SEND


Message = Call | CallResult | CallError | CallResultError | Send
