"""The upstream FIFO between the charge points and the MQTT uplink.

Every upstream message is appended here before it is published, and leaves only when the
broker acknowledged it (SPEC "Upstream": PUBACK / PUBCOMP). The uplink takes records in
order, publishes them, acks each one on the broker's acknowledgement, and ``rewind()``s
whatever was in flight when the connection dropped, so it is sent again on reconnect
(at-least-once, in order).

This is the in-memory implementation: bounded by messages and bytes, and "full" is an
explicit, counted, logged outcome (``buffer.overflow``). It survives broker outages, not
a restart of the gateway.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from itertools import islice

log = logging.getLogger("ocpp_edge.buffer")

DROP_OLDEST = "drop_oldest"
DROP_NEWEST = "drop_newest"
_RECORD_OVERHEAD = 64  # bytes counted per record beyond topic and payload


class Record:
    __slots__ = ("seq", "topic", "payload", "size", "acked")

    def __init__(self, seq: int, topic: str, payload: bytes) -> None:
        self.seq = seq  # the buffer's own identity of this message; paho's mid is not
        self.topic = topic
        self.payload = payload
        self.size = len(topic.encode()) + len(payload) + _RECORD_OVERHEAD
        self.acked = False

    def __repr__(self) -> str:
        return f"Record(seq={self.seq}, topic={self.topic!r}, {len(self.payload)} bytes)"


class MemoryBuffer:
    """A bounded FIFO with a send cursor: ``append`` → ``take`` → ``ack`` / ``rewind``."""

    def __init__(self, max_messages: int, max_bytes: int, overflow: str = DROP_OLDEST,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if overflow not in (DROP_OLDEST, DROP_NEWEST):
            raise ValueError(f"unknown overflow policy {overflow!r}")
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.overflow = overflow
        self._records: deque[Record] = deque()
        self._in_flight = 0  # records[0:_in_flight] have been handed out by take()
        self._next_seq = 1
        self._clock = clock
        self.bytes = 0
        self.dropped = 0
        self._last_drop_log = -1e9
        self._drops_since_log = 0

    def __len__(self) -> int:
        return len(self._records)

    @property
    def unsent(self) -> int:
        return len(self._records) - self._in_flight

    def append(self, topic: str, payload: bytes) -> Record | None:
        """Store a message; returns its record, or None if the overflow policy dropped it."""
        rec = Record(self._next_seq, topic, payload)
        self._next_seq += 1
        if rec.size > self.max_bytes:
            self._count_drop(rec)
            return None
        while (len(self._records) >= self.max_messages
               or self.bytes + rec.size > self.max_bytes):
            if self.overflow == DROP_NEWEST or self.unsent == 0:
                # Nothing unsent to sacrifice (all in flight): the newcomer goes.
                self._count_drop(rec)
                return None
            victim = self._records[self._in_flight]  # the oldest not in flight
            del self._records[self._in_flight]
            self.bytes -= victim.size
            if not victim.acked:  # an acked one was delivered before a rewind: no loss
                self._count_drop(victim)
        self._records.append(rec)
        self.bytes += rec.size
        return rec

    def take(self, n: int) -> list[Record]:
        """Hand out up to ``n`` records that are not in flight, oldest first."""
        out = list(islice(self._records, self._in_flight, self._in_flight + n))
        self._in_flight += len(out)
        return out

    def ack(self, rec: Record) -> None:
        """The broker acknowledged ``rec``: forget it (and every acked record before it)."""
        rec.acked = True
        records = self._records
        while self._in_flight and records[0].acked:
            head = records.popleft()
            self.bytes -= head.size
            self._in_flight -= 1

    def rewind(self) -> int:
        """The connection dropped: every record in flight becomes unsent again, in order.

        Acks that arrive later for records handed out before the rewind are harmless:
        ``ack`` marks the record, and it leaves once it reaches the head."""
        n = self._in_flight
        self._in_flight = 0
        return n

    def _count_drop(self, rec: Record) -> None:
        self.dropped += 1
        self._drops_since_log += 1
        now = self._clock()
        if now - self._last_drop_log >= 10.0:  # rate-limited: one line per 10 s at most
            log.warning("upstream buffer full (%d messages, %d bytes): dropped %d message(s) "
                        "by %s, last on %s; %d dropped in total", len(self._records),
                        self.bytes, self._drops_since_log, self.overflow, rec.topic,
                        self.dropped)
            self._last_drop_log = now
            self._drops_since_log = 0
