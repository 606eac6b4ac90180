"""Miss-flood benchmark for geopera-gateway: do cache misses slow down cache hits?

Run it from the repository root with the project's Python (``pip install -e '.[dev]'``; no
other tool is needed)::

    python bench/miss_flood.py                  # 200 hits/s, then + 200 cold tiles/s, 10 s each
    python bench/miss_flood.py --duration 5 --miss-rate 100

What it shows: the cache-hit latency (p50, p99, max) of a steady stream of hits, first with
nothing else going on ("idle"), then while the gateway is flooded with distinct, never-seen
tiles ("flood"). A gateway whose miss path blocks its event loop (synchronous SQLite
transactions, image decoding, cache writes) makes every hit wait behind it, and the flood
p99 climbs far above the idle one.

Method:

1. **Processes.** ``bench/fake_upstream.py`` (answers every render with one 30 kB PNG after
   ``--delay-ms``, at almost no CPU cost: the bundled emulator renders for real, and at
   hundreds of tiles per second it would measure its own CPU, not the gateway) and the
   gateway (``python -m gateway serve --workers N``) on free ports of 127.0.0.1, with a fresh
   cache in a scratch directory. Nothing is pinned.
2. **Config.** ``bench/tiles.toml`` plus access log off, no per-client limit, upstream
   limits of 1,000 requests/s per operation and per asset and 16 calls in flight (as shipped;
   ``--max-concurrent``), so nothing but the gateway's own work is measured, not its upstream
   protection (every override must load, or the run stops). ``max_concurrent`` is also how
   many misses a worker works on at once (its tile creators); the others wait in a queue.
3. **Tiles.** Hits cycle through 256 z14 tiles of the bahamas layer, fetched once first
   (each must then answer ``X-Cache: HIT``). Misses are ``--miss-rate`` x ``--duration``
   distinct tiles inside the layer's bounds, none of them a hit tile, in a fixed shuffle.
4. **Load.** Open loop: request i of a stream starts at t0 + i / rate whether or not earlier
   ones were answered. Idle phase: the hit stream alone for ``--duration`` s. Flood phase:
   the same hit stream, and the miss stream from a second process of this script (so the
   miss client does not share the hit client's event loop), both starting at the same t0.
   Recorded per request: status, ``X-Cache``, latency (start of the request to the end of
   the body) and how late the generator started it.
5. **Output.** Per phase: hit count, statuses, p50 / p90 / p99 / max; for the flood, the
   misses' statuses, ``X-Cache`` and latencies, and the upstream calls counted by the fake
   upstream. **Target** (informational, PASS/MISS): hit p99 during the flood at most
   :data:`P99_TARGET_MS`.

The load generators run on the same machine and share its CPUs with the gateway; their own
delays show as "late" starts, reported and held under 1 s (else the offered load was not the
one asked). The exit status is 0 when the measurement ran, whatever the target says; 1 when
something broke (a process died, a config override was refused, a hit was not a 200 HIT, a
generator fell behind); 130 on Ctrl-C. Every process is stopped by PID (``bench/tiles.py``'s
``Processes``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

try:
    import aiohttp
except ImportError:  # pragma: no cover - a helpful message instead of a traceback
    sys.exit("bench/miss_flood.py: aiohttp is missing; run it with the project's venv python")

# bench/*.py: this script's directory is first on sys.path
import gwconfig
import harness
from egress_limits import load_paths
from harness import HOST, RENDER_OP, BenchError, Processes, fmt_counter, table, verdict
from tiles import fetch_all, hit_tiles, tile_path

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "tiles.toml"
FAKE_UPSTREAM = HERE / "fake_upstream.py"

HIT_TILES = 256
HIT_CONNECTIONS = 32
"""Keep-alive connections of the hit client, opened before each phase."""
UPSTREAM_RPS = 1000.0
MAX_CONCURRENT = 16
"""Upstream calls in flight (``--max-concurrent``), as shipped: 200 misses/s of a 50 ms
upstream need 10 and more. It is also how many misses a worker works on at once (its tile
creators); the rest queue, so a larger value lets more half-done misses share the loop with
the hits."""
P99_TARGET_MS = 50.0
MAX_LAG_S = 1.0
START_DELAY_S = 2.0
CLIENT_TIMEOUT_S = 30.0


@dataclass
class Answer:
    """One request: which stream, what came back, how long it took (seconds)."""

    kind: str
    status: str = "-"
    xcache: str = "-"
    latency_s: float = 0.0
    lag_s: float = 0.0


async def one(session: aiohttp.ClientSession, url: str, answer: Answer, due: float) -> None:
    """GET ``url`` and fill ``answer`` (exceptions become statuses)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    answer.lag_s = started - due
    try:
        async with session.get(url) as response:
            await response.read()
            answer.status = str(response.status)
            answer.xcache = response.headers.get("X-Cache", "-")
    except TimeoutError:
        answer.status = "timeout"
    except aiohttp.ClientError as exc:
        answer.status = f"error:{type(exc).__name__}"
    answer.latency_s = loop.time() - started


async def stream(
    base: str,
    kind: str,
    paths: Sequence[str],
    rate: float,
    count: int,
    start_at: float,
    connections: int = 0,
) -> list[Answer]:
    """``count`` GETs of ``paths`` (cycled) at ``rate`` per second from wall time
    ``start_at``, open loop; waits for every answer.

    ``connections`` > 0: at most that many keep-alive connections, all opened (one GET each)
    before ``start_at``, as a map client keeps its connections; a request that finds them
    all busy waits for one, and that wait counts in its latency. 0: a new connection
    whenever none is free (the miss flood: many clients).
    """
    loop = asyncio.get_running_loop()
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=connections)
    answers: list[Answer] = []
    tasks = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if connections:
            warm = [Answer(kind) for _ in range(connections)]
            now = loop.time()
            await asyncio.gather(*(one(session, base + paths[0], a, now) for a in warm))
        await asyncio.sleep(max(0.0, start_at - time.time()))
        t0 = loop.time()
        for i in range(count):
            due = t0 + i / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            answer = Answer(kind)
            answers.append(answer)
            tasks.append(
                asyncio.ensure_future(one(session, base + paths[i % len(paths)], answer, due))
            )
        await asyncio.wait(tasks, timeout=CLIENT_TIMEOUT_S + 5)
    return answers


def ms_row(label: str, answers: Sequence[Answer]) -> list[str]:
    """``label, n, statuses, p50, p90, p99, max`` (milliseconds) of ``answers``."""
    latencies = sorted(a.latency_s * 1000 for a in answers)
    if not latencies:
        return [label, "0", "-", "-", "-", "-", "-"]

    def pct(q: float) -> str:
        return f"{latencies[min(len(latencies) - 1, int(q * len(latencies)))]:.1f}"

    statuses = fmt_counter(Counter(a.status for a in answers))
    return [
        label,
        str(len(latencies)),
        statuses,
        pct(0.5),
        pct(0.9),
        pct(0.99),
        f"{latencies[-1]:.1f}",
    ]


def p99_ms(answers: Sequence[Answer]) -> float:
    """The 99th percentile latency of ``answers``, milliseconds (0 when there are none)."""
    latencies = sorted(a.latency_s * 1000 for a in answers)
    return latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else 0.0


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--miss-generator`` is this script's own child mode)."""
    parser = argparse.ArgumentParser(
        description="Cache-hit latency of geopera-gateway idle and during a flood of distinct "
        "cold tiles (see the module docstring for the method)."
    )
    parser.add_argument("--hit-rate", type=float, default=200.0, help="hits per second (200)")
    parser.add_argument(
        "--miss-rate", type=float, default=200.0, help="distinct cold tiles per second (200)"
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase (10)")
    parser.add_argument(
        "--delay-ms", type=float, default=50.0, help="fake upstream delay per call (50)"
    )
    parser.add_argument("--workers", type=int, default=1, help="gateway worker processes (1)")
    parser.add_argument(
        "--max-concurrent",
        type=int,
        default=MAX_CONCURRENT,
        help=f"limits.max_concurrent: upstream calls and misses in progress ({MAX_CONCURRENT})",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir (logs, cache)")
    parser.add_argument(
        "--miss-generator", nargs=3, metavar=("URL", "START", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if not 1 <= args.hit_rate <= 5000 or not 1 <= args.miss_rate <= 5000:
        parser.error("--hit-rate and --miss-rate must be 1..5000")
    if not 1 <= args.duration <= 300:
        parser.error("--duration must be 1..300 seconds")
    if not 0 <= args.delay_ms <= 10_000:
        parser.error("--delay-ms must be 0..10000")
    if not 1 <= args.workers <= 64:
        parser.error("--workers must be 1..64")
    if not 1 <= args.max_concurrent <= 1024:
        parser.error("--max-concurrent must be 1..1024")
    return args


def overrides(max_concurrent: int = MAX_CONCURRENT) -> list[gwconfig.Override]:
    """The config overrides; all of them must be accepted."""
    r = f"{UPSTREAM_RPS:.1f}"
    return [
        gwconfig.Override("server.access_log = false", "[server]\naccess_log = false\n"),
        gwconfig.Override('clients.rate_limit = "off"', '[clients]\nrate_limit = "off"\n'),
        gwconfig.Override(
            f"limits: {UPSTREAM_RPS:g} upstream req/s per operation and per asset, "
            f"max_concurrent {max_concurrent}",
            f"[limits]\noperation_rps = {r}\noperation_burst = {r}\nasset_rps = {r}\n"
            f"asset_burst = {r}\nmax_concurrent = {max_concurrent}\n",
        ),
    ]


def miss_generator(args: argparse.Namespace) -> int:
    """Child mode: send the miss stream, write the answers as JSON to OUT."""
    base, start_at, out = args.miss_generator
    count = round(args.miss_rate * args.duration)
    paths = miss_paths(count)
    answers = asyncio.run(stream(base, "miss", paths, args.miss_rate, count, float(start_at)))
    Path(out).write_text(json.dumps([asdict(a) for a in answers]))
    return 0


def miss_paths(count: int) -> list[str]:
    """``count`` distinct cold tile paths, none of them a hit tile."""
    hits = {tile_path(t) for t in hit_tiles()[:HIT_TILES]}
    return [p for p in load_paths(count + len(hits)) if p not in hits][:count]


def start_fake_upstream(procs: Processes, delay_ms: float) -> tuple[str, object]:
    """Start ``bench/fake_upstream.py`` on a free port; returns its URL and process."""
    port = harness.free_port()
    popen = procs.start(
        "fake-upstream",
        [sys.executable, str(FAKE_UPSTREAM), "--port", str(port), "--delay-ms", f"{delay_ms:g}"],
    )
    url = f"http://{HOST}:{port}"
    procs.wait_ready(url + "/_emulator/stats", popen)
    return url, popen


def benchmark(args: argparse.Namespace, scratch: Path, procs: Processes) -> list[str]:
    """Start the processes, run both phases and print the report; returns the problems.

    Raises:
        BenchError: a process died or did not start, or the config was not accepted.
    """
    problems: list[str] = []
    upstream_url, upstream = start_fake_upstream(procs, args.delay_ms)
    env = harness.gateway_env(upstream_url, scratch / "cache")
    config = scratch / "gateway.toml"
    try:
        applied, skipped = gwconfig.write_config(
            CONFIG.read_text(), config, env, overrides(args.max_concurrent)
        )
    except Exception as exc:  # ConfigError, or a gateway that does not even import
        raise BenchError(f"the benchmark config does not load: {exc}") from exc
    if skipped:
        raise BenchError("the gateway refused config overrides: " + "; ".join(skipped))
    print(f"config: {CONFIG.name} + {'; '.join(applied)}", flush=True)
    server = harness.start_gateway(procs, config, env, args.workers)
    gateway_url, gateway = server.url, server.popen
    print(
        f"fake upstream pid {upstream.pid} on {upstream_url} (delay {args.delay_ms:g} ms); "
        f"gateway pid {gateway.pid} on {gateway_url} (workers {args.workers}); "
        f"scratch {scratch}",
        flush=True,
    )

    hit_paths = [tile_path(t) for t in hit_tiles()[:HIT_TILES]]
    warm = asyncio.run(fetch_all(gateway_url, hit_paths, 16))
    warm.upstream_calls = int(
        harness.http_json(upstream_url + "/_emulator/stats")["calls"].get(RENDER_OP, 0)
    )
    print(f"warm: {warm.describe()}", flush=True)
    if warm.statuses != Counter({200: len(hit_paths)}):
        raise BenchError(f"warming the hit tiles failed: {fmt_counter(warm.statuses)}")
    hits_n = round(args.hit_rate * args.duration)

    print(f"idle: {args.hit_rate:g} hits/s for {args.duration:g} s...", flush=True)
    start_at = time.time() + START_DELAY_S
    idle = asyncio.run(
        stream(gateway_url, "hit", hit_paths, args.hit_rate, hits_n, start_at, HIT_CONNECTIONS)
    )
    procs.check_alive(server)

    print(
        f"flood: {args.hit_rate:g} hits/s + {args.miss_rate:g} cold tiles/s for "
        f"{args.duration:g} s...",
        flush=True,
    )
    harness.http_json(upstream_url + "/_emulator/reset", method="POST")
    out = scratch / "misses.json"
    start_at = time.time() + START_DELAY_S
    generator = procs.start(
        "miss-generator",
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--miss-rate",
            f"{args.miss_rate:g}",
            "--duration",
            f"{args.duration:g}",
            "--miss-generator",
            gateway_url,
            f"{start_at:.3f}",
            str(out),
        ],
    )
    flood = asyncio.run(
        stream(gateway_url, "hit", hit_paths, args.hit_rate, hits_n, start_at, HIT_CONNECTIONS)
    )
    try:
        generator.wait(timeout=CLIENT_TIMEOUT_S + 30)
    except Exception as exc:  # subprocess.TimeoutExpired
        raise BenchError(f"the miss generator did not finish: {exc}") from exc
    if generator.returncode != 0 or not out.exists():
        raise BenchError(f"the miss generator failed:\n{procs.log_tail(generator)}")
    misses = [Answer(**a) for a in json.loads(out.read_text())]
    procs.check_alive(server)
    calls = int(harness.http_json(upstream_url + "/_emulator/stats")["calls"].get(RENDER_OP, 0))

    print()
    headers = ["phase", "requests", "statuses", "p50 ms", "p90 ms", "p99 ms", "max ms"]
    print(
        table(
            headers,
            [
                ms_row("hits, idle", idle),
                ms_row("hits, during flood", flood),
                ms_row("misses (flood)", misses),
            ],
        )
    )
    print(
        f"misses X-Cache: {fmt_counter(Counter(a.xcache for a in misses))}; upstream renders "
        f"during the flood: {calls}"
    )
    lag = max(a.lag_s for a in [*idle, *flood, *misses])
    print(f"latest start behind schedule: {lag * 1000:.0f} ms")
    flood_p99 = p99_ms(flood)
    print(
        f"target: hit p99 during the flood <= {P99_TARGET_MS:g} ms: {flood_p99:.1f} ms "
        f"(idle {p99_ms(idle):.1f} ms) {verdict(flood_p99 <= P99_TARGET_MS)}"
    )
    for label, answers in (("idle", idle), ("flood", flood)):
        bad = Counter(
            (a.status, a.xcache) for a in answers if (a.status, a.xcache) != ("200", "HIT")
        )
        if bad:
            problems.append(f"hits ({label}) not all 200 HIT: {fmt_counter(bad)}")
    if lag > MAX_LAG_S:
        problems.append(f"a generator fell {lag:.2f} s behind its schedule")
    harness.print_log_findings(procs.log_path(gateway))
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (0 measured, 1 broken, 130 interrupted)."""
    args = parse_args(argv)
    if args.miss_generator:
        return miss_generator(args)
    return harness.run_main("bench/miss_flood.py", "geopera-bench-flood-", args, benchmark)


if __name__ == "__main__":
    sys.exit(main())
