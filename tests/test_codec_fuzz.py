"""The codec's contract, fuzzed: any text decodes or raises OcppError; nothing else escapes,
and every error can be encoded into a valid CALLERROR frame."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from ocpp_edge.core.ocppj.codec import decode, encode, error_for
from ocpp_edge.core.ocppj.errors import OcppError

VERSIONS = st.sampled_from(["ocpp1.6", "ocpp2.0.1", "ocpp2.1"])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20)
near_frames = st.tuples(
    st.sampled_from([2, 3, 4, 5, 6, 7, "2", True, 2.0, None]),
    st.one_of(st.text(max_size=40), st.integers(), st.none()),
    json_values, json_values, json_values,
).flatmap(lambda t: st.integers(0, 5).map(lambda n: list(t[:n])))


def check(text: str, version: str) -> None:
    try:
        msg = decode(text, version)
    except OcppError as exc:
        frame = json.loads(encode(error_for(exc, version)))
        assert frame[0] == 4 and isinstance(frame[1], str) and len(frame[1]) <= 36
        assert isinstance(frame[2], str) and isinstance(frame[4], dict)
        return
    again = decode(encode(msg), version)
    assert again == msg


@settings(max_examples=400, deadline=None)
@given(st.text(), VERSIONS)
def test_any_text(text, version):
    check(text, version)


@settings(max_examples=600, deadline=None)
@given(near_frames, VERSIONS)
def test_frames_close_to_valid(frame, version):
    check(json.dumps(frame), version)


# -- the payload passed on as the charge point wrote it ----------------------------------

_ws = st.sampled_from(["", " ", "\n", "\t ", "\r\n  "])


@settings(max_examples=400, deadline=None)
@given(uid=st.text(max_size=36), action=st.sampled_from(["Heartbeat", "MeterValues",
                                                          "Vendor_X-1", "a"]),
       payload=st.dictionaries(st.text(max_size=8), json_values, max_size=5),
       type_id=st.sampled_from([2, 6]), gaps=st.lists(_ws, min_size=10, max_size=10),
       ascii_only=st.booleans(), indent=st.sampled_from([None, 1]))
def test_payload_text_is_the_payload_and_publishes_the_same_json(
        uid, action, payload, type_id, gaps, ascii_only, indent):
    """For CALL and SEND frames however they are laid out, the spliced upstream object is
    the same JSON value as the one encoded from the decoded message."""
    from ocpp_edge.core.ocppj.codec import payload_text
    from ocpp_edge.core.router import upstream_payload, upstream_text

    body = json.dumps(payload, ensure_ascii=ascii_only, indent=indent)
    g = gaps
    text = (f"{g[0]}[{g[1]}{type_id}{g[2]},{g[3]}{json.dumps(uid, ensure_ascii=ascii_only)}"
            f"{g[4]},{g[5]}\"{action}\"{g[6]},{g[7]}{body}{g[8]}]{g[9]}")
    try:
        msg = decode(text, "ocpp2.1")
    except OcppError:
        return  # e.g. a float beyond range: never published
    raw = payload_text(text)
    assert raw is not None
    assert json.loads(raw) == msg.payload
    assert json.loads(upstream_text(msg, None, raw)) == upstream_payload(msg)
    assert list(json.loads(upstream_text(msg, None, raw))) == list(upstream_payload(msg))


@settings(max_examples=400, deadline=None)
@given(st.text(), VERSIONS)
def test_payload_text_of_any_accepted_frame_is_its_payload_or_none(text, version):
    from ocpp_edge.core.ocppj.codec import payload_text
    try:
        msg = decode(text, version)
    except OcppError:
        return
    raw = payload_text(text)
    if raw is not None:
        assert msg.type_id in (2, 6)
        assert json.loads(raw) == msg.payload


def test_payload_text_declines_unusual_layouts():
    from ocpp_edge.core.ocppj.codec import payload_text
    assert payload_text('[2,"1","\\u0048eartbeat",{}]') is None  # escaped action
    assert payload_text('[3,"1",{}]') is None  # not a CALL
    assert payload_text('[2,"a\\"b","Heartbeat",{"k":"]"}]') == '{"k":"]"}'
