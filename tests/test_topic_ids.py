"""Charge point ids as topic levels on every broker (issue 16, failures 1 and 2): the
reversible ``percent`` encoding of ``ocpp.topic_id_encoding``, the router that applies it
to upstream topics and reads it back from downstream ones, and the MQTT client id the
configuration accepts. Pure: no broker (tests/test_broker_refusals.py has the brokers).
"""

from __future__ import annotations

import re
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ocpp_edge.config import load_text
from ocpp_edge.config.keys import safe_hostname
from ocpp_edge.core.ocppj.messages import Call, CallError, CallResult
from ocpp_edge.core.router import Router, decode_id, encode_id, id_codec
from ocpp_edge.errors import ConfigError

# What a supported broker treats specially in a topic level (README "Charge point ids in
# topics"): NATS ('.', ' ', '*', '>'), RabbitMQ ('.', '*'), MQTT ('+', '#', '/'), '%'
# for reversibility; '$' only at the start.
SPECIAL = {".": "%2E", " ": "%20", "*": "%2A", ">": "%3E", "+": "%2B", "#": "%23",
           "/": "%2F", "%": "%25"}

# OCPP ids: up to 48 printable characters (the listener refuses control characters).
printable_ids = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1,
                        max_size=48)


def router(**over):
    kw = dict(mountpoint="ocpp/", upstream_topic="cp/${cid}", upstream_topic_overrides={},
              reply_topic="cp/${cid}/Reply", error_topic="cp/${clientid}/Reply",
              dnstream_topic="cs/${cid}")
    kw.update(over)
    return Router(**kw)


class TestEncoding:
    @pytest.mark.parametrize("cid", ["CP001", "DE-ABC-123", "A_b-9", "DEABCE1234",
                                     "charger:7@site", "Ladesäule-1", "a$b", "x~y!z"])
    def test_plain_ids_are_unchanged(self, cid):
        assert encode_id(cid) == cid
        assert decode_id(cid) == cid

    @pytest.mark.parametrize("char,escape", sorted(SPECIAL.items()))
    def test_every_special_character_is_encoded(self, char, escape):
        assert encode_id(f"a{char}b") == f"a{escape}b"
        assert encode_id(char) == escape
        assert decode_id(escape) == char
        assert decode_id(escape.lower()) == char  # hex digits in either case

    def test_a_leading_dollar_is_encoded_only_at_the_start(self):
        assert encode_id("$SYS") == "%24SYS"
        assert encode_id("a$") == "a$"
        assert decode_id("%24SYS") == "$SYS"

    def test_the_issues_examples(self):
        assert encode_id("CP.dot") == "CP%2Edot"
        assert encode_id("CP.dot 1*x") == "CP%2Edot%201%2Ax"
        assert encode_id("DE*ABC*E123*4") == "DE%2AABC%2AE123%2A4"
        assert encode_id("100%") == "100%25"

    @given(printable_ids)
    def test_round_trip(self, cid):
        level = encode_id(cid)
        assert decode_id(level) == cid

    @given(printable_ids)
    def test_the_level_is_safe_on_every_broker(self, cid):
        level = encode_id(cid)
        assert not set(level) & set(". *>+#/")
        assert not level.startswith("$")
        # Every '%' starts one of the table's escapes: nothing else is ever decoded.
        assert all(re.fullmatch(r"%(2[0-5ABEF]|3E)", m)
                   for m in re.findall(r"%..", level))
        if not set(cid) & set(SPECIAL) and not cid.startswith("$"):
            assert level == cid  # what a plain id looks like today

    @given(st.lists(printable_ids, min_size=2, max_size=2, unique=True))
    def test_distinct_ids_never_share_a_level(self, pair):
        a, b = pair
        assert encode_id(a) != encode_id(b)

    def test_a_percent_that_starts_no_escape_stays(self):
        assert decode_id("CP%41") == "CP%41"
        assert decode_id("100%") == "100%"
        assert decode_id("%2524") == "%24"

    def test_none_leaves_ids_as_they_are(self):
        encode, decode = id_codec("none")
        assert encode("CP.dot 1*x") == "CP.dot 1*x"
        assert decode("CP%2Edot") == "CP%2Edot"
        with pytest.raises(ValueError, match="percent, none"):
            id_codec("base64")


class TestRouter:
    def test_upstream_topics_carry_the_encoded_id(self):
        r = router()
        cid = "CP.dot 1*x"
        assert r.upstream_topic(cid, "ocpp1.6", Call("1", "Heartbeat", {})) == \
            "ocpp/cp/CP%2Edot%201%2Ax"
        assert r.upstream_topic(cid, "ocpp1.6", CallResult("1", {})) == \
            "ocpp/cp/CP%2Edot%201%2Ax/Reply"
        # ${clientid} is the same value, encoded the same way
        assert r.upstream_topic(cid, "ocpp1.6", CallError("1", "X", "", {})) == \
            "ocpp/cp/CP%2Edot%201%2Ax/Reply"

    def test_plain_ids_give_todays_topics(self):
        r = router()
        assert r.upstream_topic("DE-ABC-123", "ocpp1.6", Call("1", "Heartbeat", {})) == \
            "ocpp/cp/DE-ABC-123"
        assert r.downstream_cid("ocpp/cs/DE-ABC-123") == "DE-ABC-123"

    def test_downstream_topics_are_decoded(self):
        r = router()
        assert r.dnstream_filter == "ocpp/cs/+"
        assert r.downstream_cid("ocpp/cs/CP%2Edot%201%2Ax") == "CP.dot 1*x"
        assert r.downstream_cid("ocpp/cs/DE%2aABC%2aE123%2a4") == "DE*ABC*E123*4"
        assert r.downstream_cid("ocpp/cs/%24x") == "$x"
        # a backend written before the encoding, on a broker that carries '.', still
        # reaches the charge point
        assert r.downstream_cid("ocpp/cs/CP.dot") == "CP.dot"
        assert r.downstream_cid("ocpp/xx/CP%2Edot") is None

    def test_encoding_none_is_yesterdays_behaviour(self):
        r = router(id_encoding="none")
        assert r.upstream_topic("CP.dot", "ocpp1.6", Call("1", "Heartbeat", {})) == \
            "ocpp/cp/CP.dot"
        assert r.downstream_cid("ocpp/cs/CP%2Edot") == "CP%2Edot"

    @given(printable_ids)
    def test_what_goes_up_comes_back_down(self, cid):
        r = router(upstream_topic="cp/${cid}/up", dnstream_topic="cs/${cid}/down")
        up = r.upstream_topic(cid, "ocpp1.6", Call("1", "Heartbeat", {}))
        level = up.split("/")[2]
        assert up == f"ocpp/cp/{level}/up"  # one level, whatever the id holds
        assert r.downstream_cid(f"ocpp/cs/{level}/down") == cid
        assert r.charge_point_of(up) == cid

    def test_charge_point_of_a_topic_for_the_logs(self):
        r = router(upstream_topic_overrides={"MeterValues": "mv/${action}/${cid}"})
        assert r.charge_point_of("ocpp/cp/CP%2Edot") == "CP.dot"
        assert r.charge_point_of("ocpp/cp/CP1/Reply") == "CP1"
        assert r.charge_point_of("ocpp/mv/MeterValues/CP2") == "CP2"
        assert r.charge_point_of("ocpp/sys/gw/clients/CP%2E3/connected",
                                 ["sys/${node}/clients/${cid}/${event}"]) == "CP.3"
        assert r.charge_point_of("ocpp/sys/gw/status", ["sys/${node}/status"]) is None
        assert r.charge_point_of("other/cp/CP1") is None


class TestClientId:
    """mqtt.client_id is ${node} in the will and status topics (issue 16: a client id
    with a '.' never connected to NATS, and the default had one on any dotted host)."""

    def test_the_default_is_safe_on_a_dotted_host(self, monkeypatch):
        monkeypatch.setattr(socket, "gethostname", lambda: "pi.site-7.example.org")
        assert load_text("").mqtt.client_id == "ocpp-edge-pi-site-7-example-org"
        s = load_text("mqtt.client_id = gw-${hostname}:1\n")
        assert s.mqtt.client_id == "gw-pi-site-7-example-org:1"

    @pytest.mark.parametrize("name,safe", [("pi.lan", "pi-lan"), ("plain", "plain"),
                                           ("a b*c", "a-b-c"), ("", "localhost")])
    def test_safe_hostname(self, name, safe):
        assert safe_hostname(name) == safe

    @pytest.mark.parametrize("client_id,shown", [
        ("gw.site1", "'.'"), ("gw site", "' '"), ("gw*", "'*'"), ("gw>", "'>'"),
        ("gw+1", "'+'"), ("site/gw", "'/'"), ("$gw", "a leading '$'"),
        ('"gw#1"', "'#'"), ('"gw\x01"', r"'\x01'")])
    def test_characters_some_broker_refuses_are_refused_naming_the_key(self, client_id,
                                                                       shown):
        with pytest.raises(ConfigError) as err:
            load_text(f"mqtt.client_id = {client_id}\n")
        assert err.value.key == "mqtt.client_id"
        assert shown in str(err.value) and "NATS" in str(err.value)

    @pytest.mark.parametrize("client_id", ["ocpp-edge-site1", "gw_1", "site:1", "g$w",
                                           "Ladesäule"])
    def test_safe_client_ids_are_accepted(self, client_id):
        assert load_text(f"mqtt.client_id = {client_id}\n").mqtt.client_id == client_id


def test_the_key_is_read_and_defaults_to_percent():
    assert load_text("").ocpp.topic_id_encoding == "percent"
    assert load_text("ocpp.topic_id_encoding = none\n").ocpp.topic_id_encoding == "none"
    with pytest.raises(ConfigError) as err:
        load_text("ocpp.topic_id_encoding = base64\n")
    assert err.value.key == "ocpp.topic_id_encoding"
