"""Upstream-limits benchmark for geopera-gateway: a 10x overload of one asset's rate limit.

Run it from the repository root with the project's Python (``pip install -e '.[dev]'``; no
other tool is needed)::

    python bench/egress_limits.py              # R = 10 req/s, 10x R for 30 s, max wait 10 s
    python bench/egress_limits.py --workers 2  # the same against two gateway workers

What it proves: the emulator limits an asset to R requests/s; clients ask the gateway for many
distinct, never-seen tiles of that asset at F x R requests/s. The gateway must keep its
upstream traffic under the limit (no 429 reaches the emulator) while still using it (an
upstream rate of at least 90 % of R), and every client must get a tile or a quick 503 with
``Retry-After``: no hung request, none answered later than ``max_wait_s`` + 1 s.

Method:

1. **Processes.** The bundled emulator (``python -m gateway emulator --asset-rps R
   --delay-ms D``; its bucket per asset holds max(1, R) tokens, refilled at R/s) and the
   gateway (``python -m gateway serve --workers N``) on free ports of 127.0.0.1, with a fresh
   cache in a scratch directory. Nothing is pinned.
2. **Config.** ``bench/tiles.toml`` (the bahamas layer, zoom 5 to 14) plus: access log off,
   no per-client rate limit (the load generator is one client), ``asset_rps = R`` with
   ``asset_burst = R / 2`` (headroom below the emulator's bucket of R for arrival jitter),
   ``operation_rps = operation_burst = 2 R`` (so the
   asset limit is the one that binds) and ``max_wait_s`` = ``--max-wait``. Every override must
   be accepted by the gateway's config loader, or the run stops.
3. **Tiles.** F x R x duration distinct tiles lying entirely inside the layer's bounds: z14
   first (10,486 of them), then z13 and z12, in a fixed shuffled order. Tiles inside the
   bounds but off the image are upstream calls too (the emulator answers 404 ``empty-tile``,
   served EMPTY).
4. **Load.** The emulator's counters are reset, then an open-loop generator in this process
   starts request i at t0 + i / (F x R), whether or not earlier ones were answered, for
   ``--duration`` seconds (aiohttp, unlimited connection pool, per-request timeout
   ``max_wait_s`` + 5 s so that a hung request is seen and counted). Per request: status,
   ``X-Cache``, for 503 the ``Retry-After`` and problem type, the latency (request start to
   end of body) and how late the generator started it. Meanwhile ``/_emulator/stats`` is read
   every 0.25 s, which timestamps the upstream calls.
5. **Upstream rate.** Render calls the emulator answered 200 or empty (404, or 204 with
   ``--empty-tiles 204``), per second, measured three ways: over the load's duration (the
   simple ratio; it also counts the initial burst and the calls made while the queue drains
   after the load), over the active window (first
   to last upstream call, to 0.25 s), and over the **steady window**, from 2 s after the load
   starts (a quarter of the duration if shorter) to its end, while demand exceeds R. The
   target is judged on the steady window.
6. **Targets** (informational, PASS/MISS): upstream 429s (the emulator's ``throttled``) = 0;
   steady upstream rate >= 90 % of R; every answer is 200 (tile or EMPTY, a PNG body) or 503
   with ``Retry-After``, nothing else (other statuses, timeouts, connection errors); no
   request hit the client timeout; max latency <= ``max_wait_s`` + 1 s.

The exit status is 0 when the measurement ran, whatever the targets say; 1 when something
broke (a process died or did not start, the config was not accepted, the generator fell more
than 1 s behind its schedule, or the emulator counted no render at all); 130 on Ctrl-C. Every
process started here is stopped by PID (by ``bench/harness.py``), also on
errors, Ctrl-C and SIGTERM. Everything listens on 127.0.0.1 and every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import random
import resource
import statistics
import sys
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path

try:
    import aiohttp
    import mercantile
except ImportError:  # pragma: no cover - a helpful message instead of a traceback
    sys.exit(
        "bench/egress_limits.py: aiohttp/mercantile missing; run it with the project's venv python"
    )

# bench/harness.py and bench/gwconfig.py: this script's directory is first on sys.path
import gwconfig
import harness

LAYER_BOUNDS = (-78.95865, 23.56499, -76.57492, 25.55087)
"""The bahamas layer's bounds in ``tiles.toml`` (west, south, east, north)."""
TILE_ZOOMS = (14, 13, 12)
SHUFFLE_SEED = 20240611

SAMPLE_S = 0.25
STEADY_SKIP_S = 2.0
CLIENT_SLACK_S = 5.0
LATENCY_SLACK_S = 1.0
RATE_TARGET = 0.9
MAX_LAG_S = 1.0
SETTLE_S = 1.0
METRIC_PREFIXES = (
    "gateway_upstream_requests_total",
    "gateway_limiter_rejections_total",
    "gateway_breaker_open",
    "gateway_cache_lookups_total",
    "gateway_client_rate_limited_total",
)


# --------------------------------------------------------------------------- tiles


def inside_tiles(zoom: int) -> list[tuple[int, int, int]]:
    """Tiles ``(z, x, y)`` at ``zoom`` lying entirely inside :data:`LAYER_BOUNDS`."""
    west, south, east, north = LAYER_BOUNDS
    found = []
    for tile in mercantile.tiles(west, south, east, north, zooms=[zoom]):
        b = mercantile.bounds(tile)
        if b.west >= west and b.east <= east and b.south >= south and b.north <= north:
            found.append((tile.z, tile.x, tile.y))
    return found


def load_paths(count: int) -> list[str]:
    """``count`` distinct tile paths of the benchmark layer, z14 first, in a fixed shuffle.

    Raises:
        BenchError: fewer tiles than ``count`` lie inside the bounds.
    """
    rng = random.Random(SHUFFLE_SEED)
    chosen: list[tuple[int, int, int]] = []
    for zoom in TILE_ZOOMS:
        level = inside_tiles(zoom)
        rng.shuffle(level)
        chosen += level[: count - len(chosen)]
        if len(chosen) >= count:
            break
    if len(chosen) < count:
        raise harness.BenchError(f"only {len(chosen)} distinct tiles available, {count} needed")
    return [f"/tiles/{harness.LAYER}/{z}/{x}/{y}.png" for z, x, y in chosen]


# --------------------------------------------------------------------------- load


@dataclass
class Answer:
    """What one client request got."""

    due_s: float
    """When it was scheduled, seconds after the load started."""
    lag_s: float = 0.0
    status: str = "-"
    xcache: str = "-"
    retry_after: str | None = None
    slug: str = ""
    latency_s: float = 0.0
    png: bool = False

    @property
    def kind(self) -> str:
        """``tile``, ``503`` (with a valid Retry-After) or ``failure``."""
        if self.status == "200" and self.png:
            return "tile"
        if self.status == "503" and retry_after_ok(self.retry_after):
            return "503"
        return "failure"

    @property
    def label(self) -> str:
        """The status as counted: ``200``, ``503``, ``200-not-png``, ``timeout``..."""
        if self.status == "200" and not self.png:
            return "200-not-png"
        if self.status == "503" and not retry_after_ok(self.retry_after):
            return "503-no-retry-after"
        return self.status


@dataclass
class Sample:
    """One reading of the emulator's counters."""

    t_s: float
    renders: int
    """``cog.tile.render`` calls answered 200 or empty (404 or 204)."""
    throttled: int


@dataclass
class Load:
    """Everything the load phase recorded."""

    answers: list[Answer] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    sample_errors: int = 0
    seconds: float = 0.0
    """Time from the first request's start to the last request's start plus 1 / rate."""
    finished_s: float = 0.0
    """Time from the load's start until every answer was in."""


def retry_after_ok(value: str | None) -> bool:
    """Whether ``value`` is a valid ``Retry-After``: delay seconds or an HTTP-date."""
    if value is None:
        return False
    value = value.strip()
    if value.isdigit():
        return True
    try:
        parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return False
    return True


def good_renders(stats: dict) -> int:
    """Render calls the emulator answered 200 or empty (404 ``empty-tile``, or 204 with
    ``--empty-tiles 204``), from ``/_emulator/stats``."""
    statuses = stats.get("statuses", {})
    return sum(int(statuses.get(f"{harness.RENDER_OP} {status}", 0)) for status in (200, 204, 404))


async def one_request(
    session: aiohttp.ClientSession, url: str, answer: Answer, t0: float, request_timeout_s: float
) -> None:
    """GET ``url`` once and fill ``answer`` in place (exceptions become statuses)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    answer.lag_s = started - t0 - answer.due_s
    try:
        async with session.get(
            url, timeout=aiohttp.ClientTimeout(total=request_timeout_s)
        ) as response:
            body = await response.read()
            answer.status = str(response.status)
            answer.xcache = response.headers.get("X-Cache", "-")
            if response.status == 200:
                answer.png = body.startswith(harness.PNG_MAGIC)
            elif response.status == 503:
                answer.retry_after = response.headers.get("Retry-After")
                try:
                    answer.slug = str(json.loads(body).get("type", "")).rsplit("/", 1)[-1]
                except (ValueError, AttributeError):
                    answer.slug = "not-json"
    except TimeoutError:
        answer.status = "timeout"
    except aiohttp.ClientError as exc:
        answer.status = f"error:{type(exc).__name__}"
    answer.latency_s = loop.time() - started


async def sample_emulator(emulator_url: str, t0: float, load: Load, stop: asyncio.Event) -> None:
    """Read ``/_emulator/stats`` every :data:`SAMPLE_S` until ``stop`` is set."""
    loop = asyncio.get_running_loop()
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            try:
                async with session.get(emulator_url + "/_emulator/stats") as response:
                    stats = await response.json()
                load.samples.append(
                    Sample(loop.time() - t0, good_renders(stats), int(stats["throttled"]))
                )
            except (aiohttp.ClientError, TimeoutError, KeyError, ValueError):
                load.sample_errors += 1
            if stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_S)


async def run_load(
    gateway_url: str,
    emulator_url: str,
    paths: Sequence[str],
    rate: float,
    request_timeout_s: float,
) -> Load:
    """Start one GET per path at ``rate`` per second on a fixed schedule; wait for all."""
    loop = asyncio.get_running_loop()
    load = Load()
    connector = aiohttp.TCPConnector(limit=0)
    stop = asyncio.Event()
    async with aiohttp.ClientSession(connector=connector) as session:
        t0 = loop.time()
        sampler = asyncio.create_task(sample_emulator(emulator_url, t0, load, stop))
        tasks = []
        for i, path in enumerate(paths):
            due = i / rate
            delay = t0 + due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            answer = Answer(due_s=due)
            load.answers.append(answer)
            tasks.append(
                asyncio.create_task(
                    one_request(session, gateway_url + path, answer, t0, request_timeout_s)
                )
            )
        load.seconds = len(paths) / rate
        # every request ends by its own timeout; the outer bound is a safety net only
        await asyncio.wait(tasks, timeout=request_timeout_s + 30)
        for task in tasks:
            if not task.done():
                task.cancel()
        load.finished_s = loop.time() - t0
        # let upstream calls still in flight (a client gave up, a refresh) reach the counters
        deadline = loop.time() + 5 * SETTLE_S
        last = -1
        while loop.time() < deadline:
            await asyncio.sleep(SETTLE_S)
            current = load.samples[-1].renders if load.samples else 0
            if current == last:
                break
            last = current
        stop.set()
        await sampler
    return load


# --------------------------------------------------------------------------- analysis


def value_at(samples: Sequence[Sample], t: float, what: str = "renders") -> float:
    """Counter ``what`` of the samples at time ``t``, linearly interpolated."""
    if not samples:
        return 0.0
    if t <= samples[0].t_s:
        return float(getattr(samples[0], what))
    for before, after in itertools.pairwise(samples):
        if before.t_s <= t <= after.t_s:
            low, high = getattr(before, what), getattr(after, what)
            span = after.t_s - before.t_s
            if span <= 0:
                return float(high)
            return low + (high - low) * (t - before.t_s) / span
    return float(getattr(samples[-1], what))


def active_window(samples: Sequence[Sample]) -> tuple[float, float] | None:
    """``(first, last)``: the first sample with a render counted and the first with the final
    count (each to within :data:`SAMPLE_S`), or None without renders."""
    final = samples[-1].renders if samples else 0
    if final == 0:
        return None
    first = next(s.t_s for s in samples if s.renders > 0)
    last = next(s.t_s for s in samples if s.renders == final)
    return first, last


def ms_stats(latencies: Sequence[float]) -> tuple[str, str, str]:
    """p50, p99 and max of ``latencies`` (seconds) as millisecond strings."""
    if not latencies:
        return "-", "-", "-"
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
    return (
        f"{statistics.median(ordered) * 1000:,.0f}",
        f"{p99 * 1000:,.0f}",
        f"{ordered[-1] * 1000:,.0f}",
    )


def metric_lines(gateway_url: str) -> list[str]:
    """The relevant lines of the gateway's ``/metrics`` (or the error reading it)."""
    try:
        with urllib.request.urlopen(gateway_url + "/metrics", timeout=10) as response:
            text = response.read().decode("utf-8", "replace")
    except OSError as exc:
        return [f"(could not read /metrics: {exc})"]
    return [ln for ln in text.splitlines() if ln.startswith(METRIC_PREFIXES)]


def timeline_rows(load: Load, bin_s: float) -> list[list[str]]:
    """Per ``bin_s`` slice of the run: requests started and what they got, upstream calls."""
    end = max(load.finished_s, load.samples[-1].t_s if load.samples else 0.0)
    rows = []
    for k in range(math.ceil(end / bin_s)):
        lo, hi = k * bin_s, (k + 1) * bin_s
        started = [a for a in load.answers if lo <= a.due_s < hi]
        kinds = Counter(a.kind for a in started)
        calls = value_at(load.samples, min(hi, end)) - value_at(load.samples, lo)
        throttled = value_at(load.samples, min(hi, end), "throttled") - value_at(
            load.samples, lo, "throttled"
        )
        rows.append(
            [
                f"{lo:.1f}-{min(hi, end):.1f} s",
                str(len(started)),
                str(kinds["tile"]),
                str(kinds["503"]),
                str(kinds["failure"]),
                f"{calls:.0f}",
                f"{calls / max(1e-9, min(hi, end) - lo):.1f}",
                f"{throttled:.0f}",
            ]
        )
    return rows


def report(
    args: argparse.Namespace,
    load: Load,
    stats: dict,
    metrics: list[str],
    gateway_log: Path | None,
) -> list[str]:
    """Print the tables and the targets (``gateway_log``: the gateway's log file, for its
    warnings); returns the problems that make the run invalid."""
    problems = []
    r, answers = args.rate, load.answers
    max_latency_limit = args.max_wait + LATENCY_SLACK_S
    renders = good_renders(stats)
    throttled = int(stats.get("throttled", 0))
    simple_rate = renders / load.seconds
    window = active_window(load.samples)
    active_rate = (
        renders / (window[1] - window[0]) if window and window[1] > window[0] else float("nan")
    )
    steady_from = min(STEADY_SKIP_S, load.seconds / 4)
    steady_rate = (value_at(load.samples, load.seconds) - value_at(load.samples, steady_from)) / (
        load.seconds - steady_from
    )
    kinds = Counter(a.kind for a in answers)
    labels = Counter(a.label for a in answers)
    failures = Counter(a.label for a in answers if a.kind == "failure")
    timeouts = labels["timeout"]
    max_latency = max((a.latency_s for a in answers), default=0.0)
    max_lag = max((a.lag_s for a in answers), default=0.0)

    print()
    print(
        f"## geopera-gateway upstream limits: R = {r:g} req/s per asset, clients at "
        f"{args.factor:g} x R = {r * args.factor:g} req/s for {args.duration:g} s, "
        f"max_wait_s {args.max_wait:g}, workers {args.workers}, emulator delay "
        f"{args.delay_ms:g} ms"
    )
    print()
    print(
        f"load: {len(answers):,} distinct never-seen tiles, started on schedule (max lag "
        f"{max_lag * 1000:.1f} ms), all answered {load.finished_s:.1f} s after the start; "
        f"emulator sampled {len(load.samples)} times every {SAMPLE_S:g} s"
        + (f" ({load.sample_errors} failed reads)" if load.sample_errors else "")
    )
    print()
    bin_s = max(1.0, math.ceil(max(load.finished_s, load.seconds) / 12))
    print(f"### Timeline ({bin_s:g} s slices; requests by start time)")
    print()
    print(
        harness.table(
            [
                "slice",
                "started",
                "tiles",
                "503",
                "failures",
                "upstream renders",
                "upstream req/s",
                "upstream 429s",
            ],
            timeline_rows(load, bin_s),
        )
    )
    print()
    print("### What clients got")
    print()
    rows, details = [], []
    for kind, title in (("tile", "200 tile"), ("503", "503 + Retry-After"), ("failure", "other")):
        group = [a for a in answers if a.kind == kind]
        p50, p99, worst = ms_stats([a.latency_s for a in group])
        rows.append([title, f"{len(group):,}", p50, p99, worst])
        if not group:
            continue
        if kind == "tile":
            details.append("200: X-Cache " + harness.fmt_counter(Counter(a.xcache for a in group)))
        elif kind == "503":
            details.append(
                "503: type "
                + harness.fmt_counter(Counter(a.slug for a in group))
                + "; Retry-After "
                + harness.fmt_counter(Counter(a.retry_after or "-" for a in group))
            )
        else:
            details.append("other: " + harness.fmt_counter(Counter(a.label for a in group)))
    print(harness.table(["answer", "count", "p50 ms", "p99 ms", "max ms"], rows))
    for line in details:
        print(line)
    print()
    print("### Upstream (emulator counters)")
    print()
    print(f"calls {json.dumps(stats.get('calls', {}))}")
    print(f"statuses {json.dumps(stats.get('statuses', {}))}; throttled (429) {throttled}")
    print()
    win = f"{window[0]:.2f} to {window[1]:.2f} s" if window else "none"
    print(
        harness.table(
            ["upstream rate (renders answered 200/empty)", "renders", "seconds", "req/s", "x R"],
            [
                [
                    "simple: all renders / load duration",
                    f"{renders:,}",
                    f"{load.seconds:.2f}",
                    f"{simple_rate:.2f}",
                    f"{simple_rate / r:.2f}",
                ],
                [
                    f"active window, first to last upstream call ({win})",
                    f"{renders:,}",
                    f"{window[1] - window[0]:.2f}" if window else "-",
                    f"{active_rate:.2f}",
                    f"{active_rate / r:.2f}",
                ],
                [
                    f"steady window, {steady_from:g} s to {load.seconds:g} s (judged)",
                    f"{steady_rate * (load.seconds - steady_from):.1f}",
                    f"{load.seconds - steady_from:.2f}",
                    f"{steady_rate:.2f}",
                    f"{steady_rate / r:.2f}",
                ],
            ],
        )
    )
    tiles_upstream = sum(
        1 for a in answers if a.kind == "tile" and a.xcache in ("MISS", "EMPTY", "COALESCED")
    )
    print(
        f"renders answered 200/empty: {renders:,}; client tiles fetched upstream: "
        f"{tiles_upstream:,}"
        + ("" if renders == tiles_upstream else " (they differ: see the note in bench/README.md)")
    )
    print()
    print("gateway /metrics:")
    for line in metrics:
        print("  " + line)
    harness.print_log_findings(gateway_log)
    print()
    harness.print_targets(
        ["measured"],
        [
            ["upstream 429s = 0", str(throttled), harness.verdict(throttled == 0)],
            [
                f"upstream rate >= {RATE_TARGET:.0%} of R = {RATE_TARGET * r:g} req/s "
                "(steady window)",
                f"{steady_rate:.2f} req/s ({steady_rate / r:.0%} of R)",
                harness.verdict(steady_rate >= RATE_TARGET * r),
            ],
            [
                "every answer 200 (tile/EMPTY) or 503 + Retry-After",
                f"{kinds['tile']:,} tiles, {kinds['503']:,} 503, "
                f"{kinds['failure']:,} other"
                + (f" ({harness.fmt_counter(failures)})" if failures else ""),
                harness.verdict(kinds["failure"] == 0),
            ],
            [
                f"no hung request (client timeout {args.max_wait + CLIENT_SLACK_S:g} s)",
                f"{timeouts} timed out",
                harness.verdict(timeouts == 0),
            ],
            [
                f"max latency <= max_wait_s + {LATENCY_SLACK_S:g} s = {max_latency_limit:g} s",
                f"{max_latency:.2f} s",
                harness.verdict(max_latency <= max_latency_limit),
            ],
        ],
    )
    if max_lag > MAX_LAG_S:
        problems.append(
            f"the load generator fell {max_lag:.2f} s behind its schedule: the offered rate "
            "was not what was asked"
        )
    if renders == 0:
        problems.append("the emulator counted no successful render: nothing was measured")
    return problems


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description="Overload one asset of geopera-gateway's upstream (the bundled emulator) "
        "and check that the gateway keeps under the upstream's limit while using it "
        "(see the module docstring for the method).",
    )
    parser.add_argument(
        "--rate", type=float, default=10.0, help="R: the emulator's limit per asset, req/s (10)"
    )
    parser.add_argument("--duration", type=float, default=30.0, help="load seconds (30)")
    parser.add_argument(
        "--factor", type=float, default=10.0, help="client request rate = F x R (10)"
    )
    parser.add_argument(
        "--max-wait", type=float, default=10.0, help="gateway's [limits] max_wait_s (10)"
    )
    harness.add_server_options(parser)
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir (logs, cache)")
    args = harness.parse_options(
        parser,
        argv,
        {
            "--rate": (0.5, 1000, ""),
            "--duration": (5, 600, " seconds"),
            "--factor": (0.1, 100, ""),
            "--max-wait": (0.1, 120, " seconds"),
        },
    )
    if round(args.rate * args.factor * args.duration) < 1:
        parser.error("rate x factor x duration must be at least one request")
    return args


def overrides(args: argparse.Namespace) -> list[gwconfig.Override]:
    """The config overrides; all of them must be accepted."""
    r = args.rate
    # half the upstream's burst: arrival jitter must not find the upstream bucket empty
    burst = max(1.0, r / 2)
    return [
        gwconfig.Override("server.access_log = false", "[server]\naccess_log = false\n"),
        gwconfig.Override('clients.rate_limit = "off"', '[clients]\nrate_limit = "off"\n'),
        gwconfig.Override(
            f"limits: asset {r:g}/s burst {burst:g}, operation {2 * r:g}/s burst {2 * r:g}, "
            f"max_wait_s {args.max_wait:g}",
            f"[limits]\nasset_rps = {r:.3f}\nasset_burst = {burst:.3f}\n"
            f"operation_rps = {2 * r:.3f}\noperation_burst = {2 * r:.3f}\n"
            f"max_wait_s = {args.max_wait:.3f}\n",
        ),
    ]


def raise_fd_limit(needed: int) -> None:
    """Raise the soft open-files limit towards ``needed`` (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def benchmark(args: argparse.Namespace, scratch: Path, procs: harness.Processes) -> list[str]:
    """Start the processes, run the load and print the report; returns the problems.

    Raises:
        BenchError: a process died or did not start, or the config was not accepted.
    """
    count = round(args.rate * args.factor * args.duration)
    paths = load_paths(count)
    client_timeout = args.max_wait + CLIENT_SLACK_S
    # worst case every request of the last client_timeout seconds is open, twice over
    raise_fd_limit(2 * math.ceil(args.rate * args.factor * client_timeout) + 1024)

    emulator = harness.start_emulator(
        procs, "--delay-ms", f"{args.delay_ms:g}", "--asset-rps", f"{args.rate:g}"
    )
    emulator_url = emulator.url

    env = harness.gateway_env(emulator_url, scratch / "cache")
    config = scratch / "gateway.toml"
    applied, _ = harness.write_gateway_config(config, env, required=overrides(args))
    print(f"config: {harness.BASE_CONFIG.name} + {'; '.join(applied)}", flush=True)
    gateway = harness.start_gateway(procs, config, env, args.workers)
    gateway_url = gateway.url
    print(
        f"emulator pid {emulator.pid} on {emulator_url} (asset limit {args.rate:g} req/s, "
        f"delay {args.delay_ms:g} ms); gateway pid {gateway.pid} on {gateway_url} "
        f"(workers {args.workers}); scratch {scratch}",
        flush=True,
    )
    harness.reset_emulator(emulator_url)
    print(
        f"load: {count:,} tiles at {args.rate * args.factor:g} req/s for {args.duration:g} s "
        f"(client timeout {client_timeout:g} s)...",
        flush=True,
    )
    load = asyncio.run(
        run_load(gateway_url, emulator_url, paths, args.rate * args.factor, client_timeout)
    )
    procs.check_alive(emulator)
    procs.check_alive(gateway)
    stats = harness.emulator_stats(emulator_url)
    metrics = metric_lines(gateway_url)
    return report(args, load, stats, metrics, procs.log_path(gateway.popen))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (0 measured, 1 broken, 130 interrupted)."""
    return harness.run_main(
        "bench/egress_limits.py", "geopera-bench-limits-", parse_args(argv), benchmark
    )


if __name__ == "__main__":
    sys.exit(main())
