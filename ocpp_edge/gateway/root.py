"""The composition root: the :class:`Gateway`, the only object that knows every part.

::

    charge point ─ws─▶ south.listener ─text─▶ Session ─ToBackend─▶ Router
                 ─(topic, bytes)─▶ buffer ─▶ MqttUplink ─▶ broker
    broker ─▶ MqttUplink ─(topic, bytes)─▶ Router ─Message─▶ Session
                 ─ToChargePoint─▶ south.listener ─ws─▶ charge point

``south`` and ``north`` never import each other (tests/test_layout.py): the charge points
keep being served while the broker is away, and upstream messages wait in the buffer.

Length: the composition root carries every effect of the core out through both adapters,
the group commit and reload; the offline glue (local.py) and the operations view
(opsview.py) are already apart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping

from tornado.netutil import bind_sockets

from ocpp_edge.config import AuthSettings, OcppSettings, Settings, tls
from ocpp_edge.core.ocppj.errors import FormatViolation
from ocpp_edge.core.ocppj.messages import Call, CallError, CallResult, Message
from ocpp_edge.core.offline import with_local_answer
from ocpp_edge.core.router import (
    DownstreamError,
    Router,
    TopicError,
    parse_downstream,
    upstream_text,
)
from ocpp_edge.core.session import (
    CloseConnection,
    Effect,
    Policy,
    Session,
    ToBackend,
    ToChargePoint,
    Unanswered,
)
from ocpp_edge.core.validation import Validator
from ocpp_edge.gateway.local import LocalMode
from ocpp_edge.gateway.opsview import OpsView, peer_info
from ocpp_edge.north.uplink import MqttUplink
from ocpp_edge.ops.operations import Operations
from ocpp_edge.south import credentials as _credentials
from ocpp_edge.south.auth import Accepted, Authenticator, Refusal
from ocpp_edge.south.listener import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_NORMAL,
    CLOSE_TRY_AGAIN_LATER,
    ChargePointHandler,
    LimitedHTTPServer,
    Listener,
    ServerOptions,
    fit_to_open_files,
    make_application,
)
from ocpp_edge.store.diskbuffer import DiskBuffer

log = logging.getLogger("ocpp_edge.gateway")

# ASCII JSON: lone surrogates a peer may send as escapes stay escapes (see core/ocppj/codec.py).

# Transaction messages are money: the buffer drops them last (issue "Disk buffer").
TRANSACTION_ACTIONS = frozenset({"StartTransaction", "StopTransaction", "MeterValues",
                                 "TransactionEvent"})


def load_credentials(auth: AuthSettings) -> _credentials.PasswordFile:
    """The charge point password file; raises CredentialsError when it is malformed.
    A missing file is no error: no password has been set yet."""
    if auth.password_file is None:
        return _credentials.PasswordFile()
    try:
        found = _credentials.PasswordFile.load(auth.password_file)
    except FileNotFoundError:
        log.warning("%s does not exist: no charge point can log in with a password (add "
                    "one with: ocpp-edge passwd <id>)", auth.password_file)
        return _credentials.PasswordFile()
    for warning in found.warnings:
        log.warning("%s", warning)
    log.info("%d charge point password(s) in %s", len(found), auth.password_file)
    return found


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        o, m, b = settings.ocpp, settings.mqtt, settings.buffer
        self.router = Router(
            mountpoint=o.mountpoint, upstream_topic=o.upstream_topic,
            upstream_topic_overrides=o.upstream_topic_overrides,
            reply_topic=o.upstream_reply_topic, error_topic=o.upstream_error_topic,
            dnstream_topic=o.dnstream_topic, id_encoding=o.topic_id_encoding)
        # Opened now: a store left by a crash is recovered before anything else runs.
        self.buffer = DiskBuffer(b.dir, b.max_messages, b.max_bytes, b.overflow)
        self.buffer.on_dirty = self._schedule_commit
        self._commit_handle: asyncio.TimerHandle | None = None
        self._stopping = False  # stop() began
        self._last_commit = 0.0
        self.loop: asyncio.AbstractEventLoop | None = None
        # Told when a charge point comes or goes or the upstream link changes (STATUS=).
        self.on_change: Callable[[], None] = lambda: None
        # ocpp.upstream_down_policy = local: offline operation (gateway/local.py); the
        # uplink then reads the buffer through its gate (transaction id rewriting).
        self.local = LocalMode(self, o.offline, b.dir) \
            if o.upstream_down_policy == "local" else None
        self.uplink = MqttUplink(
            host=m.host, port=m.port, client_id=m.client_id, username=m.username,
            password=m.password, qos=m.qos, clean_session=m.clean_session,
            protocol=m.protocol, session_expiry=m.session_expiry, keepalive=m.keepalive,
            reconnect_delay_min=m.reconnect_delay_min,
            reconnect_delay_max=m.reconnect_delay_max, max_inflight=m.max_inflight,
            buffer=self.local.gated if self.local else self.buffer,
            subscriptions=[(self.router.dnstream_filter, 1)],
            on_message=self.on_downstream, on_state=self._upstream_state,
            replay_rate=b.replay_rate,
            ssl_context=tls.client_context(m.cacertfile, m.certfile, m.keyfile,
                                           m.verify_hostname) if m.tls else None)
        # The dead-letter log line names the charge point a refused message came from.
        self.uplink.charge_point_of = self._charge_point_of
        # OCPP 2.0.1 Part 4 §6.3 (Local Controller): with close_stations, charge points are
        # only served while the upstream link is up.
        self.close_stations = o.upstream_down_policy == "close_stations"
        self.accepting = not self.close_stations
        self.options = self._server_options(o)
        a = settings.auth
        self.authenticator = Authenticator(
            load_credentials(a), known_ids_only=a.known_ids_only,
            max_failures=a.max_failures, failure_window=a.failure_window)
        # TLS contexts are built now: a certificate that cannot be used stops the start.
        self.listeners = [Listener(ls, tls.server_context(ls.tls) if ls.tls else None)
                          for ls in o.listeners]
        checking = o.message_format_checking
        self.validator: Validator | None = None
        if checking != "disable":
            # Read every schema now: a broken schema directory stops the start, loudly.
            self.validator = Validator(o.json_schema_dir, o.subprotocols,
                                       o.json_schema_id_prefix)
        self.policy = self._policy(o)
        self.connections: dict[str, ChargePointHandler] = {}
        self.sessions: dict[str, Session] = {}
        # One timer per session, armed at its next deadline; a deadline that moves later
        # is found when the timer fires, so only an earlier one re-arms (no per-message
        # timer churn, nothing scans all sessions).
        self._timers: dict[str, asyncio.TimerHandle] = {}  # its .when() is the deadline
        self._warm_handle: asyncio.Handle | None = None
        self.ports: list[int] = []  # bound ports, in listener order (port 0 → real port)
        # The admin endpoint, metrics and presence on MQTT; told as things happen. They see
        # the gateway only through OpsView (ops/view.py), never this object.
        self.ops = Operations(OpsView(self))

    def _server_options(self, o: OcppSettings) -> ServerOptions:
        return ServerOptions(
            subprotocols=o.subprotocols, default_subprotocol=o.default_subprotocol,
            fail_if_no_subprotocol=o.fail_if_no_subprotocol, max_frame_size=o.max_frame_size,
            handshake_timeout=o.handshake_timeout, ping_interval=o.ping_interval,
            ping_timeout=o.ping_timeout, max_message_rate=o.max_message_rate)

    def _policy(self, o: OcppSettings) -> Policy:
        check = self.validator.check if self.validator else None
        checking = o.message_format_checking
        return Policy(
            upstream_strict=o.upstream_strict_mode,
            upstream_timeout=o.upstream_awaiting_timeout,
            dnstream_strict=o.dnstream_strict_mode,
            dnstream_timeout=o.dnstream_awaiting_timeout,
            retry_interval=o.dnstream_retry_interval,
            max_retries=o.dnstream_max_retries,
            max_queue=o.dnstream_max_mqueue_len,
            check_upstream=check if checking in ("all", "upstream_only") else None,
            check_dnstream=check if checking in ("all", "dnstream_only") else None,
            heartbeat_interval=o.default_heartbeat_interval,
            heartbeat_backoff=o.heartbeat_checking_times_backoff,
            answer_after=self._answer_after(o))

    @staticmethod
    def _answer_after(o: OcppSettings) -> float | None:
        """Local policy: how long a forwarded CALL waits for the backend before the
        gateway answers it (the earlier of ocpp.offline.answer_after and
        ocpp.upstream.awaiting_timeout); None: the timeout's CALLERROR, as with buffer."""
        wait = o.offline.answer_after
        if o.upstream_down_policy != "local" or wait is None:
            return None
        return min(wait, o.upstream_awaiting_timeout)

    def now(self) -> float:
        assert self.loop is not None
        return self.loop.time()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.ops.start()  # the admin endpoint, on this loop (before the charge points')
        if self.local is not None:
            self.local.start()
        path = self.settings.ocpp.path
        fit_to_open_files(self.listeners)  # max_connections within RLIMIT_NOFILE
        for listener in self.listeners:
            listen = listener.settings.listen
            # idle_connection_timeout is Tornado's header timeout: the TLS handshake and
            # the request head must both arrive within ocpp.handshake_timeout (slow-loris).
            server = LimitedHTTPServer(
                make_application(self, path, self.options, listener), listener=listener,
                ssl_options=listener.ssl_ctx, xheaders=False,
                idle_connection_timeout=self.options.handshake_timeout,
                body_timeout=self.options.handshake_timeout)
            sockets = bind_sockets(listen.port, address=listen.host or None)
            server.add_sockets(sockets)
            listener.server = server
            listener.port = sockets[0].getsockname()[1]
            self.ports.append(listener.port)
            log.info("listening for charge points on %s%s/<id> (%s, security profile %d%s)",
                     listener.url, path, listener.settings.key, listener.settings.profile,
                     ", anonymous allowed" if listener.settings.allow_anonymous else "")
        self.uplink.start()

    def _warm_up(self) -> None:
        # Compile one schema per loop turn until all queued are ready (see core/validation.py).
        self._warm_handle = None
        if self.validator is not None and self.validator.warm_up_step():
            self._warm_handle = self.loop.call_soon(self._warm_up)  # type: ignore[union-attr]

    async def stop(self) -> None:
        self.ops.stop()
        self._stopping = True  # the uplink's own disconnect that follows is no outage
        if self.local is not None:
            self.local.flush()  # local answers waiting for their commit go out first
        for listener in self.listeners:
            if listener.server is not None:
                listener.server.stop()  # no new connections
        for cid, conn in list(self.connections.items()):
            conn.close_and_forget(CLOSE_GOING_AWAY, "gateway shutting down")
            self._end_session(cid, "gateway shutting down")
        await self.uplink.stop()
        if self._commit_handle is not None:
            self._commit_handle.cancel()
        if self.local is not None:
            self.local.stop()
        self.buffer.close()  # the last group commit
        await asyncio.sleep(0)  # let the close frames go out

    def status_text(self) -> str:
        """One line for ``systemctl status`` (sd_notify STATUS=)."""
        # OCPP messages apart from the presence events waiting with them (ops/operations.py)
        e = self.ops.buffered_events()
        n, k = len(self.connections), len(self.buffer) - e
        return (f"{n} charge point{'' if n == 1 else 's'}, upstream "
                f"{'connected' if self.uplink.connected else 'disconnected'}, "
                f"{k} message{'' if k == 1 else 's'}"
                + (f" and {e} event{'' if e == 1 else 's'}" if e else "") + " buffered"
                + (f", local mode ({self.local.offline.reason()})"
                   if self.local is not None and self.local.active else ""))

    # -- reload (SIGHUP) -------------------------------------------------------------------

    def reload(self, new: Settings) -> list[str]:
        """Apply a re-read configuration without dropping charge points.

        Everything that can change live is prepared first (password file, TLS contexts),
        so a file that cannot be applied raises (OcppEdgeError, OSError, ssl.SSLError)
        and leaves the running configuration untouched. Applied live: topics
        (the downstream subscription is replaced at the broker), call discipline and
        timeouts (for sessions too), frame/message limits and subprotocols (new
        connections), each listener's limits, anonymity and certificates (new
        handshakes), the credentials and auth settings. What needs a restart (the
        broker connection, the buffer, the set of listening addresses, schema checking)
        keeps its running value; the returned list names it, for the log. The log level
        (``settings.log.level``) is the caller's to apply: logging is the daemon's set-up.
        """
        old = self.settings
        o, n = old.ocpp, new.ocpp
        restart: list[str] = []
        # Listening sockets stay bound: a changed set of addresses needs a restart.
        same_listeners = [(ls.key, ls.kind, ls.listen) for ls in o.listeners] == \
            [(ls.key, ls.kind, ls.listen) for ls in n.listeners]
        if not same_listeners:
            restart.append("ocpp.listener.* addresses")
        fixed = {"message_format_checking": "ocpp.message_format_checking",
                 "json_schema_dir": "ocpp.json_schema_dir",
                 "json_schema_id_prefix": "ocpp.json_schema_id_prefix",
                 "upstream_down_policy": "ocpp.upstream_down_policy",
                 "offline": "ocpp.offline.*",
                 # the retained status is the MQTT will, fixed when the connection opens
                 "status_topic": "ocpp.upstream.status_topic"}
        restart += [key for field, key in fixed.items()
                    if getattr(o, field) != getattr(n, field)]
        keep = {field: getattr(o, field) for field in fixed}
        if not same_listeners:
            keep["listeners"] = o.listeners
        n = dataclasses.replace(n, **keep)
        sections = {}
        for section in dataclasses.fields(old):
            if section.name in ("ocpp", "auth", "log", "source"):
                continue
            if getattr(old, section.name) != getattr(new, section.name):
                restart.append(f"{section.name}.*")
            sections[section.name] = getattr(old, section.name)
        effective = dataclasses.replace(new, ocpp=n, **sections)

        # Prepare: anything that can fail does so here, before a single change is made.
        credentials = load_credentials(effective.auth)
        contexts = [tls.server_context(ls.tls) if ls.tls else None for ls in n.listeners]
        router = Router(
            mountpoint=n.mountpoint, upstream_topic=n.upstream_topic,
            upstream_topic_overrides=n.upstream_topic_overrides,
            reply_topic=n.upstream_reply_topic, error_topic=n.upstream_error_topic,
            dnstream_topic=n.dnstream_topic, id_encoding=n.topic_id_encoding)

        # Apply.
        if router.dnstream_filter != self.router.dnstream_filter:
            self.uplink.set_subscriptions([(router.dnstream_filter, 1)])
        self.router = router
        a = effective.auth
        self.authenticator.credentials = credentials
        self.authenticator.known_ids_only = a.known_ids_only
        self.authenticator.limiter.max_failures = a.max_failures
        self.authenticator.limiter.window = a.failure_window
        self.policy = self._policy(n)
        for session in self.sessions.values():
            session.policy = self.policy
        self.options = self._server_options(n)
        for listener, ls, ctx in zip(self.listeners, n.listeners, contexts, strict=True):
            listener.settings, listener.ssl_ctx = ls, ctx
            if listener.server is not None:
                listener.server.ssl_options = ctx  # Tornado wraps each new socket with it
                listener.server.request_callback = make_application(
                    self, n.path, self.options, listener)
                params = listener.server.conn_params  # the slow-loris limit, as in start()
                params.header_timeout = params.body_timeout = n.handshake_timeout
        for conn in self.connections.values():
            conn.options = self.options
        self.settings = effective
        self.ops.config_loaded()
        return restart

    # -- charge points (Hub) ---------------------------------------------------------------

    def authenticate(self, conn: ChargePointHandler) -> Refusal | None:
        tls_settings = conn.listener.settings.tls
        decision = self.authenticator.decide(
            cid=conn.cid, address=conn.peer, now=self.now(),
            authorization=conn.authorization, peer_cert=conn.peer_cert,
            peer_cert_id=tls_settings.peer_cert_id if tls_settings else "cn",
            allow_anonymous=conn.listener.settings.allow_anonymous)
        if isinstance(decision, Accepted):
            conn.auth_method = decision.method
            return None
        self.ops.refused(conn.listener.settings.key, decision.status)
        return decision

    def cp_connected(self, conn: ChargePointHandler) -> None:
        old = self.connections.get(conn.cid)
        if old is not None:
            # SPEC "Connection": a second connection with the same id replaces the first;
            # the old one's pending calls are answered as failed.
            log.info("cp %s: new connection from %s replaces the one from %s", conn.cid,
                     conn.peer, old.peer)
            old.close_and_forget(CLOSE_NORMAL, "replaced by a new connection")
            self._end_session(conn.cid, "replaced by a new connection")
        self.connections[conn.cid] = conn
        if self.validator is not None and self.validator.warm_up(conn.version or "") \
                and self._warm_handle is None and self.loop is not None:
            self._warm_handle = self.loop.call_soon(self._warm_up)  # first of its version
        self.sessions[conn.cid] = Session(conn.cid, conn.version or "", self.now(), self.policy)
        self._arm(conn.cid)
        log.info("cp %s: connected from %s using %s (%s, %s)", conn.cid, conn.peer,
                 conn.version, conn.listener.settings.key, conn.auth_method)
        self.ops.cp_connected(peer_info(conn), self.sessions[conn.cid])
        self.on_change()

    def cp_text(self, conn: ChargePointHandler, text: str) -> None:
        session = self.sessions.get(conn.cid)
        if session is None or self.connections.get(conn.cid) is not conn:
            return  # a replaced connection's last words
        try:
            self._apply(session, session.receive_text(text, self.now()))
            self.ops.cp_text(conn.cid, session)
        except Exception:  # a bug must cost one connection, never the gateway
            log.exception("cp %s: internal error handling a message; closing", conn.cid)
            conn.close_and_forget(CLOSE_INTERNAL_ERROR, "internal error")
            self._end_session(conn.cid, "internal error")

    def cp_closed(self, conn: ChargePointHandler) -> None:
        if self.connections.get(conn.cid) is conn:
            log.info("cp %s: disconnected (code %s)", conn.cid, conn.close_code)
            self._end_session(conn.cid, f"connection closed, code {conn.close_code}")

    def kick(self, cid: str, reason: str) -> bool:
        """Close ``cid``'s connection with 1000 (EMQX's kick); False if not connected."""
        conn = self.connections.get(cid)
        if conn is None:
            return False
        conn.close_and_forget(CLOSE_NORMAL, reason)
        self._end_session(cid, reason)
        return True

    def _end_session(self, cid: str, reason: str) -> None:
        conn = self.connections.pop(cid, None)
        session = self.sessions.pop(cid, None)
        timer = self._timers.pop(cid, None)
        if timer is not None:
            timer.cancel()
        if session is not None:
            self._apply(session, session.close(reason))
        if self.local is not None:
            self.local.cp_gone(cid)
        self.ops.cp_gone(cid, session, reason, conn.close_code if conn is not None else None)
        self.on_change()

    def _apply(self, session: Session, effects: list[Effect]) -> None:
        cid = session.cid
        closed: str | None = None
        close_code: int | None = None
        for effect in effects:
            if isinstance(effect, ToChargePoint):
                if self.local is not None and self.local.waiting(cid):
                    self.local.queue(session, effect.text)  # behind its local answers
                    continue
                conn = self.connections.get(cid)
                if conn is not None and self.sessions.get(cid) is session:
                    if conn.send_text(effect.text):
                        self.ops.to_cp(cid, effect.text)
            elif isinstance(effect, ToBackend):
                try:
                    if (self.local is not None and isinstance(effect.message, Call)
                            and self.local.call_from_cp(session, effect)):
                        continue  # answered locally (and stored)
                    self._publish(cid, session.version, effect.message, effect.action,
                                  effect.payload_text)
                except TopicError as exc:
                    msg = effect.message
                    log.warning("cp %s: cannot publish message %s: %s", cid,
                                msg.unique_id, exc)
                    if isinstance(msg, Call) and self.sessions.get(cid) is session:
                        self._apply(session, session.reject_call(
                            msg, FormatViolation(str(exc))))
            elif isinstance(effect, CloseConnection):
                conn = self.connections.get(cid)
                if conn is not None and self.sessions.get(cid) is session:
                    conn.close_and_forget(effect.code, effect.reason)
                    self.connections.pop(cid, None)
                    self.sessions.pop(cid, None)
                    closed, close_code = effect.reason, conn.close_code
                    if self.local is not None:
                        self.local.cp_gone(cid)
            elif isinstance(effect, Unanswered) and self.local is not None:
                self.local.unanswered(session, effect)
        if closed is not None:  # after the CALLERRORs that close() produced, as in _end_session
            self.ops.cp_gone(cid, session, closed, close_code)
            self.on_change()
        if self.sessions.get(cid) is session:
            self._arm(cid)

    def _arm(self, cid: str) -> None:
        session = self.sessions[cid]
        deadline = session.next_deadline()
        armed = self._timers.get(cid)
        if deadline is None or (armed is not None and armed.when() <= deadline):
            return
        if armed is not None:
            armed.cancel()
        assert self.loop is not None
        self._timers[cid] = self.loop.call_at(deadline, self._fire, cid, session)

    def _fire(self, cid: str, session: Session) -> None:
        self._timers.pop(cid, None)
        if self.sessions.get(cid) is not session:
            return
        self._apply(session, session.on_timer(self.now()))

    def _publish(self, cid: str, proto: str, msg: Message, action: str | None,
                 payload_text: str | None = None, told: Mapping | None = None) -> bool:
        """Append an upstream message to the buffer (False: the full buffer dropped it);
        ``told``: what the charge point was answered locally, added as ``LocalAnswer``."""
        topic = self.router.upstream_topic(cid, proto, msg, action)
        text = upstream_text(msg, action, payload_text)
        if told is not None:
            text = with_local_answer(text, told)
        important = isinstance(msg, Call) and msg.action in TRANSACTION_ACTIONS
        accepted = self.buffer.append(topic, text.encode(), important) is not None
        self.ops.upstream(cid, msg, action, accepted)
        if accepted:
            self.uplink.kick()
        # A charge point flooding frames keeps Tornado's read loop from returning to the
        # event loop, so the commit timer alone could starve: the fsync window is also
        # enforced here, on the path that fills the buffer.
        if self.loop is not None and self.loop.time() - self._last_commit >= \
                self.settings.buffer.fsync_interval:
            self._commit()
        return accepted

    publish = _publish  # for the local mode (gateway/local.py)

    def send_to_cp(self, session: Session, text: str) -> None:
        """A frame for ``session``'s charge point, if that session is still its own."""
        conn = self.connections.get(session.cid)
        if conn is not None and self.sessions.get(session.cid) is session:
            if conn.send_text(text):
                self.ops.to_cp(session.cid, text)

    def commit_buffer(self) -> bool:
        """The group commit, now (the local mode answers only what is on disk)."""
        self._commit()
        return not self.buffer.dirty

    # -- the buffer's group commit and the upstream link's state ---------------------------

    def _schedule_commit(self, delay: float | None = None) -> None:
        if self._commit_handle is None and self.loop is not None:
            self._commit_handle = self.loop.call_later(
                self.settings.buffer.fsync_interval if delay is None else delay, self._commit)

    def _commit(self) -> None:
        if self._commit_handle is not None:
            self._commit_handle.cancel()
            self._commit_handle = None
        if self.loop is not None:
            self._last_commit = self.loop.time()
        if not self.buffer.commit():
            self._schedule_commit(max(1.0, self.settings.buffer.fsync_interval))  # disk full
        elif self.buffer.dirty:
            self._schedule_commit()

    def _charge_point_of(self, topic: str) -> str | None:
        event = self.settings.ocpp.event_topic
        return self.router.charge_point_of(topic, (event,) if event else ())

    def _upstream_state(self, up: bool) -> None:
        self.ops.upstream_state(up)
        if self._stopping:  # no local mode, no closing of stations: the gateway stops
            self.on_change()
            return
        if self.local is not None:
            self.local.link(up)
        self.on_change()
        if not self.close_stations:
            return
        self.accepting = up
        if up:
            log.info("upstream link is up: accepting charge points again")
            return
        log.warning("upstream link is down: closing %d charge point connection(s) "
                    "(ocpp.upstream_down_policy = close_stations)", len(self.connections))
        for cid, conn in list(self.connections.items()):
            conn.close_and_forget(CLOSE_TRY_AGAIN_LATER, "upstream link down")
            self._end_session(cid, "upstream link down")

    # -- backend (MQTT) --------------------------------------------------------------------

    def on_downstream(self, topic: str, payload: bytes) -> None:
        try:
            self._downstream(topic, payload)
        except Exception:  # a bug in one message must not take the uplink down
            log.exception("internal error handling MQTT message on %s", topic)

    def _downstream(self, topic: str, payload: bytes) -> None:
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
        if self.local is not None:
            self.local.heard()
            if isinstance(msg, CallResult | CallError):
                if not self.local.reply(cid, proto, msg):
                    return  # it answers a CALL the charge point was answered locally
            else:
                msg = self.local.call_to_cp(cid, proto, msg)
        if session is None:
            if isinstance(msg, Call):
                # SPEC "Downstream": every downstream CALL gets an answer.
                self._answer_backend(cid, proto, msg.unique_id, msg.action, "GenericError",
                                     f"charge point {cid} is not connected")
            else:
                log.info("cp %s: not connected; reply %s from the backend dropped", cid,
                         msg.unique_id)
            return
        self._apply(session, session.send(msg, self.now()))
        self.ops.backend_rx(cid, session)

    def _answer_backend(self, cid: str, proto: str, unique_id: str, action: str | None,
                        code: str, description: str) -> None:
        try:
            self._publish(cid, proto, CallError(unique_id, code, description, {}), action)
        except TopicError as exc:
            log.warning("cp %s: cannot answer the backend: %s", cid, exc)
