"""What operations see of the gateway: the :class:`~ocpp_edge.ops.view.GatewayView` the
composition root hands to ``Operations``, and the per-connection values it reads."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from ocpp_edge.config import Settings
from ocpp_edge.core.session import Session
from ocpp_edge.north.uplink import MqttUplink, StatusTopic
from ocpp_edge.ops.view import ListenerStats, LocalModeStats, PeerInfo
from ocpp_edge.south.listener import ChargePointHandler
from ocpp_edge.store.diskbuffer import DiskBuffer

if TYPE_CHECKING:
    from ocpp_edge.gateway.root import Gateway



class OpsView:
    """The :class:`~ocpp_edge.ops.view.GatewayView` handed to ``Operations``: read-only
    figures and three named commands; the ``Gateway`` itself never reaches ``ops``."""

    __slots__ = ("_gw",)

    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway

    @property
    def settings(self) -> Settings:
        return self._gw.settings

    @property
    def charge_points(self) -> int:
        return len(self._gw.connections)

    @property
    def buffer(self) -> DiskBuffer:
        return self._gw.buffer

    @property
    def uplink(self) -> MqttUplink:
        return self._gw.uplink

    def sessions(self) -> Iterable[Session]:
        return self._gw.sessions.values()

    def listeners(self) -> list[ListenerStats]:
        return [ListenerStats(key=ls.settings.key, url=ls.url, connections=ls.upgraded,
                              listening=ls.server is not None, refused=ls.refused)
                for ls in self._gw.listeners]

    def local_mode(self) -> LocalModeStats | None:
        local = self._gw.local
        return None if local is None else local.stats()

    def kick(self, cid: str, reason: str) -> bool:
        return self._gw.kick(cid, reason)

    def publish_event(self, topic: str, payload: bytes) -> bool:
        gw = self._gw
        if gw.buffer.append(topic, payload) is None:
            return False
        gw.uplink.kick()
        return True

    def set_status_topic(self, status: StatusTopic) -> None:
        self._gw.uplink.status = status


def peer_info(conn: ChargePointHandler) -> PeerInfo:
    return PeerInfo(
        cid=conn.cid, authorization=conn.authorization, ip=conn.peer,
        peer_port=_peer_port(conn), sock_port=conn.listener.port,
        subprotocol=conn.version or "", listener=conn.listener.settings.key,
        auth=conn.auth_method or "anonymous", connected_at=conn.connected_at)


def _peer_port(conn: ChargePointHandler) -> int | None:
    # Tornado's HTTP1ServerConnection context keeps the (ip, port, ...) it accepted.
    address = getattr(getattr(conn.request.connection, "context", None), "address", None)
    if isinstance(address, tuple) and len(address) >= 2 and isinstance(address[1], int):
        return address[1]
    return None
