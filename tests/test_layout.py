"""The package layout is the architecture (README "Layout"), and this test keeps it so.

Every ``import`` in ``ocpp_edge/`` is read with :mod:`ast` (function-level and
``TYPE_CHECKING`` imports included: a hidden arrow is still an arrow) and checked against
three rules:

* ``core`` is pure: it imports no I/O library and no other part of the project but the
  exception tree (``ocpp_edge.errors``);
* every arrow between parts is in :data:`ALLOWED` — in particular ``south`` and ``north``
  never import each other, and nothing imports ``gateway`` but ``daemon``;
* the parts form no cycle.

The checker is a function of source texts, so the last tests feed it a core module that
imports tornado, and a cycle, and see it object.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ocpp_edge"

# Library modules that do I/O or run an event loop: never in the sans-I/O core.
IO_LIBRARIES = frozenset({
    "asyncio", "configobj", "cryptography", "http", "paho", "sdnotify", "selectors",
    "socket", "socketserver", "sqlite3", "ssl", "subprocess", "threading", "tornado",
    "urllib"})

# part -> the parts it may import. "errors" is the one exception tree every part shares.
ALLOWED: dict[str, frozenset[str]] = {
    "errors": frozenset(),
    "core": frozenset({"errors"}),
    "config": frozenset({"core", "errors"}),
    "store": frozenset({"core", "errors"}),
    "south": frozenset({"config", "core", "errors"}),
    "north": frozenset({"config", "core", "store", "errors"}),
    "ops": frozenset({"config", "core", "north", "errors"}),
    "tools": frozenset({"south", "errors"}),
    "gateway": frozenset({"config", "core", "store", "south", "north", "ops", "errors"}),
    "daemon": frozenset({"gateway", "config", "core", "ops", "tools", "errors"}),
    "__init__": frozenset(),
    "__main__": frozenset({"daemon"}),
}


def part_of(module: str) -> str:
    """``ocpp_edge.south.listener`` -> ``south``; ``ocpp_edge.gateway`` -> ``gateway``;
    ``ocpp_edge`` itself (its ``__version__``) -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(source: str, module: str) -> list[str]:
    """Absolute names of every module ``source`` (the text of ``module``) imports."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = module.split(".")[:-node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append(name)
            if name == "ocpp_edge":  # from ocpp_edge import x: x may be a part
                found += [f"ocpp_edge.{alias.name}" for alias in node.names
                          if alias.name != "__version__"]
    return found


def violations(sources: dict[str, str]) -> list[str]:
    """Every broken rule in ``sources`` (module name -> text)."""
    problems: list[str] = []
    edges: dict[str, set[str]] = {}
    for module, source in sorted(sources.items()):
        src = part_of(module)
        for name in imports_of(source, module):
            top = name.split(".")[0]
            if src == "core" and top in IO_LIBRARIES:
                problems.append(f"{module} imports {name}: the core does no I/O")
            if top != "ocpp_edge" or name == "ocpp_edge":
                continue
            dst = part_of(name)
            if dst == src:
                continue
            edges.setdefault(src, set()).add(dst)
            if dst not in ALLOWED.get(src, frozenset()):
                problems.append(f"{module} imports {name}: {src} may not import {dst}")
    problems += [f"cycle between parts: {' -> '.join(c)}" for c in _cycles(edges)]
    return problems


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return cycles


def package_sources() -> dict[str, str]:
    sources = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts.pop()
        sources[".".join(parts)] = path.read_text("utf-8")
    return sources


def test_the_package_keeps_its_layout():
    sources = package_sources()
    assert len(sources) > 30, "the walk found the package"
    assert violations(sources) == []


def test_every_part_is_known_and_says_its_job():
    # A new part must be placed in ALLOWED (and so in the picture) before it is used, and
    # its __init__ says what it is for and what it may import.
    parts = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert parts <= set(ALLOWED), f"parts without rules: {parts - set(ALLOWED)}"
    for part in parts:
        doc = ast.get_docstring(ast.parse((PACKAGE / part / "__init__.py").read_text()))
        assert doc and "import" in doc and len(doc) > 80, f"ocpp_edge/{part}: no docstring"


def test_only_the_daemon_imports_the_gateway():
    sources = package_sources()
    users = sorted(m for m, s in sources.items()
                   if any(n == "ocpp_edge.gateway" for n in imports_of(s, m)))
    assert users and all(part_of(m) == "daemon" for m in users), users


# The checker itself: each rule must be able to fail.

def test_a_core_module_importing_tornado_is_refused():
    sources = package_sources()
    router = sources["ocpp_edge.core.router"]
    sources["ocpp_edge.core.router"] = "import tornado.ioloop\n" + router
    assert violations(sources) == [
        "ocpp_edge.core.router imports tornado.ioloop: the core does no I/O"]
    sources["ocpp_edge.core.router"] = "def f():\n    import sqlite3\n" + router
    assert "the core does no I/O" in violations(sources)[0]


def test_forbidden_arrows_and_cycles_are_refused():
    sources = package_sources()
    sources["ocpp_edge.north.uplink"] += "\nfrom ocpp_edge.south import listener\n"
    assert violations(sources) == [
        "ocpp_edge.north.uplink imports ocpp_edge.south: north may not import south"]
    sources = package_sources()
    sources["ocpp_edge.core.session"] += "\nfrom ocpp_edge import config\n"
    found = violations(sources)
    assert "ocpp_edge.core.session imports ocpp_edge.config: core may not import config" \
        in found
    assert "cycle between parts: config -> core -> config" in found
    sources = package_sources()
    sources["ocpp_edge.ops.operations"] += (
        "\nif TYPE_CHECKING:\n    from ocpp_edge.gateway import Gateway\n")
    assert violations(sources)[0] == ("ocpp_edge.ops.operations imports ocpp_edge.gateway: "
                                      "ops may not import gateway")


def test_relative_imports_are_resolved():
    assert imports_of("from . import codec\nfrom ..router import x\n",
                      "ocpp_edge.core.ocppj.messages") == [
        "ocpp_edge.core.ocppj", "ocpp_edge.core.router"]
