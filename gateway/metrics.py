"""Prometheus metrics (``GET /metrics``), in base units with conventional names.

Labels are bounded: routes are route names, operations are Geopera operation ids, scopes are
a fixed set. No label ever holds z/x/y, a URL, a job id, a token or a key.

With ``--workers N`` the worker processes write to ``PROMETHEUS_MULTIPROC_DIR`` (set by
:mod:`gateway.cli.serve` before they start) and ``/metrics`` merges them with prometheus-client's
multiprocess collector. Host-wide state (cache size, open breakers, egress budget) is read at
scrape time from the shared state by :class:`StateCollector`, so every worker reports the
same values.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# no *_created series: they double the output and nobody reads them
disable_created_metrics()  # type: ignore[no-untyped-call]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

HTTP_REQUESTS = Counter(
    "gateway_http_requests_total", "HTTP requests answered", ["route", "method", "status"]
)
HTTP_DURATION = Histogram(
    "gateway_http_request_duration_seconds",
    "Time to answer an HTTP request",
    ["route"],
    buckets=LATENCY_BUCKETS,
)
CACHE_LOOKUPS = Counter(
    "gateway_cache_lookups_total",
    "Tile requests by cache result (hit, miss, stale, coalesced, empty)",
    ["result"],
)
UPSTREAM_SAVED = Counter(
    "gateway_upstream_calls_saved_total",
    "Tile requests answered without an upstream call of their own",
)
UPSTREAM_REQUESTS = Counter(
    "gateway_upstream_requests_total",
    "Calls to the Geopera API by operation and HTTP status",
    ["operation", "status"],
)
UPSTREAM_DURATION = Histogram(
    "gateway_upstream_request_duration_seconds",
    "Duration of successful upstream calls",
    ["operation"],
    buckets=LATENCY_BUCKETS,
)
UPSTREAM_BYTES = Counter(
    "gateway_upstream_received_bytes_total",
    "Bytes received from the upstream (egress)",
    ["operation"],
)
LIMITER_WAIT = Histogram(
    "gateway_limiter_wait_seconds",
    "Time upstream calls waited for the limiter",
    ["operation"],
    buckets=LATENCY_BUCKETS,
)
LIMITER_REJECTIONS = Counter(
    "gateway_limiter_rejections_total", "Upstream calls refused by the limiter, by scope", ["scope"]
)
CLIENT_REJECTIONS = Counter(
    "gateway_client_rate_limited_total", "Client requests answered 429 by the per-client rate limit"
)
STORE_REBUILDS = Counter(
    "gateway_store_rebuilds_total",
    "Damaged SQLite stores moved aside and started empty, by store (tiles, state, downloads)",
    ["store"],
)
CACHE_DAMAGED = Counter(
    "gateway_cache_damaged_entries_total",
    "Tile cache entries that could not be read back intact (dropped, served as a miss)",
)
CACHE_WRITE_FAILURES = Counter(
    "gateway_cache_write_failures_total",
    "Tile cache writes that failed, by reason (disk full, read-only, damaged, busy, I/O error)",
    ["reason"],
)
CACHE_WRITABLE = Gauge(
    "gateway_cache_writable",
    "1 while the tile cache accepts writes, 0 while tiles are served uncached",
    multiprocess_mode="livemin",
)

# --- the fleet's Redis (issue 13) ---
STATE_REACHABLE = Gauge(
    "gateway_state_reachable",
    "1 while the fleet's Redis answers, 0 while it cannot be reached (cache misses refused); "
    "always 1 on a host without Redis",
    multiprocess_mode="livemin",
)
EGRESS_SAVED = Counter(
    "gateway_upstream_saved_bytes_total",
    "Tile bytes served without an upstream call of their own (hit, stale, coalesced), by operation",
    ["operation"],
)
FLEET_COALESCED = Counter(
    "gateway_fleet_coalesced_total",
    "Cache misses answered by another replica's fetch (cross-replica single-flight)",
)
PEER_PULLS = Counter(
    "gateway_fleet_peer_pulls_total",
    "Clip files pulled from another replica instead of the upstream, by outcome (ok, broken: "
    "cut off midway; gone, refused, unreachable, failed: nothing sent)",
    ["outcome"],
)

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


class RouteObserver:
    """The HTTP metrics of one route, with its label children bound ahead of use: the
    duration histogram's child when the observer is made, the request counter's children
    for the usual (method, status) pairs too (:data:`PREBOUND`), the others on first use.
    So counting a request is a dict lookup, never ``.labels()``.

    Args:
        route: the route name (a bounded label value).
    """

    PREBOUND = tuple((m, s) for m in ("GET", "HEAD") for s in (200, 304))
    """(method, status) pairs bound when the observer is made: what tile hits answer."""

    __slots__ = ("_counts", "_duration", "_route")

    def __init__(self, route: str) -> None:
        self._route = route
        self._duration = HTTP_DURATION.labels(route)
        self._counts: dict[tuple[str, int], Counter] = {
            key: HTTP_REQUESTS.labels(route, key[0], str(key[1])) for key in self.PREBOUND
        }

    def __call__(self, method: str, status: int, seconds: float) -> None:
        """Count one answered request (``method``, ``status``) that took ``seconds``."""
        child = self._counts.get((method, status))
        if child is None:
            if method not in _METHODS:
                method = "other"  # any token is a valid method: keep the label set bounded
            child = self._counts.get((method, status))
            if child is None:
                child = self._counts[(method, status)] = HTTP_REQUESTS.labels(
                    self._route, method, str(status)
                )
        TURN_COUNTS.inc(child)
        self._duration.observe(seconds)


class TurnCounts:
    """Counter increments made in one event-loop turn, added to their counters together
    once the turn's ready callbacks have run (``loop.call_soon``): a cache hit counts four
    counters, and prometheus-client takes a lock for every increment (0.5 µs a call on this
    project's VM, against 0.1 µs to add to this turn's sum). Answers written in the turn go
    out after this flush (:class:`gateway.http.server.DeferredWrites` is scheduled later in
    it, aiohttp's own writes reach their client in a later turn), and :func:`render` adds
    what is pending first: a client never sees an answer its counters lack. With
    ``--workers N`` another worker's pending counts (at most one loop turn's) show in its
    next turn.

    Outside a running loop an increment is added at once; what a loop that stopped before
    its flush left is added with the next batch (or by :meth:`flush`), never dropped: the
    scheduling of :class:`gateway.logs.AccessLines`. Not thread-safe: one event loop per
    process.
    """

    def __init__(self) -> None:
        self._pending: dict[Counter, float] = {}
        self._flush_on: asyncio.AbstractEventLoop | None = None  # the loop a flush is due on

    def inc(self, child: Counter, amount: float = 1.0) -> None:
        """Add ``amount`` to the counter (a child bound with ``.labels()``, or one without
        labels) at the end of this loop turn."""
        pending = self._pending
        pending[child] = pending.get(child, 0.0) + amount
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if self._flush_on is not loop:  # not yet due on this loop (or due on one now gone)
            self._flush_on = loop
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Add the pending increments to their counters now."""
        self._flush_on = None
        batch, self._pending = self._pending, {}
        for child, amount in batch.items():
            child.inc(amount)


TURN_COUNTS = TurnCounts()
"""This process's :class:`TurnCounts`."""


_OBSERVERS: dict[str, RouteObserver] = {}


def route_observer(route: str) -> RouteObserver:
    """The :class:`RouteObserver` of ``route``, made on first use (routes are registered at
    startup: :func:`gateway.http.policy.add_get` makes theirs then)."""
    observer = _OBSERVERS.get(route)
    if observer is None:
        observer = _OBSERVERS[route] = RouteObserver(route)
    return observer


def observe_request(route: str, method: str, status: int, seconds: float) -> None:
    """Count one answered request and its duration (:func:`route_observer`)."""
    route_observer(route)(method, status, seconds)


_CACHE_RESULTS = ("hit", "miss", "stale", "coalesced", "empty")
CACHE_LOOKUP = {name.upper(): CACHE_LOOKUPS.labels(name) for name in _CACHE_RESULTS}
"""Pre-bound children by ``X-Cache`` value, so the hit path does no label lookup."""


class StateCollector(Collector):
    """Host-wide gauges computed at scrape time.

    Args:
        cache_bytes: returns the tile cache's disk volume, bytes.
        open_breakers: returns ``(operation, scope_kind, state)`` for each breaker that
            refuses calls now (state ``open``, or ``half-open`` with a probe in flight).
        budget_left: returns today's egress budget left in bytes, or None without a budget.
        alerts: returns ``(kind, subject)`` for each active operator alert
            (:mod:`gateway.upstream.alerts`; subjects are Geopera scopes or layer names).
    """

    def __init__(
        self,
        cache_bytes: Callable[[], int],
        open_breakers: Callable[[], list[tuple[str, str, str]]],
        budget_left: Callable[[], int | None],
        alerts: Callable[[], list[tuple[str, str]]] = list,
    ) -> None:
        self._cache_bytes = cache_bytes
        self._open_breakers = open_breakers
        self._budget_left = budget_left
        self._alerts = alerts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "gateway_cache_size_bytes", "Tile cache size on disk", value=self._cache_bytes()
        )
        breakers = GaugeMetricFamily(
            "gateway_breaker_open",
            "Circuit breakers refusing calls, by operation, scope kind and state",
            labels=["operation", "scope", "state"],
        )
        counts: dict[tuple[str, str, str], int] = {}
        for key in self._open_breakers():
            counts[key] = counts.get(key, 0) + 1
        for labels, n in sorted(counts.items()):
            breakers.add_metric(list(labels), n)
        yield breakers
        alerts = GaugeMetricFamily(
            "gateway_upstream_alert",
            "Active operator alerts (1 each): key-refused, scope-missing (subject: the scope), "
            "payment-required, source-unknown (subject: the layer)",
            labels=["kind", "subject"],
        )
        for kind, subject in sorted(set(self._alerts())):
            alerts.add_metric([kind, subject], 1)
        yield alerts
        left = self._budget_left()
        if left is not None:
            yield GaugeMetricFamily(
                "gateway_egress_budget_remaining_bytes",
                "Upstream egress budget left today (UTC)",
                value=left,
            )


def render(state: Collector) -> tuple[bytes, str]:
    """The exposition text for all metrics plus ``state``; returns ``(body, content_type)``.
    This loop turn's pending counts (:data:`TURN_COUNTS`) are added first."""
    TURN_COUNTS.flush()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        body = generate_latest(registry)
    else:
        body = generate_latest(REGISTRY)
    host = CollectorRegistry(auto_describe=False)
    host.register(state)
    return body + generate_latest(host), CONTENT_TYPE_LATEST
