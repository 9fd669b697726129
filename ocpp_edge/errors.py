"""One exception tree for ocpp-edge.

::

    OcppEdgeError                  everything this package raises on purpose
    ├── ConfigError                the configuration file is wrong (names key and line)
    └── ocppj.errors.OcppError     an OCPP-J message is wrong; carries its wire code
        (see ocpp_edge/ocppj/errors.py for the protocol branch)

Code that catches ``OcppEdgeError`` catches only what we raise deliberately; anything
else escaping is a bug and is allowed to crash loudly in tests.
"""

from __future__ import annotations


class OcppEdgeError(Exception):
    """Base class of every error ocpp-edge raises deliberately."""


class ConfigError(OcppEdgeError):
    """The configuration is invalid.

    ``key`` and ``line`` point the operator at the offending entry; ``str()`` gives the
    whole sentence, ready for the terminal or the journal.
    """

    def __init__(self, message: str, *, key: str | None = None, line: int | None = None,
                 path: str | None = None) -> None:
        self.key = key
        self.line = line
        self.path = path
        self.reason = message
        where = []
        if path:
            where.append(path if line is None else f"{path}:{line}")
        elif line is not None:
            where.append(f"line {line}")
        if key:
            where.append(f"key '{key}'")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)
