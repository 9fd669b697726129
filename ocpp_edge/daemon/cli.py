"""Command line: argv → settings → logging → gateway → event loop; failures → exit codes.

Exit codes: 0 clean stop (or a valid file with ``--check-config``), 1 invalid
configuration or a failure to start (e.g. the port is taken), 2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from ocpp_edge import __version__
from ocpp_edge.errors import ConfigError

DEFAULT_CONFIG = "/etc/ocpp-edge.conf"
log = logging.getLogger("ocpp_edge")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ocpp-edge",
        description="OCPP-J WebSocket to MQTT gateway (EMQX OCPP gateway format).")
    p.add_argument("--config", "-c", default=DEFAULT_CONFIG, metavar="FILE",
                   help=f"configuration file (default: {DEFAULT_CONFIG})")
    p.add_argument("--check-config", action="store_true",
                   help="validate the configuration file and exit (0 valid, 1 invalid)")
    p.add_argument("--version", action="version", version=f"ocpp-edge {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] in ("passwd", "cert"):
        from ocpp_edge.tools import commands as tools  # password file and certificate commands

        return tools.main(argv)
    if argv and argv[0] == "ctl":
        from ocpp_edge.ops import ctl  # ask a running gateway through its admin endpoint

        return ctl.main(argv[1:])
    args = _parser().parse_args(argv)
    from ocpp_edge import config  # imported here so --version/--help stay instant

    try:
        settings = config.load(args.config)
    except ConfigError as exc:
        lines = str(exc).splitlines()
        if len(lines) == 1:
            print(f"ocpp-edge: invalid configuration: {lines[0]}", file=sys.stderr)
        else:
            print("ocpp-edge: invalid configuration:", *lines, sep="\n  ", file=sys.stderr)
        return 1
    if args.check_config:
        print(f"{args.config}: configuration OK")
        return 0

    from ocpp_edge.daemon import log as logsetup

    logsetup.setup(settings.log.level)
    try:
        return asyncio.run(_run(settings))
    except KeyboardInterrupt:
        return 0


async def _run(settings) -> int:
    from ocpp_edge.core.validation import SchemaError
    from ocpp_edge.daemon.notify import Notifier
    from ocpp_edge.daemon.service import Service
    from ocpp_edge.errors import OcppEdgeError
    from ocpp_edge.gateway import Gateway

    # First, before any child process (DNS look-ups) could inherit NOTIFY_SOCKET.
    notifier = Notifier()
    try:
        gateway = Gateway(settings)
        service = Service(gateway, notifier, settings.source)
        service.handle_signals()
        await gateway.start()
    except (OSError, SchemaError, OcppEdgeError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    log.info("ocpp-edge %s running (config %s)", __version__, settings.source)
    return await service.run()
