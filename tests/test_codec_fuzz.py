"""The codec's contract, fuzzed: any text decodes or raises OcppError; nothing else escapes,
and every error can be encoded into a valid CALLERROR frame."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from ocpp_edge.ocppj.codec import decode, encode, error_for
from ocpp_edge.ocppj.errors import OcppError

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
