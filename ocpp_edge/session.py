"""The sans-I/O state of one charge point connection.

Text from the charge point and messages from the backend go in; a list of effects comes
out. No sockets, no clock reads, no MQTT: the Tornado adapter and the gateway carry the
effects out. Tests drive it with strings.

Effects:

* :class:`ToChargePoint` — a frame to write to the charge point's WebSocket.
* :class:`ToBackend` — a message to publish upstream; ``action`` names the CALL a reply
  answers when the session knows it (SPEC "Upstream": replies carry ``Action``).

What the session remembers: the CALLs in flight each way, keyed by UniqueId, so that a
reply can be labelled with its action. Each table is bounded (``MAX_PENDING``); OCPP-J
§4.1.1 allows a single outstanding CALL per direction, so a full table means a peer that
never answers, and the oldest entry is forgotten.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ocpp_edge.ocppj.codec import decode, encode, error_for
from ocpp_edge.ocppj.errors import OcppError
from ocpp_edge.ocppj.messages import (
    Call,
    CallError,
    CallResult,
    CallResultError,
    Message,
    MessageType,
    Send,
)

MAX_PENDING = 16

log = logging.getLogger("ocpp_edge.session")


@dataclass(frozen=True, slots=True)
class ToChargePoint:
    text: str


@dataclass(frozen=True, slots=True)
class ToBackend:
    message: Message
    action: str | None = None


Effect = ToChargePoint | ToBackend


def _remember(table: dict[str, str], uid: str, action: str) -> None:
    table.pop(uid, None)  # a retransmission moves to the back
    table[uid] = action
    if len(table) > MAX_PENDING:
        del table[next(iter(table))]


class Session:
    """One charge point, one protocol version, for the life of one WebSocket."""

    __slots__ = ("cid", "version", "_to_cp", "_from_cp", "counters")

    def __init__(self, cid: str, version: str) -> None:
        self.cid = cid
        self.version = version
        self._to_cp: dict[str, str] = {}  # CALLs sent to the charge point: UniqueId → Action
        self._from_cp: dict[str, str] = {}  # CALLs from the charge point: UniqueId → Action
        self.counters = {"malformed": 0}

    # -- charge point → backend ----------------------------------------------------------

    def receive_text(self, text: str) -> list[Effect]:
        """One WebSocket text frame from the charge point."""
        try:
            msg = decode(text, self.version)
        except OcppError as exc:
            self.counters["malformed"] += 1
            log.warning("cp %s: malformed message (%s): %s", self.cid, exc.code_for(self.version),
                        exc.description)
            if exc.type_id in (MessageType.CALLERROR, MessageType.CALLRESULTERROR):
                # Never answer an error with an error: two peers could bounce CALLERRORs
                # forever (OCPP-J 1.6 §4.2.3 makes CALLERROR an answer, never a request).
                return []
            # Invalid input never goes unanswered and never goes upstream (SPEC "Framing").
            return [ToChargePoint(encode(error_for(exc, self.version)))]
        t = msg.type_id
        if t == MessageType.CALL:
            _remember(self._from_cp, msg.unique_id, msg.action)
            return [ToBackend(msg)]
        if t == MessageType.SEND:
            return [ToBackend(msg)]
        return [ToBackend(msg, self._to_cp.pop(msg.unique_id, None))]

    def reject_call(self, call: Call, exc: OcppError) -> list[Effect]:
        """Answer a charge point CALL the gateway cannot pass on (e.g. unroutable)."""
        self._from_cp.pop(call.unique_id, None)
        exc.unique_id = call.unique_id
        return [ToChargePoint(encode(error_for(exc, self.version)))]

    # -- backend → charge point ----------------------------------------------------------

    def send(self, msg: Message) -> list[Effect]:
        """A message from the backend for this charge point."""
        if isinstance(msg, Call):
            _remember(self._to_cp, msg.unique_id, msg.action)
        elif isinstance(msg, CallResult | CallError | CallResultError):
            self._from_cp.pop(msg.unique_id, None)
        elif isinstance(msg, Send):
            pass
        return [ToChargePoint(encode(msg))]

    def action_of_call_from_cp(self, unique_id: str) -> str | None:
        return self._from_cp.get(unique_id)
