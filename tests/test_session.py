"""The per-charge-point session, driven with strings (no sockets, no broker)."""

import json

from ocpp_edge.ocppj.errors import FormatViolation
from ocpp_edge.ocppj.messages import Call, CallError, CallResult
from ocpp_edge.session import MAX_PENDING, Session, ToBackend, ToChargePoint


def test_call_from_charge_point_goes_upstream():
    s = Session("CP1", "ocpp1.6")
    assert s.receive_text('[2,"1","Heartbeat",{}]') == [ToBackend(Call("1", "Heartbeat", {}))]
    assert s.action_of_call_from_cp("1") == "Heartbeat"


def test_backend_reply_goes_to_charge_point_and_clears_pending():
    s = Session("CP1", "ocpp1.6")
    s.receive_text('[2,"1","Heartbeat",{}]')
    out = s.send(CallResult("1", {"currentTime": "t"}))
    assert out == [ToChargePoint('[3,"1",{"currentTime":"t"}]')]
    assert s.action_of_call_from_cp("1") is None


def test_reply_from_charge_point_carries_the_action_of_our_call():
    s = Session("CP1", "ocpp1.6")
    assert s.send(Call("r1", "Reset", {"type": "Soft"})) == [
        ToChargePoint('[2,"r1","Reset",{"type":"Soft"}]')]
    assert s.receive_text('[3,"r1",{"status":"Accepted"}]') == [
        ToBackend(CallResult("r1", {"status": "Accepted"}), "Reset")]
    # a second reply with the same id matches nothing any more
    assert s.receive_text('[3,"r1",{}]') == [ToBackend(CallResult("r1", {}), None)]


def test_callerror_from_charge_point_carries_action_and_details():
    s = Session("CP1", "ocpp1.6")
    s.send(Call("r1", "Reset", {}))
    assert s.receive_text('[4,"r1","NotSupported","no",{"why":"x"}]') == [
        ToBackend(CallError("r1", "NotSupported", "no", {"why": "x"}), "Reset")]


def test_malformed_call_is_answered_never_forwarded():
    s = Session("CP1", "ocpp1.6")
    out = s.receive_text('[2,"7","Heartbeat",[]]')
    assert len(out) == 1 and isinstance(out[0], ToChargePoint)
    assert json.loads(out[0].text) == [4, "7", "FormationViolation",
                                       "payload must be a JSON object", {}]
    assert s.counters["malformed"] == 1


def test_malformed_in_201_uses_201_spelling():
    s = Session("CP1", "ocpp2.0.1")
    (out,) = s.receive_text("garbage")
    assert json.loads(out.text)[:3] == [4, "-1", "RpcFrameworkError"]


def test_malformed_callerror_is_not_answered():
    # Answering an error with an error could loop between two peers forever.
    s = Session("CP1", "ocpp1.6")
    assert s.receive_text('[4,"7",1,2,3]') == []
    assert s.counters["malformed"] == 1


def test_pending_tables_are_bounded():
    s = Session("CP1", "ocpp1.6")
    for i in range(MAX_PENDING + 5):
        s.send(Call(str(i), "Reset", {}))
    assert len(s._to_cp) == MAX_PENDING
    assert s.receive_text('[3,"0",{}]') == [ToBackend(CallResult("0", {}), None)]
    assert s.receive_text(f'[3,"{MAX_PENDING + 4}",{{}}]')[0].action == "Reset"


def test_reject_call_answers_with_the_call_id():
    s = Session("CP1", "ocpp1.6")
    (effect,) = s.receive_text('[2,"9","Heartbeat",{}]')
    (out,) = s.reject_call(effect.message, FormatViolation("cannot route"))
    assert json.loads(out.text) == [4, "9", "FormationViolation", "cannot route", {}]
    assert s.action_of_call_from_cp("9") is None
