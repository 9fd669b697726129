"""Topic router (SPEC "Upstream", "Downstream"): pure, no broker."""

import json

import pytest

from ocpp_edge.core.ocppj.messages import Call, CallError, CallResult, Send
from ocpp_edge.core.router import (
    UPSTREAM_PLACEHOLDERS,
    DownstreamError,
    Router,
    TopicError,
    compile_template,
    parse_downstream,
    upstream_payload,
)


def emqx_router(**over):
    kw = dict(mountpoint="ocpp/", upstream_topic="cp/${cid}", upstream_topic_overrides={},
              reply_topic="cp/${cid}/Reply", error_topic="cp/${cid}/Reply",
              dnstream_topic="cs/${cid}")
    kw.update(over)
    return Router(**kw)


class TestTemplates:
    def test_unknown_placeholder_is_an_error(self):
        with pytest.raises(ValueError, match=r"unknown placeholder \$\{cidd\}"):
            compile_template("cp/${cidd}", UPSTREAM_PLACEHOLDERS)

    @pytest.mark.parametrize("text", ["cp/${cid", "cp/$${x", ""])
    def test_broken(self, text):
        with pytest.raises(ValueError):
            compile_template(text, UPSTREAM_PLACEHOLDERS)

    @pytest.mark.parametrize("text", ["cp/+/x", "cp/#", "a\x00b"])
    def test_wildcards_are_not_topics(self, text):
        with pytest.raises(ValueError, match="cannot contain"):
            compile_template(text, UPSTREAM_PLACEHOLDERS)

    def test_every_placeholder(self):
        t = compile_template("${cid}/${clientid}/${action}/${id}/${type}/${proto}",
                             UPSTREAM_PLACEHOLDERS)
        assert t.render({"cid": "C", "action": "A", "id": "I", "type": "2",
                         "proto": "ocpp1.6"}) == "C/C/A/I/2/ocpp1.6"


class TestUpstream:
    def test_emqx_defaults(self):
        r = emqx_router()
        up = r.upstream_topic
        assert up("CP1", "ocpp1.6", Call("1", "BootNotification", {})) == "ocpp/cp/CP1"
        assert up("CP1", "ocpp1.6", CallResult("1", {})) == "ocpp/cp/CP1/Reply"
        assert up("CP1", "ocpp1.6", CallError("1", "X", "", {})) == "ocpp/cp/CP1/Reply"

    def test_per_action_override(self):
        r = emqx_router(upstream_topic_overrides={"MeterValues": "cp/${cid}/mv"})
        assert r.upstream_topic("C", "ocpp1.6", Call("1", "MeterValues", {})) == "ocpp/cp/C/mv"
        assert r.upstream_topic("C", "ocpp1.6", Call("1", "Heartbeat", {})) == "ocpp/cp/C"

    def test_reply_action_placeholder(self):
        r = emqx_router(reply_topic="cp/${cid}/${action}/${type}")
        assert r.upstream_topic("C", "ocpp1.6", CallResult("1", {}), "Reset") == "ocpp/cp/C/Reset/3"

    def test_send_uses_call_topic(self):
        r = emqx_router(upstream_topic="${proto}/${cid}/${type}")
        assert r.upstream_topic("C", "ocpp2.1", Send("1", "X", {})) == "ocpp/ocpp2.1/C/6"

    @pytest.mark.parametrize("uid", ["a/b", "+", "#", "x\x00"])
    def test_unique_id_cannot_add_levels(self, uid):
        r = emqx_router(upstream_topic="cp/${cid}/${id}")
        with pytest.raises(TopicError):
            r.upstream_topic("C", "ocpp1.6", Call(uid, "Heartbeat", {}))

    def test_payloads_are_emqx_objects(self):
        assert upstream_payload(Call("u", "Heartbeat", {})) == {
            "MessageTypeId": 2, "UniqueId": "u", "Action": "Heartbeat", "Payload": {}}
        assert upstream_payload(CallResult("u", {"a": 1}), "Reset") == {
            "MessageTypeId": 3, "UniqueId": "u", "Payload": {"a": 1}, "Action": "Reset"}
        assert upstream_payload(CallResult("u", {})) == {
            "MessageTypeId": 3, "UniqueId": "u", "Payload": {}}
        assert upstream_payload(CallError("u", "C", "d", {"k": 1})) == {
            "MessageTypeId": 4, "UniqueId": "u", "ErrorCode": "C", "ErrorDescription": "d",
            "ErrorDetails": {"k": 1}}


class TestDownstream:
    def test_filter_and_cid(self):
        r = emqx_router()
        assert r.dnstream_filter == "ocpp/cs/+"
        assert r.downstream_cid("ocpp/cs/CP1") == "CP1"
        assert r.downstream_cid("ocpp/cs/CP1/x") is None
        assert r.downstream_cid("ocpp/cp/CP1") is None
        assert r.downstream_cid("ocpp/cs/") is None

    def test_cid_in_the_middle(self):
        r = emqx_router(mountpoint="site7/", dnstream_topic="dn/${clientid}/cmd")
        assert r.dnstream_filter == "site7/dn/+/cmd"
        assert r.downstream_cid("site7/dn/CP9/cmd") == "CP9"

    @pytest.mark.parametrize("topic", ["cs", "cs/${cid}x", "cs/${cid}/${cid}", "cs/x",
                                       "cs/${cid}/x${cid}"])
    def test_cid_must_be_one_whole_level(self, topic):
        with pytest.raises(ValueError):
            emqx_router(dnstream_topic=topic)

    def test_parse_each_type(self):
        assert parse_downstream(json.dumps({"MessageTypeId": 2, "UniqueId": "1",
                                            "Action": "Reset", "Payload": {"type": "Soft"}})) \
            == Call("1", "Reset", {"type": "Soft"})
        assert parse_downstream(b'{"MessageTypeId":3,"UniqueId":"1","Payload":{}}') == \
            CallResult("1", {})
        assert parse_downstream(b'{"MessageTypeId":4,"UniqueId":"1","ErrorCode":"C",'
                                b'"ErrorDescription":"d","ErrorDetails":{"x":1}}') == \
            CallError("1", "C", "d", {"x": 1})
        assert parse_downstream(b'{"MessageTypeId":4,"UniqueId":"1","ErrorCode":"C",'
                                b'"ErrorDescription":"d"}').error_details == {}

    @pytest.mark.parametrize("payload,uid", [
        (b"nope", None), (b"[1]", None), (b'{"MessageTypeId":2}', None),
        (b'{"MessageTypeId":2,"UniqueId":"7","Payload":{}}', "7"),
        (b'{"MessageTypeId":9,"UniqueId":"7"}', "7"),
        (b'{"MessageTypeId":2,"UniqueId":"7","Action":"A","Payload":[]}', "7"),
        (b'{"MessageTypeId":3,"UniqueId":"7"}', "7"),
        (b'{"MessageTypeId":4,"UniqueId":"7","ErrorCode":"C"}', "7"),
        (b"\xff\xfe", None),
    ])
    def test_malformed(self, payload, uid):
        with pytest.raises(DownstreamError) as info:
            parse_downstream(payload)
        assert info.value.unique_id == uid
