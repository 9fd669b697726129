"""The daemon's life under a service manager: start, SIGHUP reload, SIGTERM stop.

systemd.service(5) ``Type=notify`` contract, through :class:`~ocpp_edge.notify.Notifier`:

* ``READY=1`` once every listener is bound and the buffer is open (``Gateway.start``
  returned), so ``systemctl start`` returns when charge points can connect.
* ``STATUS=`` kept current: at once when a charge point comes or goes or the upstream link
  changes, otherwise at most once per :data:`STATUS_PERIOD` (the buffer depth moves with
  every message; one datagram per message would flood the service manager).
* ``WATCHDOG=1`` from the event loop at half of ``WATCHDOG_USEC``: a stuck loop stops the
  pings and systemd restarts the service.
* SIGHUP (``systemctl reload``): ``RELOADING=1``, the file is read again and applied
  (``Gateway.reload``; the log level here), then ``READY=1``. A file that is invalid or
  cannot be applied leaves the running configuration in place; the journal says why and
  ``STATUS=`` says so until a reload succeeds.
* SIGTERM/SIGINT: ``STOPPING=1``; listeners stop accepting, charge points are closed with
  1001, the buffer is committed, the broker connection is closed with DISCONNECT; exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import time

from ocpp_edge import config
from ocpp_edge.daemon import log as logsetup
from ocpp_edge.daemon.notify import Notifier
from ocpp_edge.errors import OcppEdgeError
from ocpp_edge.gateway import Gateway

log = logging.getLogger("ocpp_edge")

STATUS_PERIOD = 1.0  # seconds between STATUS= refreshes while nothing else happens


class Service:
    def __init__(self, gateway: Gateway, notifier: Notifier, config_path: str) -> None:
        self.gateway = gateway
        self.notifier = notifier
        self.config_path = config_path
        self.reload_problem: str | None = None  # set while the last reload failed
        self._stop = asyncio.Event()
        self._status_handle: asyncio.TimerHandle | None = None
        self._running = False  # READY=1 sent; before that a SIGHUP waits
        self._reload_pending = False

    def status(self) -> str:
        text = self.gateway.status_text()
        if self.reload_problem is not None:
            text += f"; {self.reload_problem}"
        return text

    def handle_signals(self) -> None:
        """Install the handlers; call before ``Gateway.start`` so that a SIGTERM that
        comes while the listeners are being bound is a clean stop, not a crash."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)

    async def run(self) -> int:
        """After ``Gateway.start``: READY=1, then serve until SIGTERM/SIGINT."""
        loop = asyncio.get_running_loop()
        self.gateway.on_change = self.refresh_status
        self.notifier.ready(self.status())
        self.notifier.start_watchdog(loop)
        if self.notifier.enabled:
            self._tick()
        self._running = True
        if self._reload_pending:
            self.reload()
        await self._stop.wait()
        return await self.stop()

    def refresh_status(self) -> None:
        self.notifier.status(self.status())  # sent only when the text changed

    def _tick(self) -> None:
        self.refresh_status()
        self._status_handle = asyncio.get_running_loop().call_later(STATUS_PERIOD, self._tick)

    def reload(self) -> None:
        if not self._running:  # no RELOADING=1 before READY=1
            log.info("SIGHUP during start-up: reloading once started")
            self._reload_pending = True
            return
        log.info("SIGHUP: reloading %s", self.config_path)
        self.notifier.reloading(f"reloading {self.config_path}")
        try:
            settings = config.load(self.config_path)
            restart = self.gateway.reload(settings)
            logsetup.set_level(self.gateway.settings.log.level)  # the set-up daemon/cli.py made
        except (OcppEdgeError, OSError, ssl.SSLError) as exc:
            when = time.strftime("%H:%M:%S")
            self.reload_problem = (f"reload failed at {when}: old configuration still "
                                   "in use (see the journal)")
            log.error("reload of %s failed; the old configuration stays in use:\n%s",
                      self.config_path, exc)
        else:
            self.reload_problem = None
            if restart:
                log.warning("reloaded %s; changes to %s take effect after a restart",
                            self.config_path, ", ".join(restart))
            else:
                log.info("reloaded %s", self.config_path)
        self.notifier.ready(self.status())

    async def stop(self) -> int:
        connected = len(self.gateway.connections)
        log.info("stopping: closing %d charge point connection(s)", connected)
        self.notifier.stopping(f"stopping: closing {connected} connection"
                               f"{'' if connected == 1 else 's'}")
        if self._status_handle is not None:
            self._status_handle.cancel()
        self.notifier.stop_watchdog()
        await self.gateway.stop()
        self.notifier.close()
        log.info("stopped")
        return 0
