"""The per-charge-point session state machine, driven with strings and a fake clock.

Grouped by the rule each group checks: OCPP-J 1.6 §4.1.1 / 2.0.1 Part 4 §4.1.1 (one
outstanding CALL each way), SPEC "Call discipline", "Downstream" and "Connection"
(liveness). No sockets, no broker, no sleeping.
"""

import json

import pytest

from ocpp_edge.core.ocppj.errors import (
    FormatViolation,
    NotImplementedError_,
    TypeConstraintViolation,
)
from ocpp_edge.core.ocppj.messages import Call, CallError, CallResult, CallResultError, Send
from ocpp_edge.core.session import (
    CloseConnection,
    Policy,
    Session,
    SessionClosed,
    State,
    ToBackend,
    ToChargePoint,
)

NO_HB = dict(heartbeat_backoff=0)


def make(version="ocpp1.6", now=0.0, **policy):
    kw = dict(NO_HB)
    kw.update(policy)
    return Session("CP1", version, now, Policy(**kw))


def frames(effects):
    return [json.loads(e.text) for e in effects if isinstance(e, ToChargePoint)]


def up(effects):
    return [(e.message, e.action) for e in effects if isinstance(e, ToBackend)]


# -- framing: malformed input ------------------------------------------------------------

class TestMalformed:
    def test_malformed_call_is_answered_never_forwarded(self):
        s = make()
        out = s.receive_text('[2,"7","Heartbeat",[]]', 1)
        assert frames(out) == [[4, "7", "FormationViolation", "payload must be a JSON object",
                                {}]]
        assert up(out) == [] and s.counters["malformed"] == 1

    def test_2x_spelling(self):
        (out,) = make("ocpp2.0.1").receive_text("garbage", 1)
        assert json.loads(out.text)[:3] == [4, "-1", "RpcFrameworkError"]

    def test_malformed_callerror_is_not_answered(self):
        # Answering an error with an error could loop between two peers forever.
        s = make()
        assert s.receive_text('[4,"7",1,2,3]', 1) == []
        assert s.counters["malformed"] == 1


# -- charge point → backend (upstream CALLs) ------------------------------------------------

class TestUpstreamCalls:
    def test_call_goes_up_and_reply_comes_down(self):
        s = make()
        assert up(s.receive_text('[2,"1","Heartbeat",{}]', 0)) == [
            (Call("1", "Heartbeat", {}), None)]
        assert s.pending_from_cp == 1
        assert frames(s.send(CallResult("1", {"currentTime": "t"}), 1)) == [
            [3, "1", {"currentTime": "t"}]]
        assert s.pending_from_cp == 0

    def test_backend_silent_charge_point_gets_callerror_at_timeout(self):
        s = make(upstream_timeout=30)
        s.receive_text('[2,"1","Heartbeat",{}]', 0)
        assert s.next_deadline() == 30
        assert s.on_timer(29.9) == []
        (err,) = frames(s.on_timer(30))
        assert err[:3] == [4, "1", "InternalError"] and "30 s" in err[3]
        assert s.counters["timeouts_upstream"] == 1
        # the late answer is dropped, never forwarded twice
        assert s.send(CallResult("1", {}), 31) == []
        assert s.counters["orphan_replies"] == 1

    def test_retransmission_is_republished_and_restarts_the_deadline(self):
        s = make(upstream_timeout=30)
        s.receive_text('[2,"1","Heartbeat",{}]', 0)
        assert len(up(s.receive_text('[2,"1","Heartbeat",{}]', 20))) == 1
        assert s.pending_from_cp == 1 and s.next_deadline() == 50
        assert s.on_timer(40) == []

    def test_concurrent_calls_are_tolerated_and_tracked_separately(self):
        s = make(upstream_timeout=30)
        s.receive_text('[2,"a","StatusNotification",{}]', 0)
        s.receive_text('[2,"b","StatusNotification",{}]', 5)
        assert frames(s.send(CallResult("b", {}), 6)) == [[3, "b", {}]]
        assert [f[1] for f in frames(s.on_timer(30))] == ["a"]

    @pytest.mark.parametrize("reply", [CallResult("zz", {}), CallError("zz", "X", "", {})])
    def test_orphan_backend_reply_is_dropped(self, reply):
        s = make()
        assert s.send(reply, 0) == []
        assert s.counters["orphan_replies"] == 1

    def test_callerror_details_travel_down(self):
        s = make()
        s.receive_text('[2,"1","Authorize",{"idTag":"x"}]', 0)
        assert frames(s.send(CallError("1", "InternalError", "db", {"k": 1}), 1)) == [
            [4, "1", "InternalError", "db", {"k": 1}]]

    def test_non_strict_forwards_anything(self):
        s = make(upstream_strict=False)
        assert frames(s.send(CallResult("never-asked", {}), 0)) == [[3, "never-asked", {}]]
        s.receive_text('[2,"1","Heartbeat",{}]', 0)
        assert s.next_deadline() is None


# -- backend → charge point (downstream CALLs) ---------------------------------------------

class TestDownstreamCalls:
    def test_one_in_flight_the_rest_queued_in_order(self):
        s = make()
        assert frames(s.send(Call("r1", "Reset", {"type": "Soft"}), 0)) == [
            [2, "r1", "Reset", {"type": "Soft"}]]
        assert s.send(Call("r2", "ClearCache", {}), 0) == []
        assert s.send(Call("r3", "ClearCache", {}), 0) == []
        assert s.queue_length == 3
        out = s.receive_text('[3,"r1",{"status":"Accepted"}]', 1)
        assert up(out) == [(CallResult("r1", {"status": "Accepted"}), "Reset")]
        assert frames(out) == [[2, "r2", "ClearCache", {}]]
        out = s.receive_text('[4,"r2","NotSupported","no",{"why":1}]', 2)
        assert up(out) == [(CallError("r2", "NotSupported", "no", {"why": 1}), "ClearCache")]
        assert frames(out) == [[2, "r3", "ClearCache", {}]]

    def test_full_queue_answers_the_backend(self):
        s = make(max_queue=1)
        s.send(Call("r1", "Reset", {}), 0)
        s.send(Call("r2", "Reset", {}), 0)
        ((err, action),) = up(s.send(Call("r3", "Reset", {}), 0))
        assert err.unique_id == "r3" and err.error_code == "GenericError"
        assert "full" in err.error_description and action == "Reset"
        assert s.counters["queue_full"] == 1

    def test_charge_point_silent_backend_gets_callerror_and_queue_moves(self):
        s = make(dnstream_timeout=30)
        s.send(Call("r1", "Reset", {}), 0)
        s.send(Call("r2", "ClearCache", {}), 10)
        assert s.next_deadline() == 30
        out = s.on_timer(30)
        ((err, action),) = up(out)
        assert (err.unique_id, err.error_code, action) == ("r1", "GenericError", "Reset")
        assert "did not answer within 30 s" in err.error_description
        assert frames(out) == [[2, "r2", "ClearCache", {}]]
        assert s.next_deadline() == 60
        # the charge point's late answer to r1 matches nothing now
        assert s.receive_text('[3,"r1",{}]', 31) == []
        assert s.counters["orphan_replies"] == 1

    def test_retries_resend_then_give_up(self):
        s = make(dnstream_timeout=10, retry_interval=5, max_retries=2)
        first = s.send(Call("r1", "Reset", {}), 0)
        assert frames(s.on_timer(10)) == frames(first)
        assert s.next_deadline() == 15
        assert frames(s.on_timer(15)) == frames(first)
        out = s.on_timer(20)
        assert frames(out) == [] and up(out)[0][0].unique_id == "r1"

    def test_answer_after_a_retry_is_accepted(self):
        s = make(dnstream_timeout=10, retry_interval=5, max_retries=1)
        s.send(Call("r1", "Reset", {}), 0)
        s.on_timer(10)
        assert up(s.receive_text('[3,"r1",{"status":"Accepted"}]', 11))[0][1] == "Reset"

    def test_duplicate_backend_call_is_not_sent_twice(self):
        s = make()
        s.send(Call("r1", "Reset", {}), 0)
        assert s.send(Call("r1", "Reset", {}), 1) == []
        s.send(Call("r2", "Reset", {}), 1)
        assert s.send(Call("r2", "Reset", {}), 2) == []
        assert s.queue_length == 2

    def test_orphan_charge_point_reply_is_dropped(self):
        s = make()
        assert s.receive_text('[3,"nobody",{}]', 0) == []
        s.send(Call("r1", "Reset", {}), 0)
        assert s.receive_text('[3,"other",{}]', 1) == []
        assert s.counters["orphan_replies"] == 2 and s.queue_length == 1

    def test_non_strict_sends_at_once_and_labels_replies(self):
        s = make(dnstream_strict=False)
        assert len(frames(s.send(Call("r1", "Reset", {}), 0))) == 1
        assert len(frames(s.send(Call("r2", "Reset", {}), 0))) == 1
        assert up(s.receive_text('[3,"r2",{}]', 1)) == [(CallResult("r2", {}), "Reset")]
        assert up(s.receive_text('[3,"xx",{}]', 1)) == [(CallResult("xx", {}), None)]
        assert s.next_deadline() is None

    def test_ocpp21_callresulterror_and_send_go_up(self):
        s = make("ocpp2.1")
        assert up(s.receive_text('[6,"s1","NotifyPeriodicEventStream",{}]', 0)) == [
            (Send("s1", "NotifyPeriodicEventStream", {}), None)]
        assert up(s.receive_text('[5,"x","FormatViolation","bad",{}]', 0)) == [
            (CallResultError("x", "FormatViolation", "bad", {}), None)]


# -- schema checking hooks ---------------------------------------------------------------

def checker(version, action, payload, response):
    if action == "Unknown":
        return None if response else NotImplementedError_(f"{action} is not an action")
    if "bad" in payload:
        return TypeConstraintViolation(f"{action}: 'bad' must be of type string")
    return None


class TestSchemaHooks:
    def test_invalid_upstream_call_answered_with_the_fitting_code(self):
        s = make(check_upstream=checker)
        out = s.receive_text('[2,"1","Authorize",{"bad":1}]', 0)
        assert frames(out) == [[4, "1", "TypeConstraintViolation",
                                "Authorize: 'bad' must be of type string", {}]]
        assert up(out) == [] and s.pending_from_cp == 0

    def test_unknown_action_is_not_implemented(self):
        s = make(check_upstream=checker)
        assert frames(s.receive_text('[2,"1","Unknown",{}]', 0))[0][:3] == [
            4, "1", "NotImplemented"]

    def test_invalid_callresult_from_charge_point_is_reported_as_error(self):
        s = make(check_upstream=checker)
        s.send(Call("r1", "Reset", {}), 0)
        ((err, action),) = up(s.receive_text('[3,"r1",{"bad":1}]', 1))
        assert isinstance(err, CallError) and action == "Reset"
        assert err.error_code == "TypeConstraintViolation"
        assert err.error_details == {"Payload": {"bad": 1}}

    def test_invalid_downstream_call_is_not_sent(self):
        s = make(check_dnstream=checker)
        out = s.send(Call("r1", "Reset", {"bad": 1}), 0)
        assert frames(out) == []
        ((err, action),) = up(out)
        assert err.error_code == "TypeConstraintViolation" and action == "Reset"
        assert s.queue_length == 0

    def test_invalid_backend_reply_answers_both_sides(self):
        s = make(check_dnstream=checker)
        s.receive_text('[2,"1","Authorize",{"idTag":"x"}]', 0)
        out = s.send(CallResult("1", {"bad": 1}), 1)
        assert frames(out)[0][:3] == [4, "1", "InternalError"]
        assert up(out)[0][0].error_code == "TypeConstraintViolation"
        assert s.pending_from_cp == 0

    def test_checks_by_direction(self):
        s = make(check_dnstream=checker)  # upstream unchecked
        assert up(s.receive_text('[2,"1","Authorize",{"bad":1}]', 0))


# -- liveness (SPEC "Connection": EMQX heartbeat checking) ---------------------------------

class TestHeartbeat:
    def test_closed_after_backoff_silent_intervals(self):
        s = make(heartbeat_interval=60, heartbeat_backoff=2)
        assert s.next_deadline() == 120
        out = s.on_timer(120)
        assert CloseConnection(1000, "heartbeat timeout") in out
        assert s.state is State.CLOSED

    def test_any_message_keeps_it_alive_sampled_per_interval(self):
        s = make(heartbeat_interval=60, heartbeat_backoff=1, upstream_strict=False)
        s.receive_text('[2,"1","Heartbeat",{}]', 50)  # seen at the tick at 60
        assert s.next_deadline() == 120
        s.receive_text('[2,"2","Heartbeat",{}]', 110)
        assert s.on_timer(120) == [] and s.next_deadline() == 180

    def test_interval_follows_accepted_boot_notification(self):
        s = make(heartbeat_interval=60, heartbeat_backoff=2)
        s.receive_text('[2,"b","BootNotification",{}]', 10)
        s.send(CallResult("b", {"status": "Accepted", "interval": 300,
                                "currentTime": "t"}), 11)
        assert s.next_deadline() == 10 + 600

    def test_rejected_boot_keeps_the_default(self):
        s = make(heartbeat_interval=60, heartbeat_backoff=2)
        s.receive_text('[2,"b","BootNotification",{}]', 10)
        s.send(CallResult("b", {"status": "Rejected", "interval": 300}), 11)
        assert s.next_deadline() == 180  # seen at the 60 s tick; silent at 120 and 180

    def test_disabled(self):
        assert make(heartbeat_backoff=0).next_deadline() is None


# -- end of a connection -------------------------------------------------------------------

class TestClose:
    def test_pending_downstream_calls_are_answered(self):
        s = make()
        s.send(Call("r1", "Reset", {}), 0)
        s.send(Call("r2", "ClearCache", {}), 0)
        out = s.close("replaced by a new connection")
        assert [(m.unique_id, a) for m, a in up(out)] == [("r1", "Reset"), ("r2", "ClearCache")]
        assert all("replaced by a new connection" in m.error_description for m, _ in up(out))
        assert s.close("again") == []

    def test_inputs_after_close_are_a_caller_bug(self):
        s = make()
        s.close("bye")
        with pytest.raises(SessionClosed):
            s.receive_text('[2,"1","Heartbeat",{}]', 0)
        assert s.on_timer(1e9) == []


def test_reject_call_answers_with_the_call_id():
    s = make()
    (effect,) = s.receive_text('[2,"9","Heartbeat",{}]', 0)
    (out,) = s.reject_call(effect.message, FormatViolation("cannot route"))
    assert json.loads(out.text) == [4, "9", "FormationViolation", "cannot route", {}]
    assert s.pending_from_cp == 0


# -- Local mode (issue "Offline operation"): answer_after hands a CALL to the gateway ----

def test_local_mode_hands_an_unanswered_call_to_the_gateway_at_answer_after():
    from ocpp_edge.core.session import Unanswered

    s = make(upstream_timeout=30, answer_after=10)
    s.receive_text('[2,"a","Authorize",{"idTag":"T1"}]', 0.0)
    assert s.next_deadline() == 10.0
    assert s.on_timer(9.9) == []
    effects = s.on_timer(10.0)
    assert effects == [Unanswered("a", "Authorize")]  # no CALLERROR to the charge point
    assert s.pending_from_cp == 0
    assert s.counters["timeouts_upstream"] == 0
    # the backend's late answer is no reply of this session's any more
    assert s.send(CallResult("a", {"idTagInfo": {"status": "Accepted"}}), 11.0) == []
    assert s.counters["orphan_replies"] == 1


def test_settle_forgets_a_call_the_gateway_answered():
    s = make(answer_after=10)
    s.receive_text('[2,"a","Heartbeat",{}]', 0.0)
    s.receive_text('[2,"b","Heartbeat",{}]', 1.0)
    assert s.settle("a") is True
    assert s.settle("a") is False
    assert s.pending_from_cp == 1
    assert s.next_deadline() == 11.0
    assert frames(s.send(CallResult("b", {"currentTime": "2026-01-01T00:00:00Z"}), 2.0)) == [
        [3, "b", {"currentTime": "2026-01-01T00:00:00Z"}]]
    assert s.send(CallResult("a", {}), 2.0) == []  # settled: an orphan


def test_without_answer_after_the_timeout_is_a_callerror():
    s = make(upstream_timeout=30)
    s.receive_text('[2,"a","Heartbeat",{}]', 0.0)
    assert frames(s.on_timer(30.0))[0][:3] == [4, "a", "InternalError"]
