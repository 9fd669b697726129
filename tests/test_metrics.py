"""The metrics registry and the gateway's metrics: exposition format 0.0.4, escaping, the
cardinality guard, values read at scrape time.

The output is read back with a strict parser written here from the format's
specification (every line must be a HELP, a TYPE or a sample of the family announced
last; only the three escapes exist; families are contiguous; no duplicate series), and
with ``prometheus_client``'s parser, the one Prometheus users' tooling relies on.
"""

from __future__ import annotations

import logging
import math
import re

import pytest

from ocpp_edge.ops.metrics import (
    CONTENT_TYPE,
    MAX_ACTIONS,
    MAX_ERROR_CODES,
    BoundedLabel,
    Counter,
    CounterFunc,
    GatewayMetrics,
    RateMeter,
    Registry,
    escape_label_value,
    format_value,
)

# -- a strict reader of the text exposition format 0.0.4 ---------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r"[a-zA-Z_][a-zA-Z0-9_]*"
_VALUE = r"[+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)|\+Inf|-Inf|NaN"
_SAMPLE = re.compile(rf"({_NAME})(?:\{{(.*)\}})? ({_VALUE})")
_PAIR = re.compile(rf'({_LABEL})="((?:[^"\\\n]|\\[\\"n])*)"')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def _labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        m = _PAIR.match(text, pos)
        assert m, f"bad label set at {text[pos:]!r}"
        name = m.group(1)
        assert name not in labels, f"label {name} twice"
        labels[name] = re.sub(r"\\[\\\"n]", lambda e: _UNESCAPE[e.group(0)], m.group(2))
        pos = m.end()
        if pos < len(text):
            assert text[pos] == ",", f"expected ',' at {text[pos:]!r}"
            pos += 1
            assert pos < len(text), "trailing comma"
    return labels


def parse_strict(text: str) -> dict[str, dict]:
    """name → {"type", "help", "samples": {frozenset(labels): value}}"""
    assert text.endswith("\n"), "the exposition must end with a line feed"
    families: dict[str, dict] = {}
    current: str | None = None
    finished: set[str] = set()
    for line in text[:-1].split("\n"):
        assert line, "empty line"
        if line.startswith("# HELP "):
            name, _, help_ = line[7:].partition(" ")
            assert re.fullmatch(_NAME, name)
            assert not re.search(r"\\[^\\n]", help_.replace("\\\\", "")), line
            fam = families.setdefault(name, {"samples": {}})
            assert "help" not in fam, f"second HELP for {name}"
            assert not fam["samples"], f"HELP after samples of {name}"
            fam["help"] = help_.replace("\\n", "\n").replace("\\\\", "\\")
            if current != name:
                assert name not in finished, f"{name} is not contiguous"
                if current:
                    finished.add(current)
            current = name
        elif line.startswith("# TYPE "):
            name, _, typ = line[7:].partition(" ")
            assert typ in ("counter", "gauge", "histogram", "summary", "untyped"), line
            fam = families.setdefault(name, {"samples": {}})
            assert "type" not in fam, f"second TYPE for {name}"
            assert not fam["samples"], f"TYPE after samples of {name}"
            fam["type"] = typ
            if current != name:
                assert name not in finished, f"{name} is not contiguous"
                if current:
                    finished.add(current)
            current = name
        elif line.startswith("#"):
            raise AssertionError(f"unexpected comment {line!r}")
        else:
            m = _SAMPLE.fullmatch(line)
            assert m, f"not a sample line: {line!r}"
            name, labels, value = m.group(1), _labels(m.group(2) or ""), m.group(3)
            assert name == current, f"sample {name} outside its family ({current})"
            key = frozenset(labels.items())
            assert key not in families[name]["samples"], f"duplicate series {line!r}"
            families[name]["samples"][key] = float(value)
    for name, fam in families.items():
        assert "type" in fam and "help" in fam, name
        if fam["type"] == "counter":
            assert name.endswith("_total"), f"counter {name} not named *_total"
    return families


def value(families: dict, name: str, **labels: str) -> float:
    return families[name]["samples"][frozenset(labels.items())]


def series(families: dict, name: str) -> list[dict[str, str]]:
    return [dict(k) for k in families[name]["samples"]]


def bound(m: GatewayMetrics, **overrides) -> GatewayMetrics:
    callbacks = dict(charge_points=lambda: 3, buffer_messages=lambda: 10,
                     buffer_bytes=lambda: 4096, buffer_oldest_age=lambda: 12.5,
                     buffer_dropped=lambda: 2, upstream_connected=lambda: True,
                     published=lambda: 1234, replay_rate=lambda: 50.0)
    callbacks.update(overrides)
    m.bind(**callbacks)
    return m


# -- the gateway's metrics ----------------------------------------------------------------


def test_gateway_metrics_count_and_render():
    m = bound(GatewayMetrics("0.1.0", 1700000000.0))
    m.connection_opened("ocpp.listener.ws")
    m.connection_opened("ocpp.listener.ws")
    m.connection_opened("ocpp.listener.wss.vlan")
    m.connection_closed("sock_closed")
    m.connection_refused("ocpp.listener.ws", "max_connections")
    for _ in range(5):
        m.message("upstream", "CALL", "Heartbeat")
    m.message("dnstream", "CALLRESULT", "Heartbeat")
    m.message("upstream", "CALLRESULT", None)
    m.callerror("upstream", "FormationViolation")
    m.timeout("dnstream")
    m.orphan_reply("upstream")
    m.schema_failure("upstream")
    m.upstream_reconnect()

    f = parse_strict(m.render())
    assert value(f, "ocpp_edge_build_info", version="0.1.0") == 1
    assert value(f, "ocpp_edge_start_time_seconds") == 1700000000
    assert value(f, "ocpp_edge_connections_opened_total", listener="ocpp.listener.ws") == 2
    assert value(f, "ocpp_edge_connections_opened_total",
                 listener="ocpp.listener.wss.vlan") == 1
    assert value(f, "ocpp_edge_connections_closed_total", reason="sock_closed") == 1
    assert value(f, "ocpp_edge_connections_refused_total", listener="ocpp.listener.ws",
                 reason="max_connections") == 1
    assert value(f, "ocpp_edge_messages_total", direction="upstream", type="CALL",
                 action="Heartbeat") == 5
    assert value(f, "ocpp_edge_messages_total", direction="dnstream", type="CALLRESULT",
                 action="Heartbeat") == 1
    assert value(f, "ocpp_edge_messages_total", direction="upstream", type="CALLRESULT",
                 action="") == 1
    assert value(f, "ocpp_edge_callerrors_total", direction="upstream",
                 code="FormationViolation") == 1
    assert value(f, "ocpp_edge_timeouts_total", direction="dnstream") == 1
    assert value(f, "ocpp_edge_timeouts_total", direction="upstream") == 0  # declared
    assert value(f, "ocpp_edge_orphan_replies_total", direction="upstream") == 1
    assert value(f, "ocpp_edge_schema_failures_total", direction="upstream") == 1
    assert value(f, "ocpp_edge_upstream_reconnects_total") == 1
    assert value(f, "ocpp_edge_charge_points_connected") == 3
    assert value(f, "ocpp_edge_buffer_messages") == 10
    assert value(f, "ocpp_edge_buffer_bytes") == 4096
    assert value(f, "ocpp_edge_buffer_oldest_age_seconds") == 12.5
    assert value(f, "ocpp_edge_buffer_dropped_total") == 2
    assert value(f, "ocpp_edge_upstream_connected") == 1
    assert value(f, "ocpp_edge_upstream_published_total") == 1234
    assert value(f, "ocpp_edge_upstream_replay_rate") == 50
    assert f["ocpp_edge_buffer_dropped_total"]["type"] == "counter"
    assert f["ocpp_edge_charge_points_connected"]["type"] == "gauge"
    assert all(name.startswith("ocpp_edge_") for name in f)


def test_every_series_starts_at_zero_before_traffic():
    f = parse_strict(bound(GatewayMetrics("0.1.0", 0.0)).render())
    for name in ("ocpp_edge_timeouts_total", "ocpp_edge_orphan_replies_total",
                 "ocpp_edge_schema_failures_total"):
        assert sorted(s["direction"] for s in series(f, name)) == ["dnstream", "upstream"]
    assert value(f, "ocpp_edge_upstream_reconnects_total") == 0
    # families with peer-chosen labels are announced, with no series yet
    assert f["ocpp_edge_messages_total"]["samples"] == {}


def test_values_read_at_scrape_time_follow_the_state():
    state = {"n": 0, "up": False, "age": None}
    m = bound(GatewayMetrics("0.1.0", 0.0), charge_points=lambda: state["n"],
              upstream_connected=lambda: state["up"],
              buffer_oldest_age=lambda: state["age"])
    f = parse_strict(m.render())
    assert value(f, "ocpp_edge_charge_points_connected") == 0
    assert value(f, "ocpp_edge_upstream_connected") == 0
    assert f["ocpp_edge_buffer_oldest_age_seconds"]["samples"] == {}  # None: no sample
    state.update(n=7, up=True, age=3.25)
    f = parse_strict(m.render())
    assert value(f, "ocpp_edge_charge_points_connected") == 7
    assert value(f, "ocpp_edge_upstream_connected") == 1
    assert value(f, "ocpp_edge_buffer_oldest_age_seconds") == 3.25


def test_a_failing_callback_costs_its_samples_not_the_scrape(caplog):
    def broken():
        raise RuntimeError("boom")

    m = bound(GatewayMetrics("0.1.0", 0.0), buffer_bytes=broken)
    with caplog.at_level(logging.ERROR, logger="ocpp_edge.metrics"):
        f = parse_strict(m.render())
    assert f["ocpp_edge_buffer_bytes"]["samples"] == {}
    assert value(f, "ocpp_edge_buffer_messages") == 10
    assert "ocpp_edge_buffer_bytes" in caplog.text


def test_bind_twice_is_a_bug():
    m = bound(GatewayMetrics("0.1.0", 0.0))
    with pytest.raises(RuntimeError):
        bound(m)


def test_wrong_direction_or_type_is_a_bug_caught_at_first_use():
    m = GatewayMetrics("0.1.0", 0.0)
    with pytest.raises(ValueError):
        m.message("sideways", "CALL", "Heartbeat")
    with pytest.raises(ValueError):
        m.message("upstream", "CALLBACK", "Heartbeat")
    with pytest.raises(ValueError):
        m.timeout("up")
    with pytest.raises(ValueError):
        m.callerror("down", "GenericError")
    m.message("upstream", "SEND", "NotifyPeriodicEventStream")  # OCPP 2.1
    m.message("dnstream", "CALLRESULTERROR", "Reset")


# -- cardinality --------------------------------------------------------------------------


def test_action_names_that_are_not_identifiers_count_as_other():
    m = GatewayMetrics("0.1.0", 0.0)
    for bad in ("Boot Notification", "x" * 65, "1Heartbeat", "a/b", 'q"uote', "é", "cp-42"):
        m.message("upstream", "CALL", bad)
    m.message("upstream", "CALL", "A" + "b" * 63)  # 64 characters: still an identifier
    f = parse_strict(m.render())
    assert value(f, "ocpp_edge_messages_total", direction="upstream", type="CALL",
                 action="other") == 7
    assert value(f, "ocpp_edge_messages_total", direction="upstream", type="CALL",
                 action="A" + "b" * 63) == 1
    assert len(series(f, "ocpp_edge_messages_total")) == 2


def test_a_flood_of_invented_names_cannot_grow_the_series_without_bound():
    m = GatewayMetrics("0.1.0", 0.0)
    for i in range(5 * MAX_ACTIONS):
        m.message("upstream", "CALL", f"Action{i}")
        m.callerror("dnstream", f"Code{i}")
        m.connection_closed(f"reason{i}")
    f = parse_strict(m.render())
    actions = series(f, "ocpp_edge_messages_total")
    assert len(actions) == MAX_ACTIONS + 1  # the first MAX_ACTIONS, then "other"
    assert value(f, "ocpp_edge_messages_total", direction="upstream", type="CALL",
                 action="other") == 4 * MAX_ACTIONS
    assert len(series(f, "ocpp_edge_callerrors_total")) == MAX_ERROR_CODES + 1
    assert len(series(f, "ocpp_edge_connections_closed_total")) <= 65
    total = sum(f["ocpp_edge_messages_total"]["samples"].values())
    assert total == 5 * MAX_ACTIONS  # nothing lost, only folded
    # the raw names are not kept anywhere either
    assert len(m._messages.values) == MAX_ACTIONS + 1


def test_no_method_takes_a_charge_point_id():
    import inspect

    for name, fn in inspect.getmembers(GatewayMetrics, inspect.isfunction):
        if not name.startswith("_"):
            assert not {"cid", "clientid", "charge_point"} & set(
                inspect.signature(fn).parameters), name


def test_bounded_label():
    label = BoundedLabel(r"[a-z]+", 2)
    assert [label(v) for v in ("a", "b", "c", "a", "B", 3)] == ["a", "b", "other", "a",
                                                                  "other", "other"]


# -- format and escaping ------------------------------------------------------------------


def test_label_values_and_help_are_escaped_and_read_back_intact():
    r = Registry()
    c = r.counter("demo_total", 'Help with a backslash \\ a "quote"\nand a second line.',
                  ("path",))
    nasty = 'C:\\dir\\"x"\nnext line \\n literal'
    c.inc((nasty,), 3)
    c.inc(("plain",))
    text = r.render()
    assert '\\"x\\"' in text and "\\\\dir" in text and "\\nnext" in text
    assert text.count("\n") == 4  # HELP, TYPE, two samples: no raw line feed leaked
    f = parse_strict(text)
    assert value(f, "demo_total", path=nasty) == 3
    assert f["demo_total"]["help"] == 'Help with a backslash \\ a "quote"\nand a second line.'
    assert escape_label_value('a\\b"c\nd') == 'a\\\\b\\"c\\nd'


def test_version_label_is_escaped():
    f = parse_strict(GatewayMetrics('1.0"beta\\2\n', 0.0).render())
    assert value(f, "ocpp_edge_build_info", version='1.0"beta\\2\n') == 1


def test_value_formatting():
    assert format_value(3) == "3"
    assert format_value(3.0) == "3"
    assert format_value(True) == "1"
    assert format_value(0.1) == "0.1"
    assert format_value(1e20) == "1e+20"
    assert format_value(math.inf) == "+Inf"
    assert format_value(-math.inf) == "-Inf"
    assert format_value(math.nan) == "NaN"
    r = Registry()
    r.gauge_func("g", "special values", lambda: {("a",): math.inf, ("b",): math.nan,
                                                 ("c",): -2.5, ("d",): None}, ("k",))
    f = parse_strict(r.render())
    assert value(f, "g", k="a") == math.inf
    assert math.isnan(value(f, "g", k="b"))
    assert value(f, "g", k="c") == -2.5
    assert len(series(f, "g")) == 3


def test_counters_must_be_named_total_and_names_must_be_valid():
    with pytest.raises(ValueError):
        Counter("ocpp_edge_messages", "no suffix")
    with pytest.raises(ValueError):
        CounterFunc("ocpp_edge_drops", "no suffix", lambda: 1)
    with pytest.raises(ValueError):
        Counter("bad-name_total", "dash")
    with pytest.raises(ValueError):
        Counter("x_total", "reserved label", ("__name",))
    r = Registry()
    r.counter("x_total", "once")
    with pytest.raises(ValueError):
        r.counter("x_total", "twice")


def test_content_type_is_the_0_0_4_text_format():
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


def test_prometheus_client_parses_the_output():
    from prometheus_client import parser  # a test dependency (pyproject.toml [test])
    m = bound(GatewayMetrics("0.1.0", 1700000000.0))
    m.message("upstream", "CALL", "BootNotification")
    m.message("upstream", "CALL", "bad action")
    m.callerror("dnstream", "NotImplemented")
    m.connection_refused("ocpp.listener.ws", "auth")
    families = {f.name: f for f in parser.text_string_to_metric_families(m.render())}
    # prometheus_client names a counter family without its _total suffix
    msgs = families["ocpp_edge_messages"]
    assert msgs.type == "counter"
    got = {(s.labels["direction"], s.labels["type"], s.labels["action"]): s.value
           for s in msgs.samples if s.name == "ocpp_edge_messages_total"}
    assert got == {("upstream", "CALL", "BootNotification"): 1.0,
                   ("upstream", "CALL", "other"): 1.0}
    assert families["ocpp_edge_buffer_oldest_age_seconds"].samples[0].value == 12.5
    assert families["ocpp_edge_upstream_connected"].type == "gauge"
    assert families["ocpp_edge_buffer_dropped"].type == "counter"


# -- cost and rate ------------------------------------------------------------------------


def test_counting_a_known_message_is_a_dict_increment():
    m = GatewayMetrics("0.1.0", 0.0)
    m.message("upstream", "CALL", "MeterValues")
    values = m._messages.values
    before = dict(values)
    m.message("upstream", "CALL", "MeterValues")
    assert values is m._messages.values and len(values) == len(before)


def test_rate_meter():
    clock = [100.0]
    count = [0]
    meter = RateMeter(lambda: count[0], lambda: clock[0], window=60.0)
    assert meter.rate() == 0.0  # first reading
    clock[0] += 15
    count[0] += 300
    assert meter.rate() == pytest.approx(20.0)
    clock[0] += 15
    count[0] += 150
    assert meter.rate() == pytest.approx(450 / 30)
    clock[0] += 0.5  # readings less than a second apart add no sample
    assert meter.rate() == pytest.approx(450 / 30.5)
    for _ in range(10):  # the window slides: old samples are forgotten
        clock[0] += 15
    assert meter.rate() == pytest.approx(0.0, abs=1e-9)
    assert len(meter._samples) <= 6


def test_counts_passed_on_several_at_once():
    # ops/operations.py passes on totals other objects keep (sessions' timeouts, the uplink's
    # reconnects, the listeners' refusals) when scraped, as one increment each.
    m = bound(GatewayMetrics("0.1.0", 0.0))
    m.timeout("upstream", 3)
    m.orphan_reply("dnstream", 2)
    m.schema_failure("dnstream", 4)
    m.upstream_reconnect(5)
    m.connection_refused("ocpp.listener.ws", "max_conn_rate", 6)
    f = parse_strict(m.render())
    assert value(f, "ocpp_edge_timeouts_total", direction="upstream") == 3
    assert value(f, "ocpp_edge_orphan_replies_total", direction="dnstream") == 2
    assert value(f, "ocpp_edge_schema_failures_total", direction="dnstream") == 4
    assert value(f, "ocpp_edge_upstream_reconnects_total") == 5
    assert value(f, "ocpp_edge_connections_refused_total", listener="ocpp.listener.ws",
                 reason="max_conn_rate") == 6
    with pytest.raises(ValueError):
        m.timeout("sideways", 2)
