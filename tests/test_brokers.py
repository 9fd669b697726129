"""The gateway against every supported broker (issue 16, README "Supported brokers"):
Mosquitto 2.0, RabbitMQ 3.10 with its MQTT plugin, NATS 2.9 in MQTT mode (JetStream).

The same tests run on each, against a private instance started by ``tests/brokers.py``
once per broker for the whole module (RabbitMQ takes about ten seconds to start): round
trips with the PyPI ``ocpp`` library as the charge point, the retained status and the will,
username/password at the broker, charge point ids with characters brokers treat
specially, ``mqtts://``, and a broker restart while messages flow (where NATS 2.9 loses
what it acknowledged while it stopped: the test asserts that behaviour, README "Supported
brokers"). Then many sites on one broker: two gateways with their own client ids and
mountpoints, one backend consuming every site (on Mosquitto through a shared
subscription; RabbitMQ 3.10 and NATS 2.9 have none).

Tests share their broker, so each uses charge point ids, client ids and topics of its
own, and ends the persistent sessions it opened.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import time
from collections import Counter

import pytest
import websockets
from brokers import (
    KINDS,
    PASSWORD,
    USER,
    BrokerBase,
    Client,
    Nats,
    TlsFiles,
    make_broker,
    make_tls_files,
    restart_while_flowing,
)
from conftest import GatewayProcess, free_port
from ocpp.routing import on
from ocpp.v16 import ChargePoint as ChargePoint16
from ocpp.v16 import call, call_result
from ocpp.v16.enums import RegistrationStatus

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("broker-pki") / "pki")


@pytest.fixture(scope="module", params=KINDS)
def mqtt_broker(request, tmp_path_factory, tls_files) -> BrokerBase:
    """One private broker of each kind for the module, with a TLS listener beside the
    plain one where the broker can have both (not NATS: one MQTT listener); a test that
    stops it starts it again."""
    kind = request.param
    if kind == "nats":
        # NATS redelivers a QoS 1 message that a subscriber did not acknowledge (it left)
        # only after mqtt.ack_wait (30 s by default), also to a session that came back:
        # 1 s keeps the restart test short and shows those redeliveries.
        b = make_broker(kind, tmp_path_factory.mktemp(kind), ack_wait="1s")
    else:
        b = make_broker(kind, tmp_path_factory.mktemp(kind), tls_files)
    b.start()
    yield b
    b.close()


@pytest.fixture
def make_gateway(tmp_path):
    """``make(broker, extra, name)``: a gateway process in a directory of its own (config,
    log, buffer), stopped after the test."""
    started: list[GatewayProcess] = []

    def make(broker: BrokerBase, extra: str = "", name: str = "gw", *,
             credentials: bool = True) -> GatewayProcess:
        workdir = tmp_path / name
        workdir.mkdir()
        settings = broker.gateway_settings() if credentials else ""
        gw = GatewayProcess(workdir, broker.port, settings + extra)
        started.append(gw)
        return gw.start()

    yield make
    for gw in started:
        gw.stop()


def start_gateway(make_gateway, broker: BrokerBase, extra: str = "",
                  name: str = "gw") -> GatewayProcess:
    gw = make_gateway(broker, extra, name)
    gw.wait_log("subscribed to", timeout=15)
    return gw


async def in_thread(fn, *args, **kwargs):
    return await asyncio.get_running_loop().run_in_executor(None, lambda: fn(*args, **kwargs))


class ChargePoint(ChargePoint16):
    @on("RemoteStartTransaction")
    async def on_remote_start(self, id_tag, **kwargs):
        return call_result.RemoteStartTransaction(status="Accepted")


# The characters of a charge point id that some supported broker treats specially in a
# topic level (NATS: `.`, space, `*`, `>`; RabbitMQ: `.` as a level separator, `*` as `+`;
# MQTT itself: `+`, `#`, `/`, a leading `$`), and `%` itself, are written `%XX` (upper-case
# hex) in the topic level; every other id is its own topic level.
SPECIAL = set(". *>+#/%")


def topic_level(cid: str) -> str:
    return "".join(f"%{ord(ch):02X}" if ch in SPECIAL or (ch == "$" and i == 0) else ch
                   for i, ch in enumerate(cid))


def test_topic_level_encoding_of_the_tests():
    assert topic_level("CP001") == "CP001"
    assert topic_level("DE-ABC-123") == "DE-ABC-123"
    assert topic_level("CP.dot") == "CP%2Edot"
    assert topic_level("DE*ABC*E123*4") == "DE%2AABC%2AE123%2A4"
    assert topic_level("$a b+#/>%") == "%24a%20b%2B%23%2F%3E%25"


def boot_and_remote_start(gw: GatewayProcess, backend: Client, cid: str) -> None:
    """README "Worked example: BootNotification" and the command the other way round, with
    the ``ocpp`` library's charge point; the backend finds the charge point's topic level
    by subscribing with wildcards, so a topic the broker split or rewrote shows up as
    such."""
    level = topic_level(cid)

    async def scenario():
        async with websockets.connect(f"{gw.url}/{cid}", subprotocols=["ocpp1.6"]) as ws:
            cp = ChargePoint(cid, ws, response_timeout=TIMEOUT)
            runner = asyncio.create_task(cp.start())
            boot = asyncio.create_task(cp.call(call.BootNotification(
                charge_point_model="Optimus", charge_point_vendor="The Mobility House")))
            topic, up = await in_thread(backend.expect, None,
                                        where=lambda b: b.get("Action") == "BootNotification")
            assert topic == f"ocpp/cp/{level}"
            assert up["MessageTypeId"] == 2
            assert up["Payload"] == {"chargePointModel": "Optimus",
                                     "chargePointVendor": "The Mobility House"}
            await in_thread(backend.publish, f"ocpp/cs/{level}", {
                "MessageTypeId": 3, "UniqueId": up["UniqueId"],
                "Payload": {"currentTime": "2026-11-22T10:00:00Z", "interval": 300,
                            "status": "Accepted"}})
            result = await asyncio.wait_for(boot, TIMEOUT)
            assert result.status == RegistrationStatus.accepted
            assert result.interval == 300

            await in_thread(backend.publish, f"ocpp/cs/{level}", {
                "MessageTypeId": 2, "UniqueId": f"rs-{level}",
                "Action": "RemoteStartTransaction",
                "Payload": {"idTag": "TAG01", "connectorId": 1}})
            topic, reply = await in_thread(backend.expect, None,
                                           where=lambda b: b.get("UniqueId") == f"rs-{level}"
                                           and b.get("MessageTypeId") == 3)
            assert topic == f"ocpp/cp/{level}/Reply"
            assert reply == {"MessageTypeId": 3, "UniqueId": f"rs-{level}",
                             "Payload": {"status": "Accepted"},
                             "Action": "RemoteStartTransaction"}
            runner.cancel()

    asyncio.run(scenario())


def test_round_trips_with_the_ocpp_library(mqtt_broker, make_gateway):
    gw = start_gateway(make_gateway, mqtt_broker)
    backend = Client(mqtt_broker, ["ocpp/#"])
    try:
        boot_and_remote_start(gw, backend, f"CP-RT-{mqtt_broker.kind}")
    finally:
        backend.close()


@pytest.mark.parametrize("cid", ["CP.dot", "DE*ABC*E123*4"])
def test_special_charge_point_ids_are_one_topic_level(mqtt_broker, make_gateway, cid):
    """README "Charge point ids in topics": without the encoding NATS drops the gateway's
    connection for `CP.dot` (and the gateway reconnects forever), RabbitMQ splits it into
    two levels and turns `*` into `+`; with it the id is one topic level everywhere."""
    gw = start_gateway(make_gateway, mqtt_broker)
    # `ocpp/#` too: a message the broker rewrote to other levels is still seen, and the
    # assertion names the topic it arrived on.
    backend = Client(mqtt_broker, ["ocpp/cp/+", "ocpp/cp/+/Reply", "ocpp/#"])
    try:
        boot_and_remote_start(gw, backend, cid)
    finally:
        backend.close()
    text = gw.log_text()
    assert "MQTT connection to" not in text, text[-2000:]  # never dropped by the broker


def status_topic_settings(node: str) -> str:
    return f"mqtt.client_id = {node}\nocpp.upstream.status_topic = sys/${{node}}/status\n"


def first_and_rest(got: list) -> tuple[tuple[str, str, bool], set[str]]:
    """The first status message (topic, status, retained) and the statuses after it (the
    gateway publishes its status again, unchanged, when local mode starts or ends)."""
    assert got, "no status message"
    (t, body, retained, _), rest = got[0], got[1:]
    return (t, body["status"], retained), {m.body["status"] for m in rest}


def test_retained_online_status_and_offline_will_after_kill_9(mqtt_broker, make_gateway):
    b = mqtt_broker
    node = f"gw-status-{b.kind}-{free_port()}"
    topic = f"ocpp/sys/{node}/status"
    gw = start_gateway(make_gateway, b, status_topic_settings(node))
    # The exact topic: RabbitMQ sends retained messages only to a subscription that names
    # the topic itself, never to one with wildcards (README "Supported brokers").
    watcher = Client(b, [topic])
    try:
        t, body = watcher.expect(topic)
        assert body["status"] == "online" and body["node"] == node
        gw.proc.send_signal(signal.SIGKILL)
        gw.proc.wait()
        t, body = watcher.expect(topic, where=lambda body: body["status"] != "online")
        assert body["status"] == "offline" and body["reason"] == "connection_lost", body
    finally:
        watcher.close()
    late = Client(b, [topic])  # subscribes afterwards: gets the retained will
    try:
        assert first_and_rest(late.drain(1.0)) == ((topic, "offline", True), set())
    finally:
        late.close()


def test_online_status_is_retained_for_a_late_subscriber(mqtt_broker, make_gateway):
    b = mqtt_broker
    node = f"gw-retain-{b.kind}-{free_port()}"
    topic = f"ocpp/sys/{node}/status"
    start_gateway(make_gateway, b, status_topic_settings(node))
    late = Client(b, [topic])
    try:
        first, rest = first_and_rest(late.drain(1.0))
        assert first == (topic, "online", True) and rest <= {"online"}
    finally:
        late.close()


# What each broker answers a CONNECT whose credentials are wrong or missing (CONNACK
# return code 5, "not authorised", or 4, "bad user name or password"), as paho 1.6 and
# 2.x spell it in the gateway's log.
REFUSED = {
    "mosquitto": r"Not authorized|Connection Refused: not authorised\.",
    "rabbitmq": r"Bad user name or password|Connection Refused: bad user name or password\.",
    "nats": r"Not authorized|Connection Refused: not authorised\.",
}


def test_username_and_password_at_the_broker(mqtt_broker, make_gateway):
    b = mqtt_broker
    right = make_gateway(b, name="right")
    wrong = make_gateway(b, f"mqtt.username = {USER}\nmqtt.password = not-{PASSWORD}\n",
                         name="wrong", credentials=False)
    anonymous = make_gateway(b, name="anonymous", credentials=False)
    right.wait_log("subscribed to", timeout=15)
    for gw in (wrong, anonymous):
        gw.wait_log("refused the connection", timeout=15)
        assert re.search("refused the connection: " + REFUSED[b.kind], gw.log_text()), \
            gw.log_text()[-1000:]
    time.sleep(1)  # more attempts, all refused
    for gw in (wrong, anonymous):
        assert "MQTT connected" not in gw.log_text()
    assert PASSWORD not in right.log_text() + wrong.log_text()


@pytest.fixture
def tls_broker(mqtt_broker, tls_files, tmp_path) -> BrokerBase:
    if mqtt_broker.tls is not None:
        yield mqtt_broker
        return
    b = Nats(tmp_path / "nats-tls", tls_files).start()  # TLS only: a second server
    yield b
    b.close()


def test_mqtts_uplink(tls_broker, tls_files, make_gateway):
    """``mqtt.server = mqtts://…`` verified against the broker's CA, with a password, and a
    round trip through it (the refusals of untrusted brokers: tests/test_security.py)."""
    b = tls_broker
    gw = make_gateway(b, f"mqtt.server = mqtts://127.0.0.1:{b.tls_port}\n"
                         f"mqtt.cacertfile = {tls_files.ca}\n")
    gw.wait_log("subscribed to", timeout=15)
    backend = Client(b, ["ocpp/cp/+"], tls=True, answer=lambda t, body: (
        t.replace("/cp/", "/cs/"), {"MessageTypeId": 3, "UniqueId": body["UniqueId"],
                                    "Payload": {"currentTime": "2026-12-04T06:00:00Z"}}))
    cid = f"CP-TLS-{b.kind}"

    async def round_trip():
        async with websockets.connect(f"{gw.url}/{cid}", subprotocols=["ocpp1.6"]) as ws:
            await ws.send('[2,"tls-1","Heartbeat",{}]')
            return json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))

    try:
        assert asyncio.run(round_trip()) == [3, "tls-1", {"currentTime": "2026-12-04T06:00:00Z"}]
    finally:
        backend.close()
    assert f"MQTT connected to 127.0.0.1:{b.tls_port}" in gw.log_text()


# --- a broker restart while messages flow ---------------------------------------------

def test_broker_restart_while_messages_flow(mqtt_broker, make_gateway, backend_away):
    """A broker restart (SIGTERM, start) while a charge point sends 500 messages a second,
    with the backend's persistent session (QoS 1) connected throughout or away across the
    restart (tests/brokers.py, restart_while_flowing). Every message the gateway accepted
    was acknowledged by a broker once its buffer is empty; Mosquitto and RabbitMQ deliver
    every one of them, in order. NATS 2.9 may lose the messages it acknowledged while it
    shut down: README "Supported brokers"."""
    b = mqtt_broker
    admin = free_port()
    gw = start_gateway(make_gateway, b, "ocpp.upstream_down_policy = buffer\n"
                       f"admin.listen = 127.0.0.1:{admin}\n")
    flow = restart_while_flowing(b, gw.url, admin, f"RST-{b.kind}-{backend_away}",
                                 backend_away=backend_away == "away")
    print(f"{b.kind}, backend {backend_away}: {flow.summary()}")
    assert len(flow.sent) >= 130
    lost, late = flow.lost, flow.late
    if b.kind != "nats":
        assert lost == [] and late == [], flow.summary()
        assert flow.firsts == sorted(flow.firsts)  # in order
    else:
        # What NATS 2.9 does (README "Supported brokers"). Messages lost, if any, are one
        # run, acknowledged (PUBACK) while the server shut down: its JetStream stops before
        # its MQTT clients are cut off. And a message that was on its way to the backend
        # when the backend left (or the broker stopped) comes again only when its ack wait
        # runs out, flagged DUP, after messages published later.
        if lost:
            assert lost == list(range(lost[0], lost[-1] + 1)), flow.summary()
            assert flow.stop_at - 0.5 <= flow.sent_at[lost[0]], flow.summary()
            assert flow.sent_at[lost[-1]] <= flow.stopped_at + 0.5, flow.summary()
        assert set(late) <= flow.first_dup, flow.summary()
        rest = [i for i in flow.firsts if i not in set(late)]
        assert rest == sorted(rest), flow.summary()
    assert "MQTT connection to 127.0.0.1" in gw.log_text()  # the outage was seen


@pytest.fixture(params=["connected", "away"])
def backend_away(request) -> str:
    return request.param


# --- many sites, one broker ------------------------------------------------------------

SITES = ("site-a", "site-b")
BACKEND_TIME = "2026-12-04T06:00:00Z"  # the backend's answer to every Heartbeat


def answer_heartbeats(topic: str, body: dict):
    """The backend: a CALLRESULT for every Heartbeat, on the downstream topic of the site
    and charge point it came from (``<site>/ocpp/cp/<id>`` → ``<site>/ocpp/cs/<id>``)."""
    site, mount, kind, level = (topic.split("/") + [""])[:4]
    if kind == "cp" and topic.count("/") == 3 and body.get("Action") == "Heartbeat":
        return (f"{site}/{mount}/cs/{level}",
                {"MessageTypeId": 3, "UniqueId": body["UniqueId"],
                 "Payload": {"currentTime": BACKEND_TIME}})
    return None


class SiteChargePoint:
    """A charge point that behaves as chargers do: it produces a Heartbeat every 20 ms,
    sends them one at a time, each after the previous was answered; while it cannot reach
    its gateway it keeps what it produced and tries again every 100 ms, then sends the
    backlog, starting with the CALL whose answer it never got (same UniqueId).

    It produces ``count`` Heartbeats, and more until ``until`` is set: a slow machine
    stretches the scenario, and the charge point still produces all through it."""

    def __init__(self, url: str, prefix: str, count: int,
                 until: threading.Event | None = None) -> None:
        self.url, self.prefix, self.count, self.until = url, prefix, count, until
        self.produced_at: dict[int, float] = {}
        self.answered_at: dict[int, float] = {}
        self.resent: set[int] = set()
        self.reconnects = 0

    async def run(self) -> None:
        pending: list[int] = []

        async def produce():
            i = 0
            while i < self.count or (self.until is not None and not self.until.is_set()):
                pending.append(i)
                self.produced_at[i] = time.monotonic()
                i += 1
                await asyncio.sleep(0.02)
            self.count = i

        producer = asyncio.create_task(produce())
        sent: set[int] = set()
        while not producer.done() or pending:
            try:
                async with websockets.connect(self.url, subprotocols=["ocpp1.6"],
                                              open_timeout=2) as ws:
                    while not producer.done() or pending:
                        if not pending:
                            await asyncio.sleep(0.002)
                            continue
                        i = pending[0]
                        uid = f"{self.prefix}-{i}"
                        if i in sent:
                            self.resent.add(i)
                        await ws.send(json.dumps([2, uid, "Heartbeat", {}]))
                        sent.add(i)
                        reply = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
                        assert reply[:2] == [3, uid], reply
                        self.answered_at[i] = time.monotonic()
                        pending.pop(0)
            except (TimeoutError, OSError, websockets.ConnectionClosed, websockets.InvalidStatus):
                self.reconnects += 1
                await asyncio.sleep(0.1)
        await producer


def backend_answers(url: str, site: str, tries: int = 3) -> None:
    """Wait until a Heartbeat through ``url`` gets the backend's answer (its fixed
    currentTime), not the gateway's local one (after ocpp.offline.answer_after, 10 s): the
    whole path, gateway → broker → backend → broker → gateway, carries messages. The
    probe's UniqueIds are no site's (``probe-``)."""
    async def probe() -> list:
        async with websockets.connect(f"{url}/PROBE", subprotocols=["ocpp1.6"]) as ws:
            for n in range(tries):
                await ws.send(json.dumps([2, f"probe-{site}-{n}", "Heartbeat", {}]))
                reply = json.loads(await asyncio.wait_for(ws.recv(), 30))
                if reply[2:] == [{"currentTime": BACKEND_TIME}]:
                    return reply
        return reply

    reply = asyncio.run(probe())
    assert reply[2:] == [{"currentTime": BACKEND_TIME}], (site, "no answer from the backend "
                                                          f"in {tries} tries", reply)


def test_many_sites_on_one_broker(mqtt_broker, make_gateway):
    """README "Many sites, one broker": two sites, each a gateway with its own client id and
    mountpoint, the same charge point id at both; the backend consumes every site through
    one subscription, on Mosquitto a shared one (``$share/backend/+/ocpp/cp/#``, two
    consumers: each message goes to one of them). Site A's gateway restarts meanwhile
    (SIGTERM, start, as ``systemctl restart`` does): what its charge point produced during
    the restart arrives once the gateway is back, in order; site B is not disturbed."""
    b = mqtt_broker
    shared = b.kind == "mosquitto"  # RabbitMQ 3.10 and NATS 2.9: no $share (README)
    subscription = "$share/backend/+/ocpp/cp/#" if shared else "+/ocpp/cp/#"
    consumers = [Client(b, [subscription], answer=answer_heartbeats)
                 for _ in range(2 if shared else 1)]
    status_topics = {site: f"{site}/ocpp/sys/ocpp-edge-{site}-{b.kind}/status"
                     for site in SITES}
    watcher = Client(b, list(status_topics.values()))  # exact topics (RabbitMQ, retained)
    gws = {site: start_gateway(make_gateway, b, f"mqtt.client_id = ocpp-edge-{site}-{b.kind}\n"
                               f"ocpp.mountpoint = {site}/ocpp/\n"
                               "ocpp.upstream.status_topic = sys/${node}/status\n", site)
           for site in SITES}
    for site, gw in gws.items():
        backend_answers(gw.url, site)
    restarted = threading.Event()  # both charge points produce until site A is back
    cps = {site: SiteChargePoint(f"{gw.url}/CP001", site, 100, restarted)
           for site, gw in gws.items()}
    restart: dict[str, float] = {}

    def restart_site_a():
        try:
            deadline = time.monotonic() + 60
            while len(cps["site-a"].answered_at) < 30 and time.monotonic() < deadline:
                time.sleep(0.01)
            restart["stop"] = time.monotonic()
            gws["site-a"].stop()
            restart["stopped"] = time.monotonic()
            time.sleep(0.5)  # the charge point produces meanwhile, and cannot send
            gws["site-a"].start()
            gws["site-a"].wait_log("subscribed to", timeout=15)
            restart["back"] = time.monotonic()
            time.sleep(0.3)  # and a little after
        finally:
            restarted.set()

    async def scenario():
        await asyncio.gather(*(cp.run() for cp in cps.values()),
                             in_thread(restart_site_a))

    try:
        asyncio.run(scenario())
        time.sleep(0.3)
        received = [[(t, body["UniqueId"]) for t, body, _, _ in c.drain()
                     if isinstance(body, dict) and body.get("MessageTypeId") == 2]
                    for c in consumers]
        statuses = [(t, body["status"]) for t, body, _, _ in watcher.drain()]
    finally:
        for c in (*consumers, watcher):
            c.close()

    everything = [m for got in received for m in got]
    # what a failure below says besides its own values
    per_consumer = {site: [sum(uid.startswith(f"{site}-") for t, uid in got)
                           for got in received] for site in SITES}
    summary = (f"CALLs per site per consumer {per_consumer}, produced "
               f"{ {site: cp.count for site, cp in cps.items()} }, restart {restart}")
    if shared:  # the group shares the load: both consumers got some, none got all
        assert all(got for got in received), [len(got) for got in received]
    for site, cp in cps.items():
        topic = f"{site}/ocpp/cp/CP001"
        mine = [uid for t, uid in everything if uid.startswith(f"{site}-")]
        assert {t for t, uid in everything if uid.startswith(f"{site}-")} == {topic}, \
            (site, summary)
        counts = Counter(mine)
        ids = [int(uid.rsplit("-", 1)[1]) for uid in dict.fromkeys(
            uid for got in received for t, uid in got if uid.startswith(f"{site}-"))]
        missing = sorted(set(range(cp.count)) - set(ids))
        assert missing == [] and len(ids) == cp.count, (site, missing, summary)  # all came
        # Once: the shared group delivers each message to one consumer; a CALL published
        # twice is one the charge point sent again because its answer was lost.
        twice = {int(u.rsplit("-", 1)[1]) for u, n in counts.items() if n > 1}
        assert twice <= cp.resent, (site, twice, cp.resent)
        for got in received:  # in order, per consumer
            seq = [int(uid.rsplit("-", 1)[1]) for t, uid in got if uid.startswith(f"{site}-")]
            assert seq == sorted(seq), (site, seq)

    a, site_b = cps["site-a"], cps["site-b"]
    # Produced once the gateway had stopped (until then it still served the charge point):
    # sent, and answered, once it was back.
    during = [i for i, t in a.produced_at.items()
              if restart["stopped"] <= t <= restart["back"]]
    assert len(during) >= 10 and a.reconnects >= 1, (during, a.reconnects)
    early = [i for i in during if a.answered_at[i] <= restart["back"]]
    assert early == [], (early, restart)
    # Site B carried on: answered while site A was down, never kept waiting.
    assert any(restart["stopped"] <= t <= restart["back"] for t in site_b.answered_at.values())
    assert (site_b.reconnects, site_b.resent) == (0, set())
    waits = [site_b.answered_at[i] - site_b.produced_at[i] for i in range(site_b.count)]
    assert max(waits) < 2.0, max(waits)
    # Presence: site A said offline and online again; site B's status never changed (the
    # status is published again, unchanged, when local mode starts or ends).
    def changes(site: str) -> list[str]:
        seen = [s for t, s in statuses if t == status_topics[site]]
        return [s for i, s in enumerate(seen) if i == 0 or seen[i - 1] != s]

    assert changes("site-a") == ["online", "offline", "online"], statuses
    assert changes("site-b") == ["online"], statuses
