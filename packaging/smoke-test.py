#!/usr/bin/python3
"""Smoke test of the built package tree, run by debian/rules (dh_auto_test) from
pybuild's build directory with Debian's python3 and Debian's python3-* packages.

* every module of ocpp_edge imports: no dependency outside Debian crept in;
* every requirement of pyproject.toml is met by the installed Debian version (the
  minimums in pyproject.toml are bookworm's versions);
* ``ocpp-edge --version`` runs.
"""

import importlib
import importlib.metadata
import pkgutil
import re
import subprocess
import sys

import ocpp_edge

failures = []

for info in pkgutil.walk_packages(ocpp_edge.__path__, "ocpp_edge."):
    try:
        importlib.import_module(info.name)
    except Exception as exc:  # noqa: BLE001 - report every module
        failures.append(f"import {info.name}: {type(exc).__name__}: {exc}")


def as_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:4])


for requirement in importlib.metadata.requires("ocpp-edge") or []:
    if ";" in requirement and "extra ==" in requirement:
        continue  # test extras are not runtime dependencies
    # "tornado>=6.2", or "tornado (>=6.2)" as older setuptools writes it
    m = re.match(r"([A-Za-z0-9_.-]+)\s*\(?\s*(?:>=\s*([0-9][^,;)\s]*))?", requirement)
    name, minimum = m[1], m[2]
    try:
        installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        failures.append(f"{requirement}: not installed (no Debian package provides it?)")
        continue
    if minimum and as_tuple(installed) < as_tuple(minimum):
        failures.append(f"{requirement}: Debian has {installed}")
    print(f"smoke-test: {name} {installed} (needs {minimum or 'any'})")

r = subprocess.run([sys.executable, "-m", "ocpp_edge", "--version"], capture_output=True,
                   text=True)
if r.returncode != 0 or ocpp_edge.__version__ not in r.stdout:
    failures.append(f"ocpp-edge --version: rc={r.returncode} {r.stdout!r} {r.stderr!r}")

if failures:
    print("smoke-test FAILED:", *failures, sep="\n  ", file=sys.stderr)
    sys.exit(1)
print(f"smoke-test: ocpp-edge {ocpp_edge.__version__}: every module imports, "
      "every dependency is met")
