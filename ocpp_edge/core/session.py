"""The sans-I/O state machine of one charge point connection.

Inputs: text from the charge point, messages from the backend, the passing of time (``now``
is always passed in, in seconds on any monotonic scale). Output: a list of effects, which
the gateway carries out. No sockets, no clock reads, no MQTT: tests drive it with strings
and a number.

Effects:

* :class:`ToChargePoint` — a frame for the charge point's WebSocket.
* :class:`ToBackend` — a message to publish upstream; ``action`` names the CALL a reply
  answers, when known (SPEC "Upstream": replies carry ``Action``).
* :class:`CloseConnection` — the connection must be closed (liveness).
* :class:`Unanswered` — a CALL from the charge point waited ``answer_after`` for the
  backend (``ocpp.upstream_down_policy = local``): the gateway answers it itself
  (core/local.py) instead of the CALLERROR ``upstream_timeout`` would give.

Call discipline (strict mode, SPEC "Call discipline"; OCPP-J 1.6 §4.1.1, 2.0.1 Part 4
§4.1.1 "at most one outstanding CALL"):

* Charge point → backend: every forwarded CALL waits in ``_from_cp`` until the backend
  answers or ``upstream_timeout`` passes; then the charge point gets a CALLERROR, so it
  never waits forever. A CALL retransmitted with the same UniqueId is published again and
  its deadline restarts. A charge point that sends a second CALL before the first is
  answered is tolerated (the spec says SHOULD NOT); each CALL is tracked on its own.
* Backend → charge point: one CALL in flight at a time; the others wait in a queue of
  ``max_queue``. Unanswered within ``dnstream_timeout`` (after ``max_retries`` resends
  ``retry_interval`` apart): the backend gets a CALLERROR and the queue moves on.
* A reply that matches nothing pending (late, duplicate, wrong id) is dropped and counted,
  never forwarded.
* Closing answers every downstream CALL still in flight or queued with a CALLERROR.

With strict mode off for a direction, messages pass straight through (labelled with their
action when known) and none of the above applies to that direction.
"""

from __future__ import annotations

import enum
import logging
import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ocpp_edge.core.ocppj.codec import decode, encode, error_for, payload_text
from ocpp_edge.core.ocppj.errors import (
    GenericError,
    InternalError,
    NotImplementedError_,
    OcppError,
)
from ocpp_edge.core.ocppj.messages import (
    Call,
    CallError,
    CallResult,
    CallResultError,
    Message,
    MessageType,
    Send,
)

log = logging.getLogger("ocpp_edge.session")

MAX_LABELS = 16  # non-strict mode: how many CALL ids per direction are remembered for labels

# check(version, action, payload, is_response) → None when valid, else the OcppError to
# answer with. A request whose action has no schema is NotImplemented; a response without
# a schema passes.
Checker = Callable[[str, str, dict, bool], OcppError | None]


@dataclass(frozen=True, slots=True)
class ToChargePoint:
    text: str


@dataclass(frozen=True, slots=True)
class ToBackend:
    message: Message
    action: str | None = None
    # A CALL/SEND payload's JSON text as the charge point sent it (codec.payload_text):
    # published as it is instead of encoded again; None: encode ``message``.
    payload_text: str | None = None


@dataclass(frozen=True, slots=True)
class CloseConnection:
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Unanswered:
    unique_id: str
    action: str


Effect = ToChargePoint | ToBackend | CloseConnection | Unanswered


@dataclass(frozen=True, slots=True)
class Policy:
    """What the configuration says about one session's behaviour (times in seconds)."""

    upstream_strict: bool = True
    upstream_timeout: float = 30.0
    dnstream_strict: bool = True
    dnstream_timeout: float = 30.0
    retry_interval: float = 30.0
    max_retries: int = 0
    max_queue: int = 100
    check_upstream: Checker | None = None
    check_dnstream: Checker | None = None
    heartbeat_interval: float = 60.0
    heartbeat_backoff: int = 2  # 0: no heartbeat checking
    # ocpp.upstream_down_policy = local: a CALL the backend has not answered after this
    # many seconds is handed to the gateway (Unanswered) instead of timing out; None: off.
    answer_after: float | None = None


class State(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


class SessionClosed(RuntimeError):
    """An input arrived after ``close()``: a bug in the caller, never the peer's fault."""


class _Outgoing:
    """The downstream CALL in flight to the charge point."""

    __slots__ = ("call", "text", "deadline", "retries_left")

    def __init__(self, call: Call, text: str, deadline: float, retries: int) -> None:
        self.call = call
        self.text = text
        self.deadline = deadline
        self.retries_left = retries


def _label(table: dict[str, str], uid: str, action: str) -> None:
    table.pop(uid, None)
    table[uid] = action
    if len(table) > MAX_LABELS:
        del table[next(iter(table))]


# Most sessions never count anything: they share this until their first count.
_NO_COUNTS: Mapping[str, int] = MappingProxyType({
    "malformed": 0, "orphan_replies": 0, "timeouts_upstream": 0, "timeouts_dnstream": 0,
    "schema_failures": 0, "queue_full": 0})


class Session:
    """One charge point, one protocol version, for the life of one WebSocket."""

    # One per connected charge point: no per-instance __dict__ (issue "Performance").
    __slots__ = ("cid", "version", "policy", "state", "_from_cp", "_in_flight", "_queue",
                 "_to_cp_labels", "_hb_interval", "_hb_start", "_last_rx", "counters")

    def __init__(self, cid: str, version: str, now: float,
                 policy: Policy | None = None) -> None:
        self.cid = cid
        self.version = version
        self.policy = policy or Policy()
        self.state = State.OPEN
        # charge point → backend: UniqueId → (action, deadline); insertion order is
        # deadline order because the timeout is the same for all.
        self._from_cp: dict[str, tuple[str, float]] = {}
        # backend → charge point
        self._in_flight: _Outgoing | None = None
        # An empty deque costs ~760 bytes (its first block): () until a CALL has to wait.
        self._queue: deque[Call] | tuple[()] = ()
        self._to_cp_labels: dict[str, str] = {}  # non-strict downstream: id → action
        # liveness (EMQX keepalive: sampled every interval since the timer started)
        self._hb_interval = self.policy.heartbeat_interval
        self._hb_start = now
        self._last_rx = now
        self.counters: Mapping[str, int] = _NO_COUNTS  # a dict of its own once one counts

    def _count(self, key: str) -> None:
        if self.counters is _NO_COUNTS:
            self.counters = dict(_NO_COUNTS)
        self.counters[key] += 1  # type: ignore[index]

    # -- introspection -----------------------------------------------------------------

    @property
    def pending_from_cp(self) -> int:
        return len(self._from_cp)

    @property
    def queue_length(self) -> int:
        return len(self._queue) + (self._in_flight is not None)

    def next_deadline(self) -> float | None:
        """The earliest time ``on_timer`` has something to do (None: nothing pending)."""
        candidates = []
        if self._from_cp:
            candidates.append(next(iter(self._from_cp.values()))[1])
        if self._in_flight is not None:
            candidates.append(self._in_flight.deadline)
        hb = self._heartbeat_deadline()
        if hb is not None:
            candidates.append(hb)
        return min(candidates) if candidates else None

    def _heartbeat_deadline(self) -> float | None:
        backoff = self.policy.heartbeat_backoff
        if backoff <= 0 or self._hb_interval <= 0:
            return None
        # EMQX checks at every interval tick whether anything arrived since the previous
        # tick and closes after `backoff` silent ticks in a row.
        i = self._hb_interval
        ticks_seen = math.ceil((self._last_rx - self._hb_start) / i)
        return self._hb_start + (ticks_seen + backoff) * i

    def _check_open(self) -> None:
        if self.state is not State.OPEN:
            raise SessionClosed(f"session {self.cid} is closed")

    # -- charge point → backend --------------------------------------------------------

    def receive_text(self, text: str, now: float) -> list[Effect]:
        """One WebSocket text frame from the charge point."""
        self._check_open()
        self._last_rx = now
        try:
            msg = decode(text, self.version)
        except OcppError as exc:
            self._count("malformed")
            log.warning("cp %s: malformed message (%s): %s", self.cid,
                        exc.code_for(self.version), exc.description)
            if exc.type_id in (MessageType.CALLERROR, MessageType.CALLRESULTERROR):
                # Never answer an error with an error: two peers could bounce CALLERRORs
                # forever (a CALLERROR is an answer, OCPP-J 1.6 §4.2.3).
                return []
            # Invalid input never goes unanswered and never goes upstream (SPEC "Framing").
            # To the charge point this answers whatever CALL of its own had that id, so
            # that CALL is no longer pending (it must not get a second answer later).
            self._from_cp.pop(exc.unique_id, None)
            return [ToChargePoint(encode(error_for(exc, self.version)))]

        if isinstance(msg, Call):
            return self._call_from_cp(msg, now, text)
        if isinstance(msg, Send):
            problem = self._check(self.policy.check_upstream, msg.action, msg.payload, False)
            if problem is not None:
                # OCPP 2.1 SEND is never answered: drop it, loudly.
                log.warning("cp %s: invalid SEND %s dropped: %s", self.cid, msg.action,
                            problem.description)
                return []
            return [ToBackend(msg, None, payload_text(text))]
        if isinstance(msg, CallResultError):
            return [ToBackend(msg)]
        return self._reply_from_cp(msg, now)

    def _call_from_cp(self, call: Call, now: float, text: str) -> list[Effect]:
        problem = self._check(self.policy.check_upstream, call.action, call.payload, False)
        if problem is not None:
            problem.unique_id = call.unique_id
            self._from_cp.pop(call.unique_id, None)  # answered now, as far as it knows
            return [ToChargePoint(encode(error_for(problem, self.version)))]
        if self.policy.upstream_strict:
            # A retransmission (same id) is republished and its deadline restarts.
            self._from_cp.pop(call.unique_id, None)
            wait = self.policy.answer_after
            self._from_cp[call.unique_id] = (
                call.action, now + (self.policy.upstream_timeout if wait is None else wait))
        return [ToBackend(call, None, payload_text(text))]

    def _reply_from_cp(self, reply: CallResult | CallError, now: float) -> list[Effect]:
        out: list[Effect] = []
        if self.policy.dnstream_strict:
            flight = self._in_flight
            if flight is None or flight.call.unique_id != reply.unique_id:
                self._count("orphan_replies")
                log.info("cp %s: reply %s matches no pending CALL; dropped", self.cid,
                         reply.unique_id)
                return []
            action: str | None = flight.call.action
            self._in_flight = None
        else:
            action = self._to_cp_labels.pop(reply.unique_id, None)
            if not self._to_cp_labels:
                self._to_cp_labels.clear()
        if isinstance(reply, CallResult) and action is not None:
            problem = self._check(self.policy.check_upstream, action, reply.payload, True)
            if problem is not None:
                # SPEC: an invalid CALLRESULT is reported upstream as an error, not passed on.
                out.append(ToBackend(CallError(
                    reply.unique_id, problem.code_for(self.version),
                    f"the charge point's {action} response is invalid: {problem.description}",
                    {"Payload": reply.payload}), action))
                return out + self._next_downstream(now)
        out.append(ToBackend(reply, action))
        return out + self._next_downstream(now)

    def settle(self, unique_id: str) -> bool:
        """The gateway answered the charge point's CALL ``unique_id`` itself (local mode):
        it is no longer pending, and a backend reply to it is no reply of this session's.
        False when it was not pending."""
        found = self._from_cp.pop(unique_id, None) is not None
        if not self._from_cp:
            self._from_cp.clear()
        return found

    def reject_call(self, call: Call, exc: OcppError) -> list[Effect]:
        """Answer a charge point CALL the gateway could not pass on (e.g. unroutable)."""
        self._from_cp.pop(call.unique_id, None)
        exc.unique_id = call.unique_id
        return [ToChargePoint(encode(error_for(exc, self.version)))]

    # -- backend → charge point --------------------------------------------------------

    def send(self, msg: Message, now: float) -> list[Effect]:
        """A message from the backend for this charge point."""
        self._check_open()
        if isinstance(msg, Call):
            return self._call_from_backend(msg, now)
        if isinstance(msg, CallResult | CallError):
            return self._reply_from_backend(msg)
        return [ToChargePoint(encode(msg))]

    def _call_from_backend(self, call: Call, now: float) -> list[Effect]:
        strict = self.policy.dnstream_strict
        flight = self._in_flight
        if strict and (flight is not None and flight.call.unique_id == call.unique_id or any(
                q.unique_id == call.unique_id for q in self._queue)):
            # The pending CALL will be answered once; a copy (e.g. an MQTT redelivery)
            # gets no answer of its own.
            log.info("cp %s: CALL %s is already pending; duplicate ignored", self.cid,
                     call.unique_id)
            return []
        problem = self._check(self.policy.check_dnstream, call.action, call.payload, False)
        if problem is not None:
            return [self._error_to_backend(call, problem.code_for(self.version),
                                           f"not sent to the charge point: "
                                           f"{problem.description}")]
        if not strict:
            _label(self._to_cp_labels, call.unique_id, call.action)
            return [ToChargePoint(encode(call))]
        if flight is None:
            return self._start(call, now)
        if len(self._queue) >= self.policy.max_queue:
            self._count("queue_full")
            return [self._error_to_backend(
                call, GenericError("").code_for(self.version),
                f"queue for charge point {self.cid} is full "
                f"({self.policy.max_queue} CALLs waiting)")]
        if not self._queue:
            self._queue = deque()
        self._queue.append(call)  # type: ignore[union-attr]
        return []

    def _reply_from_backend(self, reply: CallResult | CallError) -> list[Effect]:
        action: str | None = None
        if self.policy.upstream_strict:
            entry = self._from_cp.pop(reply.unique_id, None)
            if not self._from_cp:
                self._from_cp.clear()  # an emptied dict keeps its table (184 B) until cleared
            if entry is None:
                self._count("orphan_replies")
                log.info("cp %s: backend reply %s matches no pending CALL; dropped",
                         self.cid, reply.unique_id)
                return []
            action = entry[0]
        if isinstance(reply, CallResult) and action is not None:
            problem = self._check(self.policy.check_dnstream, action, reply.payload, True)
            if problem is not None:
                desc = f"the backend's {action} response is invalid: {problem.description}"
                return [ToBackend(CallError(reply.unique_id, problem.code_for(self.version),
                                            desc, {}), action),
                        ToChargePoint(encode(CallError(
                            reply.unique_id, InternalError("").code_for(self.version),
                            "the central system sent an invalid response", {})))]
            self._follow_boot(action, reply.payload)
        return [ToChargePoint(encode(reply))]

    def _follow_boot(self, action: str, payload: dict) -> None:
        # EMQX: the heartbeat interval follows an Accepted BootNotification response
        # (1.6 and 2.x both carry "interval" and "status").
        interval = payload.get("interval")
        if (action == "BootNotification" and payload.get("status") == "Accepted"
                and type(interval) is int and interval > 0):
            self._hb_interval = float(interval)
            self._hb_start = self._last_rx

    # -- downstream queue ----------------------------------------------------------------

    def _start(self, call: Call, now: float) -> list[Effect]:
        text = encode(call)
        self._in_flight = _Outgoing(call, text, now + self.policy.dnstream_timeout,
                                    self.policy.max_retries)
        return [ToChargePoint(text)]

    def _next_downstream(self, now: float) -> list[Effect]:
        if self._in_flight is None and self._queue:
            call = self._queue.popleft()  # type: ignore[union-attr]
            if not self._queue:
                self._queue = ()
            return self._start(call, now)
        return []

    def _error_to_backend(self, call: Call, code: str, description: str) -> ToBackend:
        return ToBackend(CallError(call.unique_id, code, description, {}), call.action)

    # -- time ----------------------------------------------------------------------------

    def on_timer(self, now: float) -> list[Effect]:
        """Act on every deadline that has passed by ``now``."""
        if self.state is not State.OPEN:
            return []
        out: list[Effect] = []
        while self._from_cp:
            uid, (action, deadline) = next(iter(self._from_cp.items()))
            if deadline > now:
                break
            del self._from_cp[uid]
            if not self._from_cp:
                self._from_cp.clear()
            if self.policy.answer_after is not None:
                out.append(Unanswered(uid, action))  # the gateway answers it (local mode)
                continue
            self._count("timeouts_upstream")
            log.warning("cp %s: backend did not answer %s %s within %g s", self.cid, action,
                        uid, self.policy.upstream_timeout)
            out.append(ToChargePoint(encode(CallError(
                uid, InternalError("").code_for(self.version),
                f"no answer from the central system within {self.policy.upstream_timeout:g} s",
                {}))))
        flight = self._in_flight
        if flight is not None and flight.deadline <= now:
            if flight.retries_left > 0:
                flight.retries_left -= 1
                flight.deadline = now + self.policy.retry_interval
                out.append(ToChargePoint(flight.text))
            else:
                self._in_flight = None
                self._count("timeouts_dnstream")
                log.warning("cp %s: no answer to %s %s", self.cid, flight.call.action,
                            flight.call.unique_id)
                out.append(self._error_to_backend(
                    flight.call, GenericError("").code_for(self.version),
                    f"charge point {self.cid} did not answer within "
                    f"{self.policy.dnstream_timeout:g} s"))
                out += self._next_downstream(now)
        hb = self._heartbeat_deadline()
        if hb is not None and hb <= now:
            silent = now - self._last_rx
            log.warning("cp %s: nothing received for %.0f s (heartbeat interval %g s); "
                        "closing", self.cid, silent, self._hb_interval)
            out.append(CloseConnection(1000, "heartbeat timeout"))
            out += self.close("heartbeat timeout")
        return out

    # -- end -----------------------------------------------------------------------------

    def close(self, reason: str) -> list[Effect]:
        """The connection is gone: answer every downstream CALL still pending."""
        if self.state is State.CLOSED:
            return []
        self.state = State.CLOSED
        pending = ([self._in_flight.call] if self._in_flight else []) + list(self._queue)
        self._in_flight = None
        self._queue = ()
        self._from_cp.clear()
        code = GenericError("").code_for(self.version)
        return [self._error_to_backend(
            call, code, f"charge point {self.cid} disconnected ({reason}) before answering")
            for call in pending]

    # -- helpers -------------------------------------------------------------------------

    def _check(self, checker: Checker | None, action: str, payload: dict,
               response: bool) -> OcppError | None:
        if checker is None:
            return None
        problem = checker(self.version, action, payload, response)
        if problem is not None:
            self._count("schema_failures")
            if not isinstance(problem, NotImplementedError_):
                log.warning("cp %s: %s %s failed schema check: %s", self.cid, action,
                            "response" if response else "request", problem.description)
        return problem
