"""A gate between the upstream buffer and the uplink: each record passes it as it is handed
out for publishing, in order.

Offline operation (core/offline.py) rewrites a 1.6 transaction's local id to the
backend's as the message leaves, and holds a message whose mapping the backend has not
given yet. The gate asks ``gate(payload)`` for each record, oldest first:

* the same bytes: publish the record as it is;
* other bytes: publish those (the stored row is not changed: a replay after a restart
  passes the gate again);
* ``None``: hold it — and, to keep the order, everything after it — until the gate lets
  it through; a hold that lasts ``hold_timeout`` seconds is released as it is, with a
  warning, so one missing answer cannot stop the site's whole stream.

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


class GatedBuffer:
    """An :class:`UpstreamBuffer` whose records pass ``gate`` on their way out."""

    def __init__(self, inner: UpstreamBuffer, gate: Callable[[bytes], bytes | None],
                 hold_timeout: float, clock: Callable[[], float],
                 on_hold: Callable[[float], None] = lambda deadline: None,
                 on_timeout: Callable[[bytes], None] = lambda payload: None) -> None:
        self.inner = inner
        self.gate = gate
        self.hold_timeout = hold_timeout
        self.clock = clock
        self.on_hold = on_hold  # told the hold's deadline when a hold starts
        self.on_timeout = on_timeout  # told the payload of a hold that ran out
        self._taken: deque[Record] = deque()  # out of the buffer, not yet given to the uplink
        self.held_since: float | None = None
        self.released = 0  # holds that ran out: published with the local id

    def __len__(self) -> int:
        return len(self.inner)

    @property
    def holding(self) -> bool:
        return self.held_since is not None

    def take(self, n: int) -> list[Record]:
        out: list[Record] = []
        taken = self._taken
        while len(out) < n:
            if not taken:
                more = self.inner.take(n - len(out))
                if not more:
                    break
                taken.extend(more)
            rec = taken[0]
            payload = self.gate(rec.payload)
            if payload is None:
                now = self.clock()
                if self.held_since is None:
                    self.held_since = now
                    self.on_hold(now + self.hold_timeout)
                if now - self.held_since < self.hold_timeout:
                    break
                self.released += 1
                log.warning("message %d held %.0f s for the backend's transactionId; "
                            "published with the local one (ocpp.offline.hold_timeout)",
                            rec.seq, now - self.held_since)
                payload = rec.payload
                self.on_timeout(payload)
            self.held_since = None
            taken.popleft()
            rec.payload = payload
            out.append(rec)
        return out

    def ack(self, rec: Record) -> None:
        self.inner.ack(rec)

    def rewind(self) -> int:
        self._taken.clear()
        self.held_since = None
        return self.inner.rewind()
