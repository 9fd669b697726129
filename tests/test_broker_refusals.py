"""Any charge point id on any broker, and what a broker refuses (issue 16, failures 1, 2).

End to end with real parts: the gateway process, a paho backend, and a real broker —
Mosquitto (conftest) or a private ``nats-server`` in MQTT mode started here. NATS 2.9 is
the broker that drops the connection of a client publishing a topic with '.' or ' ', or
at QoS 2: before issue 16 one charge point named ``CP.dot`` stopped every other charge
point's messages, forever, across restarts.

The NATS fixture is this file's own (``PrivateNats``), independent of the broker matrix
in tests/brokers.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, Backend, GatewayProcess, eventually, free_port, wait_for_port
from websockets.sync.client import connect as ws_connect

STATUS_ON = "ocpp.upstream.status_topic = sys/${node}/status\n"
EVENTS_ON = "ocpp.upstream.event_topic = sys/${node}/clients/${cid}/${event}\n"


class PrivateNats:
    """nats-server (Debian's 2.9) with JetStream and MQTT on free loopback ports, its
    store and log in the test's directory."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()  # MQTT
        self.nats_port = free_port()
        self.dir = workdir / "nats"
        self.dir.mkdir()
        self.conf = self.dir / "nats.conf"
        self.conf.write_text(
            f"server_name: ocpp_edge_refusals\nlisten: 127.0.0.1:{self.nats_port}\n"
            f"jetstream {{ store_dir: {json.dumps(str(self.dir / 'js'))} }}\n"
            f"mqtt {{ listen: 127.0.0.1:{self.port} }}\n")
        self.log = self.dir / "nats.log"
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def binary() -> str:
        for path in (shutil.which("nats-server"), "/usr/sbin/nats-server"):
            if path and os.access(path, os.X_OK):
                return path
        raise RuntimeError("nats-server is not installed (Debian package nats-server)")

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([self.binary(), "-c", str(self.conf)],
                                         stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def nats(tmp_path):
    broker = PrivateNats(tmp_path)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def nats_backend(nats):
    b = Backend(nats.port)
    yield b
    b.close()


def heartbeat(uid: str) -> str:
    return json.dumps([2, uid, "Heartbeat", {}])


def error_lines(gw: GatewayProcess) -> list[str]:
    return [line for line in gw.log_text().splitlines() if " ERROR " in line]


def get(base: str, path: str):
    with urllib.request.urlopen(base + path, timeout=10) as resp:
        body = resp.read()
    return json.loads(body) if path.startswith("/api") else body.decode()


# -- failure 2: a charge point id RabbitMQ / NATS would rewrite or refuse -----------------


def test_special_id_round_trip_through_mosquitto(make_gateway, broker, backend):
    """``CP.dot 1*x``: every topic carries it as one safe level; the backend reaches it
    by that level; presence events and the gateway's own answers use it too."""
    gw = make_gateway(broker.port, STATUS_ON + EVENTS_ON)
    gw.wait_log("subscribed to ocpp/cs/+")
    level = "CP%2Edot%201%2Ax"
    with ws_connect(f"{gw.url}/CP.dot%201*x", subprotocols=["ocpp1.6"]) as ws:
        topic, event = backend.expect(where=lambda b: isinstance(b, dict)
                                      and b.get("event") == "connected")
        assert topic.endswith(f"/clients/{level}/connected")
        assert event["clientid"] == "CP.dot 1*x"  # payloads carry the id as it is

        ws.send(json.dumps([2, "b1", "BootNotification",
                            {"chargePointVendor": "V", "chargePointModel": "M"}]))
        _, up = backend.expect(f"ocpp/cp/{level}")
        assert (up["UniqueId"], up["Action"]) == ("b1", "BootNotification")
        backend.publish(f"ocpp/cs/{level}", {
            "MessageTypeId": 3, "UniqueId": "b1",
            "Payload": {"currentTime": "2026-11-22T10:00:00Z", "interval": 300,
                        "status": "Accepted"}})
        assert json.loads(ws.recv(timeout=10))[:2] == [3, "b1"]

        backend.publish(f"ocpp/cs/{level}", {
            "MessageTypeId": 2, "UniqueId": "rs-1", "Action": "RemoteStartTransaction",
            "Payload": {"idTag": "TAG01"}})
        assert json.loads(ws.recv(timeout=10)) == [2, "rs-1", "RemoteStartTransaction",
                                                   {"idTag": "TAG01"}]
        ws.send(json.dumps([3, "rs-1", {"status": "Accepted"}]))
        _, reply = backend.expect(f"ocpp/cp/{level}/Reply")
        assert reply["UniqueId"] == "rs-1" and reply["Payload"] == {"status": "Accepted"}

    # The gateway's own answer for a charge point that is not connected: decoded, then
    # encoded again on the way back.
    backend.publish("ocpp/cs/CP%2Eother", {"MessageTypeId": 2, "UniqueId": "x1",
                                           "Action": "Reset", "Payload": {"type": "Soft"}})
    _, err = backend.expect("ocpp/cp/CP%2Eother/Reply")
    assert err["MessageTypeId"] == 4 and "CP.other is not connected" in err["ErrorDescription"]
    # Plain ids are untouched.
    with ws_connect(f"{gw.url}/DE-ABC-123", subprotocols=["ocpp1.6"]) as ws:
        ws.send(heartbeat("h1"))
        backend.expect("ocpp/cp/DE-ABC-123", where=lambda b: b.get("UniqueId") == "h1")


def test_a_dotted_id_passes_nats_by_default(nats, nats_backend, make_gateway):
    """Before issue 16 the gateway published ocpp/cp/CP.dot and NATS dropped it, again
    and again; now the id is encoded and both charge points are served."""
    gw = make_gateway(nats.port, STATUS_ON)
    gw.wait_log("subscribed to ocpp/cs/+")
    with ws_connect(f"{gw.url}/CP.dot", subprotocols=["ocpp1.6"]) as dot, \
            ws_connect(f"{gw.url}/CP001", subprotocols=["ocpp1.6"]) as plain:
        dot.send(heartbeat("d1"))
        plain.send(heartbeat("p1"))
        nats_backend.expect("ocpp/cp/CP%2Edot", where=lambda b: b.get("UniqueId") == "d1")
        nats_backend.expect("ocpp/cp/CP001", where=lambda b: b.get("UniqueId") == "p1")
        nats_backend.publish("ocpp/cs/CP%2Edot", {
            "MessageTypeId": 3, "UniqueId": "d1",
            "Payload": {"currentTime": "2026-11-22T10:00:00Z"}})
        assert json.loads(dot.recv(timeout=10))[:2] == [3, "d1"]
    assert "lost" not in gw.log_text() and error_lines(gw) == []


# -- failure 1: a message the broker refuses never blocks the others --------------------


def test_a_message_nats_refuses_goes_to_the_dead_letters_and_the_rest_flows(
        nats, nats_backend, make_gateway, tmp_path):
    admin_port = free_port()
    gw = make_gateway(nats.port, STATUS_ON + "ocpp.topic_id_encoding = none\n"
                      f"admin.listen = 127.0.0.1:{admin_port}\n")
    admin = f"http://127.0.0.1:{admin_port}"
    gw.wait_log("subscribed to ocpp/cs/+")
    with ws_connect(f"{gw.url}/CP001", subprotocols=["ocpp1.6"]) as plain, \
            ws_connect(f"{gw.url}/CP.dot", subprotocols=["ocpp1.6"]) as dot:
        plain.send(heartbeat("p1"))
        nats_backend.expect("ocpp/cp/CP001", where=lambda b: b.get("UniqueId") == "p1")
        dot.send(heartbeat("d1"))  # NATS drops the connection for this one, every time
        for i in range(2, 6):
            plain.send(heartbeat(f"p{i}"))
            time.sleep(0.05)
        for i in range(2, 6):  # they all get through, in order
            nats_backend.expect("ocpp/cp/CP001", where=lambda b, i=i: b.get("UniqueId") ==
                                f"p{i}", timeout=20)
        log = gw.wait_log("dead-letter table")
        plain.send(heartbeat("p6"))  # and the link stays up for the others
        nats_backend.expect("ocpp/cp/CP001", where=lambda b: b.get("UniqueId") == "p6")

    # One ERROR line for it, naming the charge point, the topic and why.
    dead_errors = [line for line in error_lines(gw) if "dead-letter" in line]
    assert len(dead_errors) == 1, error_lines(gw)
    assert "charge point CP.dot" in dead_errors[0] and "ocpp/cp/CP.dot" in dead_errors[0]
    assert "closed the connection" in dead_errors[0] and "'.'" in dead_errors[0]
    # The loss lines say what was in flight.
    assert re.search(r"lost \(.*\).*the oldest: message \d+ on ocpp/cp/CP\.dot", log)
    # Counted: /metrics and the status (ctl status).
    assert get(admin, "/api/v1/status")["buffer"]["dead_letters"] == 1
    assert "ocpp_edge_upstream_dead_letters_total 1\n" in get(admin, "/metrics")
    ctl = subprocess.run([sys.executable, "-m", "ocpp_edge", "ctl", "--url", admin, "status"],
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert re.search(r"^buffer\s+.*, 1 dead letter\b", ctl.stdout, re.M), ctl.stdout
    assert not [ln for ln in nats.log.read_text().splitlines()
                if "not supported" in ln][3:], "more than 3 tries"

    # In the store, after a restart too: the message never blocks the start.
    assert gw.stop() == 0
    buffer_dir = next(tmp_path.glob("buffer-*"))
    db = sqlite3.connect(buffer_dir / "buffer.sqlite3")
    dead = db.execute("SELECT topic, payload, reason FROM dead").fetchall()
    left = db.execute("SELECT count(*) FROM msg WHERE topic = 'ocpp/cp/CP.dot'").fetchone()
    db.close()
    assert len(dead) == 1 and left == (0,)
    topic, payload, reason = dead[0]
    assert topic == "ocpp/cp/CP.dot" and json.loads(payload)["UniqueId"] == "d1"
    assert "3 times in a row" in reason
    gw.start()
    gw.wait_log("subscribed to ocpp/cs/+")
    with ws_connect(f"{gw.url}/CP001", subprotocols=["ocpp1.6"]) as plain:
        plain.send(heartbeat("p7"))
        nats_backend.expect("ocpp/cp/CP001", where=lambda b: b.get("UniqueId") == "p7")
    assert get(admin, "/api/v1/status")["buffer"]["dead_letters"] == 1


def test_qos_2_on_nats_is_one_error_naming_the_key(nats, nats_backend, make_gateway):
    """NATS closes the connection at the first QoS 2 publish (the retained status here):
    the gateway says which key once, keeps retrying, and gives up on no message."""
    gw = make_gateway(nats.port, STATUS_ON + "mqtt.qos = 2\nmqtt.clean_session = true\n")
    with ws_connect(f"{gw.url}/CP001", subprotocols=["ocpp1.6"]) as plain:
        plain.send(heartbeat("q1"))
        gw.wait_log("mqtt.qos = 1", timeout=30)
        retries = gw.log_text().count("retrying in")
        eventually(lambda: gw.log_text().count("retrying in") >= retries + 3,
                   "more reconnection attempts after the error", timeout=20)
    errors = error_lines(gw)
    assert len(errors) == 1, errors
    assert "mqtt.qos" in errors[0] and "QoS 2" in errors[0]
    # ... with a growing backoff (mqtt.reconnect_delay_min = 100ms), not at full speed
    after = gw.log_text().split(errors[0], 1)[1]
    delays = [float(d) for d in re.findall(r"retrying in ([\d.]+) s", after)]
    assert len(delays) >= 3 and min(delays) >= 0.2, delays
    assert "dead-letter" not in gw.log_text()
