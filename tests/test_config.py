"""ocpp_edge.config: reading /etc/ocpp-edge.conf (SPEC "Configuration")."""

from __future__ import annotations

import dataclasses
import re
import socket
from pathlib import Path

import pytest

from ocpp_edge import config
from ocpp_edge.config import Listen, load, load_text
from ocpp_edge.errors import ConfigError

SHIPPED = Path(__file__).resolve().parent.parent / "etc" / "ocpp-edge.conf"

# Every key of the file, as the product documents it (anything else is an error).
KEYS = [
    "ocpp.listener.ws", "ocpp.listener.ws.max_connections", "ocpp.listener.ws.max_conn_rate",
    "ocpp.listener.ws.allow_anonymous", "ocpp.listener.wss", "ocpp.listener.wss.certfile",
    "ocpp.listener.wss.keyfile", "ocpp.listener.wss.cacertfile", "ocpp.listener.wss.verify",
    "ocpp.listener.wss.fail_if_no_peer_cert", "ocpp.listener.wss.peer_cert_id",
    "ocpp.listener.wss.tls_versions", "ocpp.listener.wss.ciphers",
    "ocpp.listener.wss.max_connections", "ocpp.listener.wss.max_conn_rate",
    "ocpp.listener.wss.allow_anonymous",
    "ocpp.path", "ocpp.subprotocols", "ocpp.default_subprotocol",
    "ocpp.fail_if_no_subprotocol", "ocpp.max_frame_size", "ocpp.max_message_rate",
    "ocpp.handshake_timeout",
    "ocpp.ping_interval", "ocpp.ping_timeout", "ocpp.default_heartbeat_interval",
    "ocpp.heartbeat_checking_times_backoff", "ocpp.mountpoint",
    "ocpp.upstream.topic", "ocpp.upstream.reply_topic", "ocpp.upstream.error_topic",
    "ocpp.dnstream.topic", "ocpp.topic_id_encoding", "ocpp.upstream.status_topic",
    "ocpp.upstream.event_topic",
    "ocpp.upstream.strict_mode", "ocpp.upstream.awaiting_timeout",
    "ocpp.dnstream.strict_mode", "ocpp.dnstream.max_mqueue_len",
    "ocpp.dnstream.awaiting_timeout", "ocpp.dnstream.retry_interval",
    "ocpp.dnstream.max_retries", "ocpp.message_format_checking", "ocpp.json_schema_dir",
    "ocpp.json_schema_id_prefix", "mqtt.server", "mqtt.client_id", "mqtt.username",
    "mqtt.password", "mqtt.password_file", "mqtt.cacertfile", "mqtt.certfile",
    "mqtt.keyfile", "mqtt.verify_hostname", "mqtt.protocol", "mqtt.qos", "mqtt.clean_session",
    "mqtt.session_expiry", "mqtt.keepalive",
    "mqtt.reconnect_delay_min", "mqtt.reconnect_delay_max", "mqtt.max_inflight",
    "auth.password_file", "auth.allow_anonymous", "auth.known_ids_only",
    "auth.max_failures", "auth.failure_window", "ocpp.upstream_down_policy",
    "ocpp.offline.answer_after", "ocpp.offline.unknown_id", "ocpp.offline.authorization_list",
    "ocpp.offline.transaction_ids", "ocpp.offline.hold_timeout",
    "ocpp.offline.boot_retry_interval", "ocpp.offline.data_transfer",
    "ocpp.offline.transaction_max_age", "buffer.dir",
    "buffer.max_messages", "buffer.max_bytes",
    "buffer.overflow", "buffer.fsync_interval", "buffer.replay_rate", "log.level",
    "admin.listen", "admin.token_file", "admin.socket",
]

FILLER = "# a comment\n\nocpp.upstream.topic.Heartbeat = cp/${cid}/hb\n"  # tested lines start at 4


def error_of(text: str, source: str = "x.conf") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_text(text, source)
    return info.value


def one(key: str, value: str) -> config.Settings:
    return load_text(f"{key} = {value}\n")


# -- defaults and the shipped file -------------------------------------------------------

def test_empty_file_gives_the_shipped_file():
    shipped = load(str(SHIPPED))
    assert shipped.source == str(SHIPPED)
    assert dataclasses.replace(shipped, source="<string>") == load_text("") == config.defaults()


def test_defaults():
    s = config.defaults()
    assert s.ocpp == config.OcppSettings(
        listeners=(config.ListenerSettings(
            key="ocpp.listener.ws", kind="ws", listen=Listen("0.0.0.0", 33033),
            max_connections=1024, max_conn_rate=100, allow_anonymous=False, tls=None),),
        path="/ocpp", max_message_rate=100,
        subprotocols=("ocpp1.6", "ocpp2.0.1", "ocpp2.1"), default_subprotocol="ocpp1.6",
        fail_if_no_subprotocol=False, max_frame_size=256 * 1024, mountpoint="ocpp/",
        upstream_topic="cp/${cid}", upstream_topic_overrides={},
        upstream_reply_topic="cp/${cid}/Reply", upstream_error_topic="cp/${cid}/Reply",
        dnstream_topic="cs/${cid}", handshake_timeout=10.0, ping_interval=0.0,
        ping_timeout=30.0, default_heartbeat_interval=60.0,
        heartbeat_checking_times_backoff=2, upstream_strict_mode=True,
        upstream_awaiting_timeout=30.0, dnstream_strict_mode=True,
        dnstream_max_mqueue_len=100, dnstream_awaiting_timeout=30.0,
        dnstream_retry_interval=30.0, dnstream_max_retries=0, message_format_checking="all",
        json_schema_dir=None, json_schema_id_prefix="urn:OCPP:1.6:2019:12:",
        upstream_down_policy="local", status_topic="sys/${node}/status",
        offline=config.OfflineSettings(
            answer_after=10.0, unknown_id="reject", authorization_list=None,
            transaction_ids=(1_900_000_000, 2_147_483_647), hold_timeout=60.0,
            boot_retry_interval=60.0, data_transfer="reject",
            transaction_max_age=7 * 86400.0),
        event_topic="sys/${node}/clients/${cid}/${event}")
    assert s.mqtt == config.MqttSettings(
        host="127.0.0.1", port=1883,
        client_id="ocpp-edge-" + socket.gethostname().replace(".", "-"),
        username=None, password=None, tls=False, cacertfile=None, certfile=None,
        keyfile=None, verify_hostname=True, protocol="3.1.1", qos=1, clean_session=False,
        session_expiry=3600.0, keepalive=60.0, reconnect_delay_min=1.0,
        reconnect_delay_max=5.0, max_inflight=200)
    assert s.buffer == config.BufferSettings(
        dir="/var/lib/ocpp-edge", max_messages=1_000_000, max_bytes=256 * 1024 * 1024,
        overflow="drop_oldest", fsync_interval=pytest.approx(0.1), replay_rate=0)
    assert s.auth == config.AuthSettings(
        password_file="/etc/ocpp-edge/passwords", allow_anonymous=False,
        known_ids_only=False, max_failures=10, failure_window=60.0)
    assert s.log == config.LogSettings("info")
    assert s.admin == config.AdminSettings(listen=Listen("127.0.0.1", 33080), token_file=None,
                                           token=None, socket="/run/ocpp-edge/admin.sock")
    assert s.source == "<string>"


def test_shipped_file_sets_and_documents_every_key_once():
    lines = SHIPPED.read_text().splitlines()
    written = [(i, m[1], m[2]) for i, line in enumerate(lines)
               if (m := re.match(r"([a-z_.]+) =\s*(.*)$", line))]
    assert [key for _, key, _ in written] == KEYS
    for i, key, value in written:
        block = []
        for line in reversed(lines[:i]):
            if not line.startswith("##"):
                break
            block.append(line)
        assert any(line.startswith("## Value: ") for line in block), key
        assert f"## Default: {value or '(empty)'}" in block, key


def test_shipped_file_says_how_to_check_it():
    assert "ocpp-edge --check-config --config /etc/ocpp-edge.conf" in SHIPPED.read_text()


def test_settings_are_frozen():
    s = config.defaults()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.mqtt.qos = 2
    with pytest.raises(TypeError):
        s.ocpp.upstream_topic_overrides["Heartbeat"] = "x"


# -- value types -------------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [
    ("30s", 30.0), ("5m", 300.0), ("100ms", 0.1), ("1h", 3600.0), ("2d", 172800.0),
    ("45", 45.0), ("1.5s", 1.5), ("2M", 120.0), ("10 s", 10.0),
])
def test_durations(text, seconds):
    assert config.parse_duration(text) == pytest.approx(seconds)
    s = load_text(f"mqtt.reconnect_delay_min = 1ms\nmqtt.reconnect_delay_max = {text}\n")
    assert s.mqtt.reconnect_delay_max == pytest.approx(seconds)


@pytest.mark.parametrize("text, size", [
    ("512B", 512), ("64KB", 64 << 10), ("256MB", 256 << 20), ("1GB", 1 << 30),
    ("2048", 2048), ("1KiB", 1024), ("16MiB", 16 << 20), ("64kb", 64 << 10),
    ("2gib", 2 << 30), ("1.5KB", 1536),
])
def test_sizes(text, size):
    assert config.parse_size(text) == size
    if size >= 1024:
        assert one("buffer.max_bytes", text).buffer.max_bytes == size


@pytest.mark.parametrize("text, listen", [
    ("off", None), ("OFF", None), ("8080", Listen("0.0.0.0", 8080)),
    ("127.0.0.1:9000", Listen("127.0.0.1", 9000)), ("[::1]:9000", Listen("::1", 9000)),
    ("[::]:33033", Listen("::", 33033)), ("localhost:0", Listen("localhost", 0)),
    ("0.0.0.0:65535", Listen("0.0.0.0", 65535)),
])
def test_listen(text, listen):
    listeners = one("ocpp.listener.ws", text).ocpp.listeners
    assert [ls.listen for ls in listeners] == ([listen] if listen else [])


@pytest.mark.parametrize("text, value", [
    ("true", True), ("false", False), ("True", True), ("yes", True), ("no", False),
    ("on", True), ("off", False), ("1", True), ("0", False),
])
def test_booleans(text, value):
    assert one("mqtt.clean_session", text).mqtt.clean_session is value
    assert one("ocpp.fail_if_no_subprotocol", text).ocpp.fail_if_no_subprotocol is value


@pytest.mark.parametrize("text, host, port", [
    ("mqtt://broker.local", "broker.local", 1883),
    ("mqtt://10.0.0.5:1884", "10.0.0.5", 1884),
    ("mqtt://[::1]:1885", "::1", 1885),
    ("mqtt://[fd00::2]", "fd00::2", 1883),
    ("MQTT://broker/", "broker", 1883),
])
def test_mqtt_server(text, host, port):
    s = one("mqtt.server", text)
    assert (s.mqtt.host, s.mqtt.port) == (host, port)


@pytest.mark.parametrize("text, expected", [
    ("ocpp1.6, ocpp2.0.1, ocpp2.1", ("ocpp1.6", "ocpp2.0.1", "ocpp2.1")),
    ("ocpp2.1, ocpp1.6", ("ocpp2.1", "ocpp1.6")),
    ("ocpp1.6", ("ocpp1.6",)),
    ('"ocpp1.6, ocpp2.0.1"', ("ocpp1.6", "ocpp2.0.1")),
    ("OCPP1.6,ocpp2.0.1,", ("ocpp1.6", "ocpp2.0.1")),
])
def test_subprotocols_list(text, expected):
    assert one("ocpp.subprotocols", text).ocpp.subprotocols == expected


def test_default_subprotocol_in_list():
    s = load_text("ocpp.subprotocols = ocpp2.0.1, ocpp2.1\nocpp.default_subprotocol = ocpp2.1\n")
    assert s.ocpp.default_subprotocol == "ocpp2.1"


def test_options_ignore_case():
    assert one("log.level", "DEBUG").log.level == "debug"
    assert one("log.level", "Warning").log.level == "warning"
    assert one("buffer.overflow", "drop_newest").buffer.overflow == "drop_newest"


def test_strings_and_quoting():
    s = load_text('mqtt.username = site-7\n'
                  'mqtt.password = "s3cr#t, really"   # quoted: keeps # and ,\n'
                  "ocpp.upstream.topic = 'cp/${cid}/${action}'\n"
                  'ocpp.upstream.reply_topic = cp/${cid}/${action}/reply  # a comment\n'
                  "ocpp.mountpoint =\n"
                  "ocpp.path = /ocpp/v16\n")
    assert s.mqtt.username == "site-7"
    assert s.mqtt.password == "s3cr#t, really"
    assert s.ocpp.upstream_topic == "cp/${cid}/${action}"
    assert s.ocpp.upstream_reply_topic == "cp/${cid}/${action}/reply"
    assert s.ocpp.mountpoint == ""
    assert s.ocpp.path == "/ocpp/v16"


def test_client_id_renders_hostname(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "pi-site-7")
    assert config.defaults().mqtt.client_id == "ocpp-edge-pi-site-7"
    assert one("mqtt.client_id", "gw-${hostname}-a").mqtt.client_id == "gw-pi-site-7-a"
    assert one("mqtt.client_id", "fixed").mqtt.client_id == "fixed"


def test_integers():
    s = load_text("mqtt.qos = 2\nmqtt.max_inflight = 65535\nbuffer.max_messages = 1\n")
    assert (s.mqtt.qos, s.mqtt.max_inflight, s.buffer.max_messages) == (2, 65535, 1)


# -- errors: key and line ----------------------------------------------------------------

def test_unknown_key_names_key_and_line():
    exc = error_of(FILLER + "ocpp.foo = 1\n")
    assert (exc.key, exc.line, exc.path) == ("ocpp.foo", 4, "x.conf")
    assert str(exc) == "x.conf:4, key 'ocpp.foo': unknown key"


def test_unknown_key_suggests_a_near_one():
    exc = error_of(FILLER + "mqtt.keep_alive = 30s\n")
    assert str(exc) == "x.conf:4, key 'mqtt.keep_alive': unknown key (did you mean mqtt.keepalive?)"


def test_line_is_where_the_key_is_written():
    text = "log.level = info\n\n  # ocpp.bogus = 1 (a comment, not the key)\n\n   ocpp.bogus = 2\n"
    assert error_of(text).line == 5


@pytest.mark.parametrize("key, value, message", [
    ("mqtt.qos", "3", "must be 1 or 2, got '3'"),
    ("mqtt.qos", "one", "must be a whole number, got 'one'"),
    ("mqtt.max_inflight", "0", "must be between 1 and 65535, got '0'"),
    ("buffer.max_messages", "0", "must be at least 1, got '0'"),
    ("mqtt.clean_session", "maybe", "must be true or false, got 'maybe'"),
    ("mqtt.keepalive", "2h", "must be between 5s and 1h, got '2h'"),
    ("mqtt.keepalive", "soon",
     "must be a duration like 30s, 5m, 100ms, 1h or 2d (a bare number is seconds), got 'soon'"),
    ("mqtt.keepalive", "-30s", "must not be negative, got '-30s'"),
    ("mqtt.reconnect_delay_min", "0s", "must be at least 1ms, got '0s'"),
    ("ocpp.max_frame_size", "32MB", "must be between 1KB and 16MB, got '32MB'"),
    ("ocpp.max_frame_size", "lots",
     "must be a size like 512B, 64KB, 256MB or 1GB (a bare number is bytes), got 'lots'"),
    ("buffer.max_bytes", "512B", "must be at least 1KB, got '512B'"),
    ("buffer.max_bytes", "-1KB", "must not be negative, got '-1KB'"),
    ("buffer.overflow", "drop_all", "must be one of drop_oldest, drop_newest, got 'drop_all'"),
    ("log.level", "verbose", "must be one of debug, info, warning, error, got 'verbose'"),
    ("ocpp.listener.ws", "70000", "the port must be 0 to 65535, got '70000'"),
    ("ocpp.listener.ws", "::1:80",
     "must be off, a port, host:port or [IPv6]:port, got '::1:80'"),
    ("ocpp.path", "ocpp", "must start with '/', got 'ocpp'"),
    ("ocpp.path", "/ocpp/",
     "must not end with '/' (charge points connect to <path>/<id>), got '/ocpp/'"),
    ("ocpp.path", "/oc%70p",
     "must be a plain URL path without '//', '%', '?', '#' or spaces, got '/oc%70p'"),
    ("ocpp.subprotocols", "ocpp1.6, ocpp1.5",
     "'ocpp1.5' is not one of ocpp1.6, ocpp2.0.1, ocpp2.1"),
    ("ocpp.subprotocols", "ocpp1.6, ocpp1.6", "lists ocpp1.6 twice"),
    ("ocpp.subprotocols", "", "must list at least one of ocpp1.6, ocpp2.0.1, ocpp2.1"),
    ("ocpp.default_subprotocol", "ocpp1.5",
     "must be one of ocpp1.6, ocpp2.0.1, ocpp2.1, got 'ocpp1.5'"),
    ("ocpp.mountpoint", "ocpp/+/", "cannot contain '+'"),
    ("ocpp.mountpoint", "ocpp/${cid}/", "cannot contain placeholders"),
    ("ocpp.upstream.topic", "", "a topic template cannot be empty"),
    ("ocpp.upstream.topic", "cp/+/${cid}", "a topic template cannot contain '+'"),
    ("mqtt.server", "tcp://broker:1883",
     "must look like mqtt://host:port (the port defaults to 1883) or "
     "mqtts://host:port (TLS, port 8883), got 'tcp://broker:1883'"),
    ("mqtt.server", "mqtt://broker:99999",
     "must look like mqtt://host:port (the port defaults to 1883) or "
     "mqtts://host:port (TLS, port 8883), got 'mqtt://broker:99999'"),
    ("mqtt.server", "mqtt://broker/topic",
     "must look like mqtt://host:port (the port defaults to 1883) or "
     "mqtts://host:port (TLS, port 8883), got 'mqtt://broker/topic'"),
    ("mqtt.client_id", "gw-${host}", "unknown placeholder ${host} (known: ${hostname})"),
    ("mqtt.client_id", "x" * 129,
     "must be 1 to 128 characters once ${hostname} is replaced, got 129"),
    ("mqtt.client_id", "", "must be 1 to 128 characters once ${hostname} is replaced, got 0"),
    ("mqtt.username", "a, b",
     "a comma makes this a list; put the value in quotes if the comma belongs to it"),
    ("ocpp.handshake_timeout", "10m", "must be between 1s and 5m, got '10m'"),
    ("ocpp.handshake_timeout", "500ms", "must be between 1s and 5m, got '500ms'"),
    ("ocpp.ping_interval", "2h", "must be between 0s and 1h, got '2h'"),
    ("ocpp.ping_interval", "-1s", "must not be negative, got '-1s'"),
    ("ocpp.ping_interval", "off",
     "must be a duration like 30s, 5m, 100ms, 1h or 2d (a bare number is seconds), got 'off'"),
    ("ocpp.ping_timeout", "0", "must be between 1s and 1h, got '0'"),
    ("ocpp.default_heartbeat_interval", "2d", "must be between 1s and 1d, got '2d'"),
    ("ocpp.default_heartbeat_interval", "0s", "must be between 1s and 1d, got '0s'"),
    ("ocpp.heartbeat_checking_times_backoff", "101", "must be between 0 and 100, got '101'"),
    ("ocpp.heartbeat_checking_times_backoff", "-1", "must be between 0 and 100, got '-1'"),
    ("ocpp.heartbeat_checking_times_backoff", "1.5", "must be a whole number, got '1.5'"),
    ("ocpp.upstream.strict_mode", "strict", "must be true or false, got 'strict'"),
    ("ocpp.upstream.strit_mode", "strict", "must be true or false, got 'strict'"),
    ("ocpp.upstream.awaiting_timeout", "0s", "must be between 1s and 1h, got '0s'"),
    ("ocpp.upstream.awaiting_timeout", "61m", "must be between 1s and 1h, got '61m'"),
    ("ocpp.dnstream.strict_mode", "2", "must be true or false, got '2'"),
    ("ocpp.dnstream.strit_mode", "maybe", "must be true or false, got 'maybe'"),
    ("ocpp.dnstream.max_mqueue_len", "0", "must be between 1 and 100000, got '0'"),
    ("ocpp.dnstream.max_mqueue_len", "100001", "must be between 1 and 100000, got '100001'"),
    ("ocpp.dnstream.awaiting_timeout", "soon",
     "must be a duration like 30s, 5m, 100ms, 1h or 2d (a bare number is seconds), got 'soon'"),
    ("ocpp.dnstream.awaiting_timeout", "2h", "must be between 1s and 1h, got '2h'"),
    ("ocpp.dnstream.retry_interval", "500ms", "must be between 1s and 1h, got '500ms'"),
    ("ocpp.dnstream.max_retries", "11", "must be between 0 and 10, got '11'"),
    ("ocpp.dnstream.max_retries", "-1", "must be between 0 and 10, got '-1'"),
    ("ocpp.message_format_checking", "both",
     "must be one of all, upstream_only, dnstream_only, disable, got 'both'"),
    ("ocpp.message_format_checking", "false",
     "must be one of all, upstream_only, dnstream_only, disable, got 'false'"),
    ("ocpp.json_schema_dir", "schemas",
     "must be an absolute path (the service does not run from the directory you are in), "
     "got 'schemas'"),
    ("ocpp.json_schema_dir", "/nonexistent/ocpp-edge-schemas",
     "'/nonexistent/ocpp-edge-schemas' does not exist"),
    ("ocpp.json_schema_id_prefix", "urn:a, b",
     "a comma makes this a list; put the value in quotes if the comma belongs to it"),
    ("ocpp.upstream_down_policy", "close",
     "must be one of buffer, close_stations, local, got 'close'"),
    ("ocpp.upstream_down_policy", "true",
     "must be one of buffer, close_stations, local, got 'true'"),
    ("buffer.dir", "var/lib/ocpp-edge",
     "must be an absolute path (the service does not run from the directory you are in), "
     "got 'var/lib/ocpp-edge'"),
    ("buffer.dir", ".run/buffer",
     "must be an absolute path (the service does not run from the directory you are in), "
     "got '.run/buffer'"),
    ("buffer.dir", "",
     "must be an absolute path (the service does not run from the directory you are in), "
     "got ''"),
    ("buffer.dir", "/var/lib/a, b",
     "a comma makes this a list; put the value in quotes if the comma belongs to it"),
    ("buffer.fsync_interval", "5ms", "must be between 10ms and 10s, got '5ms'"),
    ("buffer.fsync_interval", "0", "must be between 10ms and 10s, got '0'"),
    ("buffer.fsync_interval", "11s", "must be between 10ms and 10s, got '11s'"),
    ("buffer.fsync_interval", "1m", "must be between 10ms and 10s, got '1m'"),
    ("buffer.fsync_interval", "-100ms", "must not be negative, got '-100ms'"),
    ("buffer.fsync_interval", "off",
     "must be a duration like 30s, 5m, 100ms, 1h or 2d (a bare number is seconds), got 'off'"),
    ("buffer.replay_rate", "-1", "must be at least 0, got '-1'"),
    ("buffer.replay_rate", "100/s", "must be a whole number, got '100/s'"),
    ("buffer.replay_rate", "2.5", "must be a whole number, got '2.5'"),
    ("buffer.replay_rate", "off", "must be a whole number, got 'off'"),
    ("buffer.max_messages", "1e6", "must be a whole number, got '1e6'"),
])
def test_bad_value_names_key_and_line(key, value, message):
    exc = error_of(f"{FILLER}{key} = {value}\n")
    assert (exc.key, exc.line) == (key, 4)
    assert str(exc) == f"x.conf:4, key '{key}': {message}"


def test_credentials_in_the_broker_url_are_not_echoed():
    exc = error_of("mqtt.server = mqtt://gw:hunter2@broker\n")
    assert "hunter2" not in str(exc)
    assert exc.reason == ("put the user name and password in mqtt.username and "
                          "mqtt.password, not in the URL")


def test_hash_that_cuts_a_value_is_an_error():
    exc = error_of(FILLER + "mqtt.password = s3cr#t\n")
    assert (exc.key, exc.line) == ("mqtt.password", 4)
    assert exc.reason == ("'#' starts a comment and cut this value short; put the value "
                          "in quotes if '#' belongs to it")
    assert "s3cr" not in str(exc)


# -- topic templates ----------------------------------------------------------------------

UPSTREAM_KNOWN = "(known: ${action}, ${cid}, ${clientid}, ${id}, ${proto}, ${type})"


@pytest.mark.parametrize("key", [
    "ocpp.upstream.topic", "ocpp.upstream.reply_topic", "ocpp.upstream.error_topic",
    "ocpp.upstream.topic.BootNotification",
])
def test_unknown_upstream_placeholder_names_key_line_and_placeholder(key):
    exc = error_of(f"{FILLER}{key} = cp/${{cid}}/${{chargerid}}\n")
    assert (exc.key, exc.line) == (key, 4)
    assert str(exc) == f"x.conf:4, key '{key}': unknown placeholder ${{chargerid}} {UPSTREAM_KNOWN}"


def test_unknown_dnstream_placeholder():
    exc = error_of(FILLER + "ocpp.dnstream.topic = cs/${cid}/${action}\n")
    assert str(exc) == ("x.conf:4, key 'ocpp.dnstream.topic': unknown placeholder ${action} "
                        "(known: ${cid}, ${clientid})")


def test_unterminated_placeholder():
    exc = error_of(FILLER + "ocpp.upstream.topic = cp/${cid\n")
    assert str(exc) == "x.conf:4, key 'ocpp.upstream.topic': unterminated placeholder in 'cp/${cid'"


@pytest.mark.parametrize("topic", ["cs/${clientid}", "${cid}", "a/${cid}/b", "cs/${cid}/"])
def test_dnstream_topic_accepted(topic):
    assert one("ocpp.dnstream.topic", topic).ocpp.dnstream_topic == topic


@pytest.mark.parametrize("topic", ["cs", "cs/x${cid}", "cs/${cid}/${clientid}",
                                   "cs/${cid}/${cid}", "cs/${cid}x"])
def test_dnstream_topic_needs_cid_once_as_a_whole_level(topic):
    exc = error_of(f"{FILLER}ocpp.dnstream.topic = {topic}\n")
    assert (exc.key, exc.line) == ("ocpp.dnstream.topic", 4)
    assert exc.reason == ("must contain ${cid} (or ${clientid}) exactly once, as a whole "
                          f"topic level, e.g. cs/${{cid}}, got {topic!r}")


def test_dnstream_level_counts_the_mountpoint():
    assert load_text("ocpp.mountpoint = ocpp/\nocpp.dnstream.topic = ${cid}\n")
    exc = error_of("ocpp.mountpoint = ocpp\nocpp.dnstream.topic = ${cid}\n")
    assert (exc.key, exc.line) == ("ocpp.dnstream.topic", 2)
    assert exc.reason.endswith("(ocpp.mountpoint 'ocpp' does not end with '/')")


def test_per_action_overrides():
    s = load_text("ocpp.upstream.topic.BootNotification = cp/${cid}/Boot\n"
                  "ocpp.upstream.topic.MeterValues = 'cp/${cid}/meter/${id}'\n"
                  "ocpp.upstream.topic.Data_Transfer2 = dt/${cid}\n")
    assert dict(s.ocpp.upstream_topic_overrides) == {
        "BootNotification": "cp/${cid}/Boot", "MeterValues": "cp/${cid}/meter/${id}",
        "Data_Transfer2": "dt/${cid}"}
    assert s.ocpp.upstream_topic == "cp/${cid}"


@pytest.mark.parametrize("action", ["Boot-Notification", "1Boot", "", "Boot.Notification"])
def test_per_action_override_needs_an_action_name(action):
    key = f"ocpp.upstream.topic.{action}"
    exc = error_of(f"{FILLER}{key} = cp/${{cid}}\n")
    assert (exc.key, exc.line) == (key, 4)
    assert exc.reason == (f"{action!r} is not an OCPP action name (letters, digits and '_', "
                          "e.g. BootNotification)")


def test_emqx_spelling_of_keys():
    # Pasted from the EMQX 4.x OCPP gateway docs (plugins/emqx_ocpp.conf).
    s = load_text(
        "## plugins/emqx_ocpp.conf\n"
        "ocpp.mountpoint = ocpp/\n"
        "## OCPP gateway will publish all Charge Point messages to this topic.\n"
        "ocpp.upstream.topic = ocpp/cp/${cid}/${action}\n"
        "\n"
        "## Supports overriding the default topic by message name\n"
        "ocpp.upstream.topic.BootNotification = ocpp/cp/${cid}/Notify/${action}\n"
        "ocpp.upstream.reply_topic = ocpp/cp/Reply/${cid}\n"
        "ocpp.upstream.error_topic = ocpp/cp/Error/${cid}\n"
        "ocpp.dnstream.topic = ocpp/cs/${clientid}\n")
    assert s.ocpp.mountpoint == "ocpp/"
    assert s.ocpp.upstream_topic == "ocpp/cp/${cid}/${action}"
    assert dict(s.ocpp.upstream_topic_overrides) == {
        "BootNotification": "ocpp/cp/${cid}/Notify/${action}"}
    assert s.ocpp.upstream_reply_topic == "ocpp/cp/Reply/${cid}"
    assert s.ocpp.upstream_error_topic == "ocpp/cp/Error/${cid}"
    assert s.ocpp.dnstream_topic == "ocpp/cs/${clientid}"


def test_emqx_wildcard_dnstream_example_is_explained():
    exc = error_of(FILLER + "ocpp.dnstream.topic = ocpp/cs/${cid}/+/+\n")
    assert str(exc) == ("x.conf:4, key 'ocpp.dnstream.topic': a topic template cannot contain "
                        "'+'; the gateway subscribes to it with ${cid} replaced by '+' and "
                        "routes by that level")


# -- call discipline, message format checking, liveness ----------------------------------

def test_call_discipline_and_liveness_values():
    s = load_text("ocpp.handshake_timeout = 5m\n"
                  "ocpp.ping_interval = 20s\n"
                  "ocpp.ping_timeout = 1s\n"
                  "ocpp.default_heartbeat_interval = 1d\n"
                  "ocpp.heartbeat_checking_times_backoff = 0\n"
                  "ocpp.upstream.strict_mode = false\n"
                  "ocpp.upstream.awaiting_timeout = 1h\n"
                  "ocpp.dnstream.strict_mode = off\n"
                  "ocpp.dnstream.max_mqueue_len = 100000\n"
                  "ocpp.dnstream.awaiting_timeout = 1s\n"
                  "ocpp.dnstream.retry_interval = 2500ms\n"
                  "ocpp.dnstream.max_retries = 10\n"
                  "ocpp.message_format_checking = Upstream_Only\n"
                  "ocpp.json_schema_id_prefix = urn:example:\n")
    o = s.ocpp
    assert (o.handshake_timeout, o.ping_interval, o.ping_timeout) == (300.0, 20.0, 1.0)
    assert (o.default_heartbeat_interval, o.heartbeat_checking_times_backoff) == (86400.0, 0)
    assert (o.upstream_strict_mode, o.upstream_awaiting_timeout) == (False, 3600.0)
    assert (o.dnstream_strict_mode, o.dnstream_max_mqueue_len) == (False, 100000)
    assert (o.dnstream_awaiting_timeout, o.dnstream_retry_interval) == (1.0, 2.5)
    assert o.dnstream_max_retries == 10
    assert o.message_format_checking == "upstream_only"
    assert (o.json_schema_dir, o.json_schema_id_prefix) == (None, "urn:example:")


@pytest.mark.parametrize("text, seconds", [("0", 0.0), ("0s", 0.0), ("1h", 3600.0),
                                           ("250ms", 0.25)])
def test_ping_interval_zero_is_off(text, seconds):
    assert one("ocpp.ping_interval", text).ocpp.ping_interval == seconds


@pytest.mark.parametrize("value", ["all", "upstream_only", "dnstream_only", "disable", "ALL"])
def test_message_format_checking_options(value):
    assert one("ocpp.message_format_checking", value).ocpp.message_format_checking == value.lower()


@pytest.mark.parametrize("direction", ["upstream", "dnstream"])
def test_emqx_strit_mode_spelling_sets_strict_mode(direction):
    s = one(f"ocpp.{direction}.strit_mode", "false")
    assert getattr(s.ocpp, f"{direction}_strict_mode") is False
    other = "dnstream" if direction == "upstream" else "upstream"
    assert getattr(s.ocpp, f"{other}_strict_mode") is True
    assert one(f"ocpp.{direction}.strit_mode", "true") == config.defaults()


@pytest.mark.parametrize("direction", ["upstream", "dnstream"])
def test_both_spellings_of_strict_mode_are_an_error(direction):
    right, emqx = f"ocpp.{direction}.strict_mode", f"ocpp.{direction}.strit_mode"
    exc = error_of(f"{FILLER}{right} = true\nlog.level = info\n{emqx} = false\n")
    assert (exc.key, exc.line) == (emqx, 6)
    assert str(exc) == (f"x.conf:6, key '{emqx}': is EMQX's spelling of {right}, which is "
                        "already set on line 4; keep one of them")
    exc = error_of(f"{FILLER}{emqx} = false\n{right} = false\n")
    assert (exc.key, exc.line) == (right, 5)
    assert str(exc) == (f"x.conf:5, key '{right}': is already set on line 4 as {emqx} "
                        "(EMQX's spelling of this key); keep one of them")


def test_both_spellings_and_other_errors_are_all_listed():
    exc = error_of("ocpp.dnstream.strit_mode = yes\n"
                   "ocpp.dnstream.max_retries = 11\n"
                   "ocpp.dnstream.strict_mode = maybe\n"
                   "ocpp.upstream.strit_mode = maybe\n")
    assert str(exc).splitlines() == [
        "x.conf:2, key 'ocpp.dnstream.max_retries': must be between 0 and 10, got '11'",
        "x.conf:3, key 'ocpp.dnstream.strict_mode': is already set on line 1 as "
        "ocpp.dnstream.strit_mode (EMQX's spelling of this key); keep one of them",
        "x.conf:4, key 'ocpp.upstream.strit_mode': must be true or false, got 'maybe'",
    ]


def test_strit_mode_value_cut_by_a_hash_names_the_emqx_key():
    exc = error_of(FILLER + "ocpp.upstream.strit_mode = false#no\n")
    assert (exc.key, exc.line) == ("ocpp.upstream.strit_mode", 4)
    assert exc.reason.startswith("'#' starts a comment and cut this value short")


def test_misspelt_strict_mode_suggests_the_key():
    exc = error_of(FILLER + "ocpp.upstream.strict_mod = true\n")
    assert str(exc) == ("x.conf:4, key 'ocpp.upstream.strict_mod': unknown key "
                        "(did you mean ocpp.upstream.strict_mode?)")


def schema_tree(root: Path, *protocols: str) -> str:
    for protocol in protocols:
        (root / protocol).mkdir(parents=True)
    return str(root)


def test_json_schema_dir(tmp_path):
    path = schema_tree(tmp_path / "schemas", "ocpp1.6", "ocpp2.0.1", "ocpp2.1")
    assert one("ocpp.json_schema_dir", path).ocpp.json_schema_dir == path
    assert one("ocpp.json_schema_dir", f'"{path}"').ocpp.json_schema_dir == path


@pytest.mark.parametrize("text", ["ocpp.json_schema_dir =\n", 'ocpp.json_schema_dir = ""\n',
                                  "ocpp.json_schema_dir = ''  # the shipped ones\n"])
def test_empty_json_schema_dir_means_the_shipped_schemas(text):
    assert load_text(text).ocpp.json_schema_dir is None


def test_json_schema_dir_must_be_a_directory(tmp_path):
    path = tmp_path / "schemas.zip"
    path.write_bytes(b"PK")
    exc = error_of(f"{FILLER}ocpp.json_schema_dir = {path}\n")
    assert (exc.key, exc.line) == ("ocpp.json_schema_dir", 4)
    assert exc.reason == f"{str(path)!r} is not a directory"


def test_json_schema_dir_needs_every_offered_protocol(tmp_path):
    path = schema_tree(tmp_path / "schemas", "ocpp1.6")
    exc = error_of(f"{FILLER}ocpp.json_schema_dir = {path}\nlog.level = info\n")
    assert (exc.key, exc.line) == ("ocpp.json_schema_dir", 4)
    assert str(exc) == (f"x.conf:4, key 'ocpp.json_schema_dir': {path!r} has no ocpp2.0.1/ "
                        "or ocpp2.1/ (it needs a sub-directory of JSON schemas for each "
                        "protocol in ocpp.subprotocols: ocpp1.6/, ocpp2.0.1/, ocpp2.1/)")
    # Only the protocols offered count ...
    s = load_text(f"ocpp.subprotocols = ocpp1.6\nocpp.json_schema_dir = {path}\n")
    assert s.ocpp.json_schema_dir == path
    # ... and none when nothing is checked.
    s = load_text(f"ocpp.json_schema_dir = {path}\nocpp.message_format_checking = disable\n")
    assert (s.ocpp.json_schema_dir, s.ocpp.message_format_checking) == (path, "disable")
    for checking in ("upstream_only", "dnstream_only"):
        exc = error_of(f"ocpp.message_format_checking = {checking}\n"
                       f"ocpp.json_schema_dir = {path}\n")
        assert (exc.key, exc.line) == ("ocpp.json_schema_dir", 2)


def test_json_schema_dir_sub_directory_must_be_a_directory(tmp_path):
    path = schema_tree(tmp_path / "schemas", "ocpp1.6", "ocpp2.0.1")
    (tmp_path / "schemas" / "ocpp2.1").write_text("not a directory")
    exc = error_of(f"ocpp.json_schema_dir = {path}\n")
    assert exc.reason.startswith(f"{path!r} has no ocpp2.1/ (")


def test_emqx_call_discipline_keys():
    # Pasted from an EMQX 4.x emqx_ocpp.conf, with EMQX's spellings and values.
    s = load_text("ocpp.default_heartbeat_interval = 600s\n"
                  "ocpp.heartbeat_checking_times_backoff = 1\n"
                  "ocpp.upstream.strit_mode = false\n"
                  "ocpp.upstream.awaiting_timeout = 30s\n"
                  "ocpp.dnstream.strit_mode = false\n"
                  "ocpp.dnstream.max_mqueue_len = 10\n"
                  "ocpp.dnstream.retry_interval = 30s\n"
                  "ocpp.message_format_checking = disable\n"
                  "ocpp.json_schema_id_prefix = urn:OCPP:1.6:2019:12:\n")
    o = s.ocpp
    assert (o.default_heartbeat_interval, o.heartbeat_checking_times_backoff) == (600.0, 1)
    assert (o.upstream_strict_mode, o.dnstream_strict_mode) == (False, False)
    assert (o.upstream_awaiting_timeout, o.dnstream_retry_interval) == (30.0, 30.0)
    assert (o.dnstream_max_mqueue_len, o.message_format_checking) == (10, "disable")
    assert o.json_schema_id_prefix == "urn:OCPP:1.6:2019:12:"


# -- the upstream buffer and the upstream-down policy -------------------------------------

def test_buffer_values():
    s = load_text("ocpp.upstream_down_policy = close_stations\n"
                  "buffer.dir = /srv/ocpp-edge/buffer\n"
                  "buffer.max_messages = 5000\n"
                  "buffer.max_bytes = 1GB\n"
                  "buffer.overflow = drop_newest\n"
                  "buffer.fsync_interval = 10s\n"
                  "buffer.replay_rate = 200\n")
    assert s.ocpp.upstream_down_policy == "close_stations"
    assert s.buffer == config.BufferSettings(
        dir="/srv/ocpp-edge/buffer", max_messages=5000, max_bytes=1 << 30,
        overflow="drop_newest", fsync_interval=10.0, replay_rate=200)


@pytest.mark.parametrize("text, policy", [
    ("buffer", "buffer"), ("Close_Stations", "close_stations"),
    ("CLOSE_STATIONS", "close_stations"),
])
def test_upstream_down_policy_options(text, policy):
    assert one("ocpp.upstream_down_policy", text).ocpp.upstream_down_policy == policy


@pytest.mark.parametrize("text, seconds", [("10ms", 0.01), ("100ms", 0.1), ("0.5s", 0.5),
                                           ("1", 1.0), ("10s", 10.0), ("0.01", 0.01)])
def test_fsync_interval(text, seconds):
    assert one("buffer.fsync_interval", text).buffer.fsync_interval == pytest.approx(seconds)


@pytest.mark.parametrize("text, rate", [("0", 0), ("1", 1), ("+50", 50),
                                        ("1000000000", 1_000_000_000)])
def test_replay_rate(text, rate):
    assert one("buffer.replay_rate", text).buffer.replay_rate == rate


def test_buffer_dir_need_not_exist(tmp_path):
    path = str(tmp_path / "var" / "lib" / "ocpp-edge")  # the daemon creates it
    assert one("buffer.dir", path).buffer.dir == path
    assert not (tmp_path / "var").exists()  # checking creates nothing


@pytest.mark.parametrize("name", ["buffer", "buffer/", "link-to-buffer", "buffer/../buffer"])
def test_buffer_dir_may_exist(tmp_path, name):
    (tmp_path / "buffer").mkdir()
    (tmp_path / "link-to-buffer").symlink_to(tmp_path / "buffer")
    path = f"{tmp_path}/{name}"
    assert one("buffer.dir", path).buffer.dir == path  # as written
    assert one("buffer.dir", f'"{path}"').buffer.dir == path


def test_buffer_dir_root_and_spaces(tmp_path):
    assert one("buffer.dir", "/").buffer.dir == "/"
    path = f"{tmp_path}/ocpp edge"
    assert one("buffer.dir", f"'{path}'").buffer.dir == path


@pytest.mark.parametrize("name", ["buffer.db", "buffer.db/", "link-to-file"])
def test_buffer_dir_must_be_a_directory_if_it_exists(tmp_path, name):
    (tmp_path / "buffer.db").write_bytes(b"SQLite format 3\x00")
    (tmp_path / "link-to-file").symlink_to(tmp_path / "buffer.db")
    path = f"{tmp_path}/{name}"
    exc = error_of(f"{FILLER}buffer.dir = {path}\n")
    assert (exc.key, exc.line) == ("buffer.dir", 4)
    assert str(exc) == f"x.conf:4, key 'buffer.dir': {path!r} is not a directory"


def test_buffer_dir_dangling_symlink(tmp_path):
    (tmp_path / "buffer").symlink_to(tmp_path / "mnt" / "sd")
    path = str(tmp_path / "buffer")
    exc = error_of(f"{FILLER}buffer.dir = {path}\n")
    assert (exc.key, exc.line) == ("buffer.dir", 4)
    assert exc.reason == (f"{path!r} is a symbolic link to {str(tmp_path / 'mnt' / 'sd')!r}, "
                          "which does not exist")


@pytest.mark.parametrize("below", ["x", "x/y/z", "x/", "../x"])
def test_buffer_dir_under_a_file_cannot_be_created(tmp_path, below):
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n")
    path = f"{tmp_path}/hosts/{below}"
    exc = error_of(f"{FILLER}buffer.dir = {path}\n")
    assert (exc.key, exc.line) == ("buffer.dir", 4)
    assert exc.reason == f"cannot be created: {str(tmp_path / 'hosts')!r} is not a directory"


def test_buffer_dir_under_a_dangling_symlink_cannot_be_created(tmp_path):
    (tmp_path / "data").symlink_to(tmp_path / "unmounted")
    exc = error_of(f"buffer.dir = {tmp_path}/data/ocpp-edge\n")
    assert exc.reason == f"cannot be created: {str(tmp_path / 'data')!r} is not a directory"


def test_buffer_keys_misspelt_suggest_the_key():
    exc = error_of(FILLER + "buffer.fsync_intervall = 100ms\n")
    assert str(exc) == ("x.conf:4, key 'buffer.fsync_intervall': unknown key "
                        "(did you mean buffer.fsync_interval?)")
    exc = error_of(FILLER + "ocpp.upstream_down_polcy = buffer\n")
    assert str(exc) == ("x.conf:4, key 'ocpp.upstream_down_polcy': unknown key "
                        "(did you mean ocpp.upstream_down_policy?)")


def test_buffer_problems_are_all_listed_in_file_order():
    exc = error_of("buffer.replay_rate = -5\n"
                   "ocpp.upstream_down_policy = close\n"
                   "buffer.dir = buffer\n"
                   "buffer.max_bytes = 256MB\n"
                   "buffer.fsync_interval = 1ms\n")
    assert (exc.key, exc.line) == ("buffer.replay_rate", 1)
    assert str(exc).splitlines() == [
        "x.conf:1, key 'buffer.replay_rate': must be at least 0, got '-5'",
        "x.conf:2, key 'ocpp.upstream_down_policy': must be one of buffer, close_stations, "
        "local, got 'close'",
        "x.conf:3, key 'buffer.dir': must be an absolute path (the service does not run from "
        "the directory you are in), got 'buffer'",
        "x.conf:5, key 'buffer.fsync_interval': must be between 10ms and 10s, got '1ms'",
    ]


# -- relations between keys -------------------------------------------------------------

def test_default_subprotocol_must_be_offered():
    exc = error_of(FILLER + "ocpp.subprotocols = ocpp2.0.1\n")
    # ocpp.default_subprotocol is not written: point at the line that made it wrong.
    assert (exc.key, exc.line) == ("ocpp.default_subprotocol", 4)
    assert exc.reason == ("ocpp1.6 is not in ocpp.subprotocols (ocpp2.0.1); set "
                          "ocpp.default_subprotocol to one of them")
    exc = error_of("ocpp.subprotocols = ocpp2.0.1\nocpp.default_subprotocol = ocpp2.1\n")
    assert (exc.key, exc.line) == ("ocpp.default_subprotocol", 2)


def test_reconnect_delay_max_not_below_min():
    exc = error_of("mqtt.reconnect_delay_max = 5s\nmqtt.reconnect_delay_min = 10s\n")
    assert str(exc) == ("x.conf:1, key 'mqtt.reconnect_delay_max': must not be less than "
                        "mqtt.reconnect_delay_min (10s), got 5s")


# -- file syntax ---------------------------------------------------------------------------

def test_unbalanced_quote_names_line():
    exc = error_of(FILLER + 'mqtt.password = "s3cret\nmqtt.qos = 1\n')
    assert (exc.key, exc.line) == ("mqtt.password", 4)
    assert str(exc) == ("x.conf:4, key 'mqtt.password': cannot read the value: check its "
                        "quotes (a value holding a quote, ',' or '#' must be quoted as a whole)")


def test_key_set_twice():
    exc = error_of(FILLER + "mqtt.qos = 1\nmqtt.qos = 2\n")
    assert str(exc) == "x.conf:5, key 'mqtt.qos': is set twice (first on line 4)"


def test_line_without_equals():
    exc = error_of(FILLER + "mqtt.qos 1\n")
    assert (exc.key, exc.line) == (None, 4)
    assert str(exc) == "x.conf:4: expected a 'key = value' line"


@pytest.mark.parametrize("text", ["[mqtt]\nqos = 1\n", "[[mqtt]]\n"])
def test_sections_are_an_error(text):
    exc = error_of(FILLER + text)
    assert exc.line == 4
    assert "sections" in exc.reason
    assert "write dotted keys like ocpp.mountpoint = ocpp/" in exc.reason


def test_every_problem_is_listed_in_file_order():
    exc = error_of("mqtt.qos = 3\n"
                   "log.level = info\n"
                   "bogus = 1\n"
                   "mqtt.keepalive = 1s\n")
    assert (exc.key, exc.line) == ("mqtt.qos", 1)
    assert str(exc).splitlines() == [
        "x.conf:1, key 'mqtt.qos': must be 1 or 2, got '3'",
        "x.conf:3, key 'bogus': unknown key",
        "x.conf:4, key 'mqtt.keepalive': must be between 5s and 1h, got '1s'",
    ]


# -- files -------------------------------------------------------------------------------

def test_missing_file_names_the_path(tmp_path):
    path = str(tmp_path / "nope.conf")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert (info.value.path, info.value.key, info.value.line) == (path, None, None)
    assert str(info.value) == (f"{path}: cannot read the configuration file: "
                               "No such file or directory")


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(str(tmp_path))
    assert str(info.value).startswith(f"{tmp_path}: cannot read the configuration file: ")


def test_errors_name_the_file(tmp_path):
    path = tmp_path / "ocpp-edge.conf"
    path.write_text("# site 7\nmqtt.qos = 3\n")
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert str(info.value) == f"{path}:2, key 'mqtt.qos': must be 1 or 2, got '3'"


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.conf"
    path.write_bytes(b"log.level = info\nmqtt.password = \xe9t\xe9\n")
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert (info.value.line, info.value.reason) == (2, "the file is not UTF-8 text")


def test_utf8_bom_and_crlf(tmp_path):
    path = tmp_path / "windows.conf"
    path.write_bytes(b"\xef\xbb\xbfmqtt.qos = 2\r\nmqtt.username = b\xc3\xa9a\r\n")
    s = load(str(path))
    assert (s.mqtt.qos, s.mqtt.username, s.source) == (2, "béa", str(path))


def test_qos2_needs_a_clean_session():
    with pytest.raises(ConfigError) as info:
        load_text("mqtt.qos = 2\nmqtt.clean_session = false\n", "q.conf")
    assert info.value.line == 2 and info.value.key == "mqtt.clean_session"
    assert "must be true with mqtt.qos = 2" in str(info.value)
    # The default (a persistent session) yields to QoS 2 when the key is not written.
    m = load_text("mqtt.qos = 2\n").mqtt
    assert (m.qos, m.clean_session) == (2, True)


@pytest.mark.parametrize("host", ["broker..example.com", "a" * 64 + ".example.com"])
def test_host_names_the_resolver_cannot_take(host):
    with pytest.raises(ConfigError) as info:
        load_text(f"mqtt.server = mqtt://{host}:1883\n")
    assert info.value.key == "mqtt.server" and "not a valid host name" in str(info.value)


# -- admin endpoint and presence topics (issue "Operations") ------------------------------

@pytest.mark.parametrize("text, listen", [
    ("off", None), ("OFF", None), ("127.0.0.1:9000", Listen("127.0.0.1", 9000)),
    ("9000", Listen("127.0.0.1", 9000)),  # a bare port is loopback, unlike the listeners
    ("[::1]:9000", Listen("::1", 9000)), ("localhost:9000", Listen("localhost", 9000)),
])
def test_admin_listen(text, listen):
    assert one("admin.listen", text).admin.listen == listen


@pytest.mark.parametrize("address", ["0.0.0.0:33080", "192.168.1.10:33080", "[::]:33080",
                                     "gateway.local:33080"])
def test_admin_listen_reachable_from_elsewhere_needs_a_token(address):
    err = error_of(FILLER + f"admin.listen = {address}\n")
    assert (err.key, err.line) == ("admin.listen", 4)
    assert "admin.token_file" in str(err) and "x.conf:4" in str(err)


def test_admin_token_file_is_read_and_checked(tmp_path):
    token = tmp_path / "admin.token"
    token.write_text("0123456789abcdef0123\n")
    token.chmod(0o600)
    s = load_text(f"admin.listen = 0.0.0.0:33080\nadmin.token_file = {token}\n")
    assert s.admin == config.AdminSettings(listen=Listen("0.0.0.0", 33080),
                                           token_file=str(token),
                                           token="0123456789abcdef0123",
                                           socket="/run/ocpp-edge/admin.sock")
    token.chmod(0o644)
    err = error_of(FILLER + f"admin.token_file = {token}\n")
    assert (err.key, err.line) == ("admin.token_file", 4)
    assert "chmod 600" in str(err)
    err = error_of(FILLER + f"admin.token_file = {tmp_path / 'missing'}\n")
    assert (err.key, err.line) == ("admin.token_file", 4)
    assert "does not exist" in str(err)


def test_admin_token_file_must_be_absolute():
    err = error_of(FILLER + "admin.token_file = admin.token\n")
    assert (err.key, err.line) == ("admin.token_file", 4)


@pytest.mark.parametrize("key", ["ocpp.upstream.status_topic", "ocpp.upstream.event_topic"])
def test_presence_topics_can_be_off(key):
    s = one(key, "off")
    assert getattr(s.ocpp, key.split(".")[-1]) is None


@pytest.mark.parametrize("key, value, words", [
    ("ocpp.upstream.status_topic", "gw/${cid}/status", "unknown placeholder ${cid}"),
    ("ocpp.upstream.event_topic", "ev/${action}", "unknown placeholder ${action}"),
    ("ocpp.upstream.event_topic", "ev/+/x", "cannot contain '+'"),
    ("ocpp.upstream.status_topic", "", "cannot be empty"),
])
def test_presence_topic_errors_name_key_and_line(key, value, words):
    err = error_of(FILLER + f"{key} = {value}\n")
    assert (err.key, err.line) == (key, 4)
    assert words in str(err)


def test_presence_topics_render_node_from_the_client_id():
    s = load_text("ocpp.upstream.event_topic = e/${node}/${clientid}/${event}\n")
    assert s.ocpp.event_topic == "e/${node}/${clientid}/${event}"
    # A client id that cannot be a topic level on every broker is refused by its own key
    # (issue 16), whether or not a presence topic uses ${node}.
    for client_id in ("site/gw+1", "site/gw+1\nocpp.upstream.status_topic = gw/status\n"
                      "ocpp.upstream.event_topic = off"):
        err = error_of(FILLER + f"mqtt.client_id = {client_id}\n")
        assert err.key == "mqtt.client_id" and "'/'" in str(err)
