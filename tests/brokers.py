"""Private MQTT brokers for tests: Mosquitto, RabbitMQ's MQTT plugin, NATS in MQTT mode.

Each broker is a real server from its Debian package, started on free loopback ports
with its configuration, data and log in a directory of the test's own, never the
system's service (a host may run all three on their standard ports). ``stop()`` and
``start()`` keep the ports and the data, so a restart is a restart: Mosquitto saves its
persistence file, RabbitMQ keeps its Mnesia directory (durable queues, retained
messages), NATS its JetStream store.

Every broker requires a username and password (``USER`` / ``PASSWORD``); the gateway
and the test clients log in with them (``mqtt.username`` / ``mqtt.password``).

A missing broker is an error naming the package, never a skip: ``make test`` installs
the three (see the Makefile's ``brokers`` target).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import websockets
from conftest import Backend, free_port, wait_for_port

USER = "ocpp-edge"
PASSWORD = "s3cret-broker-pw"
KINDS = ("mosquitto", "rabbitmq", "nats")


def _binary(name: str, package: str, *candidates: str) -> str:
    for path in (shutil.which(name), *candidates):
        if path and os.access(path, os.X_OK):
            return path
    raise RuntimeError(f"{name} is not installed (Debian package {package}): run `make test`, "
                       "which installs it")


def _port_taken(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class TlsFiles(NamedTuple):
    """A broker's TLS listener: the CA that clients trust, the server certificate (for
    127.0.0.1 and localhost) and its key; made by ``ocpp-edge cert init``'s code."""

    ca: str
    cert: str
    key: str


def make_tls_files(directory: Path) -> TlsFiles:
    from ocpp_edge.tools import cert as certtool

    f = certtool.init(directory)
    return TlsFiles(f.ca_cert, f.server_cert, f.server_key)


class BrokerBase:
    """What the tests need of any broker: ``port`` (plain MQTT on 127.0.0.1), ``start``,
    ``stop``, ``restart``, ``kill`` and the broker's own ``log``."""

    kind = "?"
    start_timeout = 30.0

    def __init__(self, workdir: Path, tls: TlsFiles | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls = tls
        self.tls_port: int | None = free_port() if tls else None
        self.log = workdir / f"{self.kind}.log"
        self.proc: subprocess.Popen | None = None

    # -- subclasses ----------------------------------------------------------------------
    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    # -- life cycle ----------------------------------------------------------------------
    def start(self) -> BrokerBase:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env(), cwd=self.workdir,
                                         start_new_session=True)
        try:
            for port in dict.fromkeys((self.port, self.tls_port or self.port)):
                wait_for_port(port, timeout=self.start_timeout, proc=self.proc)
        except (RuntimeError, TimeoutError) as exc:
            self.kill()
            raise RuntimeError(f"{self.kind} did not start: {exc}\n{self.log_tail()}") from exc
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """A clean stop (SIGTERM), as ``systemctl stop`` does."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reap_group()
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reap_group()

    def _reap_group(self) -> None:
        # The broker's own children (RabbitMQ: the Erlang VM under its start script) are in
        # the session this object started, and only they are.
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def gateway_settings(self) -> str:
        """The gateway's ``mqtt.*`` lines for this broker."""
        return f"mqtt.username = {USER}\nmqtt.password = {PASSWORD}\n"

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class Mosquitto(BrokerBase):
    """Mosquitto 2.0 as Debian configures it in /etc/mosquitto/mosquitto.conf
    (``persistence true``), a password file, no anonymous access. Stock Debian does not set
    ``set_tcp_nodelay``; ``nodelay=True`` does (README "Supported brokers")."""

    kind = "mosquitto"
    start_timeout = 10.0

    def __init__(self, workdir: Path, tls: TlsFiles | None = None, *, nodelay: bool = False,
                 extra: str = "") -> None:
        super().__init__(workdir, tls)
        self.binary = _binary("mosquitto", "mosquitto", "/usr/sbin/mosquitto")
        passwd = _binary("mosquitto_passwd", "mosquitto", "/usr/bin/mosquitto_passwd")
        self.passwords = workdir / "passwords"
        subprocess.run([passwd, "-b", "-c", str(self.passwords), USER, PASSWORD], check=True,
                       capture_output=True)
        self.passwords.chmod(0o600)
        self.conf = workdir / "mosquitto.conf"
        conf = (f"listener {self.port} 127.0.0.1\nallow_anonymous false\n"
                f"password_file {self.passwords}\n"
                f"persistence true\npersistence_location {workdir}/\n"
                "max_queued_messages 100000\n")
        if os.geteuid() == 0:  # else mosquitto drops to its own user, who cannot read tmp
            conf += "user root\n"
        if nodelay:
            conf += "set_tcp_nodelay true\n"
        if tls:  # a second listener; users and anonymity are global (per_listener_settings)
            conf += (f"listener {self.tls_port} 127.0.0.1\ncafile {tls.ca}\n"
                     f"certfile {tls.cert}\nkeyfile {tls.key}\n")
        self.conf.write_text(conf + extra)

    def command(self) -> list[str]:
        return [self.binary, "-c", str(self.conf)]


class RabbitMQ(BrokerBase):
    """A private RabbitMQ node with the MQTT plugin: its own node name, Erlang
    distribution port, epmd (on a port of its own, so the system's epmd and node are
    untouched), Mnesia and log directories. AMQP is off; the first start takes about ten
    seconds (the MQTT plugin waits for cluster peers before electing itself), a restart
    a few."""

    kind = "rabbitmq"
    start_timeout = 90.0
    HOME = Path("/usr/lib/rabbitmq")

    def __init__(self, workdir: Path, tls: TlsFiles | None = None) -> None:
        super().__init__(workdir, tls)
        self.script = self.HOME / "bin" / "rabbitmq-server"
        if not os.access(self.script, os.X_OK):
            _binary("rabbitmq-server", "rabbitmq-server")  # raises, naming the package
            raise RuntimeError(f"{self.script} is missing: reinstall rabbitmq-server")
        self.epmd_binary = _binary("epmd", "erlang-base", "/usr/bin/epmd")
        self.epmd_port = free_port()
        self.dist_port = free_port()
        self.node = f"rabbit-test-{self.port}@localhost"
        (workdir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (workdir / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq's
        (workdir / "rabbitmq.conf").write_text(
            "listeners.tcp = none\n"
            f"mqtt.listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "mqtt.allow_anonymous = false\n"
            f"default_user = {USER}\ndefault_pass = {PASSWORD}\n"
            "loopback_users = none\n"
            + (f"mqtt.listeners.ssl.default = 127.0.0.1:{self.tls_port}\n"
               f"ssl_options.cacertfile = {tls.ca}\nssl_options.certfile = {tls.cert}\n"
               f"ssl_options.keyfile = {tls.key}\nssl_options.verify = verify_none\n"
               "ssl_options.fail_if_no_peer_cert = false\n" if tls else ""))
        self.epmd: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        w = self.workdir
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(w),  # the Erlang cookie
            "LANG": "C.UTF-8",
            "RABBITMQ_CONF_ENV_FILE": str(w / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(free_port()),  # AMQP, switched off in rabbitmq.conf
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(w / "mnesia"),
            "RABBITMQ_LOG_BASE": str(w / "log"),
            "RABBITMQ_LOGS": "-",
            "RABBITMQ_CONFIG_FILE": str(w / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(w / "enabled_plugins"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(w / "plugins-expand"),
        }

    def command(self) -> list[str]:
        return [str(self.script)]

    def start(self) -> RabbitMQ:
        if self.epmd is None or self.epmd.poll() is not None:
            # Ours, in the foreground: the node would otherwise start a daemonized epmd
            # that outlives the test.
            assert not _port_taken(self.epmd_port)
            self.epmd = subprocess.Popen(
                [self.epmd_binary, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            wait_for_port(self.epmd_port, proc=self.epmd)
        super().start()
        return self

    def close(self) -> None:
        self.stop()
        if self.epmd is not None and self.epmd.poll() is None:
            self.epmd.terminate()
            self.epmd.wait(timeout=10)
        self.epmd = None


class Nats(BrokerBase):
    """nats-server 2.9 with JetStream (required by its MQTT mode) and an MQTT listener;
    the NATS client port is a free port too (the system's nats-server has 4222). NATS has
    one MQTT listener: with ``tls`` it speaks only TLS (``port`` is ``tls_port``)."""

    kind = "nats"
    start_timeout = 20.0

    def __init__(self, workdir: Path, tls: TlsFiles | None = None, *,
                 ack_wait: str | None = None) -> None:
        super().__init__(workdir, tls)
        if tls:
            self.tls_port = self.port
        self.binary = _binary("nats-server", "nats-server", "/usr/sbin/nats-server")
        self.nats_port = free_port()
        self.conf = workdir / "nats.conf"
        self.conf.write_text(
            f'server_name: "test-{self.port}"\n'
            f'listen: "127.0.0.1:{self.nats_port}"\n'
            f'jetstream {{ store_dir: "{workdir / "jetstream"}" }}\n'
            f'mqtt {{\n  listen: "127.0.0.1:{self.port}"\n'
            + (f'  ack_wait: "{ack_wait}"\n' if ack_wait else "")
            + (f'  tls {{\n    cert_file: "{tls.cert}"\n    key_file: "{tls.key}"\n  }}\n'
               if tls else "") + "}\n"
            f'authorization {{ user: "{USER}", password: "{PASSWORD}" }}\n')

    def command(self) -> list[str]:
        return [self.binary, "-c", str(self.conf)]


def make_broker(kind: str, workdir: Path, tls: TlsFiles | None = None,
                **options) -> BrokerBase:
    return {"mosquitto": Mosquitto, "rabbitmq": RabbitMQ, "nats": Nats}[kind](
        workdir, tls, **options)


# --- an MQTT client for the tests' backends ------------------------------------------------

class Client(Backend):
    """A test backend (conftest.Backend) with the broker's credentials, on its TLS port with
    ``tls``. With ``clean_session=False`` its session and subscriptions live on at the
    broker while it is away, as a backend's should."""

    def __init__(self, broker: BrokerBase, subscriptions: list[str], *,
                 client_id: str | None = None, clean_session: bool = True,
                 answer=None, tls: bool = False) -> None:
        if tls:
            assert broker.tls is not None and broker.tls_port is not None
        super().__init__(broker.tls_port if tls else broker.port, subscriptions,
                         session=None if clean_session else client_id, client_id=client_id,
                         answer=answer, credentials=(USER, PASSWORD),
                         tls_ca=broker.tls.ca if tls else None)


def forget_session(broker: BrokerBase, client_id: str) -> None:
    """End a persistent session at the broker (connect once with a clean session)."""
    c = Client(broker, [], client_id=client_id, clean_session=True)
    c.close()


# --- a broker restart while messages flow (tests/test_brokers.py, tests/broker_bench.py) --

def metrics(port: int) -> dict[str, float]:
    """The gateway's /metrics (admin endpoint on 127.0.0.1:``port``), unlabelled series."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(r"^(\w+) ([0-9.e+-]+)$", text, re.M)}


def wait_drained(admin_port: int, timeout: float = 60.0) -> None:
    """Until the gateway is connected and its buffer is empty: every message it accepted
    has been acknowledged by a broker (PUBACK)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(admin_port)
        if m.get("ocpp_edge_upstream_connected") == 1 and m.get("ocpp_edge_buffer_messages") == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the gateway's buffer did not drain: {m}")
        time.sleep(0.1)


def _wait_for(cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.01)


@dataclass
class Flow:
    """What :func:`restart_while_flowing` saw: heartbeat numbers sent by the charge point
    (with when, ``time.monotonic()``), received by the backend (in arrival order, with
    any duplicates), and when the broker was told to stop, had stopped, was running again."""

    sent_at: dict[int, float] = field(default_factory=dict)
    got: list[int] = field(default_factory=list)
    dup: list[bool] = field(default_factory=list)  # got[i] came with the DUP flag
    stop_at: float = 0.0
    stopped_at: float = 0.0
    started_at: float = 0.0

    @property
    def sent(self) -> list[int]:
        return list(self.sent_at)

    @property
    def firsts(self) -> list[int]:
        return list(dict.fromkeys(self.got))

    @property
    def late(self) -> list[int]:
        """Messages whose first copy came after a later message: a redelivery (DUP) of a
        message the broker had sent before, held back until its ack wait ran out."""
        out, highest = [], -1
        for i in self.firsts:
            if i < highest:
                out.append(i)
            highest = max(highest, i)
        return out

    @property
    def first_dup(self) -> set[int]:
        """Messages whose first copy was flagged DUP."""
        seen: set[int] = set()
        out = set()
        for i, dup in zip(self.got, self.dup, strict=True):
            if i not in seen and dup:
                out.add(i)
            seen.add(i)
        return out

    @property
    def lost(self) -> list[int]:
        return sorted(set(self.sent_at) - set(self.got))

    @property
    def duplicates(self) -> int:
        return len(self.got) - len(set(self.got))

    def offsets_ms(self, ids: list[int]) -> list[float]:
        """When each of ``ids`` was sent, in ms relative to the stop signal."""
        return [round((self.sent_at[i] - self.stop_at) * 1000, 1) for i in ids]

    def summary(self) -> str:
        lost = self.lost
        runs: list[list[int]] = []
        for i in lost:
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        where = ", ".join(
            f"{r[0]}-{r[-1]} (sent {self.offsets_ms([r[0]])[0]} to "
            f"{self.offsets_ms([r[-1]])[0]} ms from the stop signal)" for r in runs[:5])
        late = self.late
        return (f"sent {len(self.sent_at)}, received {len(self.got)} "
                f"({self.duplicates} duplicates), lost {len(lost)}"
                + (f": {where}" if lost else "")
                + (f"; {len(late)} out of order (redelivered late): {late[:20]}"
                   if late else ""))


def restart_while_flowing(broker: BrokerBase, gateway_url: str, admin_port: int, cid: str,
                          *, interval: float = 0.002, outage_interval: float = 0.02,
                          backend_away: bool = False, kill: bool = False,
                          quiet: float = 3.0) -> Flow:
    """A charge point ``cid`` sends a Heartbeat every ``interval`` throughout (every
    ``outage_interval`` once the broker has stopped, until it runs again); a backend
    with a persistent session (QoS 1) receives them, and paho reconnects it when the broker
    is back (``backend_away``: it disconnects after 30 messages and comes back at the end,
    as a backend restarted with its broker would). After 60 messages the broker is stopped
    (SIGTERM, as ``systemctl stop`` does; ``kill``: SIGKILL, a crash), after 90 it is
    started again, and 40 more follow. Once the gateway's buffer is empty every message
    was acknowledged by a broker (PUBACK); then the backend collects until it has all of
    them or nothing new came for ``quiet`` seconds. The gateway must have
    ``admin.listen = 127.0.0.1:<admin_port>``."""
    topic = f"ocpp/cp/{cid}"
    backend_id = f"test-be-{cid}-{os.getpid()}"
    backend = Client(broker, [topic], client_id=backend_id, clean_session=False)
    flow = Flow()
    more = threading.Event()

    async def charge_point():
        async with websockets.connect(f"{gateway_url}/{cid}", subprotocols=["ocpp1.6"]) as ws:
            i, end = 0, None
            while end is None or i < end:
                if end is None and more.is_set():
                    end = i + 40
                await ws.send(f'[2,"h{i}","Heartbeat",{{}}]')
                flow.sent_at[i] = time.monotonic()
                i += 1
                down = flow.stopped_at and not flow.started_at
                await asyncio.sleep(outage_interval if down else interval)

    def operator():
        _wait_for(lambda: len(flow.sent_at) >= 30)
        if backend_away:
            backend.close()  # its session, and what it subscribed to, stay at the broker
        _wait_for(lambda: len(flow.sent_at) >= 60)
        flow.stop_at = time.monotonic()
        broker.kill() if kill else broker.stop()
        flow.stopped_at = time.monotonic()
        _wait_for(lambda: len(flow.sent_at) >= 90)
        broker.start()
        flow.started_at = time.monotonic()

    async def scenario():
        cp = asyncio.create_task(charge_point())
        await asyncio.get_running_loop().run_in_executor(None, operator)
        more.set()
        await cp

    def take(messages) -> None:
        for m in messages:
            if m.topic == topic and isinstance(m.body, dict):
                flow.got.append(int(m.body["UniqueId"][1:]))
                flow.dup.append(m.dup)

    try:
        asyncio.run(scenario())
        wait_drained(admin_port)
        if backend_away:
            take(backend.drain())
            backend = Client(broker, [topic], client_id=backend_id, clean_session=False)
        last = time.monotonic()
        while set(flow.sent_at) - set(flow.got) and time.monotonic() - last < quiet:
            if new := backend.drain(0.1):
                take(new)
                last = time.monotonic()
        take(backend.drain())
    finally:
        backend.close()
        if broker.running:
            forget_session(broker, backend_id)
    return flow
