"""Real parts for integration tests: a Mosquitto broker, a gateway process, a paho backend.

Nothing here is a mock: the broker is ``mosquitto`` on a free loopback port (stopped and
restarted to simulate an outage), the gateway is ``python -m ocpp_edge`` in its own
process, and the backend is a paho client.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import queue
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import paho.mqtt.client as mqtt
import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def eventually(fn, what: str, timeout: float = 10.0, interval: float = 0.02):
    """fn()'s first truthy value, polled (the gateway acts asynchronously); an
    AssertionError naming ``what`` and the last value after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}; last: {value!r}")
        time.sleep(interval)


async def ws_open(port: int, path: str, protocol: str | None = None):
    """A raw RFC 6455 client handshake on asyncio streams (for tests that then write
    frames byte by byte); returns (reader, writer) once the server answered 101."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    offer = f"Sec-WebSocket-Protocol: {protocol}\r\n" if protocol else ""
    writer.write((f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n{offer}"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.access(found, os.X_OK):
        raise RuntimeError("mosquitto is not installed: run `make test`, which installs it")
    return found


@contextmanager
def tmpfs(path: Path, size: str):
    """A real size-limited tmpfs at ``path`` (mounting needs root, as CI has)."""
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"mounting a test tmpfs failed (root needed): {r.stderr}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill_disk(path: Path) -> None:
    """Write zeros to ``path`` until its file system is full (ENOSPC)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:  # ENOSPC: full
        pass
    finally:
        os.close(fd)


class Broker:
    """A real Mosquitto on 127.0.0.1:<port>; ``stop()``/``start()`` keep the port.

    ``persistence=True``: Mosquitto writes its sessions and the messages queued for them
    to ``workdir`` when stopped (SIGTERM) and reads them back when started, so a session
    registered with ``keep_session`` misses nothing published while its client is away,
    across a restart of the broker too. Tests whose gateway replays a backlog the moment
    the broker comes back need that: a backend that connects only then would race the
    replay.
    """

    def __init__(self, workdir: Path, persistence: bool = False) -> None:
        self.port = free_port()
        self.persistence = persistence
        self.conf = workdir / "mosquitto.conf"
        stored = (f"persistence true\npersistence_location {workdir}/\n"
                  "user root\n"  # as root Mosquitto would write the store as 'mosquitto'
                  if persistence else "persistence false\n")
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n{stored}"
            "max_queued_messages 100000\n")
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.conf)],
                                         stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, proc=self.proc)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def keep_session(self, client_id: str, subscribe: str) -> None:
        """Register ``client_id`` as a persistent session subscribed to ``subscribe``
        (QoS 1): from now on the broker keeps what is published there for it until a
        ``Backend(..., session=client_id)`` connects. Starts and stops the broker for
        that when it is down."""
        assert self.persistence, "keep_session needs Broker(..., persistence=True)"
        was_down = self.proc is None
        if was_down:
            self.start()
        Backend(self.port, subscribe=subscribe, session=client_id).close()
        if was_down:
            self.stop()


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path)
    b.start()
    yield b
    b.stop()


class Received(NamedTuple):
    """One message as a test backend got it."""

    topic: str
    body: dict | bytes  # JSON decoded when it is JSON
    retain: bool
    dup: bool  # the broker's redelivery of a message it sent before


def paho_client(client_id: str, clean_session: bool = True) -> mqtt.Client:
    """A paho 1.6 or 2.x client speaking MQTT 3.1.1 (the callbacks below take both
    generations' arguments)."""
    kw = {"client_id": client_id, "clean_session": clean_session, "protocol": mqtt.MQTTv311}
    if hasattr(mqtt, "CallbackAPIVersion"):
        return mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **kw)
    return mqtt.Client(**kw)


class Backend:
    """A paho client playing the CSMS: subscribes to ``subscribe`` (QoS 1, and again each
    time paho's loop reconnects it), records what arrives, answers through ``answer`` when
    given (``(topic, body) -> (topic, body) | None``, run on paho's thread, so that no
    answer waits for the test), publishes commands.

    ``session``: connect as that persistent session (clean_session false) and receive
    first what the broker kept for it (``Broker.keep_session``). ``client_id``: a fixed id
    with a clean session. ``credentials`` (user, password) and ``tls_ca`` (a CA file: the
    port is then the broker's TLS port) for brokers that ask for them.
    """

    def __init__(self, port: int, subscribe: str | list[str] = "ocpp/#",
                 session: str | None = None, *, client_id: str | None = None,
                 answer=None, credentials: tuple[str, str] | None = None,
                 tls_ca: str | None = None) -> None:
        self.client_id = (session or client_id
                          or f"test-backend-{os.getpid()}-{time.monotonic_ns()}")
        self.subscriptions = [subscribe] if isinstance(subscribe, str) else list(subscribe)
        self.answer = answer
        self.messages: queue.Queue[Received] = queue.Queue()
        self._subscribed: queue.Queue[list[int]] = queue.Queue()
        self.client = paho_client(self.client_id, clean_session=session is None)
        if credentials:
            self.client.username_pw_set(*credentials)
        if tls_ca:
            self.client.tls_set_context(ssl.create_default_context(cafile=tls_ca))
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if self.subscriptions:
            codes = self._subscribed.get(timeout=10)
            assert all(c < 0x80 for c in codes), f"subscription refused: {codes}"

    def _on_connect(self, client, userdata, flags, rc, properties=None) -> None:
        if self.subscriptions:
            client.subscribe([(topic, 1) for topic in self.subscriptions])

    def _on_subscribe(self, client, userdata, mid, granted, properties=None) -> None:
        self._subscribed.put([getattr(g, "value", g) for g in granted])

    def _on_message(self, client, userdata, msg) -> None:
        try:
            body: dict | bytes = json.loads(msg.payload)
        except ValueError:
            body = msg.payload
        self.messages.put(Received(msg.topic, body, bool(msg.retain), bool(msg.dup)))
        if self.answer is not None and isinstance(body, dict):
            reply = self.answer(msg.topic, body)
            if reply is not None:
                client.publish(reply[0], json.dumps(reply[1]), qos=1)

    def expect(self, topic: str | None = None, timeout: float = 10.0,
               where=lambda body: True) -> tuple[str, dict]:
        """The next message on ``topic`` matching ``where`` (others are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no message on {topic!r} within {timeout} s")
            try:
                got = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            if (topic is None or got.topic == topic) and where(got.body):
                return got.topic, got.body

    def drain(self, wait: float = 0.0) -> list[Received]:
        """Everything received and not yet taken (after ``wait`` seconds)."""
        time.sleep(wait)
        seen = []
        while True:
            try:
                seen.append(self.messages.get_nowait())
            except queue.Empty:
                return seen

    def nothing_on(self, topic_prefix: str, wait: float) -> list:
        """(topic, body) of everything received under ``topic_prefix`` within ``wait``
        seconds."""
        return [(m.topic, m.body) for m in self.drain(wait) if m.topic.startswith(topic_prefix)]

    def publish(self, topic: str, body: dict | bytes | str, qos: int = 1,
                retain: bool = False) -> None:
        payload = json.dumps(body) if isinstance(body, dict) else body
        self.client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def backend(broker):
    b = Backend(broker.port)
    yield b
    b.close()


class GatewayProcess:
    """``python -m ocpp_edge`` with a config written for this test."""

    def __init__(self, workdir: Path, mqtt_port: int, extra: str = "") -> None:
        self.port = free_port()
        self.workdir = workdir
        self.config = workdir / "ocpp-edge.conf"
        keys = {
            "ocpp.listener.ws": f"127.0.0.1:{self.port}",
            "mqtt.server": f"mqtt://127.0.0.1:{mqtt_port}",
            "mqtt.client_id": f"gw-test-{self.port}",
            "mqtt.reconnect_delay_min": "100ms",
            "mqtt.reconnect_delay_max": "500ms",
            "log.level": "debug",
            "buffer.dir": str(workdir / f"buffer-{self.port}"),
            # Most tests are about OCPP, not authentication (tests/test_security.py is).
            "auth.allow_anonymous": "true",
            "auth.password_file": "",
            # ... nor about presence on MQTT and the admin endpoint (tests/test_ops.py is).
            "ocpp.upstream.status_topic": "off",
            "ocpp.upstream.event_topic": "off",
            "admin.listen": "off",
            "admin.socket": "off",
        }
        for line in extra.splitlines():  # a test's own settings win
            key, sep, value = line.partition("=")
            if sep:
                keys[key.strip()] = value.strip()
        self.config.write_text("".join(f"{k} = {v}\n" for k, v in keys.items()))
        self.stderr_path = workdir / "gateway.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> GatewayProcess:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        env.pop("JOURNAL_STREAM", None)
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ocpp_edge", "--config", str(self.config)],
                stdout=err, stderr=subprocess.STDOUT, env=env, cwd=self.workdir)
        wait_for_port(self.port, proc=self.proc)
        return self

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ocpp"

    def log_text(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_log(self, needle: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_text()
            if needle in text:
                return text
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not in the gateway log:\n{self.log_text()[-3000:]}")

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def make_gateway(tmp_path):
    started: list[GatewayProcess] = []

    def make(mqtt_port: int, extra: str = "", start: bool = True) -> GatewayProcess:
        gw = GatewayProcess(tmp_path, mqtt_port, extra)
        started.append(gw)
        return gw.start() if start else gw

    yield make
    for gw in started:
        gw.stop()


@pytest.fixture
def gateway(make_gateway, broker):
    gw = make_gateway(broker.port)
    gw.wait_log("subscribed to ocpp/cs/+")  # backend commands can reach it from now on
    return gw
