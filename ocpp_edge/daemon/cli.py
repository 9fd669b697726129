"""Command line: argv → settings → logging → gateway → event loop; failures → exit codes.

Exit codes: 0 clean stop (or a valid file with ``--check-config``), 1 invalid
configuration or a failure to start (e.g. the port is taken), 2 usage error.

Whatever stops the daemon from starting (an invalid configuration, a port that is taken,
an unexpected exception) is written at error priority when standard error is the journal
(``<3>``, see daemon/log.py), so ``journalctl -p err -u ocpp-edge`` says why the service
failed. At start the soft limit on open files is raised to the hard one: every charge
point connection is a file (south/listener.py shares the limit among the listeners).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import traceback

from ocpp_edge import __version__
from ocpp_edge.errors import ConfigError

DEFAULT_CONFIG = "/etc/ocpp-edge.conf"
log = logging.getLogger("ocpp_edge")


COMMANDS = """commands (each has its own --help):
  passwd ID              add, change (--generate) or --delete a charge point's password
  cert init              make the site CA and the server certificate for wss:// listeners
  cert issue ID          issue a charge point's client certificate (security profile 3)
  ctl COMMAND            ask the running gateway: status, clients, client ID, kick ID

See ocpp-edge(8) and ocpp-edge.conf(5)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ocpp-edge",
        usage="%(prog)s [-h] [--config FILE] [--check-config] [--version]\n"
              "       %(prog)s {passwd,cert,ctl} ...",
        description="OCPP-J WebSocket to MQTT gateway (EMQX OCPP gateway format).",
        epilog=COMMANDS, formatter_class=argparse.RawDescriptionHelpFormatter)
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
            fatal(f"ocpp-edge: invalid configuration: {lines[0]}")
        else:
            fatal("\n  ".join(["ocpp-edge: invalid configuration:", *lines]))
        return 1
    except Exception:  # a bug: still say it at error priority
        fatal("ocpp-edge: cannot read the configuration:\n" + traceback.format_exc())
        return 1
    if args.check_config:
        print(f"{args.config}: configuration OK")
        return 0

    from ocpp_edge.daemon import log as logsetup

    logsetup.setup(settings.log.level)
    raise_open_files()
    try:
        return asyncio.run(_run(settings))
    except KeyboardInterrupt:
        return 0
    except Exception:
        log.critical("stopped by an unexpected error", exc_info=True)
        return 1


def fatal(text: str) -> None:
    """Why the daemon cannot start, on stderr before logging is set up: each line at
    error priority (``<3>``) when stderr is the journal, plain otherwise."""
    from ocpp_edge.daemon.log import stderr_is_journal

    lines = text.rstrip("\n").splitlines() or [""]
    if stderr_is_journal():
        lines = ["<3>" + line for line in lines]
    print(*lines, sep="\n", file=sys.stderr)


def raise_open_files() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit (systemd gives services 1024:524288 unless
    the unit sets LimitNOFILE=); logs the limit in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("open files: cannot raise the limit from %d to %s: %s", soft,
                        "unlimited" if hard == resource.RLIM_INFINITY else hard, exc)
        else:
            log.info("open files: limit raised from %d to %s (RLIMIT_NOFILE)", soft,
                     "unlimited" if hard == resource.RLIM_INFINITY else hard)
            return
    log.info("open files: limit %s (RLIMIT_NOFILE)",
             "unlimited" if soft == resource.RLIM_INFINITY else soft)


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
