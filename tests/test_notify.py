"""The service manager's side of sd_notify(3), played for real.

A bound ``AF_UNIX``/``SOCK_DGRAM`` socket — at a filesystem path and in the abstract
namespace (``@name``), the two forms ``NOTIFY_SOCKET`` takes — receives what the gateway
sends, read by a thread that stamps each datagram with its arrival time. The tests check
the exact datagrams, the watchdog rhythm on a running asyncio loop (and its silence while
the loop is stuck), and, at the end, the daemon itself started as ``python -m ocpp_edge``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import free_port
from websockets.sync.client import connect as ws_connect

from ocpp_edge.daemon.notify import Notifier

ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class ServiceManager:
    """The receiving end of ``NOTIFY_SOCKET``. ``received`` holds (arrival, datagram)."""

    def __init__(self, kind: str, directory: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if kind == "path":
            self.address = str(directory / "notify")
            self.sock.bind(self.address)
        else:
            name = f"ocpp-edge-test/{os.getpid()}/{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        self.received: list[tuple[float, bytes]] = []
        self.on_datagram: Callable[[str], None] | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> ServiceManager:
        self.sock.settimeout(0.02)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            if self.on_datagram is not None:
                self.on_datagram(data.decode())
            with self._cond:
                self.received.append((now, data))
                self._cond.notify_all()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.sock.close()

    def datagrams(self) -> list[bytes]:
        with self._cond:
            return [d for _, d in self.received]

    def messages(self) -> list[str]:
        return [d.decode() for d in self.datagrams()]

    def times(self, message: bytes) -> list[float]:
        with self._cond:
            return [t for t, d in self.received if d == message]

    def wait_for(self, predicate: Callable[[str], bool], after: int = 0,
                 timeout: float = 10.0) -> int:
        """Index of the first message at or after ``after`` that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(after, len(self.received)):
                    if predicate(self.received[i][1].decode()):
                        return i
                left = deadline - time.monotonic()
                if left <= 0:
                    got = [d.decode() for _, d in self.received[after:]]
                    raise AssertionError(f"no matching notification in {timeout} s; got {got}")
                self._cond.wait(left)

    def settle(self, quiet: float = 0.1) -> list[bytes]:
        """Everything received, once nothing has arrived for ``quiet`` seconds."""
        while True:
            n = len(self.datagrams())
            time.sleep(quiet)
            if len(self.datagrams()) == n:
                return self.datagrams()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # A socket path must fit in sun_path (108 bytes); pytest's tmp_path may not.
    with tempfile.TemporaryDirectory(prefix="oe-notify-") as d:
        yield Path(d)


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture(params=["path", "abstract"])
def manager(request, short_dir, clean_env) -> Iterator[ServiceManager]:
    m = ServiceManager(request.param, short_dir).start()
    clean_env.setenv("NOTIFY_SOCKET", m.address)
    yield m
    m.close()


@pytest.fixture
def notifiers() -> Iterator[list[Notifier]]:
    made: list[Notifier] = []
    yield made
    for n in made:
        n.close()


@pytest.fixture
def make_notifier(notifiers) -> Callable[[], Notifier]:
    def make() -> Notifier:
        n = Notifier()
        notifiers.append(n)
        return n
    return make


class Blocked(BaseException):
    """Raised by the alarm when a call that must not block did (not an Exception, so the
    code under test cannot swallow it)."""


@contextmanager
def must_not_block(seconds: float):
    def fire(signum, frame):
        raise Blocked(f"blocked for more than {seconds} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_loop(body: Callable[[Notifier, asyncio.AbstractEventLoop], object], n: Notifier):
    async def main():
        result = body(n, asyncio.get_running_loop())
        if asyncio.iscoroutine(result):
            await result
    asyncio.run(main())


# -- the datagrams ---------------------------------------------------------------------------


def test_ready_status_stopping_watchdog_datagrams(manager, make_notifier):
    n = make_notifier()
    assert n.enabled
    n.ready("starting")
    n.ready()
    n.status("0 charge points")
    n.status("0 charge points")  # unchanged: not sent again
    n.status("1 charge point")
    n.status("1 charge point")
    n.status("0 charge points")  # changed back: sent
    n.watchdog()
    n.stopping()
    n.stopping("stopping: closing 3 connections")
    assert manager.settle() == [
        b"READY=1\nSTATUS=starting",
        b"READY=1",
        b"STATUS=0 charge points",
        b"STATUS=1 charge point",
        b"STATUS=0 charge points",
        b"WATCHDOG=1",
        b"STOPPING=1",
        b"STOPPING=1\nSTATUS=stopping: closing 3 connections",
    ]


def test_status_given_with_ready_counts_for_deduplication(manager, make_notifier):
    n = make_notifier()
    n.ready("running")
    n.status("running")
    n.status("busy")
    assert manager.settle() == [b"READY=1\nSTATUS=running", b"STATUS=busy"]


def test_status_is_one_line_of_utf8(manager, make_notifier):
    n = make_notifier()
    n.status("Ladepunkt Süd: 1 € pro kWh\nsecond line\r\nthird")
    assert manager.settle() == ["STATUS=Ladepunkt Süd: 1 € pro kWh second line third".encode()]


def test_reloading_then_ready(manager, make_notifier):
    n = make_notifier()
    n.ready("running")
    before = time.monotonic()
    n.reloading()
    after = time.monotonic()
    n.ready("running, configuration reloaded")
    got = manager.settle()
    assert got[0] == b"READY=1\nSTATUS=running"
    m = re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=(\d+)", got[1])
    assert m, got[1]
    # CLOCK_MONOTONIC in microseconds, as time.monotonic() reads it on Linux.
    assert before * 1e6 - 1000 <= int(m.group(1)) <= after * 1e6 + 1000
    assert got[2:] == [b"READY=1\nSTATUS=running, configuration reloaded"]


def test_reloading_with_status(manager, make_notifier):
    n = make_notifier()
    n.reloading("reloading /etc/ocpp-edge.conf")
    (got,) = manager.settle()
    assert re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=\d+\nSTATUS=reloading /etc/ocpp-edge.conf",
                        got), got


# -- the watchdog ----------------------------------------------------------------------------


def test_watchdog_pings_at_half_the_interval_from_the_loop(manager, clean_env, make_notifier):
    clean_env.setenv("WATCHDOG_USEC", "200000")
    n = make_notifier()
    assert n.watchdog_interval == pytest.approx(0.1)
    marks = {}

    async def body(n, loop):
        marks["start"] = time.monotonic()
        assert n.start_watchdog() is True
        assert n.start_watchdog() is True  # a second call does not double the pings
        await asyncio.sleep(1.0)
        n.stop_watchdog()
        marks["stop"] = time.monotonic()
        await asyncio.sleep(0.4)

    run_loop(body, n)
    pings = manager.times(b"WATCHDOG=1")
    assert pings[0] - marks["start"] < 0.05  # the first ping goes out at once
    assert 8 <= len(pings) <= 12, pings
    gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
    assert 0.08 <= statistics.median(gaps) <= 0.13, gaps
    assert max(gaps) < 0.2, gaps  # always well within WATCHDOG_USEC
    assert all(t <= marks["stop"] + 0.05 for t in pings), "pings after stop_watchdog()"
    assert set(manager.datagrams()) == {b"WATCHDOG=1"}


def test_a_stuck_loop_sends_no_pings(manager, clean_env, make_notifier):
    clean_env.setenv("WATCHDOG_USEC", "200000")
    n = make_notifier()
    block = {}

    def stuck():
        block["start"] = time.monotonic()
        time.sleep(0.6)  # three times WATCHDOG_USEC/2 … and longer than WATCHDOG_USEC
        block["end"] = time.monotonic()

    async def body(n, loop):
        n.start_watchdog()
        await asyncio.sleep(0.35)
        loop.call_soon(stuck)
        await asyncio.sleep(0)  # stuck() runs in this turn of the loop
        await asyncio.sleep(0.35)
        n.stop_watchdog()

    run_loop(body, n)
    pings = manager.times(b"WATCHDOG=1")
    # A ping sent just before the block may be stamped a moment after it began.
    during = [t for t in pings if block["start"] + 0.05 < t < block["end"]]
    assert during == [], f"pings while the loop was stuck: {during}"
    before = [t for t in pings if t <= block["start"] + 0.05]
    after = [t for t in pings if t >= block["end"]]
    assert len(before) >= 3 and len(after) >= 2, (before, after)  # and they resume
    assert after[0] - before[-1] >= 0.55


@pytest.mark.parametrize("usec, pid, interval", [
    ("300000", "self", 0.15),
    ("300000", None, 0.15),  # sd_watchdog_enabled(3): no WATCHDOG_PID → it is ours
    ("300000", "other", None),  # inherited from a parent: not ours
    ("300000", "garbage", None),
    ("0", "self", None),
    ("-5", None, None),
    ("abc", None, None),
    (None, "self", None),
], ids=["pid-matches", "no-pid", "pid-mismatch", "pid-garbage", "zero", "negative",
        "usec-garbage", "no-usec"])
def test_watchdog_enabled_only_for_this_process(manager, clean_env, make_notifier, usec, pid,
                                                interval):
    if usec is not None:
        clean_env.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        clean_env.setenv("WATCHDOG_PID", {"self": str(os.getpid()), "other": "1"}.get(pid, pid))
    n = make_notifier()
    assert n.watchdog_interval == (pytest.approx(interval) if interval else None)
    started = {}

    async def body(n, loop):
        started["ok"] = n.start_watchdog()
        await asyncio.sleep(0.4)
        n.stop_watchdog()

    run_loop(body, n)
    pings = manager.times(b"WATCHDOG=1")
    if interval:
        assert started["ok"] is True and len(pings) >= 2, pings
    else:
        assert started["ok"] is False and pings == []


# -- environment, absence, failures ----------------------------------------------------------


def test_environment_is_read_once_and_not_inherited(manager, clean_env, make_notifier):
    clean_env.setenv("WATCHDOG_USEC", "30000000")
    clean_env.setenv("WATCHDOG_PID", str(os.getpid()))
    n = make_notifier()
    assert not any(name in os.environ for name in ENV)
    child = subprocess.run(
        [sys.executable, "-c", f"import os; print([n for n in {ENV!r} if n in os.environ])"],
        capture_output=True, text=True, check=True)
    assert child.stdout.strip() == "[]"
    # The notifier kept what it read.
    assert n.enabled and n.watchdog_interval == pytest.approx(15.0)
    n.ready()
    # A second notifier finds nothing, as sd_notify(3) with unset_environment describes.
    second = make_notifier()
    assert not second.enabled
    second.ready()
    assert manager.settle() == [b"READY=1"]


def test_no_notify_socket_is_a_silent_no_op(clean_env, make_notifier, caplog):
    clean_env.setenv("WATCHDOG_USEC", "100000")
    caplog.set_level(logging.DEBUG)
    fds = len(os.listdir("/proc/self/fd"))
    n = make_notifier()
    assert not n.enabled and n.watchdog_interval is None
    started = {}

    async def body(n, loop):
        started["ok"] = n.start_watchdog()
        n.ready("running")
        n.status("x")
        n.reloading()
        n.ready()
        n.watchdog()
        n.stopping()
        n.stop_watchdog()

    run_loop(body, n)
    assert started["ok"] is False
    assert len(os.listdir("/proc/self/fd")) == fds  # no socket opened
    assert [r for r in caplog.records if r.name.startswith("ocpp_edge")] == []


@pytest.mark.parametrize("address", ["/nonexistent/notify", "vsock:2:1234", "@"])
def test_unusable_notify_socket_warns_once(clean_env, make_notifier, caplog, address):
    clean_env.setenv("NOTIFY_SOCKET", address)
    caplog.set_level(logging.DEBUG, logger="ocpp_edge.notify")
    n = make_notifier()
    assert not n.enabled
    n.ready("running")
    n.status("x")
    n.watchdog()
    n.stopping()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and address in warnings[0].getMessage()


def test_send_failure_is_logged_once_and_never_raises(manager, make_notifier, caplog):
    caplog.set_level(logging.DEBUG, logger="ocpp_edge.notify")
    n = make_notifier()
    n.ready("running")
    manager.settle()
    manager.close()  # the service manager's socket is gone
    if not manager.address.startswith("@"):
        os.unlink(manager.address)
    for i in range(5):
        n.status(f"status {i}")
        n.watchdog()
        n.reloading()
        n.ready()
    n.stopping()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert manager.address in warnings[0].getMessage()


def test_a_full_queue_neither_blocks_nor_loses_state(short_dir, clean_env, make_notifier):
    # Linux queues only net.unix.max_dgram_qlen unread datagrams per receiver.
    qlen = int(Path("/proc/sys/net/unix/max_dgram_qlen").read_text())
    slow = ServiceManager("path", short_dir)  # not reading yet
    clean_env.setenv("NOTIFY_SOCKET", slow.address)
    n = make_notifier()
    statuses = [f"status {i}" for i in range(min(qlen + 20, 60))]

    async def body(n, loop):
        with must_not_block(2.0):
            for text in statuses:
                n.status(text)
                n.watchdog()  # a ping that finds the queue full is dropped
            n.ready("running")
        slow.start()  # the service manager catches up
        await asyncio.sleep(1.0)

    try:
        run_loop(body, n)
        got = [d for d in slow.datagrams() if d != b"WATCHDOG=1"]
    finally:
        slow.close()
    assert got == [f"STATUS={t}".encode() for t in statuses] + [b"READY=1\nSTATUS=running"]


# -- the daemon, end to end ------------------------------------------------------------------
#
# The gateway started as systemd would: NOTIFY_SOCKET and WATCHDOG_USEC in its environment.
# No broker is running (the upstream link stays down and messages wait in the buffer).

CHARGE_POINTS = re.compile(r"\b(\d+) charge points?\b")
BUFFERED = re.compile(r"\b(\d+) messages? buffered\b")
UPSTREAM_DOWN = re.compile(
    r"\bupstream\b[^,;]*?\b(disconnected|connecting|reconnecting|down|unreachable|offline)\b",
    re.IGNORECASE)
RELOAD_FAILED = re.compile(r"\breload failed\b", re.IGNORECASE)
OLD_CONFIG = re.compile(r"\b(old|previous)\b[^,;]*?\bconfiguration\b", re.IGNORECASE)


def status_of(message: str) -> str | None:
    for line in message.split("\n"):
        if line.startswith("STATUS="):
            return line[len("STATUS="):]
    return None


def has(message: str, assignment: str) -> bool:
    return assignment in message.split("\n")


def last_status(manager: ServiceManager) -> str | None:
    found = [s for s in map(status_of, manager.messages()) if s is not None]
    return found[-1] if found else None


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_daemon_notifies_the_service_manager(manager, clean_env, make_gateway):
    watchdog_usec = 1_000_000
    gw = make_gateway(free_port(), start=False)
    clean_env.setenv("WATCHDOG_USEC", str(watchdog_usec))  # gw.start() passes os.environ on
    ready_probe: list[bool] = []

    def on_datagram(message: str) -> None:
        if has(message, "READY=1") and not ready_probe:
            ready_probe.append(port_accepts(gw.port))  # at the moment READY=1 arrives

    manager.on_datagram = on_datagram
    gw.start()

    # Start-up: READY=1 once charge points can connect, then a STATUS= kept current.
    first_ready = manager.wait_for(lambda m: has(m, "READY=1"))
    assert ready_probe == [True], "READY=1 arrived before the listener accepted connections"
    early = manager.messages()[:first_ready]
    assert not any(has(m, "RELOADING=1") or has(m, "STOPPING=1") for m in early), early

    def idle_status(m: str) -> bool:
        s = status_of(m)
        return bool(s and (c := CHARGE_POINTS.search(s)) and c.group(1) == "0"
                    and UPSTREAM_DOWN.search(s) and BUFFERED.search(s))
    manager.wait_for(idle_status)

    # Watchdog pings from the daemon's loop, within WATCHDOG_USEC of each other.
    first_ping = manager.wait_for(lambda m: m == "WATCHDOG=1")
    manager.wait_for(lambda m: m == "WATCHDOG=1", after=first_ping + 1)

    # A charge point connects and sends a message that must wait for the broker.
    with ws_connect(f"{gw.url}/CP1", subprotocols=["ocpp1.6"], open_timeout=5) as ws:
        ws.send('[2,"boot-1","BootNotification",'
                '{"chargePointVendor":"V","chargePointModel":"M"}]')

        def one_cp_one_buffered(m: str) -> bool:
            s = status_of(m)
            return bool(s and (c := CHARGE_POINTS.search(s)) and c.group(1) == "1"
                        and (b := BUFFERED.search(s)) and b.group(1) == "1")
        manager.wait_for(one_cp_one_buffered)

    # SIGHUP with a valid file: RELOADING=1 (with MONOTONIC_USEC=), then READY=1.
    mark = len(manager.messages())
    gw.proc.send_signal(signal.SIGHUP)
    reloading = manager.wait_for(lambda m: has(m, "RELOADING=1"), after=mark)
    assert re.search(r"^MONOTONIC_USEC=\d+$", manager.messages()[reloading], re.M)
    manager.wait_for(lambda m: has(m, "READY=1"), after=reloading)

    # SIGHUP after the file was made invalid: the old configuration stays, and says so.
    with open(gw.config, "a") as f:
        f.write("mqtt.keepalve = 30s\n")
    mark = len(manager.messages())
    gw.proc.send_signal(signal.SIGHUP)
    reloading = manager.wait_for(lambda m: has(m, "RELOADING=1"), after=mark)
    ready = manager.wait_for(lambda m: has(m, "READY=1"), after=reloading)
    failed = status_of(manager.messages()[ready])
    assert failed and RELOAD_FAILED.search(failed) and OLD_CONFIG.search(failed), \
        f"READY=1 after a failed reload must carry STATUS= saying so: {failed!r}"
    time.sleep(1.5)  # still what `systemctl status` shows a moment later
    later = last_status(manager)
    assert later and RELOAD_FAILED.search(later), later
    assert port_accepts(gw.port) and gw.proc.poll() is None

    # All along, the pings kept coming.
    pings = manager.times(b"WATCHDOG=1")
    gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
    assert len(pings) >= 4 and max(gaps) < watchdog_usec / 1e6, gaps

    # SIGTERM: STOPPING=1, exit 0.
    mark = len(manager.messages())
    assert gw.stop() == 0, gw.log_text()[-3000:]
    manager.wait_for(lambda m: has(m, "STOPPING=1"), after=mark, timeout=2)
