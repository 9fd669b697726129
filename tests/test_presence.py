"""Pure parts of presence and operations: payloads (modelled on EMQX's emqx_sys.erl),
reasons, the buffer's oldest-age clock, frame labels. The same code over real sockets and
a real Mosquitto is in tests/test_ops.py."""

from __future__ import annotations

import base64
import json

import pytest

from ocpp_edge.north import presence
from ocpp_edge.ops.operations import _FRAME_HEAD, BacklogClock, basic_username

INFO = presence.client_info(
    cid="CP1", username=None, ip="10.0.0.7", peer_port=50123, sock_port=33033,
    subprotocol="ocpp2.0.1", listener="ocpp.listener.ws", auth="anonymous",
    connected_at=1_700_000_000.25, keepalive=60.0, node="gw1")

# The keys EMQX 5 puts in both events (emqx_sys:common_infos/2).
EMQX_COMMON = {"clientid", "username", "ipaddress", "sockport", "protocol", "proto_name",
               "proto_ver", "connected_at", "ts"}


def test_connected_event_has_emqx_keys_and_values():
    body = json.loads(presence.connected_payload(INFO, 1_700_000_001.5))
    assert EMQX_COMMON | {"keepalive", "clean_start", "expiry_interval"} <= set(body)
    assert body["clientid"] == "CP1" and body["username"] is None
    assert (body["protocol"], body["proto_name"], body["proto_ver"]) == ("ocpp", "OCPP", "2.0.1")
    assert body["connected_at"] == 1_700_000_000_250 and body["ts"] == 1_700_000_001_500
    assert (body["clean_start"], body["expiry_interval"], body["keepalive"]) == (True, 0, 60)
    assert body["event"] == "connected" and body["node"] == "gw1"
    assert (body["ipaddress"], body["peerport"], body["sockport"]) == ("10.0.0.7", 50123, 33033)


@pytest.mark.parametrize("description, reason, code", [
    ("connection closed, code 1000", "sock_closed", 1000),
    ("connection closed, code None", "sock_closed", None),
    (presence.KICKED, "kicked", None),
    ("replaced by a new connection", "discarded", None),
    ("heartbeat timeout", "keepalive_timeout", None),
    ("gateway shutting down", "shutdown", None),
    ("upstream link down", "upstream_down", None),
    ("internal error", "internal_error", None),
    ("something new", "closed", None),
])
def test_disconnected_event_reason(description, reason, code):
    body = json.loads(presence.disconnected_payload(INFO, description, code, 1_700_000_009))
    assert EMQX_COMMON | {"reason", "disconnected_at"} <= set(body)
    assert (body["reason"], body["description"], body["close_code"]) == (reason, description,
                                                                          code)
    assert body["disconnected_at"] == body["ts"] == 1_700_000_009_000
    assert body["event"] == "disconnected"


def test_status_payloads():
    online = json.loads(presence.status_payload("online", node="gw1", version="0.1.0",
                                                started_at="2026-12-02T18:00:00.000Z",
                                                now=1_700_000_000))
    assert online == {"status": "online", "node": "gw1", "version": "0.1.0",
                      "started_at": "2026-12-02T18:00:00.000Z", "ts": 1_700_000_000_000}
    will = json.loads(presence.status_payload("offline", node="gw1", version="0.1.0",
                                              started_at="x", now=None,
                                              reason="connection_lost"))
    assert will == {"status": "offline", "node": "gw1", "version": "0.1.0",
                    "started_at": "x", "reason": "connection_lost"}  # no ts: not known yet


def test_proto_ver():
    assert [presence.proto_ver(p) for p in ("ocpp1.6", "ocpp2.0.1", "ocpp2.1")] == \
        ["1.6", "2.0.1", "2.1"]


def test_basic_username():
    def basic(raw: bytes) -> str:
        return "Basic " + base64.b64encode(raw).decode()

    assert basic_username(basic(b"CP1:secret:with:colons")) == "CP1"
    assert basic_username(basic(b"CP1")) == "CP1"
    assert basic_username(basic(b"\xffCP:x")) == "\ufffdCP"
    assert basic_username(None) is None
    assert basic_username("Bearer abc") is None
    assert basic_username("Basic !!notbase64") is None


@pytest.mark.parametrize("frame, groups", [
    ('[2,"a1","Heartbeat",{}]', ("2", "a1", "Heartbeat")),
    ('[3,"a\\",1",{"status":"Accepted"}]', ("3", 'a\\",1', None)),
    ('[4,"-1","FormationViolation","bad",{}]', ("4", "-1", "FormationViolation")),
    ('[6,"s1","NotifyPeriodicEventStream",{}]', ("6", "s1", "NotifyPeriodicEventStream")),
])
def test_frame_head_labels(frame, groups):
    assert _FRAME_HEAD.match(frame).groups() == groups


def test_backlog_clock_ages_the_oldest_message():
    clock = BacklogClock(initial=0, now=100.0)
    assert clock.oldest_age(0, 100.0) is None
    clock.appended(1, 100.0)        # message 1 at t=100
    clock.appended(2, 100.5)        # message 2, same second: no new sample
    clock.appended(3, 105.0)        # message 3 at t=105
    assert clock.oldest_age(3, 110.0) == pytest.approx(10.0)
    # messages 1 and 2 acknowledged: the oldest is 3, 5 s old at t=110
    assert clock.oldest_age(1, 110.0) == pytest.approx(5.0)
    assert clock.oldest_age(0, 111.0) is None
    clock.appended(1, 200.0)
    assert clock.oldest_age(1, 230.0) == pytest.approx(30.0)


def test_backlog_clock_counts_messages_found_at_start_as_arriving_then():
    clock = BacklogClock(initial=5, now=50.0)
    clock.appended(6, 60.0)
    assert clock.oldest_age(6, 70.0) == pytest.approx(20.0)
    assert clock.oldest_age(1, 70.0) == pytest.approx(10.0)  # the 5 old ones are gone


def test_backlog_clock_memory_is_bounded():
    clock = BacklogClock(initial=0, now=0.0, max_samples=100)
    for second in range(1000):  # a long outage: one sample per second, nothing acked
        clock.appended(second + 1, float(second))
    assert len(clock._samples) <= 100
    assert clock.oldest_age(1000, 1000.0) == pytest.approx(1000.0)
