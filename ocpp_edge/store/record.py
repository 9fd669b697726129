"""The records of the upstream FIFO between the charge points and the MQTT uplink.

Every upstream message is appended to the buffer before it is published, and leaves only
when the broker acknowledged it (SPEC "Upstream": PUBACK / PUBCOMP). The uplink takes
records in order, publishes them, acks each one on the broker's acknowledgement, and
``rewind()``s whatever was in flight when the connection dropped, so it is sent again on
reconnect (at-least-once, in order). The durable implementation is diskbuffer.DiskBuffer.
"""

from __future__ import annotations

from typing import Protocol

DROP_OLDEST = "drop_oldest"
DROP_NEWEST = "drop_newest"
RECORD_OVERHEAD = 64  # bytes counted per record beyond topic and payload


class Record:
    __slots__ = ("seq", "topic", "payload", "important", "size", "acked")

    def __init__(self, seq: int, topic: str, payload: bytes, important: bool = False) -> None:
        self.seq = seq  # the buffer's own identity of this message; paho's mid is not
        self.topic = topic
        self.payload = payload
        self.important = important  # a transaction message: dropped last
        self.size = len(topic.encode()) + len(payload) + RECORD_OVERHEAD
        self.acked = False

    def __repr__(self) -> str:
        return f"Record(seq={self.seq}, topic={self.topic!r}, {len(self.payload)} bytes)"


class UpstreamBuffer(Protocol):
    """What the uplink needs from a buffer (implemented by diskbuffer.DiskBuffer)."""

    def __len__(self) -> int: ...
    def take(self, n: int) -> list[Record]: ...
    def ack(self, rec: Record) -> None: ...
    def rewind(self) -> int: ...
    # Never publish ``rec`` (in flight) again: it goes to the dead-letter table.
    def dead_letter(self, rec: Record, reason: str) -> bool: ...
