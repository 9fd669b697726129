"""What operations may see of the gateway, and what they may ask it to do.

``ops`` never holds the ``Gateway``: the composition root (``gateway.py``) hands
:class:`~ocpp_edge.ops.operations.Operations` an object of the :class:`GatewayView`
protocol, and calls its hooks with plain values (:class:`PeerInfo`, a
:class:`SessionStats`, a close code). The protocol is read-only but for three named
commands (``kick``, ``publish_event``, ``set_status_topic``), so the import arrows run one
way: ``gateway`` → ``ops`` → ``core`` / ``north`` / ``config``, never back, and nothing
here knows the south side (Tornado handlers, listeners) except through these types.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ocpp_edge.config import Settings
from ocpp_edge.north.uplink import StatusTopic


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """One charge point connection as it was at the upgrade (what presence events and
    the admin endpoint say about it); none of it changes while the connection lives."""

    cid: str
    authorization: str | None  # the HTTP Authorization header, for the Basic user name
    ip: str
    peer_port: int | None
    sock_port: int  # the listener's bound port
    subprotocol: str
    listener: str  # its configuration key, e.g. "ocpp.listener.ws"
    auth: str  # how it authenticated ("anonymous" if it did not)
    connected_at: float | None  # time.time() at the upgrade


@dataclass(frozen=True, slots=True)
class ListenerStats:
    """One listener, read when somebody asks (admin status, /healthz, /metrics)."""

    key: str  # e.g. "ocpp.listener.ws"
    url: str
    connections: int  # upgraded WebSocket connections open now
    listening: bool  # bound and serving
    refused: Mapping[str, int]  # totals of connections refused at accept, by reason


@dataclass(frozen=True, slots=True)
class LocalModeStats:
    """Offline operation (ocpp.upstream_down_policy = local), read when somebody asks."""

    active: bool  # the gateway answers charge points itself now
    reason: str | None  # "upstream link down" | "backend silent" | None
    since: float  # epoch seconds of the last change of ``active``
    answers: int  # CALLs answered locally
    reconciled: int  # backend answers to locally answered CALLs, matched after replay
    disagreements: int  # ... of which decided otherwise than the local answer
    mapped: int  # local 1.6 transaction ids mapped to the backend's
    held_released: int  # messages published with a local id after ocpp.offline.hold_timeout
    holding: bool  # a message waits for the backend's transaction id now
    transactions_open: int  # local transaction ids still in use
    answered_pending: int  # locally answered CALLs whose backend answer is awaited
    authorizations_cached: int


class SessionStats(Protocol):
    """What ops reads of one charge point's session (``core.session.Session``)."""

    @property
    def counters(self) -> Mapping[str, int]: ...  # orphan_replies, schema_failures, timeouts_*
    @property
    def pending_from_cp(self) -> int: ...
    @property
    def queue_length(self) -> int: ...


class BufferStats(Protocol):
    """What ops reads of the disk buffer."""

    def __len__(self) -> int: ...
    @property
    def bytes(self) -> int: ...
    @property
    def dropped(self) -> int: ...
    @property
    def dead_letters(self) -> int: ...  # rows of the dead-letter table (north/uplink.py)
    @property
    def max_messages(self) -> int: ...
    @property
    def max_bytes(self) -> int: ...
    @property
    def dir(self) -> Path: ...


class UplinkStats(Protocol):
    """What ops reads of the MQTT uplink."""

    @property
    def connected(self) -> bool: ...
    @property
    def reconnects(self) -> int: ...
    @property
    def published(self) -> int: ...


class GatewayView(Protocol):
    """The gateway as operations see it. Every member is O(1) except ``sessions`` and
    ``listeners``, which are read once per admin request or scrape, never per message."""

    @property
    def settings(self) -> Settings: ...  # the running configuration (replaced on reload)
    @property
    def charge_points(self) -> int: ...  # connected now
    @property
    def buffer(self) -> BufferStats: ...  # the same object for the gateway's life
    @property
    def uplink(self) -> UplinkStats: ...  # the same object for the gateway's life
    def sessions(self) -> Iterable[SessionStats]: ...  # of the connected charge points
    def listeners(self) -> list[ListenerStats]: ...  # in configuration order
    def local_mode(self) -> LocalModeStats | None: ...  # None: the policy is not local

    # -- commands --------------------------------------------------------------------------

    def kick(self, cid: str, reason: str) -> bool:
        """Close ``cid``'s connection with 1000 and end its session; False if not
        connected."""
        ...

    def publish_event(self, topic: str, payload: bytes) -> bool:
        """Append a presence event to the disk buffer, in its place among the charge
        points' messages, and wake the uplink; False if the buffer refused it (full)."""
        ...

    def set_status_topic(self, status: StatusTopic) -> None:
        """The retained gateway status (and MQTT will) the uplink publishes; called
        before the uplink starts."""
        ...
