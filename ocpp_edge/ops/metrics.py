"""Counters and gauges for ``GET /metrics``, in the Prometheus text exposition format 0.0.4.

No I/O and no third-party imports: the gateway counts into plain dicts on its hot path
(thousands of messages a second on a Raspberry-Pi-class controller), and ``render()``
turns them into text only when somebody scrapes.

Two kinds of values:

* **Counted** — :class:`Counter` (and :class:`Gauge` for values the code sets): the
  gateway calls :class:`GatewayMetrics` methods as things happen. A counter that is
  already known costs one dict lookup and one add.
* **Read at scrape time** — :class:`CounterFunc` / :class:`GaugeFunc`: a callable returns
  the current value (connected charge points, buffer depth, ...), so state that other
  objects already keep is never copied or kept in sync.

Label cardinality is bounded by construction, because every label value costs memory for
the life of the process and a time series in the operator's Prometheus: label values a
peer can influence (action names, error codes, close reasons) must look like identifiers
and only the first few hundred distinct ones get their own series; anything else is
counted as ``other``. No method takes a charge point id: per-charge-point figures are in
``GET /api/v1/clients``, not in metrics.

Length: a dependency-free Prometheus text registry (counters, gauges, label limits,
escaping) and the gateway's metric families with their help texts; one module so that
every name and label is declared in one place.
"""

from __future__ import annotations

import logging
import math
import re
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

log = logging.getLogger("ocpp_edge.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

OTHER = "other"


def escape_label_value(value: str) -> str:
    """Exposition format 0.0.4: backslash, double quote and line feed are escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """HELP lines escape backslash and line feed (not the double quote)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """Integers without a fraction (``12``), floats with Python's shortest round-trip
    representation, and ``+Inf`` / ``-Inf`` / ``NaN`` as the format spells them."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


class BoundedLabel:
    """Maps values a peer may influence to a bounded set of label values.

    A value becomes its own label value only if it matches ``pattern`` and fewer than
    ``limit`` distinct values have been admitted so far; everything else is ``other``.
    The admitted set is remembered so that the common case is a set lookup.
    """

    __slots__ = ("pattern", "limit", "_seen")

    def __init__(self, pattern: str, limit: int) -> None:
        self.pattern = re.compile(pattern)
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: object) -> str:
        if value in self._seen:
            return value  # type: ignore[return-value]
        if not isinstance(value, str) or not self.pattern.fullmatch(value):
            return OTHER
        if len(self._seen) >= self.limit:
            return OTHER
        self._seen.add(value)
        return value


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()) -> None:
        if not _METRIC_NAME.fullmatch(name):
            raise ValueError(f"invalid metric name {name!r}")
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        for label in self.labelnames:
            if not _LABEL_NAME.fullmatch(label) or label.startswith("__"):
                raise ValueError(f"invalid label name {label!r} in {name}")

    def samples(self) -> Iterable[tuple[tuple[str, ...], float]]:
        raise NotImplementedError

    def render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {escape_help(self.help)}\n")
        out.append(f"# TYPE {self.name} {self.kind}\n")
        names = self.labelnames
        for labels, value in self.samples():
            if names:
                pairs = ",".join(f'{n}="{escape_label_value(v)}"' for n, v in zip(names, labels,
                                                                                 strict=True))
                out.append(f"{self.name}{{{pairs}}} {format_value(value)}\n")
            else:
                out.append(f"{self.name} {format_value(value)}\n")


class Counter(_Metric):
    """A monotonically increasing count, keyed by a tuple of label values.

    The hot path is ``inc(key)``; ``values`` is a plain dict so that callers that count
    very often can do the increment inline.
    """

    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"counter {name} must be named *_total")
        super().__init__(name, help, labelnames)
        self.values: dict[tuple[str, ...], float] = {}
        if not self.labelnames:
            self.values[()] = 0

    def inc(self, key: tuple[str, ...] = (), amount: float = 1) -> None:
        try:
            self.values[key] += amount
        except KeyError:
            self.values[key] = amount

    def declare(self, key: tuple[str, ...]) -> None:
        """Make a label set visible at 0 before anything happened (so ``rate()`` and
        ``increase()`` see the series start, and dashboards show a 0, not a gap)."""
        self.values.setdefault(key, 0)

    def samples(self) -> Iterable[tuple[tuple[str, ...], float]]:
        return sorted(self.values.items())


class Gauge(Counter):
    """A value the code sets."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()) -> None:
        _Metric.__init__(self, name, help, labelnames)
        self.values = {}
        if not self.labelnames:
            self.values[()] = 0

    def set(self, key: tuple[str, ...], value: float) -> None:
        self.values[key] = value


Reading = float | None | Mapping[tuple[str, ...], float | None]


class GaugeFunc(_Metric):
    """A value read when scraped: ``fn()`` returns a number, or None when there is no
    value right now (the sample is left out); with labels, a mapping from label-value
    tuples to numbers. A callback that raises costs its own samples, never the scrape."""

    kind = "gauge"

    def __init__(self, name: str, help: str, fn: Callable[[], Reading],
                 labelnames: Iterable[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self.fn = fn

    def samples(self) -> Iterable[tuple[tuple[str, ...], float]]:
        try:
            reading = self.fn()
        except Exception:
            log.exception("metric %s: reading its value failed", self.name)
            return []
        if reading is None:
            return []
        if isinstance(reading, Mapping):
            return sorted((k, v) for k, v in reading.items() if v is not None)
        return [((), reading)]


class CounterFunc(GaugeFunc):
    """A count some other object keeps (e.g. the buffer's drops), read when scraped."""

    kind = "counter"

    def __init__(self, name: str, help: str, fn: Callable[[], Reading],
                 labelnames: Iterable[str] = ()) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"counter {name} must be named *_total")
        super().__init__(name, help, fn, labelnames)


class Registry:
    """An ordered set of metrics; ``render()`` is the body of ``GET /metrics``."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def add(self, metric: _Metric) -> _Metric:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} registered twice")
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str, labelnames: Iterable[str] = ()) -> Counter:
        return self.add(Counter(name, help, labelnames))  # type: ignore[return-value]

    def gauge(self, name: str, help: str, labelnames: Iterable[str] = ()) -> Gauge:
        return self.add(Gauge(name, help, labelnames))  # type: ignore[return-value]

    def gauge_func(self, name: str, help: str, fn: Callable[[], Reading],
                   labelnames: Iterable[str] = ()) -> GaugeFunc:
        return self.add(GaugeFunc(name, help, fn, labelnames))  # type: ignore[return-value]

    def counter_func(self, name: str, help: str, fn: Callable[[], Reading],
                     labelnames: Iterable[str] = ()) -> CounterFunc:
        return self.add(CounterFunc(name, help, fn, labelnames))  # type: ignore[return-value]

    def get(self, name: str) -> _Metric:
        return self._metrics[name]

    def render(self) -> str:
        out: list[str] = []
        for metric in self._metrics.values():
            metric.render(out)
        return "".join(out)


class RateMeter:
    """Events per second of an ever-growing count, measured without a timer.

    Each ``rate()`` call samples ``count()`` (keeping at most one sample a second) and
    returns the average over the samples of the last ``window`` seconds: with Prometheus
    scraping every 15 s, that is the rate since the previous scrape or two. Nothing runs
    between readings, so an idle gateway never wakes up for it. The first reading is 0.
    """

    def __init__(self, count: Callable[[], int], clock: Callable[[], float],
                 window: float = 60.0) -> None:
        self.count = count
        self.clock = clock
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def rate(self) -> float:
        now, value = self.clock(), self.count()
        samples = self._samples
        if not samples or now - samples[-1][0] >= 1.0:
            samples.append((now, value))
        while len(samples) > 2 and now - samples[1][0] >= self.window:
            samples.popleft()
        then, before = samples[0]
        if now - then <= 0:
            return 0.0
        return max(0, value - before) / (now - then)


# -- the gateway's metrics -------------------------------------------------------------------

UPSTREAM = "upstream"  # charge point → backend
DNSTREAM = "dnstream"  # backend → charge point (EMQX's spelling)
DIRECTIONS = (UPSTREAM, DNSTREAM)
MESSAGE_TYPES = ("CALL", "CALLRESULT", "CALLERROR", "CALLRESULTERROR", "SEND")

# Action names and error codes are identifiers in every OCPP version; a peer inventing
# thousands of them must not be able to grow the process or the operator's Prometheus.
IDENTIFIER = r"[A-Za-z][A-Za-z0-9_]{0,63}"
MAX_ACTIONS = 256  # OCPP 2.1 defines about 90 actions; 1.6 about 30
MAX_ERROR_CODES = 64  # OCPP defines about 15 codes per version
MAX_REASONS = 64
MAX_LISTENERS = 64  # listener names come from the configuration
LISTENER_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,99}"


class GatewayMetrics:
    """The metrics ``GET /metrics`` shows, and the calls the gateway makes as things happen.

    Counted by the gateway (call the methods):

    ======================================== ==================================================
    ``ocpp_edge_connections_opened_total``   ``{listener}`` charge point WebSockets opened
    ``ocpp_edge_connections_closed_total``   ``{reason}`` connections that ended, by why
    ``ocpp_edge_connections_refused_total``  ``{listener, reason}`` refused before the upgrade
    ``ocpp_edge_messages_total``             ``{direction, type, action}`` OCPP-J messages
    ``ocpp_edge_callerrors_total``           ``{direction, code}`` CALLERRORs by error code
    ``ocpp_edge_timeouts_total``             ``{direction}`` CALLs left unanswered
    ``ocpp_edge_orphan_replies_total``       ``{direction}`` replies matching no pending CALL
    ``ocpp_edge_schema_failures_total``      ``{direction}`` payloads failing the schemas
    ``ocpp_edge_upstream_reconnects_total``  MQTT connections re-established after a loss
    ======================================== ==================================================

    Read when scraped (callbacks given to :meth:`bind`): ``ocpp_edge_charge_points_connected``,
    ``ocpp_edge_buffer_messages`` (OCPP messages), ``ocpp_edge_buffer_events`` (presence
    and offline events), ``ocpp_edge_buffer_bytes``, ``ocpp_edge_buffer_oldest_age_seconds``,
    ``ocpp_edge_buffer_dropped_total``, ``ocpp_edge_upstream_connected``,
    ``ocpp_edge_upstream_published_total``, ``ocpp_edge_upstream_replay_rate``. Always
    present: ``ocpp_edge_build_info{version}`` and ``ocpp_edge_start_time_seconds``.

    ``direction`` is ``upstream`` (charge point → backend) or ``dnstream`` (backend →
    charge point), as in the configuration keys. A message is counted in the direction it
    travels, whoever answers: a CALLRESULT from a charge point is ``upstream``.
    ``action`` is the CALL's action (for replies: of the CALL they answer, ``""`` when
    unknown). Close reasons are those of the ``disconnected`` event (north/presence.py, EMQX's
    words where EMQX has one): ``sock_closed`` (the charge point or the network closed
    it), ``kicked``, ``discarded`` (replaced by a new connection with the same id),
    ``keepalive_timeout`` (heartbeat checking), ``shutdown``, ``upstream_down``,
    ``internal_error``, ``closed``. Refusals: ``auth`` (401/403), ``unknown_id`` (404),
    ``too_many_failures`` (429), ``max_connections``, ``max_conn_rate``, ``open_files``
    (the process's share of ``RLIMIT_NOFILE`` is used up), ``tls_handshake`` (the TLS
    handshake failed). Anything not shaped like an identifier is counted as ``other``.
    """

    def __init__(self, version: str, start_time: float) -> None:
        self.registry = r = Registry()
        r.gauge_func("ocpp_edge_build_info", "The running ocpp-edge version (always 1).",
                     lambda: {(version,): 1}, ("version",))
        r.gauge_func("ocpp_edge_start_time_seconds",
                     "When the gateway started, in seconds since the Unix epoch.",
                     lambda: start_time)
        self._opened = r.counter("ocpp_edge_connections_opened_total",
                                 "Charge point WebSocket connections opened.", ("listener",))
        self._closed = r.counter("ocpp_edge_connections_closed_total",
                                 "Charge point connections that ended, by reason.",
                                 ("reason",))
        self._refused = r.counter("ocpp_edge_connections_refused_total",
                                  "Connections refused before the WebSocket upgrade.",
                                  ("listener", "reason"))
        self._messages = r.counter(
            "ocpp_edge_messages_total",
            "OCPP-J messages passed on, by direction (upstream: from the charge points), "
            "message type and action.", ("direction", "type", "action"))
        self._callerrors = r.counter("ocpp_edge_callerrors_total",
                                     "CALLERRORs by direction and error code.",
                                     ("direction", "code"))
        self._timeouts = r.counter(
            "ocpp_edge_timeouts_total",
            "CALLs not answered in time (upstream: the backend did not answer a charge "
            "point; dnstream: a charge point did not answer the backend).", ("direction",))
        self._orphans = r.counter("ocpp_edge_orphan_replies_total",
                                  "Replies that matched no pending CALL and were dropped.",
                                  ("direction",))
        self._schema = r.counter("ocpp_edge_schema_failures_total",
                                 "Payloads that failed the OCPP JSON schema check.",
                                 ("direction",))
        for d in DIRECTIONS:
            for c in (self._timeouts, self._orphans, self._schema):
                c.declare((d,))
        self._reconnects = r.counter("ocpp_edge_upstream_reconnects_total",
                                     "MQTT connections to the broker re-established after "
                                     "the link was lost.")
        self._action = BoundedLabel(IDENTIFIER, MAX_ACTIONS)
        self._code = BoundedLabel(IDENTIFIER, MAX_ERROR_CODES)
        self._reason = BoundedLabel(IDENTIFIER, MAX_REASONS)
        self._listener = BoundedLabel(LISTENER_NAME, MAX_LISTENERS)
        self._bound = False

    def bind(self, *, charge_points: Callable[[], Reading],
             buffer_messages: Callable[[], Reading], buffer_bytes: Callable[[], Reading],
             buffer_oldest_age: Callable[[], Reading], buffer_dropped: Callable[[], Reading],
             upstream_connected: Callable[[], Reading], published: Callable[[], Reading],
             replay_rate: Callable[[], Reading],
             buffer_events: Callable[[], Reading] | None = None) -> None:
        """Name where the values read at scrape time come from (once, at start-up).

        ``buffer_oldest_age`` returns None while the buffer is empty;
        ``upstream_connected`` a bool; ``replay_rate`` messages/s (see :class:`RateMeter`).
        ``buffer_messages`` counts OCPP messages, ``buffer_events`` the presence (and
        offline) events waiting in the buffer with them.
        """
        if self._bound:
            raise RuntimeError("GatewayMetrics.bind() called twice")
        self._bound = True
        r = self.registry
        r.gauge_func("ocpp_edge_charge_points_connected",
                     "Charge points connected now.", charge_points)
        r.gauge_func("ocpp_edge_buffer_messages",
                     "Upstream OCPP messages in the disk buffer, not yet acknowledged by "
                     "the broker.", buffer_messages)
        if buffer_events is not None:
            r.gauge_func("ocpp_edge_buffer_events",
                         "Presence and offline events in the disk buffer (not counted in "
                         "ocpp_edge_buffer_messages).", buffer_events)
        r.gauge_func("ocpp_edge_buffer_bytes", "Bytes held by the disk buffer.", buffer_bytes)
        r.gauge_func("ocpp_edge_buffer_oldest_age_seconds",
                     "Age of the oldest message in the disk buffer (absent when empty).",
                     buffer_oldest_age)
        r.counter_func("ocpp_edge_buffer_dropped_total",
                       "Messages the disk buffer dropped because it was full.",
                       buffer_dropped)
        r.gauge_func("ocpp_edge_upstream_connected",
                     "1 while the MQTT connection to the broker is up, else 0.",
                     lambda: int(bool(upstream_connected())))
        r.counter_func("ocpp_edge_upstream_published_total",
                       "Messages the broker acknowledged (and so left the buffer).",
                       published)
        r.gauge_func("ocpp_edge_upstream_replay_rate",
                     "Messages per second published to the broker lately, backlog replay "
                     "included.", replay_rate)

    def bind_dead_letters(self, dead_letters: Callable[[], Reading]) -> None:
        """``ocpp_edge_upstream_dead_letters_total``: the rows of the buffer's dead-letter
        table (messages the broker would not take, north/uplink.py), read when scraped."""
        self.registry.counter_func(
            "ocpp_edge_upstream_dead_letters_total",
            "Messages the broker would not take (it dropped the connection each time one "
            "was published), moved to the buffer's dead-letter table; the table's rows, "
            "kept across restarts.", dead_letters)

    def bind_local_mode(self, stats: Callable[[], Any]) -> None:
        """Offline operation's figures (ocpp.upstream_down_policy = local), read from
        ``stats()`` (an ``ops.view.LocalModeStats``) at scrape time."""
        r = self.registry
        r.gauge_func("ocpp_edge_local_mode",
                     "1 while the gateway answers charge points itself (backend away).",
                     lambda: int(stats().active))
        for name, field, help_ in (
                ("ocpp_edge_local_answers_total", "answers",
                 "Charge point CALLs the gateway answered itself."),
                ("ocpp_edge_local_reconciled_total", "reconciled",
                 "Backend answers to locally answered CALLs, matched after the replay."),
                ("ocpp_edge_local_disagreements_total", "disagreements",
                 "Reconciled backend answers that overruled the local answer."),
                ("ocpp_edge_local_transactions_mapped_total", "mapped",
                 "Local 1.6 transaction ids mapped to the backend's."),
                ("ocpp_edge_local_held_released_total", "held_released",
                 "Messages published with a local transaction id after "
                 "ocpp.offline.hold_timeout.")):
            r.counter_func(name, help_, lambda f=field: getattr(stats(), f))
        r.gauge_func("ocpp_edge_local_transactions_open",
                     "Local 1.6 transaction ids in use.", lambda: stats().transactions_open)
        r.gauge_func("ocpp_edge_local_answered_pending",
                     "Locally answered CALLs whose backend answer is still awaited.",
                     lambda: stats().answered_pending)

    # -- connections -----------------------------------------------------------------------

    def connection_opened(self, listener: str) -> None:
        self._opened.inc((self._listener(listener),))

    def connection_closed(self, reason: str) -> None:
        self._closed.inc((self._reason(reason),))

    def connection_refused(self, listener: str, reason: str, n: int = 1) -> None:
        self._refused.inc((self._listener(listener), self._reason(reason)), n)

    # -- messages --------------------------------------------------------------------------

    def message(self, direction: str, type: str, action: str | None = None) -> None:
        """One OCPP-J message passed on; ``type`` is the name of its message type
        (``MessageType(n).name``). The hot path: one dict lookup and an add once the
        combination has been seen."""
        key = (direction, type, action or "")
        values = self._messages.values
        try:
            values[key] += 1
        except KeyError:
            self._new_message(key)

    def _new_message(self, key: tuple[str, str, str]) -> None:
        direction, type_, action = key
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        if type_ not in MESSAGE_TYPES:
            raise ValueError(f"message type must be one of {MESSAGE_TYPES}, got {type_!r}")
        # An action that is not admitted as a label is counted under "other"; its raw key
        # is never stored (that would make memory unbounded again), so each such message
        # takes this path: a regex match, still cheap.
        self._messages.inc((direction, type_, self._action(action) if action else ""))

    def callerror(self, direction: str, code: str) -> None:
        key = (direction, code)
        values = self._callerrors.values
        if key in values:
            values[key] += 1
            return
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        self._callerrors.inc((direction, self._code(code)))

    # ``n``: several at once, for counts another object keeps and the gateway passes on
    # when scraped (see ops/operations.py).

    def timeout(self, direction: str, n: int = 1) -> None:
        self._count_direction(self._timeouts, direction, n)

    def orphan_reply(self, direction: str, n: int = 1) -> None:
        self._count_direction(self._orphans, direction, n)

    def schema_failure(self, direction: str, n: int = 1) -> None:
        self._count_direction(self._schema, direction, n)

    @staticmethod
    def _count_direction(counter: Counter, direction: str, n: int = 1) -> None:
        key = (direction,)
        if key not in counter.values:  # all valid directions are declared up front
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        counter.values[key] += n

    # -- upstream --------------------------------------------------------------------------

    def upstream_reconnect(self, n: int = 1) -> None:
        self._reconnects.values[()] += n

    # -- output ----------------------------------------------------------------------------

    def render(self) -> str:
        return self.registry.render()
