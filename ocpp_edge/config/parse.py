"""Read ocpp-edge.conf: configobj's parse, the keys it holds, where each is, what is wrong.

The file holds flat ``key = value`` lines with dotted keys, as EMQX 4.x ``emqx_ocpp.conf``.
Which keys exist and how each value is checked is in ``keys``; the checks between keys
are in ``checks``; the result is a ``settings.Settings``.

Errors: every problem in the file is reported at once, in file order, one per line of the
message; the ``ConfigError`` carries the first one's key and line. Relations between keys
(``ocpp.default_subprotocol`` in ``ocpp.subprotocols``, ...) are checked once every single
value is valid. A syntax error stops before the values are checked.

EMQX's spellings ``ocpp.upstream.strit_mode`` and ``ocpp.dnstream.strit_mode`` set the
same values as ``ocpp.*.strict_mode`` (both spellings of one key: an error); errors name
the key as it is written in the file.
"""

from __future__ import annotations

import difflib
import re
from typing import NoReturn

from configobj import ConfigObj, ConfigObjError, DuplicateError, NestingError

from ocpp_edge.config import checks
from ocpp_edge.config.checks import Problem
from ocpp_edge.config.keys import (
    ACTION,
    ALIASES,
    OVERRIDE,
    SPEC_KEYS,
    SPEC_LINES,
    Invalid,
    check_topic_template,
    named_listener_spec,
    validator,
)
from ocpp_edge.config.settings import ListenerSettings, Settings, build
from ocpp_edge.errors import ConfigError

# The key of a ``key = value`` line and the name of a ``[section]`` line, as configobj
# reads them (configobj keeps no line numbers, so we find them in the text ourselves).
_KEY_LINE = re.compile(r"""\s*(?:"([^"]*)"|'([^']*)'|([^\s'"=\[#][^=]*?))\s*=""")
_SECTION_LINE = re.compile(r"""\s*\[+\s*(?:"([^"]*)"|'([^']*)'|([^\]]*?))\s*\]""")


def _first_lines(lines: list[str], pattern: re.Pattern) -> dict[str, int]:
    found: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        m = pattern.match(line)
        if m:
            found.setdefault(next(g for g in m.groups() if g is not None), number)
    return found


def _cut_by_comment(raw: str, value: object, comment: str | None) -> bool:
    """True when an unquoted ``#`` right after the value (``secret#2``) made configobj
    cut it short; a comment after a space (``value  # note``) is fine."""
    comment = (comment or "").rstrip()
    raw = raw.rstrip()
    if not comment or not isinstance(value, str) or not raw.endswith(comment):
        return False
    before = raw[:-len(comment)]
    return not (before[-1:].isspace() or before[-1:] in ("", "=", '"', "'"))


def _parse_problem(error: ConfigObjError, key_lines: dict[str, int]) -> Problem:
    m = _KEY_LINE.match(error.line)
    key = next((g for g in m.groups() if g is not None), None) if m else None
    if isinstance(error, DuplicateError) and key is not None:
        return Problem(error.line_number, key,
                       f"is set twice (first on line {key_lines[key]})")
    if isinstance(error, NestingError | DuplicateError):
        return Problem(error.line_number, None, "sections are not used; write dotted keys "
                       "like ocpp.mountpoint = ocpp/")
    if key is not None:
        return Problem(error.line_number, key, "cannot read the value: check its quotes "
                       "(a value holding a quote, ',' or '#' must be quoted as a whole)")
    # The line is not echoed: it may hold a password.
    return Problem(error.line_number, None, "expected a 'key = value' line")


def _raise(problems: list[Problem], source: str) -> NoReturn:
    problems = sorted(problems, key=lambda p: (p.line is None, p.line or 0))
    first = problems[0]
    message = first.message + "".join(
        f"\n{ConfigError(p.message, key=p.key, line=p.line, path=source)}"
        for p in problems[1:])
    raise ConfigError(message, key=first.key, line=first.line, path=source)


def load(path: str) -> Settings:
    """Read and check the file at ``path``; raise ConfigError naming every problem."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read the configuration file: {exc.strerror}",
                          path=path) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError("the file is not UTF-8 text", path=path,
                          line=data[:exc.start].count(b"\n") + 1) from None
    return load_text(text, source=path)


def defaults() -> Settings:
    return load_text("")


def load_text(text: str, source: str = "<string>") -> Settings:
    """Check ``text`` as if read from the file ``source``."""
    lines = text.splitlines()
    key_lines = _first_lines(lines, _KEY_LINE)
    problems: list[Problem] = []

    try:
        parsed = ConfigObj(lines, interpolation=False, raise_errors=False, file_error=False)
    except ConfigObjError as exc:
        problems = [_parse_problem(e, key_lines) for e in exc.errors]
    if problems:
        _raise(problems, source)

    section_lines = _first_lines(lines, _SECTION_LINE)
    for name in parsed.sections:
        problems.append(Problem(section_lines.get(name), None, f"sections like [{name}] are "
                                "not used; write dotted keys like ocpp.mountpoint = ocpp/"))

    values: dict[str, str | list[str]] = {}
    overrides: dict[str, str] = {}
    written: dict[str, str] = {}  # spec key -> the key as written (it may be an alias)
    extra_spec: list[str] = []  # checks for the keys of named listeners
    for key in parsed.scalars:
        line, value = key_lines.get(key), parsed[key]
        override = OVERRIDE.fullmatch(key)
        name = ALIASES.get(key, key)
        known = name in SPEC_KEYS
        if not known and not override:
            spec, problem = named_listener_spec(key)
            if problem is not None:
                problems.append(Problem(line, key, problem))
                continue
            if spec is not None:
                extra_spec.append(f"{key} = {spec}")
                known = True
        if not known and not override:
            near = difflib.get_close_matches(key, SPEC_KEYS, n=1, cutoff=0.85)
            hint = f" (did you mean {near[0]}?)" if near else ""
            problems.append(Problem(line, key, f"unknown key{hint}"))
        elif name in written:  # both spellings of one key (configobj caught exact repeats)
            other = written[name]
            first = f"line {key_lines[other]}" if other in key_lines else "another line"
            if name == key:
                message = (f"is already set on {first} as {other} (EMQX's spelling of "
                           "this key); keep one of them")
            else:
                message = (f"is EMQX's spelling of {name}, which is already set on "
                           f"{first}; keep one of them")
            problems.append(Problem(line, key, message))
        elif line and _cut_by_comment(lines[line - 1], value, parsed.inline_comments.get(key)):
            written[name] = key
            problems.append(Problem(line, key, "'#' starts a comment and cut this value "
                                    "short; put the value in quotes if '#' belongs to it"))
        elif not override:
            written[name] = key
            values[name] = value
        elif not ACTION.fullmatch(override[1]):
            problems.append(Problem(line, key, f"{override[1]!r} is not an OCPP action name "
                                    "(letters, digits and '_', e.g. BootNotification)"))
        else:
            try:
                overrides[override[1]] = check_topic_template(value, "upstream")
            except Invalid as exc:
                problems.append(Problem(line, key, str(exc)))

    checked = ConfigObj(values, configspec=SPEC_LINES + extra_spec, interpolation=False)
    results = checked.validate(validator(), preserve_errors=True)
    if results is not True:
        problems += [Problem(key_lines.get(written.get(key, key)), written.get(key, key),
                             str(result))
                     for key, result in results.items() if result is not True]
    listeners: tuple[ListenerSettings, ...] = ()
    mqtt_password: str | None = None
    admin_token: str | None = None
    if not problems:
        problems = checks.cross_checks(checked, key_lines)
        listeners, more = checks.listener_checks(checked, values, key_lines)
        problems += more
        mqtt_password, more = checks.mqtt_checks(checked, key_lines)
        problems += more
        admin_token, more = checks.admin_checks(checked, key_lines)
        problems += more
    if problems:
        _raise(problems, source)
    return build(checked, overrides, listeners, mqtt_password, source, admin_token)

