"""Offline operation's decisions (core/offline.py) on a real LocalState file and a real
DiskBuffer: the edge cases a review found, each pinned (README "When the backend is
away"). No broker: tests/test_offline.py runs the same end to end."""

from __future__ import annotations

import json

from ocpp_edge.core.local import LocalOptions
from ocpp_edge.core.ocppj.messages import Call, CallError, CallResult
from ocpp_edge.core.offline import STOP_GRACE, Offline
from ocpp_edge.store.diskbuffer import DiskBuffer
from ocpp_edge.store.gate import GatedBuffer
from ocpp_edge.store.localstate import LocalState

V = "ocpp1.6"
START = {"connectorId": 1, "idTag": "T", "meterStart": 0, "timestamp": "2026-01-01T00:00:00Z"}


def make(tmp_path):
    state = LocalState(tmp_path / "local.sqlite")
    off = Offline(state, LocalOptions())
    off.link(False)
    return state, off


def answer_locally(off, cid, call, now=0.0, upstream_id=None):
    found = off.answer(cid, V, call, now)
    off.answered(cid, V, call, found, now, upstream_id)
    return found


def message(uid, action, payload):
    return json.dumps({"MessageTypeId": 2, "UniqueId": uid, "Action": action,
                       "Payload": payload}).encode()


def meter(tid):
    return {"connectorId": 1, "transactionId": tid, "meterValue": []}


def test_a_reused_unique_id_is_published_under_its_own_id(tmp_path):
    # The charge point reboots during the outage and starts its ids again at "1".
    state, off = make(tmp_path)
    local_id = answer_locally(off, "CP", Call("1", "StartTransaction", START)).transaction_id
    second = off.upstream_unique_id("CP", "1")
    assert second == "1~2"
    answer_locally(off, "CP", Call("1", "BootNotification",
                                   {"chargePointVendor": "V", "chargePointModel": "M"}),
                   upstream_id=second)
    assert off.upstream_unique_id("CP", "1") == "1~3"
    start = off.reply("CP", V, CallResult("1", {"idTagInfo": {"status": "Accepted"},
                                                "transactionId": 4711}), 1.0)
    assert (start.forward, start.mapped) == (False, (local_id, 4711))
    boot = off.reply("CP", V, CallResult(second, {"status": "Accepted", "interval": 300,
                                                  "currentTime": "2026-01-01T00:00:00Z"}), 1.0)
    assert (boot.forward, boot.action) == (False, "BootNotification")
    assert state.boot_interval("CP") == 300


def test_a_hold_that_ran_out_gives_the_local_id_up_once(tmp_path):
    state, off = make(tmp_path)
    local_id = answer_locally(off, "CP", Call("s", "StartTransaction", START)).transaction_id
    buf = DiskBuffer(tmp_path / "buf", 1000, 10**7, "drop_oldest")
    for i in range(3):
        buf.append("ocpp/cp/CP", message(f"m{i}", "MeterValues", meter(local_id)))
        buf.append("ocpp/cp/OTHER", message(f"o{i}", "Heartbeat", {}))
    clock = [0.0]
    gated = GatedBuffer(buf, off.upstream_payload, 60, lambda: clock[0],
                        on_timeout=off.give_up_payload)
    assert gated.take(100) == []  # held: the backend's id is not known
    clock[0] = 60.0
    out = gated.take(100)
    assert len(out) == 6 and gated.released == 1  # one hold, then everything flows
    assert all(json.loads(r.payload)["Payload"].get("transactionId", local_id) == local_id
               for r in out)
    assert state.transaction(local_id) == ("CP", local_id)  # given up, persisted
    assert off.counts["given_up"] == 1


def test_a_callerror_to_the_replayed_start_gives_the_local_id_up(tmp_path):
    state, off = make(tmp_path)
    local_id = answer_locally(off, "CP", Call("s", "StartTransaction", START)).transaction_id
    off.link(True)
    found = off.reply("CP", V, CallError("s", "InternalError", "database down", {}), 1.0)
    assert found.forward is False
    assert "InternalError" in found.disagreement
    assert off.upstream_payload(message("m", "MeterValues", meter(local_id))) is not None


def test_the_mapping_outlives_the_stop_answer_for_a_republished_stop(tmp_path):
    state, off = make(tmp_path)
    local_id = answer_locally(off, "CP", Call("s", "StartTransaction", START)).transaction_id
    stop = {"transactionId": local_id, "meterStop": 5, "timestamp": "2026-01-01T01:00:00Z"}
    answer_locally(off, "CP", Call("e", "StopTransaction", stop))
    off.link(True)
    off.reply("CP", V, CallResult("s", {"idTagInfo": {"status": "Accepted"},
                                        "transactionId": 4711}), 10.0)
    published = message("e", "StopTransaction", stop)
    assert json.loads(off.upstream_payload(published))["Payload"]["transactionId"] == 4711
    off.reply("CP", V, CallResult("e", {}), 20.0)
    # the connection dropped before its PUBACK: published again, still rewritten
    assert json.loads(off.upstream_payload(published))["Payload"]["transactionId"] == 4711
    assert off.expire_ended(20.0 + STOP_GRACE - 1) == []
    assert off.expire_ended(20.0 + STOP_GRACE) == [("CP", local_id)]


def test_what_is_tracked_per_charge_point_is_bounded(tmp_path):
    _, off = make(tmp_path)
    off.link(True)
    for i in range(100):
        off.track("CP", Call(f"u{i}", "Heartbeat", {}))
    assert off.in_flight("CP", "u99") is not None
    assert off.in_flight("CP", "u0") is None
    assert sum(1 for i in range(100) if off.in_flight("CP", f"u{i}")) == 16


def test_a_lone_surrogate_in_an_id_is_stored_and_found_again(tmp_path):
    state, off = make(tmp_path)
    call = Call("\ud800", "Authorize", {"idTag": "\ud800x"})
    found = answer_locally(off, "CP", call)
    assert found.payload == {"idTagInfo": {"status": "Invalid"}}
    assert state.commit() is True
    state.close()
    again = LocalState(tmp_path / "local.sqlite")
    assert again.has_answered("CP", "\ud800")
    assert again.take_answered("CP", "\ud800")[1] == {"idTag": "\ud800x"}
