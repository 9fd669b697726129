"""The gate between the upstream buffer and the uplink (store/gate.py), on a real
DiskBuffer in a temporary directory: order kept, holds bounded, rewinds forget holds."""

from ocpp_edge.store.diskbuffer import DiskBuffer
from ocpp_edge.store.gate import GatedBuffer


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def fill(tmp_path, *payloads):
    buf = DiskBuffer(tmp_path, 1000, 10_000_000, "drop_oldest")
    for p in payloads:
        buf.append("t", p)
    return buf


def test_records_pass_in_order_rewritten_or_as_they_are(tmp_path):
    buf = fill(tmp_path, b"a", b"b", b"c")
    gated = GatedBuffer(buf, lambda p: p.upper() if p == b"b" else p, 60, Clock())
    out = gated.take(10)
    assert [r.payload for r in out] == [b"a", b"B", b"c"]
    for r in out:
        gated.ack(r)
    assert len(gated) == 0


def test_a_hold_stops_everything_behind_it_until_the_gate_opens(tmp_path):
    buf = fill(tmp_path, b"a", b"hold", b"c")
    open_ = {"yes": False}
    deadlines = []
    clock = Clock()
    gated = GatedBuffer(buf, lambda p: (b"H" if open_["yes"] else None) if p == b"hold" else p,
                        60, clock, deadlines.append)
    assert [r.payload for r in gated.take(10)] == [b"a"]
    assert gated.holding and deadlines == [60.0]
    clock.now = 30
    assert gated.take(10) == []  # still held; c waits behind it
    open_["yes"] = True
    assert [r.payload for r in gated.take(10)] == [b"H", b"c"]
    assert not gated.holding and gated.released == 0


def test_a_hold_that_lasts_hold_timeout_is_released_unchanged(tmp_path, caplog):
    buf = fill(tmp_path, b"hold", b"c")
    clock = Clock()
    gated = GatedBuffer(buf, lambda p: None if p == b"hold" else p, 60, clock)
    assert gated.take(10) == []
    clock.now = 60
    assert [r.payload for r in gated.take(10)] == [b"hold", b"c"]
    assert gated.released == 1
    assert "published with the local one" in caplog.text


def test_rewind_forgets_the_held_records_and_hands_them_out_again(tmp_path):
    buf = fill(tmp_path, b"a", b"hold", b"c")
    open_ = {"yes": False}
    gated = GatedBuffer(buf, lambda p: (p if open_["yes"] else None) if p == b"hold" else p,
                        60, Clock())
    first = gated.take(10)
    assert [r.payload for r in first] == [b"a"]
    assert gated.rewind() == 3  # a (in flight), hold and c (taken, held) are unsent again
    assert not gated.holding
    open_["yes"] = True
    assert [r.payload for r in gated.take(10)] == [b"a", b"hold", b"c"]


def test_a_window_smaller_than_the_batch_keeps_the_rest_for_the_next_take(tmp_path):
    buf = fill(tmp_path, *[bytes([65 + i]) for i in range(5)])
    gated = GatedBuffer(buf, lambda p: p, 60, Clock())
    assert [r.payload for r in gated.take(2)] == [b"A", b"B"]
    assert [r.payload for r in gated.take(2)] == [b"C", b"D"]
    assert [r.payload for r in gated.take(2)] == [b"E"]


def test_a_hold_stops_only_its_own_charge_points_later_records(tmp_path):
    buf = DiskBuffer(tmp_path, 1000, 10_000_000, "drop_oldest")
    for topic, payload in (("cp/A", b"a-hold"), ("cp/B", b"b1"), ("cp/A/Reply", b"a2"),
                           ("cp/B", b"b2")):
        buf.append(topic, payload)
    open_ = {"yes": False}
    gated = GatedBuffer(buf, lambda p: None if p == b"a-hold" and not open_["yes"] else p,
                        60, Clock(), key=lambda topic: topic.split("/")[1])
    assert [r.payload for r in gated.take(10)] == [b"b1", b"b2"]  # B is not held back
    assert gated.holding
    assert gated.take(10) == []
    open_["yes"] = True
    assert [r.payload for r in gated.take(10)] == [b"a-hold", b"a2"]  # A's, in order
    assert not gated.holding
