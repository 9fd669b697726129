"""The composition root: the only module that knows every piece.

::

    charge point ─ws─▶ cp_server ─text─▶ Session ─ToBackend─▶ Router
                 ─(topic, bytes)─▶ buffer ─▶ MqttUplink ─▶ broker
    broker ─▶ MqttUplink ─(topic, bytes)─▶ Router ─Message─▶ Session
                 ─ToChargePoint─▶ cp_server ─ws─▶ charge point

``cp_server`` and ``mqtt_uplink`` never import each other: the charge points keep being
served while the broker is away, and upstream messages wait in the buffer.
"""

from __future__ import annotations

import asyncio
import json
import logging

import tornado.httpserver
from tornado.netutil import bind_sockets

from ocpp_edge.buffer import MemoryBuffer
from ocpp_edge.config import Settings
from ocpp_edge.cp_server import (
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    ChargePointHandler,
    ServerOptions,
    make_application,
)
from ocpp_edge.mqtt_uplink import MqttUplink
from ocpp_edge.ocppj.errors import FormatViolation
from ocpp_edge.ocppj.messages import Call, CallError, Message
from ocpp_edge.router import DownstreamError, Router, TopicError, parse_downstream, upstream_payload
from ocpp_edge.session import Effect, Session, ToBackend, ToChargePoint

log = logging.getLogger("ocpp_edge.gateway")

_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        o, m, b = settings.ocpp, settings.mqtt, settings.buffer
        self.router = Router(
            mountpoint=o.mountpoint, upstream_topic=o.upstream_topic,
            upstream_topic_overrides=o.upstream_topic_overrides,
            reply_topic=o.upstream_reply_topic, error_topic=o.upstream_error_topic,
            dnstream_topic=o.dnstream_topic)
        self.buffer = MemoryBuffer(b.max_messages, b.max_bytes, b.overflow)
        self.uplink = MqttUplink(
            host=m.host, port=m.port, client_id=m.client_id, username=m.username,
            password=m.password, qos=m.qos, clean_session=m.clean_session,
            keepalive=m.keepalive, reconnect_delay_min=m.reconnect_delay_min,
            reconnect_delay_max=m.reconnect_delay_max, max_inflight=m.max_inflight,
            buffer=self.buffer, subscriptions=[(self.router.dnstream_filter, 1)],
            on_message=self.on_downstream)
        self.options = ServerOptions(
            subprotocols=o.subprotocols, default_subprotocol=o.default_subprotocol,
            fail_if_no_subprotocol=o.fail_if_no_subprotocol, max_frame_size=o.max_frame_size)
        self.connections: dict[str, ChargePointHandler] = {}
        self.sessions: dict[str, Session] = {}
        self._servers: list[tornado.httpserver.HTTPServer] = []
        self.ports: list[int] = []  # bound ports, in listener order (port 0 → real port)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        listen = self.settings.ocpp.listener_ws
        if listen is not None:
            app = make_application(self, self.settings.ocpp.path, self.options)
            server = tornado.httpserver.HTTPServer(app, xheaders=False)
            sockets = bind_sockets(listen.port, address=listen.host or None)
            server.add_sockets(sockets)
            self._servers.append(server)
            self.ports.append(sockets[0].getsockname()[1])
            log.info("listening for charge points on ws://%s:%d%s/<id>", listen.host,
                     self.ports[-1], self.settings.ocpp.path)
        self.uplink.start()

    async def stop(self) -> None:
        for server in self._servers:
            server.stop()  # no new connections
        for conn in list(self.connections.values()):
            conn.close_and_forget(CLOSE_GOING_AWAY, "gateway shutting down")
        self.connections.clear()
        self.sessions.clear()
        await self.uplink.stop()
        await asyncio.sleep(0)  # let the close frames go out

    # -- charge points (Hub) ---------------------------------------------------------------

    def cp_connected(self, conn: ChargePointHandler) -> None:
        old = self.connections.get(conn.cid)
        if old is not None:
            # SPEC "Connection": a second connection with the same id replaces the first.
            log.info("cp %s: new connection from %s replaces the one from %s", conn.cid,
                     conn.peer, old.peer)
            old.close_and_forget(CLOSE_NORMAL, "replaced by a new connection")
        self.connections[conn.cid] = conn
        self.sessions[conn.cid] = Session(conn.cid, conn.version or "")
        log.info("cp %s: connected from %s using %s", conn.cid, conn.peer, conn.version)

    def cp_text(self, conn: ChargePointHandler, text: str) -> None:
        session = self.sessions.get(conn.cid)
        if session is None or self.connections.get(conn.cid) is not conn:
            return  # a replaced connection's last words
        self._apply(conn, session, session.receive_text(text))

    def cp_closed(self, conn: ChargePointHandler) -> None:
        if self.connections.get(conn.cid) is conn:
            del self.connections[conn.cid]
            del self.sessions[conn.cid]
            log.info("cp %s: disconnected (code %s)", conn.cid, conn.close_code)

    def _apply(self, conn: ChargePointHandler | None, session: Session,
               effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, ToChargePoint):
                if conn is not None:
                    conn.send_text(effect.text)
            elif isinstance(effect, ToBackend):
                try:
                    self._publish(session.cid, session.version, effect.message, effect.action)
                except TopicError as exc:
                    msg = effect.message
                    log.warning("cp %s: cannot publish message %s: %s", session.cid,
                                msg.unique_id, exc)
                    if isinstance(msg, Call):
                        self._apply(conn, session, session.reject_call(
                            msg, FormatViolation(str(exc))))

    def _publish(self, cid: str, proto: str, msg: Message, action: str | None) -> None:
        topic = self.router.upstream_topic(cid, proto, msg, action)
        payload = _json.encode(upstream_payload(msg, action)).encode()
        if self.buffer.append(topic, payload) is not None:
            self.uplink.kick()

    # -- backend (MQTT) --------------------------------------------------------------------

    def on_downstream(self, topic: str, payload: bytes) -> None:
        cid = self.router.downstream_cid(topic)
        if cid is None:
            log.warning("ignoring MQTT message on unexpected topic %r", topic)
            return
        session = self.sessions.get(cid)
        proto = session.version if session else self.settings.ocpp.default_subprotocol
        try:
            msg = parse_downstream(payload)
        except DownstreamError as exc:
            log.warning("cp %s: malformed downstream message on %s: %s", cid, topic, exc)
            if exc.unique_id is not None:
                self._answer_backend(cid, proto, exc.unique_id, exc.action,
                                     FormatViolation(str(exc)).code_for(proto), str(exc))
            return
        if session is None:
            if isinstance(msg, Call):
                # SPEC "Downstream": every downstream CALL gets an answer.
                self._answer_backend(cid, proto, msg.unique_id, msg.action, "GenericError",
                                     f"charge point {cid} is not connected")
            else:
                log.info("cp %s: not connected; reply %s from the backend dropped", cid,
                         msg.unique_id)
            return
        self._apply(self.connections.get(cid), session, session.send(msg))

    def _answer_backend(self, cid: str, proto: str, unique_id: str, action: str | None,
                        code: str, description: str) -> None:
        try:
            self._publish(cid, proto, CallError(unique_id, code, description, {}), action)
        except TopicError as exc:
            log.warning("cp %s: cannot answer the backend: %s", cid, exc)
