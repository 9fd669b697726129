"""Property-based: for any sequence of inbound text from the charge point, messages from the
backend and clock advances, no exception escapes the session, every CALL from either side
gets exactly one answer (real or gateway-made), and nothing invalid is emitted."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ocpp_edge.core.ocppj.codec import decode
from ocpp_edge.core.ocppj.errors import NotImplementedError_, PropertyConstraintViolation
from ocpp_edge.core.ocppj.messages import Call, CallError, CallResult
from ocpp_edge.core.router import upstream_payload
from ocpp_edge.core.session import CloseConnection, Policy, Session, State, ToBackend, ToChargePoint

IDS = st.sampled_from(["a", "b", "c", "r1", "r2", "r3", "-1", ""])
ACTIONS = st.sampled_from(["Heartbeat", "Reset", "Authorize", "Unknown", "BootNotification"])
PAYLOADS = st.sampled_from([{}, {"bad": 1}, {"status": "Accepted", "interval": 5},
                            {"x": [1, {"y": None}]}])


def checker(version, action, payload, response):
    if action == "Unknown":
        return None if response else NotImplementedError_("unknown")
    if "bad" in payload:
        return PropertyConstraintViolation(f"{action}: 'bad' is bad")
    return None


cp_text = st.one_of(
    st.builds(lambda i, a, p: json.dumps([2, i, a, p]), IDS, ACTIONS, PAYLOADS),
    st.builds(lambda i, p: json.dumps([3, i, p]), IDS, PAYLOADS),
    st.builds(lambda i: json.dumps([4, i, "GenericError", "x", {}]), IDS),
    st.sampled_from(["garbage", "[]", '[2,"q"]', '[4,"q",1,2,3]', '[9,"z",{}]']),
    st.text(max_size=20),
)
backend_msg = st.one_of(
    st.builds(Call, IDS, ACTIONS, PAYLOADS),
    st.builds(CallResult, IDS, PAYLOADS),
    st.builds(lambda i: CallError(i, "GenericError", "d", {}), IDS),
)
ops = st.lists(st.one_of(
    st.tuples(st.just("cp"), cp_text),
    st.tuples(st.just("be"), backend_msg),
    st.tuples(st.just("tick"), st.floats(min_value=0, max_value=40)),
), max_size=40)
policies = st.builds(
    Policy, upstream_timeout=st.sampled_from([5.0, 30.0]),
    dnstream_timeout=st.sampled_from([5.0, 30.0]), retry_interval=st.just(3.0),
    max_retries=st.integers(0, 2), max_queue=st.integers(1, 3),
    check_upstream=st.sampled_from([None, checker]),
    check_dnstream=st.sampled_from([None, checker]),
    heartbeat_interval=st.sampled_from([10.0, 60.0]), heartbeat_backoff=st.integers(0, 2))


class Model:
    """Tracks the CALLs each side is owed an answer for, and checks every effect."""

    def __init__(self, session: Session) -> None:
        self.s = session
        self.owed_to_cp: set[str] = set()  # CP CALLs forwarded upstream, not yet answered
        self.owed_to_be: set[str] = set()  # backend CALLs accepted, not yet answered

    def check(self, effects, immediate_answers_allowed: int = 0,
              rejected_reply: str | None = None) -> None:
        extra = 0
        for e in effects:
            if isinstance(e, ToChargePoint):
                frame = decode(e.text, self.s.version)  # whatever we send is valid OCPP-J
                if frame.type_id in (3, 4):
                    if frame.unique_id in self.owed_to_cp:
                        self.owed_to_cp.discard(frame.unique_id)
                    else:
                        extra += 1
            elif isinstance(e, ToBackend):
                json.dumps(upstream_payload(e.message, e.action), allow_nan=False)
                if e.message.type_id == 2:
                    self.owed_to_cp.add(e.message.unique_id)
                elif e.message.type_id == 4 and e.message.unique_id == rejected_reply:
                    rejected_reply = None  # "your reply was invalid": once, for this reply
                elif e.message.type_id in (3, 4):
                    assert e.message.unique_id in self.owed_to_be, e
                    self.owed_to_be.discard(e.message.unique_id)
            else:
                assert isinstance(e, CloseConnection)
        assert extra <= immediate_answers_allowed, effects


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies, ops, st.sampled_from(["ocpp1.6", "ocpp2.0.1"]))
@example(  # found by this test: an empty MessageId's CALLERROR once carried "-1"
    Policy(upstream_timeout=5.0, dnstream_timeout=5.0, retry_interval=3.0, max_retries=0,
           max_queue=1, check_upstream=checker, check_dnstream=None,
           heartbeat_interval=10.0, heartbeat_backoff=0),
    [("cp", '[2, "-1", "Heartbeat", {}]'), ("cp", '[2, "", "Heartbeat", {"bad": 1}]')],
    "ocpp1.6")
def test_every_call_answered_exactly_once(policy, operations, version):
    now = 0.0
    s = Session("CP", version, now, policy)
    m = Model(s)
    for kind, value in operations:
        if s.state is State.CLOSED:
            break
        if kind == "cp":
            # a malformed or rejected CALL is answered at once, outside the owed set
            m.check(s.receive_text(value, now), immediate_answers_allowed=1)
        elif kind == "be":
            if value.type_id == 2:
                m.owed_to_be.add(value.unique_id)  # a duplicate of an owed one adds nothing
                m.check(s.send(value, now))
            else:
                m.check(s.send(value, now), rejected_reply=value.unique_id)
        else:
            now += value
            m.check(s.on_timer(now))
    # let every deadline pass: everything the gateway owes is answered by then
    for _ in range(200):
        deadline = s.next_deadline()
        if s.state is State.CLOSED or deadline is None:
            break
        now = max(now, deadline)
        m.check(s.on_timer(now))
    if s.state is State.OPEN:  # (a heartbeat timeout may have closed it: nobody to answer)
        assert m.owed_to_cp == set(), "a charge point CALL was never answered"
    m.check(s.close("end of test"))
    assert m.owed_to_be == set(), "a backend CALL was never answered"


@settings(max_examples=200, deadline=None)
@given(ops, st.booleans(), st.booleans())
def test_non_strict_never_raises(operations, up_strict, dn_strict):
    now = 0.0
    s = Session("CP", "ocpp2.1", now, Policy(upstream_strict=up_strict,
                                             dnstream_strict=dn_strict, check_upstream=checker))
    for kind, value in operations:
        if s.state is State.CLOSED:
            break
        if kind == "cp":
            s.receive_text(value, now)
        elif kind == "be":
            s.send(value, now)
        else:
            now += value
            s.on_timer(now)
    s.close("end")
