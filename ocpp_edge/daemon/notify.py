"""Telling the service manager how the gateway is doing: readiness, status, watchdog.

Under systemd (``Type=notify``), the gateway reports over the datagram socket named by
``NOTIFY_SOCKET`` (sd_notify(3)): ``READY=1`` once charge points can connect, a ``STATUS=``
line that ``systemctl status`` shows, ``RELOADING=1`` … ``READY=1`` around a reload,
``STOPPING=1`` when it shuts down, and ``WATCHDOG=1`` pings (systemd.service(5),
``WatchdogSec=``). Messages go out through the ``sdnotify`` library.

Decisions, and why:

* **Read once, then unset.** The environment (``NOTIFY_SOCKET``, ``WATCHDOG_USEC``,
  ``WATCHDOG_PID``) is read when the :class:`Notifier` is made and then removed from
  ``os.environ``: the ``unset_environment`` behaviour of sd_notify(3) and
  sd_watchdog_enabled(3). Child processes the gateway starts (``getent`` for DNS) must not
  talk to the service manager in its name, and with ``NotifyAccess=main`` systemd would
  log a complaint for every message they sent. So make exactly one Notifier, early in
  start-up, before any child process runs; a second one finds nothing and stays silent.
* **Outside systemd, nothing happens.** Without ``NOTIFY_SOCKET`` (run from a shell, in a
  container, in tests) every method returns at once: no socket, no timer, no log line.
* **Never raise, never block.** A notification must not take the gateway down or stall
  its event loop. Failures are logged once (warning), later ones at debug level. The
  socket is non-blocking: Linux queues only ``net.unix.max_dgram_qlen`` unread datagrams
  per receiving socket (the kernel's default is 10, and one socket serves every service
  of the service manager), and a blocking send to a full queue would freeze every charge
  point until the service manager reads. A state
  message that meets a full queue (``READY=1``, ``RELOADING=1``, ``STOPPING=1``,
  ``STATUS=``) is kept and sent again from the event loop a moment later, in order; a
  watchdog ping is simply dropped, the next one follows at half the timeout anyway.
* **Watchdog pings come from the event loop itself** (``loop.call_later``), never from a
  thread: if the loop is stuck, the pings stop, and systemd restarts the gateway after
  ``WatchdogSec=``. They are sent every half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3)
  recommends, and only when ``WATCHDOG_PID`` is unset or names this process.
* **Text is UTF-8.** The service manager reads ``STATUS=`` as UTF-8, while sdnotify encodes
  text as latin-1 (and fails on anything else); the text is handed over so that sdnotify's
  encoding yields the UTF-8 bytes. Newlines would start a new assignment, so they become
  spaces.
* **sdnotify versions.** Debian bookworm's python3-sdnotify 0.3.1 and the newest release,
  0.3.2, are the same code: both map an abstract socket name (``@name``) to ``\\0name``,
  so no work-around is needed, and both connect once, when constructed. An address that is
  neither an absolute path nor ``@name`` (e.g. ``vsock:``, for a service manager outside a
  VM) is beyond sdnotify: the gateway says so once and sends nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import warnings

import sdnotify

log = logging.getLogger("ocpp_edge.notify")

RETRY_DELAY = 0.05  # seconds before a state message that met a full queue is sent again
MAX_PENDING = 64  # state messages kept while the queue is full; more are dropped


class Notifier:
    """The gateway's side of sd_notify(3); cheap no-ops when not run by a service manager."""

    def __init__(self) -> None:
        self.address: str | None = None  # NOTIFY_SOCKET as given, for log lines
        self.watchdog_usec: int | None = None  # WATCHDOG_USEC, when it applies to us
        self._sd: sdnotify.SystemdNotifier | None = None
        self._status: str | None = None  # last STATUS= the service manager accepted
        self._pending: list[str] = []  # state messages waiting for room in the queue
        self._retry: asyncio.TimerHandle | None = None
        self._ping: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._warned = False

        address = os.environ.pop("NOTIFY_SOCKET", None)
        usec = os.environ.pop("WATCHDOG_USEC", None)
        pid = os.environ.pop("WATCHDOG_PID", None)
        if not address:
            return
        self.address = address
        if not address.startswith(("/", "@")):
            self._warn_once("unsupported NOTIFY_SOCKET address %r; not notifying the "
                            "service manager", address)
            return
        # sdnotify reads the address from the environment and connects right away.
        os.environ["NOTIFY_SOCKET"] = address
        try:
            with warnings.catch_warnings():
                # On failure sdnotify drops its socket unclosed; the error is reported below.
                warnings.simplefilter("ignore", ResourceWarning)
                self._sd = sdnotify.SystemdNotifier(debug=True)
            self._sd.socket.setblocking(False)
        except Exception as exc:
            self._sd = None
            self._warn_once("cannot reach the service manager at %s: %s", address, exc)
            return
        finally:
            del os.environ["NOTIFY_SOCKET"]
        self.watchdog_usec = _watchdog_usec(usec, pid)
        log.debug("notifying the service manager at %s%s", address,
                  f"; watchdog ping every {self.watchdog_interval:.3g} s"
                  if self.watchdog_interval else "")

    @property
    def enabled(self) -> bool:
        """True when a service manager listens (``NOTIFY_SOCKET`` was usable)."""
        return self._sd is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings: half of ``WATCHDOG_USEC``, or None."""
        if self._sd is None or self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2 / 1_000_000

    # -- state ---------------------------------------------------------------------------

    def ready(self, status: str | None = None) -> None:
        """``READY=1``: start-up (or a reload) is complete; systemd.service(5) ``Type=notify``
        marks the unit active only now, so call it once charge points can connect."""
        self._state("READY=1", status)

    def status(self, text: str) -> None:
        """``STATUS=<text>`` for ``systemctl status``, sent only when the text changed, so it
        can be called on every event without flooding the service manager."""
        if self._sd is None or _clean(text) == self._status:
            return
        self._state(None, text)

    def reloading(self, status: str | None = None) -> None:
        """``RELOADING=1`` with ``MONOTONIC_USEC=`` (CLOCK_MONOTONIC, µs). systemd ≥ 253
        requires the timestamp for ``Type=notify-reload`` (sd_notify(3)); older versions
        ignore it. Follow with :meth:`ready` once the reload is done, failed or not."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._state(f"RELOADING=1\nMONOTONIC_USEC={usec}", status)

    def stopping(self, status: str | None = None) -> None:
        """``STOPPING=1``: shutting down on purpose, so the service manager shows the unit
        as deactivating instead of waiting for it to die."""
        self._state("STOPPING=1", status)

    def watchdog(self) -> None:
        """One ``WATCHDOG=1`` ping (systemd.service(5) ``WatchdogSec=``)."""
        if self._sd is not None:
            self._send("WATCHDOG=1", keep=False)

    # -- watchdog ------------------------------------------------------------------------

    def start_watchdog(self, loop: asyncio.AbstractEventLoop | None = None) -> bool:
        """Ping now and then every half of ``WATCHDOG_USEC`` from ``loop`` (default: the
        running loop). Returns False, doing nothing, when no watchdog is asked for."""
        interval = self.watchdog_interval
        if interval is None:
            return False
        if self._ping is None:
            self._loop = loop if loop is not None else asyncio.get_running_loop()
            self._tick()
        return True

    def stop_watchdog(self) -> None:
        if self._ping is not None:
            self._ping.cancel()
            self._ping = None

    def _tick(self) -> None:
        self.watchdog()
        assert self._loop is not None and self.watchdog_interval is not None
        self._ping = self._loop.call_later(self.watchdog_interval, self._tick)

    def close(self) -> None:
        """Stop the pings and the retries, and close the socket."""
        self.stop_watchdog()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._pending.clear()
        if self._sd is not None:
            self._sd.socket.close()
            self._sd = None

    # -- sending -------------------------------------------------------------------------

    def _state(self, head: str | None, status: str | None) -> None:
        if self._sd is None:
            return
        lines = [head] if head else []
        if status is not None:
            status = _clean(status)
            lines.append(f"STATUS={status}")
        message = "\n".join(lines)
        if self._pending:  # keep the order: behind what is already waiting
            self._queue(message)
            if self._retry is None:  # no loop ran the retry yet: try now
                self._flush()
            return
        if self._send(message, keep=True) and status is not None:
            self._status = status

    def _send(self, message: str, keep: bool) -> bool:
        """One datagram. True if sent; False if it failed (logged) or was queued (keep)."""
        assert self._sd is not None
        try:
            # sdnotify encodes latin-1: this yields the UTF-8 bytes of the text.
            self._sd.notify(message.encode("utf-8").decode("latin-1"))
            return True
        except BlockingIOError:
            if keep:
                self._queue(message)
            else:
                log.debug("service manager queue full; %s dropped", message)
            return False
        except Exception as exc:
            self._warn_once("cannot notify the service manager at %s: %s", self.address, exc)
            return False

    def _queue(self, message: str) -> None:
        if len(self._pending) >= MAX_PENDING:
            log.debug("service manager queue full; %r dropped", message)
            return
        self._pending.append(message)
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        if self._retry is not None:
            return
        loop = self._loop
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            pass
        if loop is None or loop.is_closed():
            return  # no loop yet: the next message sends the pending ones first
        self._retry = loop.call_later(RETRY_DELAY, self._flush)

    def _flush(self) -> None:
        self._retry = None
        while self._pending and self._sd is not None:
            message = self._pending[0]
            try:
                self._sd.notify(message.encode("utf-8").decode("latin-1"))
            except BlockingIOError:
                self._schedule_retry()
                return
            except Exception as exc:
                self._warn_once("cannot notify the service manager at %s: %s",
                                self.address, exc)
            else:
                status = _status_of(message)
                if status is not None:
                    self._status = status
            self._pending.pop(0)

    def _warn_once(self, fmt: str, *args: object) -> None:
        (log.debug if self._warned else log.warning)(fmt, *args)
        self._warned = True


def _watchdog_usec(usec: str | None, pid: str | None) -> int | None:
    """sd_watchdog_enabled(3): ``WATCHDOG_USEC`` applies only if ``WATCHDOG_PID`` is unset
    or names this process (it may have been inherited from a parent)."""
    if not usec:
        return None
    try:
        value = int(usec)
        if pid and int(pid) != os.getpid():
            return None
    except ValueError:
        log.warning("ignoring invalid WATCHDOG_USEC=%r / WATCHDOG_PID=%r", usec, pid)
        return None
    return value if value > 0 else None


def _clean(text: str) -> str:
    return " ".join(text.splitlines())


def _status_of(message: str) -> str | None:
    for line in message.split("\n"):
        if line.startswith("STATUS="):
            return line[len("STATUS="):]
    return None
