"""Offline operation's decisions (core/offline.py on a real store/localstate.py file) under
random sequences: charge points' CALLs answered locally, the link going up and down, the
backend's replies to the replayed CALLs (right, wrong, malformed, twice), messages passing
the gate, backend commands naming transactions, clean restarts and ``kill -9`` (a restart
that loses what was not committed, as the gateway sends no local answer before its commit).

What must hold whatever the sequence: nothing raises; a local transaction id a charge
point was told is never handed out again (within ``ocpp.offline.transaction_ids``, which
no sequence here uses up), its mapping ended or not, restarted or not; the backend's first
reply to a CALL answered locally is reconciled, not forwarded; an upstream message leaves
the gate unchanged, held, or with exactly the backend's id for the local one, and a
command reaches the charge point with exactly the local id for the backend's.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ocpp_edge.core.local import LocalOptions
from ocpp_edge.core.ocppj.messages import Call, CallError, CallResult
from ocpp_edge.core.offline import HOLD, STOP_GRACE, Offline, with_local_answer
from ocpp_edge.store.localstate import LocalState

V = "ocpp1.6"
CIDS = st.sampled_from(["CP1", "CP2", "CP3"])
UIDS = st.sampled_from(["1", "2", "3", "4"])  # few: charge points reuse ids after a reboot
TAGS = st.sampled_from(["TAG-A", "TAG-B", "\ud800", ""])
STATUSES = st.sampled_from(["Accepted", "Blocked", "Invalid", "Expired", "ConcurrentTx", 7])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=6)
backend_ids = st.integers(-2**31, 2**31 - 1) | st.sampled_from([4711, 4712])
COMMIT = st.sampled_from([True, True, True, False])  # mostly the loop turn ends at once


def upstream_message(uid: str, action: str, payload: dict, told: dict) -> bytes:
    """What the buffer holds for a CALL answered locally (EMQX format + LocalAnswer)."""
    text = json.dumps({"MessageTypeId": 2, "UniqueId": uid, "Action": action,
                       "Payload": payload})
    return with_local_answer(text, told).encode()


class OfflineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="offline-prop-"))
        self.open()
        self.now = 1_000_000.0
        self.told_ids: set[int] = set()  # local transaction ids charge points were told
        # answered, not yet committed, so not yet sent: (cid, local id, uid, action, msg)
        self.uncommitted: list[tuple[str, int | None, str, str, bytes]] = []
        self.sent: list[tuple[str, str, str, bytes]] = []  # (cid, upstream uid, action, msg)
        self.replied: set[tuple[str, str]] = set()
        self.cid_of: dict[int, str] = {}  # told local id -> its charge point
        self.backend_of: dict[int, int] = {}  # local id -> backend id, from the replies

    def open(self) -> None:
        self.state = LocalState(self.dir / "local.sqlite")
        self.off = Offline(self.state, LocalOptions())

    def teardown(self) -> None:
        self.state.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- the link, the clock -----------------------------------------------------------

    @rule(up=st.booleans())
    def link(self, up: bool) -> None:
        self.off.link(up)

    @rule(seconds=st.floats(0, 7200))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        for cid, tid in self.off.expire_ended(self.now):
            self.state.end_transaction(cid, tid)

    # -- charge points ---------------------------------------------------------------------

    def answer_locally(self, cid: str, uid: str, action: str, payload: dict,
                       commit: bool) -> None:
        call = Call(uid, action, payload)
        found = self.off.answer(cid, V, call, self.now)
        upstream_id = self.off.upstream_unique_id(cid, uid)
        told = self.off.answered(cid, V, call, found, self.now, upstream_id)
        self.uncommitted.append((cid, found.transaction_id, upstream_id, action,
                                 upstream_message(upstream_id, action, payload, told)))
        if commit:
            self.commit()

    @rule(cid=CIDS, uid=UIDS, tag=TAGS, commit=COMMIT)
    def start_transaction(self, cid: str, uid: str, tag: str, commit: bool) -> None:
        self.answer_locally(cid, uid, "StartTransaction", {
            "connectorId": 1, "idTag": tag, "meterStart": 0,
            "timestamp": "2026-12-01T10:00:00Z"}, commit)

    @rule(cid=CIDS, uid=UIDS, pick=st.integers(0, 50), stop=st.booleans(), commit=COMMIT,
          stranger=st.one_of(st.none(), st.none(), st.none(), backend_ids))
    def use_transaction(self, cid: str, uid: str, pick: int, stop: bool, commit: bool,
                        stranger: int | None) -> None:
        own = sorted(t for t, c in self.cid_of.items() if c == cid)
        tid = stranger if stranger is not None or not own else own[pick % len(own)]
        if stop:
            self.answer_locally(cid, uid, "StopTransaction", {
                "transactionId": tid, "meterStop": 9, "timestamp": "2026-12-01T11:00:00Z"},
                commit)
        else:
            self.answer_locally(cid, uid, "MeterValues", {
                "connectorId": 1, "transactionId": tid, "meterValue": [
                    {"timestamp": "2026-12-01T10:05:00Z", "sampledValue": [{"value": "1"}]}]},
                commit)

    @rule(cid=CIDS, uid=UIDS, tag=TAGS, commit=COMMIT,
          action=st.sampled_from(["Authorize", "Heartbeat", "BootNotification", "DataTransfer",
                                  "StatusNotification", "Unknown"]))
    def other_call(self, cid: str, uid: str, tag: str, commit: bool, action: str) -> None:
        payload = {"Authorize": {"idTag": tag},
                   "BootNotification": {"chargePointVendor": "V", "chargePointModel": "M"},
                   "DataTransfer": {"vendorId": "V"},
                   "StatusNotification": {"connectorId": 1, "errorCode": "NoError",
                                          "status": "Available"}}.get(action, {})
        self.answer_locally(cid, uid, action, payload, commit)

    @rule()
    def commit(self) -> None:
        """The gateway's loop turn: commit, then the answers go out."""
        assert self.state.commit()
        for cid, tid, upstream_id, action, msg in self.uncommitted:
            if tid is not None:
                assert tid not in self.told_ids, f"local id {tid} handed out twice"
                self.told_ids.add(tid)
                self.cid_of[tid] = cid
            self.sent.append((cid, upstream_id, action, msg))
        self.uncommitted.clear()

    @rule(clean=st.booleans())
    def restart(self, clean: bool) -> None:
        if clean:
            self.commit()
            self.state.close()
        else:  # kill -9: nothing since the last commit was told or stored
            if self.state._db is not None:
                self.state._db.close()  # the process is gone; SQLite's file stays
            self.uncommitted.clear()
        self.open()

    # -- the backend ------------------------------------------------------------------------

    @precondition(lambda self: self.sent)
    @rule(pick=st.integers(0, 10**6), tid=backend_ids, status=STATUSES,
          shape=st.sampled_from(["right", "error", "junk", "no id"]), junk=json_values)
    def backend_replies(self, pick: int, tid: int, status, shape: str, junk) -> None:
        cid, uid, action, _ = self.sent[pick % len(self.sent)]
        if shape == "error":
            reply = CallError(uid, "InternalError", "no", {})
        elif shape == "junk":
            reply = CallResult(uid, junk)
        else:
            payload = {"idTagInfo": {"status": status}}
            if action == "StartTransaction" and shape == "right":
                payload["transactionId"] = tid
            reply = CallResult(uid, payload)
        first = (cid, uid) not in self.replied
        found = self.off.reply(cid, V, reply, self.now)
        self.replied.add((cid, uid))
        if first:
            assert not found.forward, (cid, uid, action)  # reconciled, not an orphan
        if found.mapped is not None:
            local_id, backend_id = found.mapped
            assert backend_id == tid and local_id in self.told_ids, (found.mapped, tid)
            self.backend_of[local_id] = backend_id
            assert self.state.commit()  # as the gateway does at once

    @precondition(lambda self: any(m[2] == "StartTransaction" and m[:2] not in self.replied
                                   for m in self.sent))
    @rule(pick=st.integers(0, 10**6), tid=backend_ids)
    def backend_accepts_a_start(self, pick: int, tid: int) -> None:
        starts = [i for i, m in enumerate(self.sent)
                  if m[2] == "StartTransaction" and m[:2] not in self.replied]
        self.backend_replies(starts[pick % len(starts)], tid, "Accepted", "right", None)

    @rule(cid=CIDS, uids=st.tuples(UIDS, UIDS, UIDS), tid=backend_ids, tag=TAGS,
          ends=st.booleans())
    def a_transaction_replayed(self, cid: str, uids: tuple[str, str, str], tid: int,
                               tag: str, ends: bool) -> None:
        """The common case whole, amid whatever else happened: a transaction started and
        metered offline, the backend's id for it, the meter reading through the gate;
        with ``ends``, its StopTransaction answered by the backend and the mapping gone
        STOP_GRACE later."""
        self.start_transaction(cid, uids[0], tag, True)
        start = len(self.sent) - 1
        local_id = max(t for t, c in self.cid_of.items() if c == cid)  # the newest
        self.answer_locally(cid, uids[1], "MeterValues", {
            "connectorId": 1, "transactionId": local_id, "meterValue": []}, True)
        assert self.off.upstream_payload(self.sent[-1][3]) is HOLD  # no backend id yet
        self.backend_replies(start, tid, "Accepted", "right", None)
        self.through_the_gate(len(self.sent) - 1, False)
        if ends:
            self.answer_locally(cid, uids[2], "StopTransaction", {
                "transactionId": local_id, "meterStop": 9,
                "timestamp": "2026-12-01T11:00:00Z"}, True)
            self.backend_replies(len(self.sent) - 1, tid, "Accepted", "right", None)
            self.time_passes(STOP_GRACE)
            assert self.state.commit()

    @precondition(lambda self: self.sent)
    @rule(pick=st.integers(0, 10**6), carrying=COMMIT)
    def through_the_gate(self, pick: int, carrying: bool) -> None:
        # mostly a message that names a transaction
        named = [m for m in self.sent if m[2] in ("MeterValues", "StopTransaction")]
        chosen = named if carrying and named else self.sent
        _, _, action, msg = chosen[pick % len(chosen)]
        out = self.off.upstream_payload(msg)
        if out is HOLD:
            return
        before, after = json.loads(msg), json.loads(out)
        assert {k: v for k, v in after.items() if k != "Payload"} == \
            {k: v for k, v in before.items() if k != "Payload"}
        old, new = before["Payload"].get("transactionId"), after["Payload"].get("transactionId")
        if old != new:
            assert action in ("MeterValues", "StopTransaction"), action
            assert self.backend_of.get(old) == new, (old, new, self.backend_of)
        else:
            assert after["Payload"] == before["Payload"]

    @precondition(lambda self: self.sent)
    @rule(pick=st.integers(0, 10**6), cid=CIDS, tid=backend_ids)
    def backend_command(self, pick: int, cid: str, tid: int) -> None:
        known = sorted(self.backend_of.items())
        if known and pick % 2:
            tid = known[pick % len(known)][1]
        call = Call("cmd", "RemoteStopTransaction", {"transactionId": tid})
        out = self.off.downstream_call(cid, V, call)
        new = out.payload["transactionId"]
        if new != tid:
            assert self.backend_of.get(new) == tid and self.cid_of.get(new) == cid, \
                (cid, tid, new)

    @precondition(lambda self: self.sent)
    @rule(pick=st.integers(0, 10**6))
    def hold_runs_out(self, pick: int) -> None:
        _, _, _, msg = self.sent[pick % len(self.sent)]
        given_up = self.off.give_up_payload(msg)
        if given_up is not None:
            assert given_up[1] in self.told_ids
            self.backend_of.setdefault(given_up[1], given_up[1])

    @invariant()
    def counts_are_sane(self) -> None:
        assert all(v >= 0 for v in self.off.counts.values())


OfflineMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestOffline = OfflineMachine.TestCase
