"""Schema checking of OCPP payloads against the OCA JSON schemas (SPEC "OCPP-J framing").

The schemas are read from disk once at start-up (one directory per protocol:
``ocpp1.6/``, ``ocpp2.0.1/``, ``ocpp2.1/``) and compiled with fastjsonschema, which
generates Python code per schema: 10–20× faster per message than jsonschema's
interpreter on the same schemas (notes/performance.md). Compiling all ~390 schemas takes
several seconds on a Pi and the compiled code is large (measured with bookworm's
fastjsonschema: ~2.5 MB resident for 1.6's, ~10 MB for 2.0.1's, ~28 MB for 2.1's), so
start-up only reads them. Each is compiled on first use; and once a charge point speaking
a version has connected (``warm_up``), a background warm-up compiles the rest of that
version's schemas one per event-loop turn (``warm_up_step``), so no message waits for
more than its own schema, and a site whose charge points all speak 1.6 never pays for
2.x's code. A schema fastjsonschema cannot compile is
validated with jsonschema instead (logged once).

Errors map onto the OCPP-J codes (1.6 §4.2.3, 2.0.1 Part 4 §4.3): a missing required
property → OccurrenceConstraintViolation; a wrong JSON type → TypeConstraintViolation; a
value outside enum/length/range/format → PropertyConstraintViolation; a property the
schema does not allow → FormatViolation (not the PDU structure); no schema for a request's
action → NotImplemented. The description names the field.

The files are used as published (CC BY-ND 4.0, unmodified): draft and id quirks are
handled here, in code — the ``id``/``$id`` keys are dropped from the in-memory copy
handed to the compiler, since fastjsonschema would try to resolve ``urn:`` ids as URLs.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import fastjsonschema

from ocpp_edge.core.ocppj.errors import (
    FormatViolation,
    NotImplementedError_,
    OccurrenceConstraintViolation,
    OcppError,
    PropertyConstraintViolation,
    TypeConstraintViolation,
)
from ocpp_edge.core.ocppj.messages import Version

log = logging.getLogger("ocpp_edge.validation")

# Where the schemas are when ocpp.json_schema_dir is empty, in order: the source tree or
# an editable install, the Debian package.
_DEFAULT_DIRS = (Path(__file__).resolve().parents[2] / "schemas",
                 Path("/usr/share/ocpp-edge/schemas"))
_BUILTIN_PREFIXES = {Version.V201: "urn:OCPP:Cp:2:2020:3:", Version.V21: "urn:OCPP:Cp:2:2025:1:"}


class SchemaError(Exception):
    """The schema directory cannot be used (missing, unreadable, invalid JSON)."""


def default_schema_dir() -> Path | None:
    for candidate in _DEFAULT_DIRS:
        # Ours only if it holds the 1.6 schemas: an installed system has no source tree,
        # and another package's top-level "schemas" folder must not be taken for it.
        if (candidate / "ocpp1.6").is_dir():
            return candidate
    return None


def _message_name(version: str, stem: str, schema: dict, prefix: str) -> str | None:
    """The message a schema describes, as ``<Action>Request`` or ``<Action>Response``."""
    sid = schema.get("$id") or schema.get("id") or ""
    if isinstance(sid, str) and prefix and sid.startswith(prefix):
        name = sid[len(prefix):]
    else:
        name = stem
    if version == Version.V16:
        # 1.6 files: Authorize.json / AuthorizeResponse.json (core);
        # security extension ids: SignCertificate.req / SignCertificate.conf
        if name.endswith(".req"):
            return name[:-4] + "Request"
        if name.endswith(".conf"):
            return name[:-5] + "Response"
        if name.endswith("Request") or name.endswith("Response"):
            return name
        return name + "Request"
    # 2.1's SEND-only messages (e.g. NotifyPeriodicEventStream) have one schema and no
    # suffix: it is checked like a request.
    return name if name.endswith(("Request", "Response")) else name + "Request"


class Validator:
    """Compiled-on-demand validators for the configured protocols."""

    def __init__(self, schema_dir: str | os.PathLike | None, versions: Iterable[str],
                 id_prefix_16: str = "urn:OCPP:1.6:2019:12:") -> None:
        root = Path(schema_dir) if schema_dir else default_schema_dir()
        if root is None:
            raise SchemaError("no schema directory found (looked in "
                              + ", ".join(str(d) for d in _DEFAULT_DIRS)
                              + "); set ocpp.json_schema_dir")
        self.root = root
        self._schemas: dict[tuple[str, str], dict] = {}
        self._compiled: dict[tuple[str, str], object] = {}
        prefixes = dict(_BUILTIN_PREFIXES, **{Version.V16: id_prefix_16})
        for version in versions:
            folder = root / version
            if not folder.is_dir():
                raise SchemaError(f"{folder} is missing (schemas for {version})")
            count = 0
            for path in sorted(folder.glob("*.json")):
                try:
                    schema = json.loads(path.read_text(encoding="utf-8-sig"))
                except (OSError, ValueError) as exc:
                    raise SchemaError(f"{path}: {exc}") from None
                name = _message_name(version, path.stem, schema, prefixes[version])
                if name is not None and isinstance(schema, dict):
                    self._schemas[(version, name)] = schema
                    count += 1
            if count == 0:
                raise SchemaError(f"{folder} holds no OCPP schemas")
        self._warm_queue: list[tuple[str, str]] = []
        self._warming: set[str] = set()  # versions queued for the warm-up

    def __len__(self) -> int:
        return len(self._schemas)

    # -- compiling -----------------------------------------------------------------------

    def _validator(self, key: tuple[str, str]):
        fn = self._compiled.get(key)
        if fn is None:
            schema = {k: v for k, v in self._schemas[key].items() if k not in ("$id", "id")}
            try:
                fn = fastjsonschema.compile(schema)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back
                log.warning("schema %s/%s: fastjsonschema cannot compile it (%s); using "
                            "jsonschema", *key, exc)
                fn = _JsonSchemaFallback(schema)
            self._compiled[key] = fn
        return fn

    def warm_up(self, version: str) -> bool:
        """Queue ``version``'s schemas for the background warm-up; False if that was done
        already (or there are none)."""
        if version in self._warming:
            return False
        self._warming.add(version)
        keys = [k for k in self._schemas if k[0] == version and k not in self._compiled]
        self._warm_queue[:0] = keys  # popped from the end: the queue's older versions first
        return bool(keys)

    def warm_up_step(self) -> bool:
        """Compile one more schema; False when all are compiled."""
        while self._warm_queue:
            key = self._warm_queue.pop()
            if key not in self._compiled:
                self._validator(key)
                return True
        return False

    # -- checking ------------------------------------------------------------------------

    def check(self, version: str, action: str, payload: dict,
              response: bool) -> OcppError | None:
        key = (version, action + ("Response" if response else "Request"))
        if key not in self._schemas:
            if response:
                return None  # nothing to check against (vendor action): pass it on
            return NotImplementedError_(f"{action} is not an action of {version}")
        try:
            self._validator(key)(payload)
        except fastjsonschema.JsonSchemaValueException as exc:
            return _to_ocpp_error(action, response, exc)
        return None


def _field(name: str | None) -> str:
    # fastjsonschema names the failing value "data.a.b[0].c"; the payload is "data".
    if not name or name == "data":
        return ""
    return name[5:] if name.startswith("data.") else name[4:] if name.startswith("data") else name


def _to_ocpp_error(action: str, response: bool, exc) -> OcppError:
    what = f"{action}{' response' if response else ''}"
    rule = getattr(exc, "rule", None)
    field = _field(getattr(exc, "name", None))
    definition = getattr(exc, "rule_definition", None)
    if rule == "required":
        value = exc.value if isinstance(exc.value, dict) else {}
        missing = [k for k in (definition or []) if k not in value]
        where = ".".join(p for p in (field, missing[0] if missing else "") if p)
        return OccurrenceConstraintViolation(f"{what}: required property '{where}' is missing")
    if rule == "type":
        return TypeConstraintViolation(f"{what}: '{field}' must be of type {definition}")
    if rule == "additionalProperties":
        return FormatViolation(f"{what}: {exc.message.replace('data', field or 'payload', 1)}")
    if rule in ("minItems", "maxItems"):
        return OccurrenceConstraintViolation(f"{what}: '{field}' {rule} is {definition}")
    return PropertyConstraintViolation(f"{what}: '{field}' violates {rule} {definition!r}"
                                       if field else f"{what}: {exc.message}")


class _JsonSchemaFallback:
    """A jsonschema validator shaped like a fastjsonschema function."""

    def __init__(self, schema: dict) -> None:
        import jsonschema

        cls = jsonschema.validators.validator_for(schema)
        self._v = cls(schema, format_checker=jsonschema.FormatChecker())

    def __call__(self, payload: dict) -> None:
        error = next(iter(sorted(self._v.iter_errors(payload), key=lambda e: e.path)), None)
        if error is not None:
            path = "data" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}"
                                    for p in error.absolute_path)
            raise fastjsonschema.JsonSchemaValueException(
                error.message, value=error.instance, name=path,
                definition=error.schema, rule=error.validator)
