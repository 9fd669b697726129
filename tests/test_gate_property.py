"""The gate between the upstream buffer and the uplink (store/gate.py) under random
sequences, on a real DiskBuffer: charge points' records appended, some held until the
backend's transactionId arrives (the gate opens for them) or until ``hold_timeout``
runs out, the uplink taking batches and acknowledging them in order, the link dropping
(a rewind: what was taken and not acknowledged is handed out again).

What must hold whatever the sequence: each charge point's records are acknowledged in
the order they were appended, none twice, none held ones rewritten; a record leaves
while its gate is closed only after it waited ``hold_timeout``; a charge point with
nothing held is never kept waiting by another's hold; once every gate is open and the
uplink takes everything, the buffer is empty.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ocpp_edge.store.diskbuffer import DiskBuffer
from ocpp_edge.store.gate import GatedBuffer

CPS = st.sampled_from(["A", "B", "C"])
HOLD_TIMEOUT = 60.0


class GateMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="gate-prop-"))
        self.buffer = DiskBuffer(self.dir, 100_000, 100_000_000, "drop_oldest")
        self.now = 0.0
        self.closed: set[bytes] = set()  # payloads whose gate is closed (no backend id yet)
        self.opened: set[bytes] = set()  # ... and those it opened for since
        self.gated = GatedBuffer(self.buffer, self.gate, HOLD_TIMEOUT, lambda: self.now,
                                 key=lambda topic: topic.rsplit("/", 1)[1])
        self.appended: dict[str, list[bytes]] = {"A": [], "B": [], "C": []}
        self.in_flight: list = []  # taken by the uplink, not acknowledged yet
        self.acked: dict[str, list[bytes]] = {"A": [], "B": [], "C": []}
        self.first_held_at: dict[bytes, float] = {}
        self.n = 0

    def gate(self, payload: bytes) -> bytes | None:
        if payload in self.closed:
            self.first_held_at.setdefault(payload, self.now)
            return None
        return payload.upper() if payload in self.opened else payload  # rewritten

    def teardown(self) -> None:
        self.buffer.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(cp=CPS, held=st.booleans())
    def append(self, cp: str, held: bool) -> None:
        self.n += 1
        payload = f"{cp.lower()}-{self.n}".encode()  # rewritten: upper case
        if held:  # a MeterValues of a transaction whose backend id is not known yet
            self.closed.add(payload)
        self.buffer.append(f"ocpp/cp/{cp}", payload)
        self.appended[cp].append(payload)

    @precondition(lambda self: self.closed)
    @rule(pick=st.integers(0, 10**6))
    def backend_id_arrives(self, pick: int) -> None:
        payload = sorted(self.closed)[pick % len(self.closed)]
        self.closed.discard(payload)
        self.opened.add(payload)

    @rule(seconds=st.sampled_from([1.0, 30.0, HOLD_TIMEOUT]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds

    @rule(n=st.integers(1, 20))
    def uplink_takes(self, n: int) -> None:
        out = self.gated.take(n)
        assert len(out) <= n
        for rec in out:
            original = rec.payload.lower()
            if original in self.closed:  # left while its gate was closed: released
                assert rec.payload == original
                assert self.now - self.first_held_at[original] >= HOLD_TIMEOUT
            elif original in self.opened:
                assert rec.payload == original.upper()
            self.in_flight.append(rec)

    @rule(k=st.integers(0, 20))
    def broker_acknowledges(self, k: int) -> None:
        done, self.in_flight = self.in_flight[:k], self.in_flight[k:]
        for rec in done:
            self.gated.ack(rec)
            cp = rec.topic.rsplit("/", 1)[1]
            self.acked[cp].append(rec.payload.lower())

    @rule()
    def link_drops(self) -> None:
        self.in_flight.clear()  # their acknowledgements will never come
        self.gated.rewind()

    @rule(cp=CPS, n=st.integers(1, 3))
    def passed_then_the_link_drops(self, cp: str, n: int) -> None:
        """What a per-charge-point hold brings about, amid whatever else happened: a held
        message, another charge point's acknowledged past it, the connection dropping,
        the uplink taking and publishing again."""
        other = next(c for c in "ABC" if c != cp)
        self.append(cp, True)
        for _ in range(n):
            self.append(other, False)
        self.uplink_takes(10**6)
        self.broker_acknowledges(10**6)
        self.link_drops()
        self.uplink_takes(10**6)
        self.broker_acknowledges(10**6)

    @rule()
    def free_charge_points_are_not_kept_waiting(self) -> None:
        """Take as much as the uplink can: every record of a charge point with nothing
        held, and not acknowledged yet, comes out (or is in flight already)."""
        self.uplink_takes(10**6)
        flowing = {rec.payload.lower() for rec in self.in_flight}
        for cp, records in self.appended.items():
            if any(p in self.closed for p in records if p not in self.acked[cp]):
                continue  # held, or behind a hold
            missing = [p for p in records if p not in self.acked[cp] and p not in flowing]
            assert missing == [], (cp, missing)

    @invariant()
    def in_order_and_once(self) -> None:
        for cp, acked in self.acked.items():
            order = [self.appended[cp].index(p) for p in acked]
            assert order == sorted(set(order)), (cp, acked)

    @rule()
    def everything_goes_once_the_backend_answered(self) -> None:
        while self.closed:
            self.backend_id_arrives(0)
        self.uplink_takes(10**6)
        self.broker_acknowledges(10**6)
        assert len(self.gated) == 0 and not self.gated.holding
        for cp in self.acked:
            assert self.acked[cp] == self.appended[cp], cp


GateMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestGate = GateMachine.TestCase
