"""The Debian package's documentation and metadata keep up with the code.

* ocpp-edge.conf(5) has an entry for every key of ``ocpp_edge/config/configspec.ini``, with the
  spec's default, and no entry for a key the spec no longer has;
* ocpp-edge(8) names every option and command of the command line;
* both pages format without warnings (``man --warnings``, ``groff -ww``);
* ``debian/changelog`` carries the version of ``pyproject.toml``.

The package itself (build, lintian, install and a real systemd) is ``make deb-test``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest
from configobj import ConfigObj

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "man"
CONF_PAGE = MAN / "ocpp-edge.conf.5"
DAEMON_PAGE = MAN / "ocpp-edge.8"
PAGES = (DAEMON_PAGE, CONF_PAGE)

# Key families ocpp_edge.config reads besides the spec's keys; the page documents them as such.
FAMILIES = ("ocpp.upstream.topic.", "ocpp.listener.ws.", "ocpp.listener.wss.")
ALIASES = {"ocpp.upstream.strit_mode", "ocpp.dnstream.strit_mode"}


def spec() -> dict[str, str]:
    """key -> check, read the way ocpp_edge/config/keys.py reads it."""
    text = (resources.files("ocpp_edge.config") / "configspec.ini").read_text("utf-8")
    return dict(ConfigObj(text.splitlines(), list_values=False, interpolation=False))


_DEFAULT = re.compile(r"""default=(?:"([^"]*)"|'([^']*)'|list\(([^)]*)\)|([^,)\s]+))""")


def spec_default(check: str) -> str:
    """The default of a spec line as the page writes it: ``a, b`` for a list, ``(empty)``."""
    m = _DEFAULT.search(check)
    assert m, f"no default in {check!r}"
    double, single, items, bare = m.groups()
    if items is not None:
        return ", ".join(part.strip().strip("\"'") for part in items.split(","))
    value = next(v for v in (double, single, bare) if v is not None)
    return value if value != "" else "(empty)"


def plain(roff: str) -> str:
    """Roff source text -> the text a reader sees (enough for the constructs used here)."""
    text = re.sub(r"\\f[BIRP]|\\f\(..|\\&|\\c", "", roff)
    return text.replace("\\-", "-").replace("\\e", "\\").replace("\\(aq", "'") \
        .replace("\\(dq", '"').strip()


def entries(page: Path) -> dict[str, str]:
    """``.TP`` / ``.B key`` entries of a page: key -> the roff text of its body."""
    found: dict[str, str] = {}
    lines = page.read_text("utf-8").splitlines()
    for i, line in enumerate(lines[:-1]):
        if line != ".TP":
            continue
        m = re.fullmatch(r"\.B (\S+)", lines[i + 1])
        if not m:
            continue
        body = []
        for follow in lines[i + 2:]:
            if follow.startswith((".TP", ".SS", ".SH")):
                break
            body.append(follow)
        found[m[1]] = "\n".join(body)
    return found


def test_conf_page_documents_every_key_of_the_spec():
    documented = entries(CONF_PAGE)
    missing = [key for key in spec() if key not in documented]
    assert not missing, (
        f"{CONF_PAGE.relative_to(ROOT)} has no entry for: {', '.join(missing)}. Add one per "
        "key: '.TP', '.B <key>', what it does, '.IP', 'Value: ...', '.br', 'Default: ...' "
        "(the text of its comment in etc/ocpp-edge.conf)")


def test_conf_page_gives_the_spec_defaults():
    documented = entries(CONF_PAGE)
    wrong = []
    for key, check in spec().items():
        body = documented.get(key)
        if body is None:
            continue  # the test above reports it
        m = re.search(r"^Default: (.*)$", body, re.MULTILINE)
        said = plain(m[1]).rstrip(".") if m else None
        want = spec_default(check)
        if said != want and not (said or "").startswith(want + " ("):
            wrong.append(f"{key}: page says {said!r}, configspec.ini says {want!r}")
    assert not wrong, "\n".join(wrong)


def test_conf_page_documents_no_key_the_spec_lacks():
    keys = set(spec())
    stale = [key for key in entries(CONF_PAGE)
             if re.fullmatch(r"(ocpp|mqtt|auth|buffer|log)\.[a-z0-9_.]+", key)
             and key not in keys and key not in ALIASES]
    assert not stale, f"{CONF_PAGE.relative_to(ROOT)} documents unknown keys: {stale}"
    headings = [line for line in CONF_PAGE.read_text("utf-8").splitlines()
                if line.startswith(".BI ")]
    for family in FAMILIES:  # documented as such: ".BI ocpp.upstream.topic. Action"
        assert any(f"{family} " in line for line in headings), family


def _cli_words() -> list[str]:
    """Long options and sub-commands of ``ocpp-edge`` and of the commands it hands over
    to (``passwd``/``cert``: ocpp_edge.tools.commands, ``ctl``: ocpp_edge.ops.ctl),
    however nested."""
    import importlib

    words: list[str] = []

    def walk(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            words.extend(s for s in action.option_strings if s.startswith("--"))
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    words.append(name)
                    walk(sub)

    for module, command in (("daemon.cli", None), ("tools.commands", None), ("ops.ctl", "ctl")):
        try:
            mod = importlib.import_module(f"ocpp_edge.{module}")
        except ImportError:
            continue
        if command:
            words.append(command)
        walk(mod._parser())
    return [w for w in dict.fromkeys(words) if w != "--help"]


def test_daemon_page_names_every_option_and_command():
    text = plain(DAEMON_PAGE.read_text("utf-8"))
    missing = [w for w in _cli_words() if not re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])",
                                                      text)]
    assert not missing, f"{DAEMON_PAGE.relative_to(ROOT)} does not mention: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_formats_without_warnings_groff(page):
    assert shutil.which("groff"), "groff is missing: `make test` installs it (man-tools)"
    r = subprocess.run(["groff", "-man", "-ww", "-z", str(page)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_formats_without_warnings_man(page):
    assert shutil.which("man"), "man is missing: `make test` installs it (man-tools)"
    env = dict(os.environ, MANWIDTH="80", LC_ALL="C.UTF-8", MAN_DISABLE_SECCOMP="1")
    r = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", str(page)],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def test_changelog_version_is_the_project_version():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]
    first = (ROOT / "debian" / "changelog").read_text("utf-8").splitlines()[0]
    m = re.match(r"ocpp-edge \(([^)-]+)(?:-[^)]+)?\) ", first)
    assert m, first
    assert m[1] == project["version"], (
        f"debian/changelog is at {m[1]}, pyproject.toml at {project['version']}: add a "
        "debian/changelog entry (dch -v VERSION-1)")
