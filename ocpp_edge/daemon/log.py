"""Logging set-up: journald-aware, human-readable otherwise.

Under systemd, stderr is a journald stream and ``JOURNAL_STREAM`` names it (device:inode).
Then every line gets a ``<N>`` syslog priority prefix (journald strips it and files the
line at that priority; each line of a traceback needs its own) and no timestamp (journald
adds one). Elsewhere: timestamp, level, logger, message.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
             logging.DEBUG: 7}
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


def stderr_is_journal(stream: TextIO | None = None) -> bool:
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat((stream or sys.stderr).fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines() or [""])


def setup(level: str = "info", stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if stderr_is_journal(stream):
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)
    # One access line per charge point handshake is noise at info level.
    logging.getLogger("tornado.access").setLevel(logging.WARNING)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(LEVELS.get(level.lower(), logging.INFO))
