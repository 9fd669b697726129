"""The core is sans-I/O: codec, session and router import no tornado, paho, sdnotify or
configobj (ARCHITECTURE "The shape"). Checked in a fresh interpreter, so nothing imported
by other tests can hide a violation."""

import subprocess
import sys

FORBIDDEN = ("tornado", "paho", "sdnotify", "configobj", "asyncio", "socket", "sqlite3")
# core.validation is left out: fastjsonschema (2.16, bookworm's) imports urllib, and so
# socket, for remote $refs it never fetches here; tests/test_layout.py checks that the
# core's own imports are pure.
CORE = ("ocpp_edge.core.ocppj.codec", "ocpp_edge.core.ocppj.messages",
        "ocpp_edge.core.ocppj.errors", "ocpp_edge.core.session", "ocpp_edge.core.router",
        "ocpp_edge.core.local", "ocpp_edge.core.offline")


def test_core_imports_no_io():
    code = (
        "import sys\n"
        f"for m in {CORE!r}: __import__(m)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "", f"the sans-I/O core pulled in: {out}"


def test_the_check_can_fail():
    # The same probe on an adapter module must see tornado, or the test above proves nothing.
    code = ("import sys, ocpp_edge.south.listener\n"
            "print('tornado' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "True"
