"""The typed settings: frozen dataclasses, one per section of ocpp-edge.conf.

``build`` fills them from the checked values (every key of the spec, converted by its
check function, see ``keys``); everything else in ocpp-edge reads these, never the file.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ocpp_edge.config.tls import TlsSettings


@dataclass(frozen=True)
class Listen:
    host: str
    port: int


@dataclass(frozen=True)
class ListenerSettings:
    """One charge point listener: ``ocpp.listener.<kind>`` or ``ocpp.listener.<kind>.<name>``."""
    key: str                    # the address key, e.g. "ocpp.listener.wss.vlan"
    kind: str                   # "ws" | "wss"
    listen: Listen
    max_connections: int        # open connections (handshaking or upgraded) at once
    max_conn_rate: int          # new connections per second; 0: no limit
    allow_anonymous: bool       # resolved: the listener's own value or auth.allow_anonymous
    tls: TlsSettings | None     # wss only

    @property
    def scheme(self) -> str:
        return self.kind

    @property
    def profile(self) -> int:
        """The OCPP security profile this listener offers at most (SECURITY.md)."""
        if self.tls is None:
            return 1
        return 3 if self.tls.verify else 2


@dataclass(frozen=True)
class AuthSettings:
    password_file: str | None   # charge point credentials (ocpp-edge passwd)
    allow_anonymous: bool       # default of the listeners' allow_anonymous
    known_ids_only: bool        # 404 for an id without an entry in password_file
    max_failures: int           # failed authentications per address ...
    failure_window: float       # ... within this many seconds before 429


@dataclass(frozen=True)
class OfflineSettings:
    """ocpp.offline.*: offline operation (ocpp.upstream_down_policy = local)."""

    answer_after: float | None  # None: only a down link makes the gateway answer
    unknown_id: str             # "reject" | "accept"
    authorization_list: str | None
    transaction_ids: tuple[int, int]
    hold_timeout: float
    boot_retry_interval: float
    data_transfer: str          # "reject" | "accept"
    transaction_max_age: float


@dataclass(frozen=True)
class OcppSettings:
    listeners: tuple[ListenerSettings, ...]
    path: str
    subprotocols: tuple[str, ...]
    default_subprotocol: str
    fail_if_no_subprotocol: bool
    max_frame_size: int
    max_message_rate: int                       # frames/s per charge point; 0: no limit
    mountpoint: str
    upstream_topic: str                         # raw template text, validated
    upstream_topic_overrides: Mapping[str, str]  # Action -> template text
    upstream_reply_topic: str
    upstream_error_topic: str
    dnstream_topic: str
    handshake_timeout: float                    # seconds (all durations below too)
    ping_interval: float                        # 0: no server pings
    ping_timeout: float
    default_heartbeat_interval: float
    heartbeat_checking_times_backoff: int       # 0: no heartbeat checking
    upstream_strict_mode: bool                  # also read from ocpp.upstream.strit_mode
    upstream_awaiting_timeout: float
    dnstream_strict_mode: bool                  # also read from ocpp.dnstream.strit_mode
    dnstream_max_mqueue_len: int
    dnstream_awaiting_timeout: float
    dnstream_retry_interval: float
    dnstream_max_retries: int
    message_format_checking: str    # "all" | "upstream_only" | "dnstream_only" | "disable"
    json_schema_dir: str | None                 # None: the schemas shipped with ocpp-edge
    json_schema_id_prefix: str
    upstream_down_policy: str                   # "buffer" | "close_stations" | "local"
    offline: OfflineSettings
    status_topic: str | None                    # gateway status (retained); None: off
    event_topic: str | None                     # charge point events; None: off
    topic_id_encoding: str = "percent"          # "percent" | "none": ${cid} in a topic


@dataclass(frozen=True)
class MqttSettings:
    host: str
    port: int
    client_id: str              # ${hostname} already replaced
    username: str | None
    password: str | None        # mqtt.password, or the content of mqtt.password_file
    tls: bool                   # mqtts://
    cacertfile: str | None      # None: the system's CAs
    certfile: str | None
    keyfile: str | None
    verify_hostname: bool
    protocol: str               # "3.1.1" | "5"
    qos: int
    clean_session: bool         # False: a persistent session (MQTT 5: see session_expiry)
    session_expiry: float       # seconds; MQTT 5 with clean_session False only
    keepalive: float            # seconds
    reconnect_delay_min: float
    reconnect_delay_max: float
    max_inflight: int


@dataclass(frozen=True)
class BufferSettings:
    dir: str                    # absolute; may not exist yet (the daemon creates it)
    max_messages: int
    max_bytes: int
    overflow: str               # "drop_oldest" | "drop_newest"
    fsync_interval: float       # seconds: group commit at most this often
    replay_rate: int            # messages per second from a backlog; 0: no limit


@dataclass(frozen=True)
class LogSettings:
    level: str                  # "debug" | "info" | "warning" | "error"


@dataclass(frozen=True)
class AdminSettings:
    listen: Listen | None       # None: the admin endpoint is off
    token_file: str | None
    token: str | None           # read from token_file; None: loopback without a token
    socket: str | None = None   # admin.socket: the Unix socket (kick without a token); None: off


@dataclass(frozen=True)
class Settings:
    ocpp: OcppSettings
    mqtt: MqttSettings
    buffer: BufferSettings
    auth: AuthSettings
    log: LogSettings
    admin: AdminSettings
    source: str                 # path of the file, or "<string>"


def build(v: Mapping[str, Any], overrides: dict[str, str],
          listeners: tuple[ListenerSettings, ...], mqtt_password: str | None, source: str,
          admin_token: str | None = None) -> Settings:
    """The settings from ``v``, the checked values by spec key."""
    tls, host, port = v["mqtt.server"]
    return Settings(
        ocpp=OcppSettings(
            listeners=listeners,
            path=v["ocpp.path"],
            subprotocols=v["ocpp.subprotocols"],
            default_subprotocol=v["ocpp.default_subprotocol"],
            fail_if_no_subprotocol=v["ocpp.fail_if_no_subprotocol"],
            max_frame_size=v["ocpp.max_frame_size"],
            max_message_rate=v["ocpp.max_message_rate"],
            mountpoint=v["ocpp.mountpoint"],
            upstream_topic=v["ocpp.upstream.topic"],
            upstream_topic_overrides=types.MappingProxyType(overrides),
            upstream_reply_topic=v["ocpp.upstream.reply_topic"],
            upstream_error_topic=v["ocpp.upstream.error_topic"],
            dnstream_topic=v["ocpp.dnstream.topic"],
            handshake_timeout=v["ocpp.handshake_timeout"],
            ping_interval=v["ocpp.ping_interval"],
            ping_timeout=v["ocpp.ping_timeout"],
            default_heartbeat_interval=v["ocpp.default_heartbeat_interval"],
            heartbeat_checking_times_backoff=v["ocpp.heartbeat_checking_times_backoff"],
            upstream_strict_mode=v["ocpp.upstream.strict_mode"],
            upstream_awaiting_timeout=v["ocpp.upstream.awaiting_timeout"],
            dnstream_strict_mode=v["ocpp.dnstream.strict_mode"],
            dnstream_max_mqueue_len=v["ocpp.dnstream.max_mqueue_len"],
            dnstream_awaiting_timeout=v["ocpp.dnstream.awaiting_timeout"],
            dnstream_retry_interval=v["ocpp.dnstream.retry_interval"],
            dnstream_max_retries=v["ocpp.dnstream.max_retries"],
            message_format_checking=v["ocpp.message_format_checking"],
            json_schema_dir=v["ocpp.json_schema_dir"],
            json_schema_id_prefix=v["ocpp.json_schema_id_prefix"],
            upstream_down_policy=v["ocpp.upstream_down_policy"],
            offline=OfflineSettings(
                answer_after=v["ocpp.offline.answer_after"],
                unknown_id=v["ocpp.offline.unknown_id"],
                authorization_list=v["ocpp.offline.authorization_list"],
                transaction_ids=v["ocpp.offline.transaction_ids"],
                hold_timeout=v["ocpp.offline.hold_timeout"],
                boot_retry_interval=v["ocpp.offline.boot_retry_interval"],
                data_transfer=v["ocpp.offline.data_transfer"],
                transaction_max_age=v["ocpp.offline.transaction_max_age"],
            ),
            status_topic=v["ocpp.upstream.status_topic"],
            event_topic=v["ocpp.upstream.event_topic"],
            topic_id_encoding=v["ocpp.topic_id_encoding"],
        ),
        mqtt=MqttSettings(
            host=host,
            port=port,
            client_id=v["mqtt.client_id"],
            username=v["mqtt.username"] or None,
            password=mqtt_password,
            tls=tls,
            cacertfile=v["mqtt.cacertfile"],
            certfile=v["mqtt.certfile"],
            keyfile=v["mqtt.keyfile"],
            verify_hostname=v["mqtt.verify_hostname"],
            protocol=v["mqtt.protocol"],
            qos=v["mqtt.qos"],
            # QoS 2 needs a clean session (config/checks.py); unwritten, the key yields.
            clean_session=v["mqtt.clean_session"] or v["mqtt.qos"] == 2,
            session_expiry=v["mqtt.session_expiry"],
            keepalive=v["mqtt.keepalive"],
            reconnect_delay_min=v["mqtt.reconnect_delay_min"],
            reconnect_delay_max=v["mqtt.reconnect_delay_max"],
            max_inflight=v["mqtt.max_inflight"],
        ),
        buffer=BufferSettings(
            dir=v["buffer.dir"],
            max_messages=v["buffer.max_messages"],
            max_bytes=v["buffer.max_bytes"],
            overflow=v["buffer.overflow"],
            fsync_interval=v["buffer.fsync_interval"],
            replay_rate=v["buffer.replay_rate"],
        ),
        auth=AuthSettings(
            password_file=v["auth.password_file"],
            allow_anonymous=v["auth.allow_anonymous"],
            known_ids_only=v["auth.known_ids_only"],
            max_failures=v["auth.max_failures"],
            failure_window=v["auth.failure_window"],
        ),
        log=LogSettings(level=v["log.level"]),
        admin=AdminSettings(listen=v["admin.listen"], token_file=v["admin.token_file"],
                            token=admin_token, socket=v["admin.socket"]),
        source=source,
    )
