"""OCPP-J codec, grouped by spec section. Pure: strings in, messages or errors out."""

import json

import pytest

from ocpp_edge.core.ocppj.codec import decode, encode, error_for
from ocpp_edge.core.ocppj.errors import OcppError
from ocpp_edge.core.ocppj.messages import Call, CallError, CallResult, CallResultError, Send

V16, V201, V21 = "ocpp1.6", "ocpp2.0.1", "ocpp2.1"


def answer(text: str, version: str = V16) -> list:
    """The CALLERROR frame the gateway sends back for ``text``, as a JSON list."""
    with pytest.raises(OcppError) as info:
        decode(text, version)
    return json.loads(encode(error_for(info.value, version)))


# -- OCPP-J 1.6 §4.1.3 / 2.0.1 Part 4 §4.2: the three (five) message shapes -----------------

class TestMessageShapes:
    def test_call(self):
        assert decode('[2,"19223201","BootNotification",{"chargePointVendor":"V"}]') == \
            Call("19223201", "BootNotification", {"chargePointVendor": "V"})

    def test_callresult(self):
        assert decode('[3,"19223201",{"status":"Accepted"}]') == \
            CallResult("19223201", {"status": "Accepted"})

    def test_callerror(self):
        assert decode('[4,"1","NotImplemented","no",{"a":1}]') == \
            CallError("1", "NotImplemented", "no", {"a": 1})

    def test_whitespace_and_unicode_survive(self):
        msg = decode(' [ 2 , "a" , "DataTransfer" , {"data": "ümlaut ✓"} ] ')
        assert msg.payload == {"data": "ümlaut ✓"}
        assert encode(msg) == '[2,"a","DataTransfer",{"data":"\\u00fcmlaut \\u2713"}]'

    @pytest.mark.parametrize("msg", [
        Call("1", "Heartbeat", {}), CallResult("1", {"currentTime": "x"}),
        CallError("1", "GenericError", "d", {}), Send("9", "NotifyPeriodicEventStream", {}),
        CallResultError("2", "FormatViolation", "bad", {"f": 1}),
    ])
    def test_round_trip(self, msg):
        assert decode(encode(msg), V21) == msg

    def test_callerror_without_details_is_tolerated(self):
        # Field quirk: some 1.6 firmware sends 4 elements; details default to {}.
        assert decode('[4,"1","InternalError","oops"]') == CallError("1", "InternalError",
                                                                    "oops", {})

    def test_callerror_null_details_is_tolerated(self):
        assert decode('[4,"1","InternalError","oops",null]').error_details == {}

    def test_encode_error_details_always_object(self):
        assert encode(CallError("1", "GenericError", "", None)) == '[4,"1","GenericError","",{}]'


# -- SPEC "OCPP-J framing": every malformed class, with the exact answer -------------------

class TestMalformed16:
    """1.6 spells the format code FormationViolation (sic)."""

    @pytest.mark.parametrize("text", ["not json", "{", "", "[2,\"1\",\"A\",{}", "NaN",
                                      '[2,"1","A",{"x":NaN}]', '[3,"1",{"x":Infinity}]'])
    def test_not_json(self, text):
        code = answer(text)
        assert code[:3] == [4, "-1", "FormationViolation"]
        assert "not valid JSON" in code[3]

    @pytest.mark.parametrize("text", ['{"a":1}', '"str"', "42", "[]", "null"])
    def test_not_a_nonempty_array(self, text):
        assert answer(text)[:3] == [4, "-1", "FormationViolation"]

    @pytest.mark.parametrize("text", ['[2]', '[2,1,"A",{}]', '[2,null,"A",{}]',
                                      '[2,"' + "x" * 37 + '","A",{}]'])
    def test_id_unreadable(self, text):
        got = answer(text)
        assert got[:3] == [4, "-1", "FormationViolation"]
        assert "MessageId" in got[3]

    def test_id_of_36_characters_is_fine(self):
        assert decode('[2,"' + "x" * 36 + '","Heartbeat",{}]').unique_id == "x" * 36

    @pytest.mark.parametrize("text", ['[7,"id1",{}]', '[0,"id1"]', '[5,"id1","C","d",{}]',
                                      '[6,"id1","A",{}]'])
    def test_unknown_type_id(self, text):
        got = answer(text)
        assert got[:3] == [4, "id1", "FormationViolation"]
        assert "not supported" in got[3]

    @pytest.mark.parametrize("text", ['["2","id1","A",{}]', '[true,"id1","A",{}]',
                                      '[2.0,"id1","A",{}]'])
    def test_type_id_not_an_integer(self, text):
        assert answer(text)[:3] == [4, "id1", "FormationViolation"]

    @pytest.mark.parametrize("text", ['[2,"id1","A"]', '[2,"id1","A",{},{}]', '[3,"id1"]',
                                      '[3,"id1",{},1]', '[4,"id1","C"]'])
    def test_wrong_arity(self, text):
        got = answer(text)
        assert got[:3] == [4, "id1", "FormationViolation"]
        assert "elements" in got[3]

    @pytest.mark.parametrize("action", ["1", "null", "{}", '""', '"Boot/Notification"',
                                        '"a+b"', '"#"', '"' + "A" * 65 + '"'])
    def test_action_not_a_name(self, action):
        assert answer(f'[2,"id1",{action},{{}}]')[:3] == [4, "id1", "FormationViolation"]

    @pytest.mark.parametrize("payload", ["[]", "null", "1", '"x"'])
    def test_payload_not_an_object(self, payload):
        got = answer(f'[2,"id1","Heartbeat",{payload}]')
        assert got == [4, "id1", "FormationViolation", "payload must be a JSON object", {}]
        assert answer(f'[3,"id1",{payload}]')[:3] == [4, "id1", "FormationViolation"]

    def test_callerror_fields_wrong_type(self):
        assert answer('[4,"id1",1,"d",{}]')[:3] == [4, "id1", "FormationViolation"]
        assert answer('[4,"id1","C","d",[]]')[:3] == [4, "id1", "FormationViolation"]

    def test_lone_surrogate_survives_as_an_escape(self):
        msg = decode('[2,"a","DataTransfer",{"data":"\\ud800"}]')
        assert encode(msg) == '[2,"a","DataTransfer",{"data":"\\ud800"}]'
        encode(msg).encode("utf-8")  # always valid UTF-8

    @pytest.mark.parametrize("number", ["1e999", "-1e400"])
    def test_numbers_beyond_float_range(self, number):
        assert answer(f'[2,"a","MeterValues",{{"v":{number}}}]')[:2] == [4, "-1"]

    def test_deep_nesting_is_an_error_not_a_crash(self):
        assert answer("[" * 100_000)[:2] == [4, "-1"]


class TestMalformed2x:
    """OCPP 2.0.1 Part 4 §4.3: RpcFrameworkError, FormatViolation, MessageTypeNotSupported."""

    def test_not_json(self):
        assert answer("oops", V201)[:3] == [4, "-1", "RpcFrameworkError"]

    def test_unknown_type(self):
        assert answer('[9,"a",{}]', V201)[:3] == [4, "a", "MessageTypeNotSupported"]

    def test_21_types_not_in_201(self):
        assert answer('[6,"a","X",{}]', V201)[:3] == [4, "a", "MessageTypeNotSupported"]
        assert decode('[6,"a","X",{}]', V21) == Send("a", "X", {})

    def test_payload(self):
        assert answer('[2,"a","Heartbeat",[]]', V201)[:3] == [4, "a", "FormatViolation"]

    def test_arity(self):
        assert answer('[2,"a","Heartbeat"]', V21)[:3] == [4, "a", "RpcFrameworkError"]


def test_an_empty_message_id_is_answered_with_itself_not_minus_one():
    from ocpp_edge.core.ocppj.errors import FormatViolation
    assert error_for(FormatViolation("bad", ""), "ocpp1.6").unique_id == ""
    assert error_for(FormatViolation("bad"), "ocpp1.6").unique_id == "-1"  # id unreadable
