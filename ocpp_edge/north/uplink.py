"""North side: paho-mqtt driven by the gateway's event loop, no thread.

paho's socket is registered with the running asyncio/Tornado loop (the pattern of paho's
``examples/loop_asyncio.py``): readable → ``loop_read``, writable while paho has bytes
queued → ``loop_write``, once a second → ``loop_misc`` for keepalive. ``loop_start()`` is
never called, so the daemon stays one thread.

The TCP connection itself is opened here, without blocking the loop, and handed to paho:
paho's own ``connect()`` blocks for as long as the kernel takes to give up on an
unreachable broker, which would freeze every charge point on the site. A fresh paho
client is made for every connection, so nothing paho queued on a dead connection is ever
re-sent behind our back: the buffer alone decides what is (re)published.

With ``mqtts://`` the TLS handshake is done here too, on the loop, before paho sees the
socket (paho's own ``tls_set`` path does a blocking handshake). paho then reads and writes
through the wrapped socket and turns ``SSLWantRead``/``SSLWantWrite`` into "try later";
what paho cannot see is plaintext TLS already decrypted and buffered while the file
descriptor is quiet, so the read callback drains ``pending()`` itself.

Upstream flow: ``kick()`` after the buffer grew → up to ``max_inflight`` records published
at ``qos`` → each PUBACK/PUBCOMP acks its record in the buffer → more are taken. On a lost
connection, every record in flight is rewound and published again after reconnecting
(at-least-once, in order). A message the broker answers by dropping the connection, again
and again, goes to the buffer's dead-letter table instead (see "refusals" below).

Downstream flow and the session: MQTT 3.1.1 or 5 (``mqtt.protocol``). By default the
session is persistent (3.1.1: clean session 0; 5: clean start 0 and a session expiry
interval), so what the backend publishes while the gateway reconnects or restarts is
queued by the broker and delivered after CONNACK; the subscription is made again on every
connection all the same (the broker may have lost the session). A copy the broker
redelivers (DUP) because our PUBACK was lost with the link is dropped once seen
(``_on_message``). With MQTT 5 the window is also bounded by the broker's Receive Maximum.

Length: paho on somebody else's event loop (socket registration, reads, connect and
backoff), MQTT 3.1.1 and 5 sessions, publishing from the buffer and the refusal/dead-
letter detection all act on the one connection's state; a split is the next refactor
when it grows.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import socket
import ssl
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from tornado.ioloop import IOLoop, PeriodicCallback

from ocpp_edge.store.record import Record, UpstreamBuffer

log = logging.getLogger("ocpp_edge.mqtt")

PAHO2 = hasattr(mqtt, "CallbackAPIVersion")
CONNECT_TIMEOUT = 10.0  # seconds for TCP connect, and again for the CONNACK


def _rc(value: object) -> int:
    """paho 1.x passes ints, 2.x ReasonCode objects; both compare by value."""
    return int(getattr(value, "value", value))  # type: ignore[call-overload]


@dataclass(frozen=True)
class StatusTopic:
    """A retained status topic (north/presence.py): ``online()`` is published on every
    connection before anything from the buffer, ``will`` is left with the broker as the
    MQTT will (MQTT 3.1.1 §3.1.2.5: published when the connection is lost without a
    DISCONNECT), ``stopped()`` is published before a clean DISCONNECT."""

    topic: str
    online: Callable[[], bytes]
    will: bytes
    stopped: Callable[[], bytes]


def _new_paho_client(client_id: str, clean_session: bool,
                     protocol: str = "3.1.1") -> mqtt.Client:
    """MQTT 3.1.1: the session flag goes here; MQTT 5: clean start and the session expiry
    go to ``connect_async`` (paho refuses ``clean_session`` with MQTTv5)."""
    kw: dict = {"client_id": client_id}
    if protocol == "5":
        kw["protocol"] = mqtt.MQTTv5
    else:
        kw.update(protocol=mqtt.MQTTv311, clean_session=clean_session)
    if PAHO2:
        return mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **kw)
    return mqtt.Client(**kw)


def backoff_delay(attempt: int, low: float, high: float,
                  uniform: Callable[[float, float], float] = random.uniform) -> float:
    """The wait before reconnection attempt ``attempt`` (0: the first after a loss):
    ``low`` doubled per attempt, capped at ``high``, then drawn from its upper half
    (jitter, so a site's gateways do not reconnect in lock-step after a broker restart,
    and never less than half the capped wait)."""
    delay = min(high, low * (2 ** min(attempt, 30)))
    return uniform(delay / 2, delay)


def _session_present(flags: object) -> bool:
    """CONNACK's session present flag: paho 1.6 passes a dict, 2.x ConnectFlags."""
    if isinstance(flags, dict):
        return bool(flags.get("session present"))
    return bool(getattr(flags, "session_present", False))


class MqttUplink:
    """One MQTT connection to the upstream broker, reconnecting forever."""

    def __init__(self, *, host: str, port: int, client_id: str, username: str | None,
                 password: str | None, qos: int, clean_session: bool, keepalive: float,
                 reconnect_delay_min: float, reconnect_delay_max: float, max_inflight: int,
                 buffer: UpstreamBuffer, subscriptions: list[tuple[str, int]],
                 on_message: Callable[[str, bytes], None],
                 on_state: Callable[[bool], None] | None = None,
                 replay_rate: int = 0, ssl_context: ssl.SSLContext | None = None,
                 protocol: str = "3.1.1", session_expiry: float = 0.0) -> None:
        self.host, self.port = host, port
        self.protocol = protocol  # "3.1.1" | "5"
        self.session_expiry = session_expiry  # MQTT 5, persistent session: seconds
        self.ssl_context = ssl_context
        self.client_id = client_id
        self.username, self.password = username, password
        self.qos = qos
        self.clean_session = clean_session
        self.keepalive = max(1, int(keepalive))
        self.delay_min, self.delay_max = reconnect_delay_min, reconnect_delay_max
        self.max_inflight = max_inflight  # lowered to the broker's Receive Maximum (MQTT 5)
        self._max_inflight_configured = max_inflight
        self._connected_once = False  # a session was made: later ones should be resumed
        # Downstream messages seen lately (hash of topic and payload): a copy the broker
        # redelivers (DUP) after a lost PUBACK is not handled twice.
        self._recent: dict[int, None] = {}
        self.buffer = buffer
        self.subscriptions = subscriptions
        self.on_message = on_message
        self.on_state = on_state or (lambda up: None)
        self.status: StatusTopic | None = None  # set before start() (ops/operations.py)
        self.replay_rate = replay_rate  # messages/s, 0: no limit
        self._tokens = float(replay_rate)
        self._tokens_at = 0.0
        self._rate_handle: asyncio.TimerHandle | None = None

        self.connected = False
        self.reconnects = 0
        self.published = 0
        self._client: mqtt.Client | None = None
        self._inflight: dict[int, Record] = {}  # paho mid → record (short-lived handles)
        self._attempt = 0
        self._retry_handle: asyncio.TimerHandle | None = None
        self._connack_handle: asyncio.TimerHandle | None = None
        self._misc: PeriodicCallback | None = None
        self._pump_scheduled = False
        self._stopping = False
        self._closed = asyncio.Event()
        self._closed.set()
        # What the broker will not take (see "refusals" below).
        self.dead_letters = 0  # messages moved to the dead-letter table by this process
        self.charge_point_of: Callable[[str], str | None] = lambda topic: None  # for logs
        self._suspect: int | None = None  # seq oldest in flight at the last loss(es)
        self._strikes = 0  # losses in a row with the suspect oldest in flight
        self._probe_at: float | None = None  # when the suspect went out alone
        self._last_publish_at = -1e9  # loop time of the last buffer publish
        self._puback_seen = False  # the broker took a message (since the last dead letter)
        self._connect_at: float | None = None  # CONNECT sent on the current connection
        self._up_at = 0.0  # CONNACK received
        self._acked_on_conn = False  # the broker took a message on this connection
        self._refused: int | None = None  # CONNACK refusal code of this attempt
        self._early = 0  # attempts in a row the broker ended at or right after CONNECT
        self._early_warned = False

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        IOLoop.current().add_callback(self._connect)

    async def stop(self, flush_timeout: float = 2.0) -> None:
        """Publish what is buffered for up to ``flush_timeout`` s, then disconnect cleanly."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + flush_timeout
        while self.connected and len(self.buffer) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        self._stopping = True
        if self._retry_handle:
            self._retry_handle.cancel()
        if self._rate_handle:
            self._rate_handle.cancel()
        if self._client is not None:
            if self.connected and self.status is not None:
                # A clean DISCONNECT discards the will: say offline ourselves, first.
                self._client.publish(self.status.topic, self.status.stopped(), self.qos,
                                     retain=True)
            self._client.disconnect()  # DISCONNECT goes out via loop_write, then closes
            if not self.connected:
                self._close_socket()  # nothing to say to a broker that never answered
            try:
                await asyncio.wait_for(self._closed.wait(), timeout=2.0)
            except TimeoutError:
                self._close_socket()
        if len(self.buffer):
            log.info("stopping with %d upstream message(s) not yet acknowledged by the "
                     "broker; they stay in the buffer for the next start", len(self.buffer))

    def set_subscriptions(self, subscriptions: list[tuple[str, int]]) -> None:
        """Replace the downstream subscriptions (a reload changed the topic): at once when
        connected, else at the next connection."""
        old, self.subscriptions = self.subscriptions, subscriptions
        client = self._client
        if not self.connected or client is None:
            return
        gone = [f for f, _ in old if f not in {f for f, _ in subscriptions}]
        if gone:
            client.unsubscribe(gone)
        for topic_filter, qos in subscriptions:
            client.subscribe(topic_filter, qos)

    def republish_status(self) -> None:
        """The retained status changed while connected (e.g. local mode): publish it."""
        if self.connected and self.status is not None and self._client is not None:
            self._client.publish(self.status.topic, self.status.online(), self.qos,
                                 retain=True)

    def kick(self) -> None:
        """The buffer grew: publish soon (once per loop iteration, however many appends)."""
        if self.connected and not self._pump_scheduled:
            self._pump_scheduled = True
            IOLoop.current().add_callback(self._pump)

    # -- connecting ------------------------------------------------------------------------

    async def _addresses(self) -> list[tuple[int, tuple]]:
        """(family, sockaddr) pairs for the broker, without blocking the loop."""
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            pass
        else:
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            return [(family, (self.host, self.port))]
        return [(family, (addr, self.port)) for family, addr in await resolve(self.host)]

    async def _open_socket(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        error: Exception = OSError(f"no address for {self.host}")
        for family, addr in await self._addresses():
            sock = None
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setblocking(False)
                # Nagle would add up to 40 ms per round trip (notes/performance.md).
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await asyncio.wait_for(loop.sock_connect(sock, addr), CONNECT_TIMEOUT)
                return sock
            except (TimeoutError, OSError) as exc:
                if sock is not None:
                    sock.close()
                error = exc
        raise error

    async def _connect(self) -> None:
        self._retry_handle = None
        if self._stopping:
            return
        try:
            sock = await self._open_socket()
        except (TimeoutError, OSError) as exc:
            self._schedule_retry(f"cannot reach {self.host}:{self.port}: "
                                 f"{exc or type(exc).__name__}")
            return
        if self.ssl_context is not None and not self._stopping:
            try:
                sock = await self._tls_handshake(sock)
            except (TimeoutError, OSError) as exc:  # ssl.SSLError is an OSError
                sock.close()
                if isinstance(exc, ssl.SSLCertVerificationError):
                    log.error("MQTT: the broker's certificate is not trusted: %s "
                              "(mqtt.cacertfile, mqtt.verify_hostname)", exc.verify_message)
                self._schedule_retry(f"TLS handshake with {self.host}:{self.port} failed: "
                                     f"{exc or type(exc).__name__}")
                return
        if self._stopping:
            sock.close()
            return
        sock = ReadBuffered(sock)
        client = _new_paho_client(self.client_id, self.clean_session, self.protocol)
        # We bound the window ourselves; paho's own limit rescans its queue on every ack.
        client.max_inflight_messages_set(0)
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        if self.status is not None:
            client.will_set(self.status.topic, self.status.will, self.qos, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        # Hand paho the socket we connected: reconnect() asks _create_socket_connection for
        # one (paho 1.6 and 2.x alike) and then sends CONNECT over it.
        client._create_socket_connection = lambda: sock  # type: ignore[method-assign]
        client.connect_async(self.host, self.port, keepalive=self.keepalive,
                             **self._session_options())
        self._client = client
        self._closed.clear()
        try:
            client.reconnect()
        except OSError as exc:
            self._close_socket()
            self._lost(client, f"connection to {self.host}:{self.port} failed: {exc}")
            return
        self._connect_at = asyncio.get_running_loop().time()
        self._connack_handle = asyncio.get_running_loop().call_later(
            CONNECT_TIMEOUT, self._connack_timeout)

    def _session_options(self) -> dict:
        """MQTT 5: clean start and the session expiry interval (a fresh paho client per
        connection, so paho's default "clean start on the first connection only" would
        mean always). ``clean_session`` true: what 3.1.1 means by it (clean start, the
        session ends with the connection)."""
        if self.protocol != "5":
            return {}
        properties = Properties(PacketTypes.CONNECT)
        expiry = 0 if self.clean_session else min(int(self.session_expiry), 0xFFFFFFFE)
        if expiry:
            properties.SessionExpiryInterval = expiry
        return {"clean_start": self.clean_session, "properties": properties}

    async def _tls_handshake(self, sock: socket.socket) -> ssl.SSLSocket:
        """Wrap the connected socket and run the handshake without blocking the loop."""
        assert self.ssl_context is not None
        ssock = self.ssl_context.wrap_socket(sock, server_hostname=self.host,
                                             do_handshake_on_connect=False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONNECT_TIMEOUT
        while True:
            try:
                ssock.do_handshake()
                return ssock
            except ssl.SSLWantReadError:
                add, remove = loop.add_reader, loop.remove_reader
            except ssl.SSLWantWriteError:
                add, remove = loop.add_writer, loop.remove_writer
            ready: asyncio.Future[None] = loop.create_future()
            add(ssock, _resolve, ready)
            try:
                await asyncio.wait_for(ready, max(0.0, deadline - loop.time()))
            finally:
                remove(ssock)

    def _read(self, client: mqtt.Client, sock: ReadBuffered) -> None:
        client.loop_read()
        # Bytes already read from the kernel (and TLS records already decrypted) that paho
        # has not consumed yet: the file descriptor will not signal them again.
        while self._client is client and client.socket() is sock and sock.pending():
            client.loop_read()

    def _connack_timeout(self) -> None:
        self._connack_handle = None
        if not self.connected and self._client is not None:
            log.warning("broker %s:%d did not answer CONNECT within %.0f s",
                        self.host, self.port, CONNECT_TIMEOUT)
            client = self._client
            self._close_socket()
            self._lost(client, "no CONNACK")

    def _schedule_retry(self, why: str) -> None:
        if self._stopping:
            return
        # Capped exponential backoff with jitter (mqtt.reconnect_delay_min ... _max).
        delay = backoff_delay(self._attempt, self.delay_min, self.delay_max)
        self._attempt += 1
        log.warning("MQTT: %s; retrying in %.1f s", why, delay)
        self._retry_handle = asyncio.get_running_loop().call_later(
            delay, lambda: IOLoop.current().add_callback(self._connect))

    def _close_socket(self) -> None:
        client = self._client
        if client is not None and client.socket() is not None:
            client._sock_close()  # runs on_socket_close, which unregisters the fd

    def _lost(self, client: mqtt.Client, why: str) -> None:
        """``client``'s connection is gone (or never came up): rewind and reconnect.

        paho reports a loss through on_disconnect, on_socket_close or both; the first
        report for the current client wins."""
        if client is not self._client:
            return
        if self._connack_handle:
            self._connack_handle.cancel()
            self._connack_handle = None
        was_up = self.connected
        self.connected = False
        head = next(iter(self._inflight.values()), None)  # the oldest not acknowledged
        in_flight = len(self._inflight)
        if not self._stopping:
            self._judge_loss(was_up, head, in_flight)  # may dead-letter head
        self._inflight.clear()
        self._client = None
        rewound = self.buffer.rewind()
        if was_up and self._stopping:
            log.info("MQTT disconnected from %s:%d", self.host, self.port)
        elif was_up:
            log.warning("MQTT connection to %s:%d lost (%s); %d message(s) in flight will be "
                        "sent again%s, %d buffered", self.host, self.port, why, rewound,
                        self._describe_flight(head, in_flight), len(self.buffer))
        if was_up:
            self.on_state(False)
        self._schedule_retry("reconnecting" if was_up else why)

    # -- paho callbacks (all on the loop thread) --------------------------------------------

    def _on_connect(self, client, userdata, flags, rc, properties=None) -> None:
        if client is not self._client:
            return
        code = _rc(rc)
        if code != 0:
            self._refused = code
            v5 = self.protocol == "5"
            hint = ("; the broker may not speak MQTT 5: try mqtt.protocol = 3.1.1"
                    if v5 and code in (1, 0x84) else self._refusal_hint(code))
            # Once at ERROR, naming the key; the same again at WARNING until a message
            # goes through (a refusal that names no key is the broker's own state).
            level = logging.WARNING if self._early_warned or not hint else logging.ERROR
            self._early_warned = self._early_warned or bool(hint)
            log.log(level, "broker %s:%d refused the connection: %s%s", self.host,
                    self.port, str(rc) if v5 else mqtt.connack_string(rc), hint)
            return  # paho closes the socket; _on_disconnect/_on_socket_close follow
        if self._connack_handle:
            self._connack_handle.cancel()
            self._connack_handle = None
        if self._attempt:
            self.reconnects += 1
        self._attempt = 0
        self.connected = True
        self._up_at = asyncio.get_running_loop().time()
        self._acked_on_conn = False
        session = self._check_session(flags, properties)
        if self.status is not None:
            # Not a buffer record: its mid is not in _inflight, so its ack is ignored.
            client.publish(self.status.topic, self.status.online(), self.qos, retain=True)
        for topic_filter, qos in self.subscriptions:
            client.subscribe(topic_filter, qos)
        log.info("MQTT connected to %s:%d as %r (MQTT %s, %s); %d message(s) buffered",
                 self.host, self.port, self.client_id, self.protocol, session,
                 len(self.buffer))
        self.on_state(True)
        self.kick()

    def _check_session(self, flags: object, properties: object) -> str:
        """What CONNACK says about the session and (MQTT 5) the broker's limits; returns
        the session's state for the log line."""
        # MQTT 5 §3.3.4: at most Receive Maximum unacknowledged QoS 1/2 PUBLISHes (paho
        # does not enforce it; some brokers disconnect with 0x93 beyond it).
        receive_max = getattr(properties, "ReceiveMaximum", None)
        self.max_inflight = min(self._max_inflight_configured,
                                receive_max or self._max_inflight_configured)
        max_qos = getattr(properties, "MaximumQoS", None)
        if max_qos is not None and max_qos < self.qos:
            log.error("broker %s:%d accepts QoS %d at most: set mqtt.qos = %d", self.host,
                      self.port, max_qos, max(1, max_qos))
        first, self._connected_once = not self._connected_once, True
        if self.clean_session:
            return "clean session"
        if _session_present(flags):
            return "session resumed"
        if not first:
            log.warning("broker %s:%d kept no session for %r (restarted without "
                        "persistence, or the session expired): what the backend published "
                        "for charge points while the link was down is lost", self.host,
                        self.port, self.client_id)
        return "new session"

    def _on_disconnect(self, client, userdata, *args) -> None:
        # 1.6: (rc,) with MQTT 3.1.1, (reason_code, properties) with MQTT 5;
        # 2.x: (flags, reason_code, properties)
        rc = _rc(args[1] if len(args) == 3 else args[0])
        self._lost(client, f"rc={rc}")

    def _on_publish(self, client, userdata, mid, *args) -> None:
        if not self._acked_on_conn:  # the broker takes messages (the status one counts)
            self._acked_on_conn = self._puback_seen = True
            self._early, self._early_warned = 0, False
        rec = self._inflight.pop(mid, None)
        if rec is not None:
            if rec.seq == self._suspect:  # it went through after all
                self._suspect, self._strikes = None, 0
            self.buffer.ack(rec)
            self.published += 1
            self.kick()

    def _on_subscribe(self, client, userdata, mid, granted, properties=None) -> None:
        codes = [_rc(g) for g in granted]
        if any(code >= 0x80 for code in codes):
            log.error("broker refused the downstream subscription %s: backend commands will "
                      "not arrive", [f for f, _ in self.subscriptions])
        else:
            log.info("subscribed to %s", ", ".join(f for f, _ in self.subscriptions))

    RECENT = 1024  # downstream messages remembered for spotting redeliveries

    def _on_message(self, client, userdata, message) -> None:
        # A persistent session redelivers, flagged DUP, what the broker sent and saw no
        # PUBACK for: a copy of a message handled before the link broke is dropped.
        key = hash((message.topic, message.payload))
        recent = self._recent
        if key in recent:
            if message.dup:
                log.info("MQTT: message on %s redelivered by the broker after a lost "
                         "acknowledgement; handled already, dropped", message.topic)
                return
            del recent[key]
        recent[key] = None
        if len(recent) > self.RECENT:
            del recent[next(iter(recent))]
        try:
            self.on_message(message.topic, message.payload)
        except Exception:  # a bug in one message must not take the uplink down
            log.exception("error handling MQTT message on %s", message.topic)

    def _on_socket_open(self, client, userdata, sock) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(sock, self._safe, lambda: self._read(client, sock))
        self._misc = PeriodicCallback(lambda: self._safe(client.loop_misc), 1000)
        self._misc.start()

    def _on_socket_close(self, client, userdata, sock) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(sock)
        loop.remove_writer(sock)
        if self._misc:
            self._misc.stop()
            self._misc = None
        self._closed.set()
        # paho does not always follow a closed socket with on_disconnect (a refused or
        # timed-out CONNECT): report the loss after paho has finished its own handling.
        IOLoop.current().add_callback(self._lost, client, "socket closed")

    def _on_register_write(self, client, userdata, sock) -> None:
        asyncio.get_running_loop().add_writer(sock, self._safe, client.loop_write)

    def _on_unregister_write(self, client, userdata, sock) -> None:
        asyncio.get_running_loop().remove_writer(sock)

    @staticmethod
    def _safe(fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception:
            log.exception("MQTT event loop callback failed")

    # -- publishing ------------------------------------------------------------------------

    def _pump(self) -> None:
        self._pump_scheduled = False
        client = self._client
        if not self.connected or client is None:
            return
        room = self.max_inflight - len(self._inflight)
        if self._suspect is not None:  # the suspect goes out alone (see _judge_loss)
            room = 0 if self._inflight else 1
        if room <= 0:
            return
        if self.replay_rate:
            room = self._rate_limited(room)
            if room <= 0:
                return
        records = self.buffer.take(room)
        self._tokens -= len(records)
        if records:
            self._last_publish_at = now = asyncio.get_running_loop().time()
            if self._suspect is not None:
                if records[0].seq == self._suspect:
                    self._probe_at = now
                else:  # acknowledged or dropped meanwhile: no longer suspect
                    self._suspect, self._strikes = None, 0
        for rec in records:
            info = client.publish(rec.topic, rec.payload, self.qos)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                # The connection is going away; _lost() rewinds everything in flight.
                self.buffer.rewind()
                return
            self._inflight[info.mid] = rec

    def _rate_limited(self, room: int) -> int:
        """Token bucket of one second's worth (buffer.replay_rate)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._tokens = min(float(self.replay_rate),
                           self._tokens + (now - self._tokens_at) * self.replay_rate)
        self._tokens_at = now
        allowed = min(room, int(self._tokens))
        if allowed <= 0 and self._rate_handle is None and len(self.buffer):
            def again() -> None:
                self._rate_handle = None
                self.kick()
            self._rate_handle = loop.call_later(1.0 / self.replay_rate, again)
        return allowed


    # -- refusals: a message, or a configuration, the broker will not take -------------------
    #
    # Some brokers answer what they will not take by closing the connection: NATS for a
    # topic with '.' or ' ' and for QoS 2, others for a topic their access rules deny. The
    # buffer would send the same message first after every reconnect, forever, and nothing
    # behind it would get through (issue 16). So:
    #
    # * A loss soon after publishing, with a buffer message oldest in flight, makes that
    #   message the suspect: the next connection publishes it alone. Each time the broker
    #   drops that connection within PROMPT s of it, without acknowledging it, is a
    #   strike; at STRIKES losses in a row the message moves to the buffer's dead-letter
    #   table (one ERROR line, counted) and the others flow again. An acknowledgement
    #   clears the suspicion. Only when the broker has taken some other message (since
    #   the last dead letter): a broker that takes nothing refuses the configuration.
    # * The broker refusing CONNECT (CONNACK), or ending STRIKES connections in a row at
    #   or within PROMPT s of CONNECT before taking anything: one ERROR naming the likely
    #   key (mqtt.client_id, mqtt.qos, ...); the uplink keeps retrying with its backoff.

    STRIKES = 3
    PROMPT = 5.0  # seconds

    def _judge_loss(self, was_up: bool, head: Record | None, in_flight: int) -> None:
        """The connection is lost (``head``: the oldest message in flight, if any)."""
        now = asyncio.get_running_loop().time()
        connect_at, self._connect_at = self._connect_at, None
        refused, self._refused = self._refused, None
        if was_up and head is not None:
            if head.seq != self._suspect:
                prompt = now - self._last_publish_at <= self.PROMPT
                self._suspect, self._strikes = (head.seq, 1) if prompt else (None, 0)
            elif (in_flight == 1 and self._probe_at is not None
                  and now - self._probe_at <= self.PROMPT):
                self._strikes += 1
            else:  # the same message, but not alone or not at once: start over
                self._strikes = 1
            self._probe_at = None
            if self._puback_seen:  # the broker takes messages, maybe not this one
                if self._strikes >= self.STRIKES:
                    self._dead_letter(head)
                return
        if was_up:
            early = not self._acked_on_conn and now - self._up_at <= self.PROMPT
        elif connect_at is None:
            return  # CONNECT never went out: nothing learnt
        else:
            early = refused is not None or now - connect_at <= self.PROMPT
        if not early:
            self._early = 0
            return
        self._early += 1
        # A connection that comes up only to be closed again resets the backoff at its
        # CONNACK: keep it growing, or a refused configuration reconnects at full speed.
        self._attempt = max(self._attempt, self._early - 1)
        if refused is None and self._early >= self.STRIKES and not self._early_warned:
            self._early_warned = True  # refusals are logged as they come (_on_connect)
            log.error("MQTT: broker %s:%d closed the connection %s, %d times in a row: %s; "
                      "retrying", self.host, self.port,
                      "right after accepting it, before taking any message" if was_up
                      else "without answering CONNECT", self._early,
                      self._silent_hint(was_up, head))

    def _silent_hint(self, was_up: bool, head: Record | None) -> str:
        """The keys that may make a broker close the connection without saying why."""
        if self.qos == 2:
            return ("it may not support QoS 2 (NATS does not; RabbitMQ downgrades it): set "
                    "mqtt.qos = 1")
        status = self.status.topic if self.status is not None else None
        if not was_up:
            return (f"it may refuse the client id (mqtt.client_id = {self.client_id})"
                    + (f" or the will's topic {status} (ocpp.upstream.status_topic)"
                       if status else "") + "; the broker's log says which")
        if head is not None:
            return (f"it may refuse the topic {head.topic}{_topic_hint(head.topic)} or "
                    f"the retained status; the broker's log says which")
        return ((f"it may refuse the retained status on {status} "
                 "(ocpp.upstream.status_topic) or " if status else "it may refuse ")
                + "this client (its access rules for mqtt.username / mqtt.client_id); "
                "the broker's log says which")

    def _refusal_hint(self, code: int) -> str:
        """The key to look at for a CONNACK refusal (MQTT 3.1.1 and 5 reason codes)."""
        if code in (1, 0x84):
            return "; the broker does not accept this MQTT version (mqtt.protocol)"
        if code in (2, 0x85):
            return f"; check mqtt.client_id ({self.client_id})"
        if code in (4, 0x86, 0x8C):
            return "; check mqtt.username and mqtt.password (or mqtt.password_file)"
        if code in (5, 0x87, 0x8A):
            return ("; the broker's access rules do not let this client connect (mqtt.username, "
                    "mqtt.client_id)")
        if code == 0x9A:
            return "; the broker takes no retained messages: set ocpp.upstream.status_topic = off"
        if code == 0x9B:
            return "; set mqtt.qos = 1"
        return ""

    def _dead_letter(self, rec: Record) -> None:
        reason = (f"the broker closed the connection each time it was published, "
                  f"{self._strikes} times in a row{_topic_hint(rec.topic)}")
        self._suspect, self._strikes = None, 0
        self._puback_seen = False  # the next one needs another message taken first
        if not self.buffer.dead_letter(rec, reason):
            return
        self.dead_letters += 1
        cid = self.charge_point_of(rec.topic)
        log.error("MQTT: message %d%s on %s moved to the dead-letter table of the buffer: %s; "
                  "the messages behind it go on", rec.seq,
                  f" from charge point {cid}" if cid is not None else "", rec.topic, reason)

    def _describe_flight(self, head: Record | None, in_flight: int) -> str:
        """For the loss's log line: what was in flight."""
        if head is None:
            return ""
        if head.acked:  # dead-lettered just now
            return f" (message {head.seq} on {head.topic} went to the dead-letter table)"
        note = ""
        if head.seq == self._suspect:
            note = (f"; suspected, {self._strikes} of {self.STRIKES} losses: it goes out "
                    "alone next")
        return f" (the oldest: message {head.seq} on {head.topic}{note})"


def _topic_hint(topic: str) -> str:
    odd = [c for c in ". *>" if c in topic]
    if not odd:
        return ""
    shown = " and ".join(repr(c) for c in odd)
    return (f" (the topic holds {shown}: NATS refuses '.' and ' ' in topics and takes '*' "
            "and '>' as wildcards, RabbitMQ rewrites '.' and '*'; ocpp.topic_id_encoding = "
            "percent keeps them out of charge point ids)")


_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only


class ReadBuffered:
    """The socket as paho sees it, with reads served from one buffer.

    paho reads an MQTT packet with at least three ``recv`` calls (the type byte, each
    remaining-length byte, the rest) and makes one more to find the socket empty: four
    system calls per PUBACK, more per PUBLISH. Here one ``recv`` of up to 64 KiB per
    readiness event fills a buffer that serves all of them; whatever paho has not consumed
    when ``loop_read`` returns is reported by ``pending()`` (the read callback drains it).
    Writes and everything else go straight to the socket.

    Every read from the kernel re-arms ``TCP_QUICKACK`` (Linux; it does not stay set):
    the broker's packets are acknowledged at once instead of up to 40 ms later. A broker
    with Nagle on (Mosquitto without ``set_tcp_nodelay``, Debian's default) holds the
    backend's answer behind its unacknowledged PUBACK to us until that ACK comes: 46 ms
    round trips instead of 2-3 ms (README "Broker settings", bench/nodelay_rtt.py).
    """

    __slots__ = ("sock", "_data", "_pos", "_tls")
    CHUNK = 65536

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._data = b""
        self._pos = 0
        self._tls = isinstance(sock, ssl.SSLSocket)

    def recv(self, n: int) -> bytes:
        data, pos = self._data, self._pos
        if pos >= len(data):
            data = self.sock.recv(self.CHUNK)  # BlockingIOError/SSLWantRead*: paho's business
            if data and _QUICKACK is not None:
                try:
                    self.sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
                except OSError:
                    pass
            if len(data) <= n:
                self._data, self._pos = b"", 0
                return data  # includes b"" at EOF
            self._data, self._pos = data, n
            return data[:n]
        end = pos + n
        self._pos = end
        if end >= len(data):
            self._data, self._pos = b"", 0
            return data[pos:] if pos else data
        return data[pos:end]

    def pending(self) -> int:
        """Bytes received but not yet handed to paho (TLS: plus decrypted, unread bytes)."""
        buffered = len(self._data) - self._pos
        if self._tls:
            buffered += self.sock.pending()  # type: ignore[attr-defined]
        return buffered

    def send(self, data: bytes) -> int:
        return self.sock.send(data)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self._data, self._pos = b"", 0
        self.sock.close()

    def __getattr__(self, name: str) -> object:  # setblocking, settimeout, getpeername ...
        return getattr(self.sock, name)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def resolve(host: str, timeout: float = CONNECT_TIMEOUT) -> list[tuple[int, str]]:
    """Look ``host`` up without blocking the loop and without a thread.

    ``socket.getaddrinfo`` blocks (for 10 s when the site's resolver is unreachable, which
    is exactly when the uplink reconnects), and asyncio's non-blocking variant runs it in
    a thread. ``getent ahosts`` (glibc, always on Debian) answers the same question from
    the same sources (/etc/hosts, DNS, mDNS as nsswitch.conf says) in a child process
    whose pipe the loop watches.
    """
    loop = asyncio.get_running_loop()
    try:
        proc = subprocess.Popen(["getent", "ahosts", host], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    except OSError:  # no getent: fall back to the blocking call
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        return [(family, addr[0]) for family, _, _, _, addr in infos]
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        if data:
            chunks.append(data)
        elif not done.done():
            done.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await asyncio.wait_for(done, timeout)
    except TimeoutError:
        raise OSError(f"looking up {host} took more than {timeout:g} s") from None
    finally:
        loop.remove_reader(fd)
        proc.stdout.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()  # it has closed its output (or was killed): this returns at once
    found: list[tuple[int, str]] = []
    for line in b"".join(chunks).decode("ascii", "replace").splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[1] == "STREAM":
            family = socket.AF_INET6 if ":" in fields[0] else socket.AF_INET
            found.append((family, fields[0]))
    if not found:
        raise OSError(f"cannot resolve {host}")
    return found
