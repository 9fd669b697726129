"""Offline operation wired in: ``ocpp.upstream_down_policy = local``.

The decisions are core/offline.py's and core/local.py's; what the site must remember is
store/localstate.py's; this module does the rest of the I/O around them for the
composition root:

* a CALL that arrives while the backend is away is answered at once, **after** its
  upstream message (with the ``LocalAnswer`` it got) and the offline state are committed
  to disk: one commit per event-loop turn, however many answers it covers. A gateway
  killed with ``kill -9`` therefore never told a charge point something it forgot: the
  message is replayed, the local transaction id is not handed out again, and the
  backend's answer to the replay is recognised after the restart;
* a CALL the backend has not answered within ``ocpp.offline.answer_after`` (the link up,
  the backend silent) is answered the same way; until the backend is heard again every
  CALL is answered at once;
* the upstream buffer is handed to the uplink through a gate (store/gate.py) that
  rewrites local transaction ids and holds a message until the backend's id is known,
  at most ``ocpp.offline.hold_timeout``;
* entering and leaving local mode, each reconciliation that disagrees, each mapping is a
  log line; counts go to ``ctl status`` and ``/metrics``; a disagreement is also an
  event for the backend (``ocpp.upstream.event_topic``, event ``local_answer_overruled``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ocpp_edge.config import OfflineSettings
from ocpp_edge.core.local import LocalAnswer, LocalOptions
from ocpp_edge.core.ocppj.codec import encode
from ocpp_edge.core.ocppj.errors import InternalError
from ocpp_edge.core.ocppj.messages import Call, CallError, CallResult, Message
from ocpp_edge.core.offline import Offline, answer_record
from ocpp_edge.core.session import Session, ToBackend, Unanswered
from ocpp_edge.ops.view import LocalModeStats
from ocpp_edge.store.gate import GatedBuffer
from ocpp_edge.store.localstate import FILENAME, LocalState, load_authorization_list

if TYPE_CHECKING:
    from ocpp_edge.gateway.root import Gateway

log = logging.getLogger("ocpp_edge.offline")

STARTUP_GRACE = 5.0  # s: away at start-up for longer than this is logged as local mode
STATE_COMMIT_DELAY = 1.0  # s: what is learnt online is committed at most this late
PRUNE_EVERY = 3600.0  # s


class LocalMode:
    """The gateway's offline operation: one per gateway, made when the policy is local."""

    def __init__(self, gateway: Gateway, settings: OfflineSettings, buffer_dir: str) -> None:
        self.gw = gateway
        self.settings = settings
        listed = (load_authorization_list(settings.authorization_list)
                  if settings.authorization_list else None)
        if listed is not None:
            log.info("%d id(s) in the authorization list %s", len(listed),
                     settings.authorization_list)
        self.state = LocalState(Path(buffer_dir) / FILENAME, settings.transaction_ids, listed)
        self.state.on_dirty = self._schedule_state_commit
        self.offline = Offline(self.state, LocalOptions(
            unknown_id=settings.unknown_id, pending_interval=int(settings.boot_retry_interval),
            data_transfer=settings.data_transfer))
        self.gated = GatedBuffer(gateway.buffer, self.offline.upstream_payload,
                                 settings.hold_timeout, self._clock, self._arm_hold,
                                 self._hold_ran_out, self._charge_point_of)
        self.last_heard = float("-inf")  # loop time of the last message from the backend
        self.since = time.time()  # of the current state (local mode or not)
        self._announced = False  # "local mode: ..." was logged and not yet ended
        self._answers: list[tuple[Session, str]] = []  # frames waiting for the commit
        self._waiting: set[str] = set()  # charge points with frames in _answers
        self._flush_handle: asyncio.Handle | None = None
        self._commit_handle: asyncio.TimerHandle | None = None
        self._hold_handle: asyncio.TimerHandle | None = None
        self._prune_handle: asyncio.TimerHandle | None = None
        log.info("offline operation on (ocpp.upstream_down_policy = local): charge points "
                 "are answered locally while the backend is away%s",
                 f", or silent for {settings.answer_after:g} s"
                 if settings.answer_after is not None else "")

    def _charge_point_of(self, topic: str) -> str:
        """The gate's key: a hold stops only this charge point's later messages."""
        return self.gw.router.charge_point_of(topic) or topic

    def _clock(self) -> float:
        loop = self.gw.loop
        return loop.time() if loop is not None else time.monotonic()

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        self._prune()
        # The gateway starts away (no link yet); that is news only if it lasts.
        loop = self.gw.loop
        if loop is not None:
            loop.call_later(STARTUP_GRACE, self._announce_if_away)

    def _announce_if_away(self) -> None:
        if self.offline.active and not self._announced:
            self._changed()

    def flush(self) -> None:
        """Answers waiting for their commit: commit and send them now."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush()

    def stop(self) -> None:
        for handle in (self._flush_handle, self._commit_handle, self._hold_handle,
                       self._prune_handle):
            if handle is not None:
                handle.cancel()
        self._flush()
        self.state.commit()
        self.state.close()

    def _prune(self) -> None:
        s, now = self.settings, time.time()
        for cid, local_id in self.state.prune_transactions(now - s.transaction_max_age):
            log.warning("cp %s: local transaction %d is older than ocpp.offline."
                        "transaction_max_age (%g s); its id mapping is dropped", cid,
                        local_id, s.transaction_max_age)
        for cid, local_id in self.offline.expire_ended(now):
            self.state.end_transaction(cid, local_id)
        dropped = self.state.prune_answered(now - s.transaction_max_age)
        if dropped:
            log.warning("%d locally answered CALL(s) got no answer from the backend within "
                        "ocpp.offline.transaction_max_age; no longer awaited", dropped)
        loop = self.gw.loop
        if loop is not None:
            self._prune_handle = loop.call_later(PRUNE_EVERY, self._prune)

    # -- the backend away or not ---------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.offline.active

    def link(self, up: bool) -> None:
        if self.offline.link(up):
            self._changed()

    def _changed(self) -> None:
        self.since = time.time()
        reason = self.offline.reason()
        if reason is None:
            if self._announced:  # not at the first connection after a quick start
                log.warning("local mode ends: the backend is reachable again; %d message(s) "
                            "to replay", len(self.gw.buffer))
            self._announced = False
        else:
            self._announced = True
            log.warning("local mode: %s; charge points are answered by the gateway, their "
                        "messages stored for the backend", reason)
        self.gw.uplink.republish_status()  # presence: "local_mode" in the retained status
        self.gw.on_change()

    def heard(self) -> None:
        """A message from the backend arrived."""
        self.last_heard = self._clock()
        if self.offline.backend_heard():
            self._changed()

    # -- CALLs from charge points --------------------------------------------------------

    def call_from_cp(self, session: Session, effect: ToBackend) -> bool:
        """A CALL the session passes on: published (online: remembered until the backend
        answers it) or answered locally and stored (away). True when it was handled
        here; the gateway's TopicError handling still applies to the publish."""
        call = effect.message
        assert isinstance(call, Call)
        cid, version = session.cid, session.version
        if not self.offline.active:
            if self.state.has_answered(cid, call.unique_id):
                # The charge point reuses the id of a CALL answered locally whose replay
                # the backend has not answered (and, long after, will not): the answer to
                # this id is this CALL's from now on.
                self.state.take_answered(cid, call.unique_id)
                log.info("cp %s: UniqueId %s used again; the earlier CALL answered "
                         "locally with it is no longer awaited", cid, call.unique_id)
            self.offline.track(cid, call)
            if self.gw.publish(cid, version, call, None, effect.payload_text):
                return True
            # Not stored (buffer full, buffer.overflow = drop_newest): not forwarded, so
            # answered now; the charge point keeps it and sends it again later.
            self.offline.untrack(cid, call.unique_id)
            session.settle(call.unique_id)
            self._not_stored(session, call)
            return True
        now = time.time()
        answer = self.offline.answer(cid, version, call, now)
        told = answer_record(answer, version)
        upstream_id = self.offline.upstream_unique_id(cid, call.unique_id)
        published = call if upstream_id == call.unique_id else \
            Call(upstream_id, call.action, call.payload)
        accepted = self.gw.publish(cid, version, published, None, effect.payload_text, told)
        session.settle(call.unique_id)
        if not accepted:
            if answer.transaction_id is not None:
                self.state.end_transaction(cid, answer.transaction_id)  # never told
            # The buffer is full and drops newcomers (buffer.overflow = drop_newest): not
            # stored, so not answered as if it were; the charge point keeps it and retries.
            self._not_stored(session, call)
            return True
        if upstream_id != call.unique_id:
            log.info("cp %s: %s %s published as %s (an earlier CALL with that id awaits "
                     "the backend's answer)", cid, call.action, call.unique_id, upstream_id)
        self._answered(session, call, answer, now, upstream_id)
        return True

    def _not_stored(self, session: Session, call: Call) -> None:
        log.warning("cp %s: %s %s not stored (buffer full); answered with an error so that "
                    "the charge point keeps it", session.cid, call.action, call.unique_id)
        self.queue(session, encode(CallError(
            call.unique_id, InternalError("").code_for(session.version),
            "the gateway cannot store this message now; send it again later", {})))

    def unanswered(self, session: Session, effect: Unanswered) -> None:
        """The backend did not answer a forwarded CALL within answer_after."""
        cid = session.cid
        found = self.offline.in_flight(cid, effect.unique_id)
        call = Call(effect.unique_id, effect.action, found[1] if found else {})
        if self.offline.link_up:
            wait = self.gw.policy.answer_after or 0.0
            log.warning("cp %s: the backend has not answered %s %s within %g s; answered "
                        "locally", cid, effect.action, effect.unique_id, wait)
            # Silent: nothing at all from the backend for that long (one CALL waiting
            # behind a replayed backlog, or one action the backend ignores, is not that).
            if self._clock() - self.last_heard >= wait and self.offline.backend_silent():
                self._changed()
        if self.state.has_answered(cid, effect.unique_id):
            self.state.take_answered(cid, effect.unique_id)  # an older CALL's: superseded
        now = time.time()
        self._answered(session, call, self.offline.answer(cid, session.version, call, now),
                       now)

    def _answered(self, session: Session, call: Call, answer: LocalAnswer,
                  now: float, upstream_id: str | None = None) -> None:
        self.offline.answered(session.cid, session.version, call, answer, now, upstream_id)
        if answer.transaction_id is not None:
            log.info("cp %s: transaction started offline with local id %d", session.cid,
                     answer.transaction_id)
        frame = encode(CallResult(call.unique_id, answer.payload) if answer.error is None
                       else CallError(call.unique_id, answer.error.code_for(session.version),
                                      answer.error.description, {}))
        self.queue(session, frame)

    def waiting(self, cid: str) -> bool:
        """Frames for ``cid`` wait for the commit: any other frame for it queues behind
        them, so that the charge point gets its frames in the order they were made."""
        return cid in self._waiting

    def queue(self, session: Session, frame: str) -> None:
        """Send ``frame`` once what the charge point was told locally is on disk."""
        self._answers.append((session, frame))
        self._waiting.add(session.cid)
        loop = self.gw.loop
        if self._flush_handle is None and loop is not None:
            self._flush_handle = loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Commit the stored messages and the offline state, then send the answers."""
        self._flush_handle = None
        if not self._answers:
            return
        # On a full disk both keep what they could not write in memory (bounded; the
        # buffer's documented behaviour) and the answers go out all the same: the
        # charge point is served, and the next commit writes it all.
        try:
            self.gw.commit_buffer()
            self.state.commit()
        except Exception:  # never lose the answers to a bug in a commit
            log.exception("committing before local answers failed; answering anyway")
        answers, self._answers = self._answers, []
        self._waiting.clear()
        for session, frame in answers:
            self.gw.send_to_cp(session, frame)

    def cp_gone(self, cid: str) -> None:
        self.offline.forget(cid)

    # -- messages from the backend -------------------------------------------------------

    def reply(self, cid: str, version: str, msg: CallResult | CallError) -> bool:
        """A reply from the backend; True when it goes on to the charge point."""
        given_up = self.offline.counts["given_up"]
        found = self.offline.reply(cid, version, msg, time.time())
        if found.mapped is not None:
            local_id, backend_id = found.mapped
            log.info("cp %s: local transaction %d is transaction %d at the backend",
                     cid, local_id, backend_id)
        if found.mapped is not None or self.offline.counts["given_up"] != given_up:
            # At once: the broker acknowledged the StartTransaction, whose row may leave
            # the buffer at its next commit; a kill -9 must not lose the mapping with it.
            self.state.commit()
            self.gw.uplink.kick()  # a held message may go now
        if found.disagreement is not None:
            log.warning("cp %s: the backend's answer to %s %s overrules the local answer: %s",
                        cid, found.action, msg.unique_id, found.disagreement)
            self.gw.ops.local_event(cid, "local_answer_overruled", {
                "uniqueid": msg.unique_id, "action": found.action,
                "description": found.disagreement})
        if not found.forward:
            log.debug("cp %s: the backend answered %s %s, answered locally before", cid,
                      found.action, msg.unique_id)
        return found.forward

    def call_to_cp(self, cid: str, version: str, msg: Message) -> Message:
        """A backend command as the charge point knows its transaction."""
        if isinstance(msg, Call):
            rewritten = self.offline.downstream_call(cid, version, msg)
            if rewritten is not msg:
                log.info("cp %s: %s %s names transaction %s, local id %s for the charge "
                         "point", cid, msg.action, msg.unique_id,
                         json.dumps(msg.payload)[:80], json.dumps(rewritten.payload)[:80])
            return rewritten
        return msg

    # -- timers --------------------------------------------------------------------------

    def _schedule_state_commit(self) -> None:
        loop = self.gw.loop
        if self._commit_handle is None and loop is not None:
            self._commit_handle = loop.call_later(STATE_COMMIT_DELAY, self._commit_state)

    def _commit_state(self) -> None:
        self._commit_handle = None
        if not self.state.commit():
            self._schedule_state_commit()  # the disk refused: try again later

    def _hold_ran_out(self, payload: bytes) -> None:
        given_up = self.offline.give_up_payload(payload)
        if given_up is not None:
            cid, local_id = given_up
            log.warning("cp %s: no backend transactionId for local transaction %d after "
                        "ocpp.offline.hold_timeout; its messages go out with the local id",
                        cid, local_id)
            self.state.commit()

    def _arm_hold(self, deadline: float) -> None:
        loop = self.gw.loop
        if loop is None:
            return
        if self._hold_handle is not None:
            self._hold_handle.cancel()
        self._hold_handle = loop.call_at(deadline, self.gw.uplink.kick)

    # -- what operations see -------------------------------------------------------------

    def stats(self) -> LocalModeStats:
        c, s = self.offline.counts, self.state
        return LocalModeStats(
            active=self.offline.active, reason=self.offline.reason(), since=self.since,
            answers=c["answers"], reconciled=c["reconciled"],
            disagreements=c["disagreements"], mapped=c["mapped"],
            held_released=self.gated.released, holding=self.gated.holding,
            transactions_open=s.transactions_open, answered_pending=s.answered_pending,
            authorizations_cached=s.authorizations_cached)
