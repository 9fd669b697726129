"""Offline operation, sans-I/O: when the backend is away, the site keeps charging.

``ocpp.upstream_down_policy = local`` (README "When the backend is away"). The gateway owns
one :class:`Offline`; it tells it what happens and asks it what to do. This module decides;
the gateway does the I/O (publishing, committing, sending frames).

* **When.** The backend is away while the MQTT link is down, and also from the moment a
  CALL has waited ``answer_after`` with the link up (the backend itself is silent) until
  the backend is heard again (any reply from it). :attr:`Offline.active` says which.
* **Answers.** While away, a charge point's CALL is answered at once by :meth:`answer`
  (the rules are in core/local.py), and still stored and forwarded: the gateway adds the
  answer to the upstream message (``"LocalAnswer"``). The answered CALL is remembered in
  the store (:class:`Memory`), so the backend's own answer to its replay, whenever it
  comes (after a restart too), is recognised by :meth:`reply` and reconciled, never
  passed to the charge point a second time.
* **Learning.** Every answer the backend gives to a charge point's Authorize,
  StartTransaction, StopTransaction, TransactionEvent (their idTagInfo / idTokenInfo) and
  BootNotification (an Accepted interval) updates the store, whether the charge point
  was answered by the backend or locally; the payloads of CALLs in flight are held here
  (:meth:`track`) until their answer comes.
* **Transaction ids (OCPP 1.6).** A StartTransaction answered locally gets a local id
  from a range the backend does not use. When the backend answers the replayed
  StartTransaction, its id is mapped to the local one; from then on, upstream messages
  carrying the local id are rewritten to the backend's as they are published
  (:meth:`upstream_payload`), downstream commands carrying the backend's id are rewritten
  to the local one (:meth:`downstream_call`). A message that needs a mapping not yet
  known is held (:data:`HOLD`) — with it that charge point's later ones, since order
  is kept — until the answer arrives; the gateway bounds the wait
  (``ocpp.offline.hold_timeout``) and then publishes it with the local id. The mapping
  ends an hour after the transaction's StopTransaction is answered by the backend.

Imports: the standard library and ``ocpp_edge.core`` only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from ocpp_edge.core import local
from ocpp_edge.core.local import Authorization, Knowledge, LocalAnswer, LocalOptions
from ocpp_edge.core.ocppj.codec import dump_json, parse_json
from ocpp_edge.core.ocppj.messages import Call, CallError, CallResult

log = logging.getLogger("ocpp_edge.offline")

HOLD = None  # upstream_payload's answer for a message that must wait for a mapping
MAX_TRACKED = 16  # CALLs in flight remembered per charge point (the spec allows one)
STOP_GRACE = 3600.0  # s a mapping outlives its StopTransaction's answer (republishes)

# 1.6 messages that carry a transactionId the backend must see as its own.
_REWRITTEN_UP = (b'"MeterValues"', b'"StopTransaction"')


class Memory(Knowledge, Protocol):
    """What offline operation keeps on disk (store/localstate.py implements it)."""

    def learn_authorization(self, id_key: str, auth: Authorization, now: float) -> None: ...
    def remember_boot(self, cid: str, interval: int) -> None: ...
    def map_transaction(self, cid: str, local_id: int, backend_id: int) -> None: ...
    def transaction(self, local_id: int) -> tuple[str, int | None] | None: ...
    def local_id(self, cid: str, backend_id: int) -> int | None: ...
    def end_transaction(self, cid: str, local_id: int) -> None: ...
    def remember_answered(self, cid: str, unique_id: str, action: str, request: dict,
                          answer: dict, now: float) -> None: ...
    def take_answered(self, cid: str, unique_id: str) -> tuple[str, dict, dict] | None: ...
    def has_answered(self, cid: str, unique_id: str) -> bool: ...
    @property
    def transactions_open(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Reconciled:
    """What :meth:`Offline.reply` found out about a backend reply."""

    forward: bool                 # pass it to the charge point (it was not answered locally)
    action: str | None = None     # of the CALL it answers, when known
    disagreement: str | None = None  # the backend decided otherwise than the local answer
    mapped: tuple[int, int] | None = None  # (local, backend) transaction id now known


class Offline:
    """The gateway's offline state: away or not, CALLs in flight, reconciliation."""

    def __init__(self, memory: Memory, options: LocalOptions) -> None:
        self.memory = memory
        self.options = options
        self.link_up = False
        self.silent = False  # a CALL waited answer_after with the link up
        # charge point -> UniqueId -> (action, payload) of its CALLs awaiting the backend
        self._in_flight: dict[str, dict[str, tuple[str, dict]]] = {}
        self.counts = {"answers": 0, "reconciled": 0, "disagreements": 0, "mapped": 0,
                       "given_up": 0}
        # local id -> (charge point, when its StopTransaction was answered): the mapping
        # is kept STOP_GRACE longer, for a StopTransaction published twice
        self.ending: dict[int, tuple[str, float]] = {}

    # -- away or not ---------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return not self.link_up or self.silent

    def reason(self) -> str | None:
        if not self.link_up:
            return "upstream link down"
        return "backend silent" if self.silent else None

    def link(self, up: bool) -> bool:
        """The MQTT link went up or down; True when :attr:`active` changed."""
        before = self.active
        self.link_up = up
        return self.active != before

    def backend_silent(self) -> bool:
        """A CALL waited ``answer_after`` with no answer; True when :attr:`active` changed."""
        before = self.active
        self.silent = True
        return self.active != before

    def backend_heard(self) -> bool:
        """A reply from the backend arrived; True when :attr:`active` changed."""
        before = self.active
        self.silent = False
        return self.active != before

    # -- CALLs from charge points --------------------------------------------------------

    def track(self, cid: str, call: Call) -> None:
        """``call`` was forwarded: hold its payload until the backend answers it (at most
        MAX_TRACKED per charge point: one that is never answered cannot grow this)."""
        calls = self._in_flight.setdefault(cid, {})
        calls.pop(call.unique_id, None)
        calls[call.unique_id] = (call.action, call.payload)
        if len(calls) > MAX_TRACKED:
            del calls[next(iter(calls))]

    def untrack(self, cid: str, unique_id: str) -> tuple[str, dict] | None:
        calls = self._in_flight.get(cid)
        if calls is None:
            return None
        entry = calls.pop(unique_id, None)
        if not calls:
            del self._in_flight[cid]
        return entry

    def forget(self, cid: str) -> None:
        """``cid``'s session ended; replies to its CALLs can no longer be forwarded."""
        self._in_flight.pop(cid, None)

    def in_flight(self, cid: str, unique_id: str) -> tuple[str, dict] | None:
        calls = self._in_flight.get(cid)
        return calls.get(unique_id) if calls else None

    def answer(self, cid: str, version: str, call: Call, now: float) -> LocalAnswer:
        """The local answer to ``call`` (``now``: epoch seconds). The caller stores the
        message and, once it is stored, calls :meth:`answered`."""
        return local.local_answer(version, call.action, call.payload, cid, self.memory,
                                  now, self.options)

    def upstream_unique_id(self, cid: str, unique_id: str) -> str:
        """The UniqueId a CALL answered locally is published with: its own, unless a CALL
        of ``cid`` with that id already awaits the backend's answer (a charge point that
        rebooted during the outage starts its ids again): then ``<id>~<n>``, so that each
        backend answer finds its own CALL."""
        found, n = unique_id, 1
        while self.memory.has_answered(cid, found):
            n += 1
            found = f"{unique_id}~{n}"
        return found

    def answered(self, cid: str, version: str, call: Call, answer: LocalAnswer,
                 now: float, upstream_id: str | None = None) -> dict:
        """``call`` was answered locally with ``answer`` and stored (published with
        ``upstream_id``, default its own id): remember it, so the backend's reply to its
        replay is reconciled."""
        self.untrack(cid, call.unique_id)
        self.counts["answers"] += 1
        told = answer_record(answer, version)
        self.memory.remember_answered(cid, upstream_id or call.unique_id, call.action,
                                      call.payload, {**told, "version": version}, now)
        return told

    def give_up(self, local_id: int) -> str | None:
        """No backend id will come for ``local_id`` (the backend refused or never answered
        its StartTransaction): its messages go out with the local id from now on, none is
        held for it again. The charge point, or None if the id is not one of ours."""
        known = self.memory.transaction(local_id)
        if known is None or known[1] is not None:
            return None
        self.memory.map_transaction(known[0], local_id, local_id)
        self.counts["given_up"] += 1
        return known[0]

    def give_up_payload(self, payload: bytes) -> tuple[str, int] | None:
        """:meth:`give_up` for the local id of an upstream message that was held too long;
        (charge point, local id), or None."""
        body = _upstream_body(payload)
        tid = None if body is None else local.upstream_transaction_id("ocpp1.6", *body[:2])
        cid = None if tid is None else self.give_up(tid)
        return None if cid is None else (cid, tid)  # type: ignore[return-value]

    def expire_ended(self, now: float) -> list[tuple[str, int]]:
        """Mappings whose StopTransaction was answered STOP_GRACE ago: to be ended."""
        done = [(cid, tid) for tid, (cid, at) in self.ending.items() if now - at >= STOP_GRACE]
        for _, tid in done:
            del self.ending[tid]
        return done

    # -- replies from the backend --------------------------------------------------------

    def reply(self, cid: str, version: str, reply: CallResult | CallError,
              now: float) -> Reconciled:
        """A reply from the backend for ``cid``: learn from it, and say whether it goes to
        the charge point (``forward``) or answers a CALL answered locally."""
        found = self.memory.take_answered(cid, reply.unique_id)
        if found is not None:
            action, request, told = found
            version = told.get("version", version)  # the charge point's, when answered
            self.counts["reconciled"] += 1
            mapped = self._learn(cid, version, action, request, reply, told, now)
            differs = None
            if isinstance(reply, CallResult) and "payload" in told:
                differs = local.disagreement(version, action, told["payload"], reply.payload)
            elif isinstance(reply, CallResult):
                differs = f"answered locally with {told.get('error', 'an error')}, " \
                          "the backend accepted the request"
            elif "payload" in told:  # a CALLERROR for a CALL the charge point was answered
                differs = f"the backend answered with {reply.error_code}: " \
                          f"{reply.error_description}"
            said = told.get("payload")
            if action == "StartTransaction" and mapped is None and isinstance(said, dict) \
                    and type(said.get("transactionId")) is int:
                self.give_up(said["transactionId"])  # no backend id will come for it
            if differs is not None:
                self.counts["disagreements"] += 1
            return Reconciled(False, action, differs, mapped)
        entry = self.untrack(cid, reply.unique_id)
        if entry is None:
            return Reconciled(True)
        action, request = entry
        return Reconciled(True, action, None,
                          self._learn(cid, version, action, request, reply, now=now))

    def _learn(self, cid: str, version: str, action: str, request: dict,
               reply: CallResult | CallError,
               told: Mapping | None = None, now: float = 0.0) -> tuple[int, int] | None:
        if not isinstance(reply, CallResult) or not isinstance(reply.payload, dict):
            return None
        m, response = self.memory, reply.payload
        learnt = local.learned_authorization(version, action, request, response)
        if learnt is not None:
            m.learn_authorization(learnt[0], learnt[1], now)
        interval = local.learned_boot_interval(action, response)
        if interval is not None:
            m.remember_boot(cid, interval)
        if action == "StartTransaction":
            # OCPP 1.6 §4.8: the charge point keeps the id it was told for the whole
            # transaction; the backend's id for it arrives with this answer.
            said = told.get("payload") if told else None
            local_id = said.get("transactionId") if isinstance(said, dict) else None
            backend_id = response.get("transactionId")
            if type(local_id) is int and type(backend_id) is int:
                m.map_transaction(cid, local_id, backend_id)
                self.counts["mapped"] += 1
                return local_id, backend_id
        elif action == "StopTransaction":
            tid = local.upstream_transaction_id(version, action, request)
            if tid is not None and m.transaction(tid) is not None:
                # The transaction is over at the backend too: the mapping ends, after a
                # grace period for a copy of the StopTransaction published again.
                self.ending[tid] = (cid, now)
        return None

    # -- rewriting transaction ids -------------------------------------------------------

    def upstream_payload(self, payload: bytes) -> bytes | None:
        """An upstream message as it is about to be published: with the backend's
        transactionId in place of a local one, unchanged when it carries none, or
        :data:`HOLD` while the backend's id is not known yet."""
        if not self.memory.transactions_open or b'"transactionId"' not in payload \
                or not any(a in payload for a in _REWRITTEN_UP):
            return payload
        found = _upstream_body(payload)
        if found is None:
            return payload
        action, body, envelope = found
        tid = local.upstream_transaction_id("ocpp1.6", action, body)
        known = None if tid is None else self.memory.transaction(tid)
        if known is None:
            return payload  # not one of ours: the backend's own id
        backend_id = known[1]
        if backend_id is None:
            return HOLD
        if backend_id == tid:
            return payload  # given up: the local id stays
        envelope["Payload"] = local.with_transaction_id(action, body, backend_id)
        return dump_json(envelope).encode()

    def downstream_call(self, cid: str, version: str, call: Call) -> Call:
        """A backend command naming the backend's transactionId, as the charge point
        knows that transaction (its local id); other commands unchanged."""
        if not self.memory.transactions_open or not isinstance(call.payload, dict):
            return call
        tid = local.downstream_transaction_id(version, call.action, call.payload)
        if tid is None:
            return call
        local_id = self.memory.local_id(cid, tid)
        if local_id is None:
            return call
        return Call(call.unique_id, call.action,
                    local.with_transaction_id(call.action, call.payload, local_id))


def _upstream_body(payload: bytes) -> tuple[str, dict, dict] | None:
    """(Action, Payload, the whole message) of an upstream CALL message, or None."""
    try:
        envelope = parse_json(payload)
    except ValueError:
        return None
    if not isinstance(envelope, dict) or envelope.get("MessageTypeId") != 2:
        return None
    action, body = envelope.get("Action"), envelope.get("Payload")
    if not isinstance(action, str) or not isinstance(body, dict):
        return None
    return action, body, envelope


def answer_record(answer: LocalAnswer, version: str) -> dict:
    """What the charge point was told, as kept in the store and added to the upstream
    message: ``{"payload": {...}}`` or ``{"error": code, "description": text}``."""
    if answer.error is not None:
        return {"error": answer.error.code_for(version),
                "description": answer.error.description}
    return {"payload": answer.payload}


def local_answer_key(told: Mapping) -> str:
    """``,"LocalAnswer":{...}`` for the upstream message of a CALL answered locally: the
    CALLRESULT payload the charge point got, or ``{"ErrorCode", "ErrorDescription"}``
    (an added key; EMQX-format consumers ignore unknown keys)."""
    if "payload" in told:
        value: object = told["payload"]
    else:
        value = {"ErrorCode": told.get("error"), "ErrorDescription": told.get("description")}
    return ',"LocalAnswer":' + dump_json(value)


def with_local_answer(text: str, told: Mapping) -> str:
    """The upstream message text (a JSON object) with the ``LocalAnswer`` key added."""
    return text[:-1] + local_answer_key(told) + "}"
