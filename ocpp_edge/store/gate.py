"""A gate between the upstream buffer and the uplink: each record passes it as it is handed
out for publishing, in order.

Offline operation (core/offline.py) rewrites a 1.6 transaction's local id to the
backend's as the message leaves, and holds a message whose mapping the backend has not
given yet. The gate asks ``gate(payload)`` for each record, oldest first:

* the same bytes: publish the record as it is;
* other bytes: publish those (the stored row is not changed: a replay after a restart
  passes the gate again);
* ``None``: hold it — and, to keep the order, that charge point's later records (those
  whose ``key`` is the same) — until the gate lets it through, while other charge
  points' records pass (at most ``max_passed`` are kept back); a hold that lasts
  ``hold_timeout`` seconds is released as it is, with a warning.

The uplink sees an ordinary :class:`~ocpp_edge.store.record.UpstreamBuffer`: records it
was not given are still unsent in the buffer underneath, and ``rewind`` forgets the held
ones with the rest.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

from ocpp_edge.store.record import Record, UpstreamBuffer

log = logging.getLogger("ocpp_edge.offline")

MAX_PASSED = 10_000  # records taken from the buffer past held ones, at most


class GatedBuffer:
    """An :class:`UpstreamBuffer` whose records pass ``gate`` on their way out."""

    def __init__(self, inner: UpstreamBuffer, gate: Callable[[bytes], bytes | None],
                 hold_timeout: float, clock: Callable[[], float],
                 on_hold: Callable[[float], None] = lambda deadline: None,
                 on_timeout: Callable[[bytes], None] = lambda payload: None,
                 key: Callable[[str], str] = lambda topic: "",
                 max_passed: int = MAX_PASSED) -> None:
        self.inner = inner
        self.gate = gate
        self.hold_timeout = hold_timeout
        self.clock = clock
        self.on_hold = on_hold  # told the hold's deadline when a hold starts
        self.on_timeout = on_timeout  # told the payload of a hold that ran out
        # A record's charge point, from its topic: a hold stops that charge point's
        # later records only (one key for all: the whole stream waits).
        self.key = key
        self.max_passed = max_passed  # records kept back behind holds, at most
        self._taken: deque[Record] = deque()  # out of the buffer, not yet given to the uplink
        self._held: dict[str, float] = {}  # key -> since when its first record is held
        self.released = 0  # holds that ran out: published with the local id

    def __len__(self) -> int:
        return len(self.inner)

    @property
    def holding(self) -> bool:
        return bool(self._held)

    @property
    def held_since(self) -> float | None:
        return min(self._held.values()) if self._held else None

    def take(self, n: int) -> list[Record]:
        out: list[Record] = []
        taken = self._taken
        kept: deque[Record] = deque()  # records behind a hold, in order
        blocked: set[str] = set()  # keys held in this pass
        while len(out) < n:
            if not taken:
                if len(kept) >= self.max_passed:
                    break  # enough kept back: the rest waits in the buffer
                more = self.inner.take(n - len(out))
                if not more:
                    break
                taken.extend(more)
            rec = taken.popleft()
            # The key (a topic match) is only worked out while some charge point waits.
            key = self.key(rec.topic) if blocked or self._held else None
            if key is not None and key in blocked:
                kept.append(rec)  # behind its charge point's held record
                continue
            payload = self.gate(rec.payload)
            if payload is None:
                if key is None:
                    key = self.key(rec.topic)
                now = self.clock()
                since = self._held.get(key)
                if since is None:
                    since = self._held[key] = now
                    self.on_hold(now + self.hold_timeout)
                if now - since < self.hold_timeout:
                    blocked.add(key)
                    kept.append(rec)
                    continue
                self.released += 1
                log.warning("message %d held %.0f s for the backend's transactionId; "
                            "published with the local one (ocpp.offline.hold_timeout)",
                            rec.seq, now - since)
                payload = rec.payload
                self.on_timeout(payload)
            if key is not None:
                self._held.pop(key, None)
            rec.payload = payload
            out.append(rec)
        kept.extend(taken)
        self._taken = kept
        return out

    def ack(self, rec: Record) -> None:
        self.inner.ack(rec)

    def dead_letter(self, rec: Record, reason: str) -> bool:
        return self.inner.dead_letter(rec, reason)

    def rewind(self) -> int:
        self._taken.clear()
        self._held.clear()
        return self.inner.rewind()
