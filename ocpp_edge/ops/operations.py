"""Operations: the admin endpoint's view of the gateway, its metrics, presence on MQTT.

The adapter between the gateway and ``ops/admin.py`` / ``ops/metrics.py`` / ``north/presence.py``.
It never holds the ``Gateway``: it reads a narrow, read-only
:class:`~ocpp_edge.ops.view.GatewayView` (settings, counts, the buffer's and the uplink's
statistics, the listeners') and acts through the view's named commands only (``kick``,
``publish_event``, ``set_status_topic``). The composition root (``gateway.py``) builds the
view, makes one :class:`Operations` with it and calls its hooks, with plain values
(:class:`~ocpp_edge.ops.view.PeerInfo`, the session's counters, a close code), as things
happen:

====================  ==================================================================
``cp_connected``      a charge point's WebSocket is open and its session made
``cp_text``           a frame from it was handled
``to_cp``             a frame went to it
``backend_rx``        a message from the backend for it was handled
``upstream``          a message was appended to the buffer for the broker
``cp_gone``           its session ended (whatever the reason)
``upstream_state``    the MQTT link went up or down
``refused``           a charge point was refused before the upgrade
====================  ==================================================================

Each hook is O(1): a dict lookup and a few additions (``to_cp`` also matches a regular
expression against the first few bytes of the frame). Nothing here scans the charge
points per message; what other objects already count (the sessions' timeouts, the
uplink's reconnects and acknowledgements, the buffer's drops, the listeners' refusals)
is read through the view when somebody asks: one pass over the sessions per scrape of
``/metrics``.

Presence (``north/presence.py``): the retained gateway status is handed to the uplink (it is
state, not history: published on every connection and as the will, never buffered:
``set_status_topic``); the charge point events are appended to the disk buffer like OCPP
messages (``publish_event``), so they keep their place among the charge point's messages
on the wire.

Length: one hook per gateway event, the admin view (status, clients, kick, health) and
the presence events share the per-client records kept here; splitting them would split
that state.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import time
from collections import deque
from typing import Any

from ocpp_edge import __version__
from ocpp_edge.core.ocppj.messages import Call, CallError, CallResultError, Message, MessageType
from ocpp_edge.core.router import TopicError, TopicTemplate, compile_template, id_codec
from ocpp_edge.north import presence
from ocpp_edge.north.uplink import StatusTopic
from ocpp_edge.ops.admin import AdminSocket, rfc3339, start_admin_server
from ocpp_edge.ops.metrics import DNSTREAM, UPSTREAM, GatewayMetrics, RateMeter
from ocpp_edge.ops.view import GatewayView, LocalModeStats, PeerInfo, SessionStats

log = logging.getLogger("ocpp_edge.ops")

# The head of a frame the codec wrote: [type,"id","action-or-code"... (no spaces; see
# core/ocppj/codec.py). Matched from the start only, so its cost does not grow with the payload.
_FRAME_HEAD = re.compile(r'\[([2-6]),"((?:[^"\\]|\\.)*)"(?:,"([A-Za-z][A-Za-z0-9_]*)")?')
_TYPE_NAMES = {str(t.value): t.name for t in MessageType}
MAX_LABELLED_CALLS = 16  # per charge point: ids of its CALLs, to label the replies to them
_REFUSALS = {401: "auth", 403: "auth", 404: "unknown_id", 429: "too_many_failures"}


class BacklogClock:
    """The age of the oldest message in the buffer, from its length alone.

    The buffer is a FIFO: the oldest message still in it is the ``accepted - len + 1``-th
    one ever accepted (messages found at start-up count as accepted then). One (ordinal,
    time) sample is kept per second of arrivals, so the age is right to a second, memory is
    bounded by the length of the backlog in seconds (thinned past ``max_samples``), and
    an append costs an addition and a comparison. While the buffer overflows and keeps
    transaction messages longest, the oldest one can be older than reported.
    """

    def __init__(self, initial: int, now: float, max_samples: int = 100_000) -> None:
        self.accepted = initial
        self.max_samples = max_samples
        self._samples: deque[tuple[int, float]] = deque([(1, now)] if initial else [])

    def appended(self, length: int, now: float) -> None:
        self.accepted += 1
        samples = self._samples
        if not samples or now - samples[-1][1] >= 1.0:
            samples.append((self.accepted, now))
            self._prune(length)
            if len(samples) > self.max_samples:  # a very long outage: halve the precision
                self._samples = deque(list(samples)[::2])

    def _prune(self, length: int) -> int:
        oldest = self.accepted - length + 1
        samples = self._samples
        while len(samples) > 1 and samples[1][0] <= oldest:
            samples.popleft()
        return oldest

    def oldest_age(self, length: int, now: float) -> float | None:
        if length <= 0:
            self._samples.clear()
            return None
        self._prune(length)
        if not self._samples:
            return None
        return max(0.0, now - self._samples[0][1])


class EventTally:
    """How many of the records in the buffer are events (presence, offline), not OCPP
    messages, from the buffer's length alone, as :class:`BacklogClock` reads ages: the
    buffer is a FIFO, so the ``n``-th record ever accepted is still in it while ``n >=
    accepted - len + 1``. One int per buffered event. While the buffer overflows (and
    drops events before transaction messages) the count can be high by the events
    dropped; records found at start-up count as messages.
    """

    def __init__(self) -> None:
        self._ordinals: deque[int] = deque()

    def appended(self, ordinal: int) -> None:
        self._ordinals.append(ordinal)

    def count(self, accepted: int, length: int) -> int:
        ordinals = self._ordinals
        oldest = accepted - length + 1
        while ordinals and ordinals[0] < oldest:
            ordinals.popleft()
        return min(len(ordinals), max(0, length))


class _Client:
    """What the admin endpoint and the events say about one connection."""

    __slots__ = ("peer", "session", "keepalive", "node", "connected_at", "last_rx", "rx",
                 "tx", "orphans", "schema", "calls")

    def __init__(self, peer: PeerInfo, session: SessionStats, keepalive: float,
                 node: str) -> None:
        self.peer = peer
        self.session = session
        self.keepalive = keepalive
        self.node = node
        self.connected_at = peer.connected_at or time.time()
        self.last_rx: float | None = None
        self.rx = 0
        self.tx = 0
        self.orphans = 0  # the session's counters as last seen, to split them by direction
        self.schema = 0
        self.calls: dict[str, str] = {}  # UniqueId -> action of its CALLs in flight

    @property
    def info(self) -> dict:
        """The fields both events carry (presence.client_info), made when asked for: one
        dict per connected charge point would cost ~0.5 KB each for two uses."""
        peer = self.peer
        return presence.client_info(
            cid=peer.cid, username=basic_username(peer.authorization), ip=peer.ip,
            peer_port=peer.peer_port, sock_port=peer.sock_port,
            subprotocol=peer.subprotocol, listener=peer.listener, auth=peer.auth,
            connected_at=self.connected_at, keepalive=self.keepalive, node=self.node)


def basic_username(authorization: str | None) -> str | None:
    """The user name of an HTTP Basic ``Authorization`` header (EMQX's username)."""
    if not authorization:
        return None
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        raw = base64.b64decode(credentials.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.partition(b":")[0].decode("utf-8", "replace")


class Operations:
    """The :class:`~ocpp_edge.ops.admin.AdminView` of one gateway, its metrics and
    presence, from a :class:`~ocpp_edge.ops.view.GatewayView` of it."""

    def __init__(self, view: GatewayView) -> None:
        self.view = view
        self.started_at = time.time()
        self.loaded_at = self.started_at
        self._settings_seen = view.settings
        self.metrics = GatewayMetrics(__version__, self.started_at)
        self.node = view.settings.mqtt.client_id  # presence's ${node}
        self.stopping = False
        self.admin_server: Any = None
        self.admin_port: int | None = None
        self.admin_socket: AdminSocket | None = None
        self._clients: dict[str, _Client] = {}
        self._retired = {"timeouts_upstream": 0, "timeouts_dnstream": 0}
        self._passed: dict[tuple, int] = {}  # totals read elsewhere, as given to metrics
        self._templates: dict[str, TopicTemplate] = {}
        self._link_since = self.started_at
        self._ever_up = False
        self._buffer = buffer = view.buffer  # the same object for the gateway's life
        uplink = view.uplink
        self._backlog = BacklogClock(len(buffer), time.monotonic())
        self._events = EventTally()
        self._rate = RateMeter(lambda: uplink.published, time.monotonic)
        self.metrics.bind(
            charge_points=lambda: view.charge_points,
            buffer_messages=lambda: len(buffer) - self.buffered_events(),
            buffer_events=self.buffered_events, buffer_bytes=lambda: buffer.bytes,
            buffer_oldest_age=lambda: self._backlog.oldest_age(len(buffer), time.monotonic()),
            buffer_dropped=lambda: buffer.dropped,
            upstream_connected=lambda: uplink.connected,
            published=lambda: uplink.published, replay_rate=self._rate.rate)
        self.metrics.bind_dead_letters(lambda: buffer.dead_letters)
        if view.local_mode() is not None:
            self.metrics.bind_local_mode(view.local_mode)
        status = self._render(view.settings.ocpp.status_topic, {"node": self.node})
        if status is not None:
            started = rfc3339(self.started_at) or ""

            def payload(state: str, reason: str | None, now: float | None) -> bytes:
                local = view.local_mode() if state == presence.ONLINE else None
                return presence.status_payload(state, node=self.node, version=__version__,
                                               started_at=started, now=now, reason=reason,
                                               local_mode=local.active if local else None)

            view.set_status_topic(StatusTopic(
                topic=status,
                online=lambda: payload(presence.ONLINE, None, time.time()),
                will=payload(presence.OFFLINE, "connection_lost", None),
                stopped=lambda: payload(presence.OFFLINE, "shutdown", time.time())))

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the admin endpoint on the running loop (raises OSError: port taken)."""
        admin = self.view.settings.admin
        if admin.listen is None:
            log.info("admin endpoint off (admin.listen = off)")
        else:
            host = admin.listen.host
            try:
                self.admin_server, self.admin_port = start_admin_server(
                    self, host, admin.listen.port, admin.token, admin.socket)
            except OSError as exc:  # the CLI logs it and exits 1: name the key to change
                raise OSError(exc.errno, f"admin.listen = {host}:{admin.listen.port}: "
                              f"{exc.strerror or exc}") from None
            shown = f"[{host}]" if ":" in host else host
            log.info("admin endpoint on http://%s:%d (%s)", shown, self.admin_port,
                     "bearer token required" if admin.token else
                     "no token: loopback only, reading only")
        if admin.socket is not None:
            self._start_socket(admin.socket)

    def _start_socket(self, path: str) -> None:
        # Without it the gateway still serves; kicks then need the token (or wait).
        try:
            self.admin_socket = AdminSocket(self, path)
        except (OSError, ValueError) as exc:
            why = getattr(exc, "strerror", None) or str(exc)
            log.warning("admin.socket = %s: cannot listen there (%s); until it can, "
                        "changes through the admin endpoint (ctl kick) need "
                        "admin.token_file", path, why)
            return
        try:
            import grp

            group = f"the {grp.getgrgid(os.getegid()).gr_name} group"
        except (ImportError, KeyError):
            group = f"group {os.getegid()}"
        log.info("admin socket %s (mode 0660: root and %s may change things, e.g. "
                 "ocpp-edge ctl kick)", path, group)

    def stop(self) -> None:
        self.stopping = True  # /healthz says so until the server is gone
        if self.admin_server is not None:
            self.admin_server.stop()
            self.admin_server = None
        if self.admin_socket is not None:
            self.admin_socket.close()
            self.admin_socket = None

    def config_loaded(self) -> None:
        """The configuration was (re)loaded: call after ``Gateway.reload``."""
        self._settings_seen = self.view.settings
        self.loaded_at = time.time()

    # -- hooks (see the module docstring) -----------------------------------------------

    def cp_connected(self, peer: PeerInfo, session: SessionStats) -> None:
        client = _Client(peer, session, self.view.settings.ocpp.default_heartbeat_interval,
                         self.node)
        info = client.info
        self._clients[peer.cid] = client
        self.metrics.connection_opened(peer.listener)
        # Appended before anything the charge point sends: on the wire before its
        # BootNotification (the buffer is one FIFO).
        self._event(peer.cid, presence.CONNECTED,
                    lambda now: presence.connected_payload(info, now))

    def cp_text(self, cid: str, session: SessionStats) -> None:
        client = self._clients.get(cid)
        if client is None:
            return
        client.rx += 1
        client.last_rx = time.time()
        self._split_counters(client, session, UPSTREAM)

    def backend_rx(self, cid: str, session: SessionStats) -> None:
        client = self._clients.get(cid)
        if client is not None:
            self._split_counters(client, session, DNSTREAM)

    def _split_counters(self, client: _Client, session: SessionStats,
                        direction: str) -> None:
        # Session.receive_text checks the charge point's messages (upstream) and only it
        # finds upstream orphans; Session.send does the same for the backend's (dnstream):
        # what changed during one of them belongs to its direction.
        counters = session.counters
        orphans, schema = counters["orphan_replies"], counters["schema_failures"]
        if orphans != client.orphans:
            self.metrics.orphan_reply(direction, orphans - client.orphans)
            client.orphans = orphans
        if schema != client.schema:
            self.metrics.schema_failure(direction, schema - client.schema)
            client.schema = schema

    def to_cp(self, cid: str, text: str) -> None:
        client = self._clients.get(cid)
        m = _FRAME_HEAD.match(text)
        if m is None:  # not a frame of ours; nothing to label it with
            return
        type_digit, uid, word = m.groups()
        name = _TYPE_NAMES[type_digit]
        action = word if type_digit in ("2", "6") else None
        if client is not None:
            client.tx += 1
            if type_digit in ("3", "4", "5"):  # a reply to one of the charge point's CALLs
                action = client.calls.pop(uid, None)
                if not client.calls:
                    client.calls.clear()  # back to an empty dict's 64 bytes
        self.metrics.message(DNSTREAM, name, action)
        if word is not None and type_digit in ("4", "5"):
            self.metrics.callerror(DNSTREAM, word)

    def upstream(self, cid: str, msg: Message, action: str | None, accepted: bool) -> None:
        if isinstance(msg, Call):
            action = msg.action
            client = self._clients.get(cid)
            if client is not None:
                calls = client.calls
                calls[msg.unique_id] = action
                if len(calls) > MAX_LABELLED_CALLS:
                    del calls[next(iter(calls))]
        elif isinstance(msg, CallError | CallResultError):
            self.metrics.callerror(UPSTREAM, msg.error_code)
        else:
            action = getattr(msg, "action", None) or action  # SEND carries its own
        self.metrics.message(UPSTREAM, msg.type_id.name, action)
        if accepted:
            self._backlog.appended(len(self._buffer), time.monotonic())

    def cp_gone(self, cid: str, session: SessionStats | None, description: str,
                close_code: int | None = None) -> None:
        """``close_code``: the WebSocket close code the charge point sent, if any."""
        if session is not None:
            for key in self._retired:
                self._retired[key] += session.counters[key]
        client = self._clients.pop(cid, None)
        if client is None:
            return
        reason = presence.reason_code(description)
        self.metrics.connection_closed(reason)
        if reason != "sock_closed":
            close_code = None
        info = client.info
        self._event(cid, presence.DISCONNECTED, lambda now: presence.disconnected_payload(
            info, description, close_code, now))

    def upstream_state(self, up: bool) -> None:
        self._link_since = time.time()
        self._ever_up = self._ever_up or up

    def refused(self, listener: str, status: int) -> None:
        """A charge point was refused on ``listener`` (its key) with HTTP ``status``."""
        self.metrics.connection_refused(listener, _REFUSALS.get(status, "other"))

    # -- presence events -----------------------------------------------------------------

    def _render(self, template: str | None, values: dict[str, str]) -> str | None:
        if template is None:
            return None
        compiled = self._templates.get(template)
        if compiled is None:
            allowed = presence.EVENT_PLACEHOLDERS | presence.STATUS_PLACEHOLDERS
            compiled = self._templates[template] = compile_template(template, allowed)
        return self.view.settings.ocpp.mountpoint + compiled.render(values)

    def _event(self, cid: str, event: str, payload) -> None:
        try:
            ocpp = self.view.settings.ocpp
            encode = id_codec(ocpp.topic_id_encoding)[0]  # as the OCPP topics (router)
            topic = self._render(ocpp.event_topic,
                                 {"cid": encode(cid), "node": self.node, "event": event})
        except (TopicError, ValueError, KeyError) as exc:
            log.warning("cp %s: cannot publish the %s event: %s", cid, event, exc)
            return
        if topic is None:
            return
        if self.view.publish_event(topic, payload(time.time())):
            self._backlog.appended(len(self._buffer), time.monotonic())
            self._events.appended(self._backlog.accepted)

    def buffered_events(self) -> int:
        """Presence and offline events among the records in the buffer (the rest are OCPP
        messages): STATUS=, ``ctl status`` and /metrics count them apart."""
        return self._events.count(self._backlog.accepted, len(self._buffer))

    def local_event(self, cid: str, event: str, fields: dict[str, Any]) -> None:
        """An offline-operation event for the backend (e.g. ``local_answer_overruled``),
        on ``ocpp.upstream.event_topic`` like the presence events."""
        def payload(now: float) -> bytes:
            return presence.encode({"clientid": cid, "node": self.node, "event": event,
                                    "ts": presence.millis(now), **fields})
        self._event(cid, event, payload)

    # -- AdminView -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        view, now = self.view, time.time()
        if view.settings is not self._settings_seen:  # reloaded without config_loaded()
            self.config_loaded()
        buffer, uplink, m = view.buffer, view.uplink, view.settings.mqtt
        state = "connected" if uplink.connected else \
            "disconnected" if self._ever_up else "connecting"
        return {
            "version": __version__,
            "node": self.node,
            "started_at": rfc3339(self.started_at),
            "uptime_seconds": round(now - self.started_at, 3),
            "config": {"file": view.settings.source, "loaded_at": rfc3339(self.loaded_at)},
            "upstream": {
                "state": state, "connected": uplink.connected,
                "server": f"{'mqtts' if m.tls else 'mqtt'}://{m.host}:{m.port}",
                "client_id": m.client_id, "since": rfc3339(self._link_since),
                "reconnects": uplink.reconnects, "published": uplink.published,
                "replay_rate": round(self._rate.rate(), 3)},
            "charge_points": {"connected": view.charge_points},
            "buffer": {
                "messages": len(buffer) - self.buffered_events(),
                "events": self.buffered_events(), "bytes": buffer.bytes,
                "oldest_age_seconds": _round(self._backlog.oldest_age(
                    len(buffer), time.monotonic())),
                "dropped": buffer.dropped, "dead_letters": buffer.dead_letters,
                "max_messages": buffer.max_messages,
                "max_bytes": buffer.max_bytes, "dir": str(buffer.dir)},
            "listeners": [{"name": ls.key, "url": ls.url, "connections": ls.connections}
                          for ls in view.listeners()],
            "local_mode": _local_mode(view.local_mode()),
        }

    def clients(self) -> list[dict[str, Any]]:
        return [self._describe(c) for c in self._clients.values()]

    def client(self, cid: str) -> dict[str, Any] | None:
        c = self._clients.get(cid)
        return None if c is None else self._describe(c)

    def _describe(self, c: _Client) -> dict[str, Any]:
        info, session = c.info, c.session
        queued = session.queue_length  # strict mode: the CALL in flight + the queue
        return {
            "clientid": info["clientid"], "username": info["username"],
            "protocol": info["subprotocol"], "proto_ver": info["proto_ver"],
            "listener": info["listener"], "auth": info["auth"],
            "ip_address": info["ipaddress"], "port": info["peerport"],
            "connected_at": rfc3339(c.connected_at), "last_message_at": rfc3339(c.last_rx),
            "messages_in": c.rx, "messages_out": c.tx,
            "pending_upstream": session.pending_from_cp,
            "pending_dnstream": 1 if queued else 0, "queue_len": max(0, queued - 1),
        }

    def kick(self, cid: str) -> bool:
        # EMQX: DELETE /api/v5/clients/{clientid} → the channel's shutdown(kicked).
        return self.view.kick(cid, presence.KICKED)

    def metrics_text(self) -> str:
        self._pass_on_totals()
        return self.metrics.render()

    def healthy(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "stopping"
        for listener in self.view.listeners():
            if not listener.listening:
                return False, f"{listener.key} is not listening"
        # Answering at all shows that the IOLoop is responsive.
        return True, "ok"

    # -- totals other objects keep -------------------------------------------------------

    def _pass_on_totals(self) -> None:
        timeouts = dict(self._retired)
        for session in self.view.sessions():
            for key in timeouts:
                timeouts[key] += session.counters[key]
        m = self.metrics
        self._pass(("timeouts", UPSTREAM), timeouts["timeouts_upstream"],
                   lambda n: m.timeout(UPSTREAM, n))
        self._pass(("timeouts", DNSTREAM), timeouts["timeouts_dnstream"],
                   lambda n: m.timeout(DNSTREAM, n))
        self._pass(("reconnects",), self.view.uplink.reconnects, m.upstream_reconnect)
        for listener in self.view.listeners():
            key = listener.key
            for why, count in listener.refused.items():
                self._pass(("refused", key, why), count,
                           lambda n, k=key, w=why: m.connection_refused(k, w, n))

    def _pass(self, key: tuple, total: int, count) -> None:
        before = self._passed.get(key, 0)
        if total > before:
            count(total - before)
            self._passed[key] = total


def _local_mode(stats: LocalModeStats | None) -> dict[str, Any] | None:
    """``ctl status``'s ``local_mode``: None unless ocpp.upstream_down_policy = local."""
    if stats is None:
        return None
    return {"active": stats.active, "reason": stats.reason, "since": rfc3339(stats.since),
            "answers": stats.answers, "reconciled": stats.reconciled,
            "disagreements": stats.disagreements, "transactions_mapped": stats.mapped,
            "transactions_open": stats.transactions_open,
            "answered_awaiting_backend": stats.answered_pending,
            "held": stats.holding, "held_released": stats.held_released,
            "authorizations_cached": stats.authorizations_cached}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
