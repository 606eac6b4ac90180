"""Tile benchmark for geopera-gateway: cache-HIT throughput and cold-miss coalescing.

Run it from the repository root with the project's Python (everything it needs comes with
``pip install -e '.[dev]'``, plus ``wrk`` and ``taskset`` on the PATH)::

    python bench/tiles.py                      # defaults: 3 x 15 s, 64 connections, 50 ms delay
    python bench/tiles.py --workers 2 --no-pin # two gateway workers sharing both CPUs
    python bench/tiles.py --profile hits.svg   # plus a py-spy flame graph of the hit path
    python bench/tiles.py --compare            # beside nginx and the aiohttp ceiling (compare.py)

Method (the same as the reference anchors in ``../shared/bench-anchors``, so the numbers can
be set side by side; ``--anchors`` measures some anchors in the same invocation):

1. **Processes.** The bundled Geopera emulator (``python -m gateway emulator``, upstream delay
   ``--delay-ms``) and the gateway (``python -m gateway serve``) start as subprocesses on free
   ports of 127.0.0.1, with a fresh cache directory in a scratch directory. The gateway's
   config is ``bench/tiles.toml`` plus the overrides of ``bench/gwconfig.py`` that this gateway
   version accepts: access log off (as for the anchors), no per-client rate limit (wrk is one
   client) and upstream limits of 40 req/s, below the emulator's own per-asset limit. The
   gateway (all of its processes) is pinned to CPU 0 and wrk to CPU 1 (``taskset``) unless
   ``--no-pin``; the emulator is never pinned (it is idle while wrk runs).
2. **Tile set.** 1,024 distinct z14 tiles, x in 145*32 .. 145*32+31 and y in 220*32 ..
   220*32+31: every z14 child of tile 9/145/220, which the Bahamas sample COG covers fully, so
   every tile is a real render (no empty tiles, no short cuts).
3. **Warm and verify.** All 1,024 tiles are fetched, 16 at a time; the emulator must have
   counted exactly 1,024 ``cog.tile.render`` calls. A second pass must answer every tile
   ``X-Cache: HIT`` with 0 new upstream calls.
4. **Cache HITs.** An unrecorded 2 s wrk warm-up, then ``--runs`` runs of
   ``wrk -t1 -c64 -d15s --timeout 5s -s bench/tiles.lua`` cycling through the 1,024 paths.
   Reported: the median of each metric over the runs (req/s, p50, p99 are each the median of
   their own values) and the upstream calls during the runs, which must be 0. CPU use of the
   gateway processes and of wrk, and per-core busy time (steal apart), are recorded too (with
   psutil, ``bench/harness.py``); a run where something else used a noticeable share of the
   CPUs is marked DISTURBED.
5. **Cold miss.** Nothing restarts. 200 TCP connections are opened to the gateway first; then
   the same ``GET`` (``Connection: close``) for a tile the gateway has never seen is written on
   all of them at once and all 200 responses are read. Recorded: statuses, ``X-Cache`` counts,
   per-request latency (from its write to the end of its response) p50 and max, and the
   emulator's render count delta, which is 1 when the gateway coalesced all 200 requests.
   3 runs (``--bursts``), each with a new z13 tile inside 9/145/220. Before each run one
   render of another never-seen tile is timed directly against the emulator ("upstream
   alone"), after it one of the burst's own tile ("same tile after"): the emulator renders
   for real, so one upstream call takes the delay plus its render time, and "p50 - alone" /
   "max - alone" are the part of the median / slowest answer that the gateway adds. When
   pinning, the emulator and this process (the bursts' client) run on wrk's CPU.
   ``--burst-only`` runs only this step (after fetching 16 tiles), without wrk.
6. **Targets** (informational, PASS/MISS): cache HITs >= 10,000 req/s and p99 < 10 ms at 64
   connections on one core; 200 coalesced requests all answered within the upstream delay
   + 30 ms, with one upstream call, and their p50 within one measured upstream call + 15 ms
   (issue 15). The cold-miss limit is also shown against one measured upstream call instead
   of the bare delay, in parentheses.

The exit status is 0 when the measurements ran, whatever the targets say; it is 1 when
something broke (a process died, wrk failed, the gateway did not cache, errors or non-2xx
answers), 130 on Ctrl-C. Every process started here is stopped by PID (SIGTERM, then
SIGKILL after 10 s), also on Ctrl-C, SIGTERM and errors, by ``bench/harness.py``. Everything
listens on 127.0.0.1, and every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import aiohttp
except ImportError:  # pragma: no cover - a helpful message instead of a traceback
    sys.exit("bench/tiles.py: aiohttp is missing; run it with the project's venv python")

# bench/harness.py and bench/gwconfig.py: this script's directory is first on sys.path
import gwconfig
import harness

HERE = Path(__file__).resolve().parent
LUA = HERE / "tiles.lua"
ANCHOR_TARGET = HERE / "anchor_target.py"
DEFAULT_ANCHORS_DIR = HERE.parent.parent / "shared" / "bench-anchors"
ANCHOR_TARGETS = "nginx w=1 [pinned],diskcache 1p [pinned]"

BAHAMAS_COG = "https://demo.geopera.invalid/cogs/landsat7_bahamas_rgb_cog.tif"

PARENT_TILE = (9, 145, 220)
"""A z9 tile that the Bahamas sample COG covers fully; every tile used lies inside it."""
HIT_ZOOM = 14
COLD_ZOOM = 13

WARM_CONCURRENCY = 16
WRK_WARMUP_S = 2
WRK_TIMEOUT = "5s"
COLDMISS_CONNECTIONS = 200
COLDMISS_RUNS = 3
"""Cold-miss bursts by default (``--bursts``)."""
BURST_ONLY_WARM_TILES = 16
"""Tiles fetched before the bursts with ``--burst-only`` (imports, sessions, threads)."""
COLDMISS_CONNECT_CONCURRENCY = 50
COLDMISS_TIMEOUT_S = 30.0

PROFILE_RATE_HZ = 250
"""py-spy's sampling rate for ``--profile``, samples per second."""

HIT_RPS_TARGET = 10_000.0
HIT_P99_TARGET_MS = 10.0
COLDMISS_SLACK_MS = 30.0
COLDMISS_P50_SLACK_MS = 15.0
"""Issue 15: the burst's p50 within one upstream call's own time + this, ms."""


# --------------------------------------------------------------------------- tiles


def hit_tiles() -> list[tuple[int, int, int]]:
    """The 1,024 z14 tiles ``(z, x, y)`` inside :data:`PARENT_TILE`, row by row."""
    pz, px, py = PARENT_TILE
    side = 1 << (HIT_ZOOM - pz)
    return [(HIT_ZOOM, px * side + dx, py * side + dy) for dy in range(side) for dx in range(side)]


def cold_tile(run: int) -> tuple[int, int, int]:
    """The never-seen z13 tile used by cold-miss run ``run`` (0-based, below 16)."""
    pz, px, py = PARENT_TILE
    side = 1 << (COLD_ZOOM - pz)
    return COLD_ZOOM, px * side + run, py * side + side - 1 - run


def probe_tile(run: int) -> tuple[int, int, int]:
    """A z13 tile, distinct from every :func:`cold_tile`, rendered directly upstream."""
    pz, px, py = PARENT_TILE
    side = 1 << (COLD_ZOOM - pz)
    return COLD_ZOOM, px * side + run, py * side + run


def tile_path(tile: tuple[int, int, int]) -> str:
    """The gateway path of ``tile`` in the benchmark layer."""
    z, x, y = tile
    return f"/tiles/{harness.LAYER}/{z}/{x}/{y}.png"


# --------------------------------------------------------------------------- upstream


def upstream_renders(emulator_url: str) -> int:
    """``cog.tile.render`` calls the emulator has counted since its last reset."""
    return harness.emulator_calls(emulator_url, harness.RENDER_OP)


# --------------------------------------------------------------------------- warm / verify


@dataclass
class Pass:
    """One pass over a list of tile paths through the gateway."""

    tiles: int = 0
    statuses: Counter[int | str] = field(default_factory=Counter)
    xcache: Counter[str] = field(default_factory=Counter)
    bad: list[str] = field(default_factory=list)
    body_bytes: int = 0
    seconds: float = 0.0
    upstream_calls: int = 0

    def describe(self) -> str:
        """One line: tiles, time, statuses, X-Cache counts, upstream calls."""
        return (
            f"{self.tiles} tiles in {self.seconds:.1f} s, "
            f"statuses {harness.fmt_counter(self.statuses)}, "
            f"X-Cache {harness.fmt_counter(self.xcache)}, {self.upstream_calls} upstream renders, "
            f"mean body {self.body_bytes / max(1, self.tiles):,.0f} B"
        )


async def fetch_all(base_url: str, paths: Sequence[str], concurrency: int) -> Pass:
    """GET every path, ``concurrency`` at a time; record statuses, X-Cache and bad bodies."""
    result = Pass(tiles=len(paths))
    queue = iter(paths)
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=concurrency)
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            for path in queue:
                try:
                    async with session.get(base_url + path) as response:
                        body = await response.read()
                        status, xcache = response.status, response.headers.get("X-Cache", "-")
                except (aiohttp.ClientError, TimeoutError) as exc:
                    result.statuses[type(exc).__name__] += 1
                    result.bad.append(f"{path}: {exc!r}")
                    continue
                result.statuses[status] += 1
                result.xcache[xcache] += 1
                result.body_bytes += len(body)
                if status != 200 or not body.startswith(harness.PNG_MAGIC):
                    result.bad.append(f"{path}: {status} {body[:120]!r}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.seconds = time.perf_counter() - started
    return result


# --------------------------------------------------------------------------- wrk


@dataclass
class WrkRun:
    """One wrk run: its JSON summary, the upstream call delta and the CPU used meanwhile."""

    summary: dict[str, Any]
    upstream_calls: int
    cpu: harness.CpuUsage
    """CPU during the run: group ``gateway`` (the measured server's processes: the gateway,
    or an anchor), wrk as the ended child."""

    @property
    def seconds(self) -> float:
        """The run's duration as wrk measured it, seconds."""
        return self.summary["duration_us"] / 1e6

    @property
    def rps(self) -> float:
        """Completed requests per second."""
        return self.summary["requests"] / self.seconds

    @property
    def errors(self) -> int:
        """Socket errors and timeouts."""
        s = self.summary
        return s["connect_errors"] + s["read_errors"] + s["write_errors"] + s["timeouts"]

    @property
    def gateway_cpu_pct(self) -> float:
        """CPU used by the gateway's processes, % of one core."""
        return self.cpu.groups_pct["gateway"]

    @property
    def wrk_cpu_pct(self) -> float:
        """CPU used by wrk, % of one core."""
        return self.cpu.children_pct

    @property
    def note(self) -> str:
        """Other CPU (neither the gateway nor wrk), steal, and DISTURBED with the busiest
        other processes (see ``harness.CpuUsage.note``)."""
        return self.cpu.note(self.gateway_cpu_pct, self.wrk_cpu_pct)

    def ms(self, key: str) -> float:
        """A latency from the summary (``p50``, ``p90``, ``p99``), milliseconds."""
        return self.summary[f"latency_{key}_us"] / 1000


def run_wrk(
    procs: harness.Processes,
    url: str,
    paths_file: Path,
    duration_s: int,
    connections: int,
    cpu: int | None,
    gateway_pid: int,
    emulator_url: str | Callable[[], int],
) -> WrkRun:
    """Run wrk once with :data:`LUA` over ``paths_file`` for ``duration_s`` seconds (pinned
    to CPU ``cpu`` when given); measure CPU (of ``gateway_pid`` and its descendants: the
    measured server) and upstream calls (the emulator's renders at ``emulator_url``, or
    what that callable counts).

    Raises:
        BenchError: wrk failed or printed no summary.
    """
    argv = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration_s}s",
        "--timeout",
        WRK_TIMEOUT,
        "-s",
        str(LUA),
        url,
        "--",
        str(paths_file),
    ]
    groups = {"gateway": harness.process_tree(gateway_pid)}
    count = emulator_url if callable(emulator_url) else lambda: upstream_renders(emulator_url)
    calls_before = count()
    before = harness.cpu_snapshot(groups, machine=True)
    popen = procs.start("wrk", argv, cpu=cpu, output="text")
    try:
        out, err = popen.communicate(timeout=duration_s + 30)
    except subprocess.TimeoutExpired:
        raise harness.BenchError(f"wrk did not finish within {duration_s + 30} s") from None
    finally:
        procs.stop(popen)
    after = harness.cpu_snapshot(groups, machine=True)
    calls_after = count()
    line = next((ln for ln in out.splitlines() if ln.startswith("TILES_BENCH_JSON ")), None)
    if popen.returncode != 0 or line is None:
        raise harness.BenchError(f"wrk failed (exit {popen.returncode}):\n{out}\n{err}")
    return WrkRun(
        summary=json.loads(line.split(" ", 1)[1]),
        upstream_calls=calls_after - calls_before,
        cpu=harness.cpu_usage(before, after, exclude=[popen.pid]),
    )


def profile_hits(
    args: argparse.Namespace,
    procs: harness.Processes,
    gateway: harness.Server,
    gateway_url: str,
    paths_file: Path,
    wrk_cpu: int | None,
    emulator_url: str | Callable[[], int],
) -> None:
    """One extra wrk run of ``args.duration`` s (not counted) while py-spy samples the
    gateway (``--nonblocking``: it never stops the process; ``--subprocesses`` for workers)
    and writes a flame graph to ``args.profile``. py-spy runs on wrk's CPU.

    Raises:
        BenchError: py-spy is missing or wrote no flame graph.
    """
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise harness.BenchError("--profile: py-spy not found (pip install -e '.[dev]')")
    args.profile.parent.mkdir(parents=True, exist_ok=True)
    argv = [spy, "record", "--nonblocking", "--rate", str(PROFILE_RATE_HZ), "--subprocesses"]
    argv += ["-d", str(args.duration + 1), "-o", str(args.profile), "-p", str(gateway.pid)]
    spy_popen = procs.start("py-spy", argv, cpu=wrk_cpu)
    time.sleep(0.5)  # py-spy attaches
    run = run_wrk(
        procs,
        gateway_url,
        paths_file,
        args.duration,
        args.connections,
        wrk_cpu,
        gateway.pid,
        emulator_url,
    )
    try:
        spy_popen.wait(timeout=args.duration + 30)
    except subprocess.TimeoutExpired:
        raise harness.BenchError("--profile: py-spy did not finish") from None
    finally:
        procs.stop(spy_popen)
    if not args.profile.exists():
        raise harness.BenchError(f"--profile: py-spy wrote no {args.profile}")
    print(
        f"profiled run (not counted, py-spy at {PROFILE_RATE_HZ} Hz): {run.rps:,.0f} req/s, "
        f"p99 {run.ms('p99'):.2f} ms; flame graph: {args.profile}",
        flush=True,
    )


# --------------------------------------------------------------------------- cold miss


@dataclass
class ColdMiss:
    """One cold-miss burst: N identical requests for one never-seen tile."""

    tile: tuple[int, int, int]
    upstream_alone_ms: float = 0.0
    """One direct render of another never-seen tile, just before the burst, ms."""
    upstream_same_ms: float = 0.0
    """One direct render of the burst's own tile, just after the burst, ms."""
    statuses: Counter[str] = field(default_factory=Counter)
    xcache: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    upstream_calls: int = 0

    @property
    def p50_ms(self) -> float:
        """Median latency, milliseconds."""
        return statistics.median(self.latencies_ms) if self.latencies_ms else float("nan")

    @property
    def max_ms(self) -> float:
        """Slowest latency, milliseconds."""
        return max(self.latencies_ms) if self.latencies_ms else float("nan")

    @property
    def overhead_ms(self) -> float:
        """Slowest latency minus one direct upstream call: the gateway's own share."""
        return self.max_ms - self.upstream_alone_ms

    @property
    def p50_overhead_ms(self) -> float:
        """Median latency minus one direct upstream call (``upstream_alone_ms``), ms."""
        return self.p50_ms - self.upstream_alone_ms

    @property
    def all_ok(self) -> bool:
        """Whether every request was answered 200."""
        return set(self.statuses) == {"200"}


def _parse_response(data: bytes) -> tuple[str, str]:
    """``(status, X-Cache)`` of a raw HTTP/1.1 response; checks Content-Length."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        return "no-response", "-"
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = headers.get("content-length")
    if length is not None and int(length) != len(body):
        return f"{parts[1]}-truncated", headers.get("x-cache", "-")
    return parts[1], headers.get("x-cache", "-")


async def _read_one(reader: asyncio.StreamReader) -> bytes:
    """One HTTP/1.1 response from ``reader``: its head, then ``Content-Length`` bytes."""
    head = await reader.readuntil(b"\r\n\r\n")
    match = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.IGNORECASE)
    return head + (await reader.readexactly(int(match.group(1))) if match else b"")


async def cold_miss_burst(
    port: int, path: str, connections: int, result: ColdMiss, keep_alive: bool = False
) -> None:
    """Open ``connections`` connections, then write the same GET on all and read every answer.

    Each latency runs from the write of that request to the end of its response: the
    connection's end (the request says ``Connection: close``), or with ``keep_alive`` its
    ``Content-Length``-th body byte (the connection stays open, as a map client's does).
    Fills ``result`` in place.

    Raises:
        BenchError: the connections could not be opened or the answers took over
            :data:`COLDMISS_TIMEOUT_S`.
    """
    gate = asyncio.Semaphore(COLDMISS_CONNECT_CONCURRENCY)

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with gate:
            return await asyncio.open_connection(harness.HOST, port)

    opened = await asyncio.wait_for(
        asyncio.gather(*(connect() for _ in range(connections)), return_exceptions=True),
        COLDMISS_TIMEOUT_S,
    )
    streams = [s for s in opened if not isinstance(s, BaseException)]
    try:
        if len(streams) != connections:
            failed = next(s for s in opened if isinstance(s, BaseException))
            raise harness.BenchError(f"cold miss: opened {len(streams)}/{connections}: {failed!r}")
        await asyncio.sleep(0.3)  # let the gateway accept every connection before the burst
        close = "" if keep_alive else "Connection: close\r\n"
        request = f"GET {path} HTTP/1.1\r\nHost: {harness.HOST}:{port}\r\n{close}\r\n".encode()

        async def answer(reader: asyncio.StreamReader, sent: float) -> None:
            try:
                data = await (_read_one(reader) if keep_alive else reader.read())
            except (OSError, asyncio.IncompleteReadError) as exc:
                result.statuses[type(exc).__name__] += 1
                return
            result.latencies_ms.append((time.perf_counter() - sent) * 1000)
            status, xcache = _parse_response(data)
            result.statuses[status] += 1
            result.xcache[xcache] += 1

        readers = []
        for reader, writer in streams:  # no await in this loop: all writes go out back to back
            sent = time.perf_counter()
            writer.write(request)
            readers.append(answer(reader, sent))
        try:
            await asyncio.wait_for(asyncio.gather(*readers), COLDMISS_TIMEOUT_S)
        except TimeoutError:
            raise harness.BenchError(
                f"cold miss: only {len(result.latencies_ms)}/{connections} answers "
                f"within {COLDMISS_TIMEOUT_S:g} s"
            ) from None
    finally:
        for _, writer in streams:
            writer.close()


async def time_upstream_render(emulator_url: str, tile: tuple[int, int, int]) -> float:
    """Milliseconds for one ``cog.tile.render`` of ``tile`` sent straight to the emulator."""
    z, x, y = tile
    body = {"url": BAHAMAS_COG, "z": z, "x": x, "y": y, "format": "png", "rescale": "0,180"}
    headers = {"Authorization": f"Bearer {harness.API_KEY}"}
    timeout = aiohttp.ClientTimeout(total=COLDMISS_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        started = time.perf_counter()
        async with session.post(
            f"{emulator_url}/v1/op/{harness.RENDER_OP}", json=body, headers=headers
        ) as response:
            await response.read()
            if response.status != 200:
                raise harness.BenchError(f"emulator answered {response.status} for {tile}")
        return (time.perf_counter() - started) * 1000


# --------------------------------------------------------------------------- report


def _run_values(run: WrkRun) -> dict[str, float]:
    """The numeric columns of one HIT run."""
    return {
        "rps": run.rps,
        "p50": run.ms("p50"),
        "p90": run.ms("p90"),
        "p99": run.ms("p99"),
        "bytes": run.summary["bytes"] / max(1, run.summary["requests"]),
        "gateway_cpu": run.gateway_cpu_pct,
        "wrk_cpu": run.wrk_cpu_pct,
        "upstream": run.upstream_calls,
        "errors": run.errors,
        "non2xx": run.summary["non2xx"],
    }


def hit_rows(runs: Sequence[WrkRun]) -> list[list[str]]:
    """Table rows for the HIT runs, then one row of medians (sums for the counters)."""

    def row(label: str, v: dict[str, float], busy: str, note: str) -> list[str]:
        return [
            label,
            f"{v['rps']:,.0f}",
            f"{v['p50']:.2f}",
            f"{v['p90']:.2f}",
            f"{v['p99']:.2f}",
            f"{v['bytes']:,.0f}",
            f"{v['gateway_cpu']:.0f}",
            f"{v['wrk_cpu']:.0f}",
            busy,
            f"{v['upstream']:.0f}",
            f"{v['errors']:.0f}",
            f"{v['non2xx']:.0f}",
            note,
        ]

    rows = []
    for i, run in enumerate(runs, 1):
        busy = "/".join(f"{v:.0f}" for v in run.cpu.core_busy_pct.values())
        rows.append(row(f"run {i}", _run_values(run), busy, run.note))
    each = [_run_values(r) for r in runs]
    summary = {k: statistics.median(v[k] for v in each) for k in each[0]}
    for counter in ("upstream", "errors", "non2xx"):
        summary[counter] = sum(v[counter] for v in each)
    rows.append(row("median", summary, "", "counters: sum of runs"))
    return rows


def print_report(
    args: argparse.Namespace,
    warm: Pass | None,
    verify: Pass | None,
    runs: Sequence[WrkRun],
    colds: Sequence[ColdMiss],
    placement: str,
    config_note: str,
) -> None:
    """Print the HIT table (unless ``--burst-only``), the cold-miss table and the targets
    with PASS/MISS."""
    print()
    print(
        f"## geopera-gateway tiles: workers={args.workers}, {placement}, "
        f"upstream delay {args.delay_ms:g} ms, {os.cpu_count()} CPUs"
    )
    print()
    print(f"config: {config_note}")
    targets: list[list[str]] = []
    if warm is not None and verify is not None:
        print(f"warm:   {warm.describe()}")
        print(f"verify: {verify.describe()}")
        print()
        print_hits(args, warm, runs)
        targets += hit_targets(args, runs)
    print()
    print_bursts(colds, args.burst_keep_alive)
    targets += burst_targets(args, colds)
    harness.print_targets(["measured", "ratio"], targets)


def print_hits(args: argparse.Namespace, warm: Pass, runs: Sequence[WrkRun]) -> None:
    """The HIT table."""
    print(
        f"### Cache HITs: wrk -t1 -c{args.connections} -d{args.duration}s --timeout "
        f"{WRK_TIMEOUT}, {warm.tiles:,} distinct z{HIT_ZOOM} tiles, {len(runs)} runs"
    )
    print()
    print(
        harness.table(
            [
                "",
                "req/s",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "bytes/resp",
                "gateway CPU %",
                "wrk CPU %",
                "CPU busy % per core",
                "upstream calls",
                "errors",
                "non-2xx",
                "",
            ],
            hit_rows(runs),
        )
    )


def print_bursts(colds: Sequence[ColdMiss], keep_alive: bool = False) -> None:
    """The cold-miss table: one row per burst, latencies from each request's write."""
    mode = "kept alive, until each body's last byte" if keep_alive else "Connection: close"
    print(
        f"### Cold miss: {COLDMISS_CONNECTIONS} connections opened first, then the same GET "
        f"({mode}) for a never-seen tile on all of them"
    )
    print()
    print(
        harness.table(
            [
                "run",
                "tile",
                "upstream calls",
                "statuses",
                "X-Cache",
                "p50 ms",
                "max ms",
                "upstream alone ms",
                "same tile after ms",
                "p50 - alone ms",
                "max - alone ms",
            ],
            [
                [
                    str(i),
                    "/".join(map(str, c.tile)),
                    str(c.upstream_calls),
                    harness.fmt_counter(c.statuses),
                    harness.fmt_counter(c.xcache),
                    f"{c.p50_ms:.1f}",
                    f"{c.max_ms:.1f}",
                    f"{c.upstream_alone_ms:.1f}",
                    f"{c.upstream_same_ms:.1f}",
                    f"{c.p50_overhead_ms:.1f}",
                    f"{c.overhead_ms:.1f}",
                ]
                for i, c in enumerate(colds, 1)
            ],
        )
    )
    if len(colds) > 1:
        print()
        print(
            f"over {len(colds)} bursts: p50 - alone median "
            f"{statistics.median(c.p50_overhead_ms for c in colds):.1f} ms "
            f"(min {min(c.p50_overhead_ms for c in colds):.1f}, "
            f"max {max(c.p50_overhead_ms for c in colds):.1f}); max - alone median "
            f"{statistics.median(c.overhead_ms for c in colds):.1f} ms "
            f"(min {min(c.overhead_ms for c in colds):.1f}, "
            f"max {max(c.overhead_ms for c in colds):.1f})"
        )
    print()


def hit_targets(args: argparse.Namespace, runs: Sequence[WrkRun]) -> list[list[str]]:
    """The HIT rows of the targets table."""
    rps = statistics.median(r.rps for r in runs)
    one_core = args.workers == 1 and not args.no_pin
    shared = ", shared CPUs" if args.no_pin else ""
    setup = f"{args.connections} conns, " + (
        "one core" if one_core else f"workers={args.workers}{shared}: not the one-core setup"
    )
    p99 = statistics.median(r.ms("p99") for r in runs)
    return [
        [
            f"cache HITs >= {HIT_RPS_TARGET:,.0f} req/s ({setup})",
            f"{rps:,.0f} req/s",
            f"{rps / HIT_RPS_TARGET:.2f}x target",
            harness.verdict(rps >= HIT_RPS_TARGET),
        ],
        [
            f"cache HITs p99 < {HIT_P99_TARGET_MS:g} ms",
            f"{p99:.2f} ms",
            f"{p99 / HIT_P99_TARGET_MS:.2f}x limit",
            harness.verdict(p99 < HIT_P99_TARGET_MS),
        ],
    ]


def burst_targets(args: argparse.Namespace, colds: Sequence[ColdMiss]) -> list[list[str]]:
    """The cold-miss rows of the targets table (the worst burst counts)."""
    delay_limit = args.delay_ms + COLDMISS_SLACK_MS
    worst = max(c.max_ms for c in colds)
    worst_overhead = max(c.overhead_ms for c in colds)
    worst_p50 = max(c.p50_overhead_ms for c in colds)
    calls = [c.upstream_calls for c in colds]
    all_ok = all(c.all_ok for c in colds)
    return [
        [
            f"cold miss: all {COLDMISS_CONNECTIONS} answered 200 within "
            f"{delay_limit:g} ms (delay + {COLDMISS_SLACK_MS:g})",
            f"worst max {worst:.1f} ms" + ("" if all_ok else ", not all 200"),
            f"{worst / delay_limit:.2f}x limit",
            harness.verdict(all_ok and worst <= delay_limit),
        ],
        [
            "(same, counting from one direct upstream call instead of the delay: "
            f"max - upstream alone <= {COLDMISS_SLACK_MS:g} ms)",
            f"worst {worst_overhead:.1f} ms",
            f"{worst_overhead / COLDMISS_SLACK_MS:.2f}x limit",
            f"({harness.verdict(all_ok and worst_overhead <= COLDMISS_SLACK_MS)})",
        ],
        [
            f"cold miss p50 within one direct upstream call + {COLDMISS_P50_SLACK_MS:g} ms "
            "(issue 15)",
            f"worst p50 - alone {worst_p50:.1f} ms",
            f"{worst_p50 / COLDMISS_P50_SLACK_MS:.2f}x limit",
            harness.verdict(all_ok and worst_p50 <= COLDMISS_P50_SLACK_MS),
        ],
        [
            "cold miss: 1 upstream call per burst",
            "/".join(map(str, calls)),
            "",
            harness.verdict(all(c == 1 for c in calls)),
        ],
    ]


# --------------------------------------------------------------------------- anchors


def run_anchors(args: argparse.Namespace, procs: harness.Processes) -> None:
    """Run the reference anchors with this gateway as an ``--ext`` target, in one invocation.

    Output streams through; ``run_all.sh`` prints its own table and saves its results.

    Raises:
        BenchError: the anchors harness is missing, failed or overran its time.
    """
    script = args.anchors_dir / "run_all.sh"
    if not script.exists():
        raise harness.BenchError(f"--anchors: {script} not found (use --anchors-dir)")
    cmd = (
        f"{shlex.quote(sys.executable)} {shlex.quote(str(ANCHOR_TARGET))} --port {{port}} "
        f"--upstream {{upstream}} --scratch {{scratch}} --workers {args.workers}"
    )
    ext = {
        "name": f"geopera-gateway w={args.workers}",
        "cmd": cmd,
        "path": "/tiles/{z}/{x}/{y}.png",
        "pin": "shared" if args.no_pin else "pinned",
        "coldmiss": True,
    }
    argv = [
        "bash",
        str(script),
        "--only",
        ANCHOR_TARGETS,
        "--duration",
        str(args.duration),
        "--runs",
        str(args.runs),
        "--delay-ms",
        f"{args.delay_ms:g}",
        "--ext",
        json.dumps(ext),
    ]
    print(f"\n## Anchors in the same run: {shlex.join(argv)}\n", flush=True)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    popen = procs.start("anchors", argv, env=env, output="terminal")
    # A generous bound: package installs on first use, then per target ~(runs+1) wrk runs.
    limit_s = 1800 + 6 * (args.runs + 1) * (args.duration + 30)
    try:
        code = popen.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        raise harness.BenchError(f"--anchors: run_all.sh still running after {limit_s} s") from None
    finally:
        # the harness stops its own servers on SIGTERM, which can take a while: 60 s grace
        procs.stop(popen, grace_s=60.0)
    if code != 0:
        raise harness.BenchError(f"--anchors: run_all.sh exited with {code}")


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description="Cache-HIT throughput and cold-miss coalescing of geopera-gateway "
        "against its bundled emulator (see the module docstring for the method).",
    )
    parser.add_argument("--duration", type=int, default=15, help="seconds per wrk run (15)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    parser.add_argument("--runs", type=int, default=3, help="recorded wrk runs (3)")
    harness.add_server_options(parser)
    parser.add_argument(
        "--no-pin", action="store_true", help="do not pin: gateway and wrk share every CPU"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir (logs, cache)")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="SVG",
        help="after the recorded HIT runs, one more wrk run (not counted) while py-spy "
        "records the gateway's flame graph into SVG (py-spy comes with the dev extras)",
    )
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="keep the gateway's access log on (default: off, like the anchors)",
    )
    parser.add_argument(
        "--client-limit",
        default="off",
        metavar="RATE",
        help='per-client rate limit of the gateway, e.g. "100/second" (default: off; wrk is '
        "one client)",
    )
    parser.add_argument(
        "--upstream-rps",
        type=float,
        default=40.0,
        help="gateway's upstream limit per operation and per asset, req/s (default 40, below "
        "the emulator's own 50/s per asset)",
    )
    parser.add_argument(
        "--anchors",
        action="store_true",
        help="afterwards, run the reference anchors (nginx w=1, aiohttp diskcache 1p) with "
        "this gateway as an --ext target, same duration and runs; takes minutes",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="instead of the emulator run: cache hits side by side with the anchors' nginx "
        "(worker_processes 1) and the bare aiohttp ceiling, in front of the anchors' upstream, "
        "for each --compare-sizes; one table (bench/compare.py); a few minutes",
    )
    parser.add_argument(
        "--compare-sizes",
        default="20480,81920",
        metavar="BYTES,...",
        help="tile sizes for --compare, bytes (default 20480,81920: the anchors' tile and "
        "real imagery)",
    )
    parser.add_argument(
        "--compare-workers2",
        action="store_true",
        help="with --compare, also nginx worker_processes auto and the gateway with "
        "--workers 2, both unpinned (the ratio of that row is to nginx auto)",
    )
    parser.add_argument(
        "--compare-parts",
        action="store_true",
        help="with --compare, also the anchors' settings plus the access log alone and plus "
        "the client limit alone (what each part of 'as shipped' costs)",
    )
    parser.add_argument(
        "--compare-interleave",
        action="store_true",
        help="with --compare-baseline, run each gateway target and its baseline side by "
        "side and alternate their wrk runs (an A/B that a busy machine disturbs alike)",
    )
    parser.add_argument(
        "--compare-only",
        metavar="TEXT,...",
        help="with --compare, only the targets whose name contains one of these texts "
        '(e.g. "nginx w=1,anchors\' settings")',
    )
    parser.add_argument(
        "--compare-baseline",
        type=Path,
        metavar="DIR",
        help="with --compare, also measure the gateway package of the source tree DIR "
        "(another version, e.g. from git archive), anchors' settings: an A/B in one run",
    )
    parser.add_argument(
        "--burst-only",
        action="store_true",
        help="only the cold-miss bursts (no warm-up of the 1,024 tiles, no wrk; wrk not "
        f"needed): {BURST_ONLY_WARM_TILES} tiles are fetched first so imports, sessions and "
        "threads exist, then the bursts run",
    )
    parser.add_argument(
        "--bursts",
        type=int,
        default=COLDMISS_RUNS,
        help=f"cold-miss bursts, each for a new z{COLD_ZOOM} tile ({COLDMISS_RUNS}, at most 16)",
    )
    parser.add_argument(
        "--burst-gap",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds of idleness before each burst after the first (0); above 15 s the "
        "gateway's pooled upstream connection has closed, as after the wrk runs",
    )
    parser.add_argument(
        "--burst-keep-alive",
        action="store_true",
        help="the bursts' requests keep their connections open (as map clients do) and each "
        "latency ends at its body's last byte, not at the connection's close",
    )
    parser.add_argument(
        "--anchors-dir",
        type=Path,
        default=DEFAULT_ANCHORS_DIR,
        help=f"where run_all.sh lives (default {DEFAULT_ANCHORS_DIR})",
    )
    return harness.parse_options(
        parser,
        argv,
        {
            "--duration": (1, 600, " seconds"),
            "--runs": (1, 20, ""),
            "--connections": (1, 10_000, ""),
            "--bursts": (1, 16, ""),
            "--burst-gap": (0, 600, " seconds"),
        },
    )


def check_tools(pin: bool) -> None:
    """Raise :class:`BenchError` when wrk (or taskset, for pinning) is missing."""
    for tool in ("wrk", "taskset") if pin else ("wrk",):
        if shutil.which(tool) is None:
            raise harness.BenchError(
                f"{tool} not found on PATH (Debian: apt-get install wrk util-linux)"
            )


def run_bursts(
    procs: harness.Processes,
    gateway: harness.Server,
    emulator_url: str,
    count: int,
    problems: list[str],
    gap_s: float = 0.0,
    cpu: int | None = None,
    keep_alive: bool = False,
) -> list[ColdMiss]:
    """``count`` cold-miss bursts, each for a new tile (:func:`cold_tile`), each bracketed by
    direct renders: another never-seen tile just before ("upstream alone") and the burst's
    own tile just after ("same tile"). With ``cpu``, this process (the bursts' client) is
    pinned to it first; ``keep_alive``: see :func:`cold_miss_burst`. Adds what went wrong
    to ``problems``."""
    allowed = os.sched_getaffinity(0)
    if cpu is not None:  # the burst's client (this process) on wrk's CPU, beside the emulator
        os.sched_setaffinity(0, {cpu})
    try:
        colds = []
        for i in range(count):
            if i and gap_s > 0:
                time.sleep(gap_s)
            cold = ColdMiss(cold_tile(i))
            cold.upstream_alone_ms = asyncio.run(time_upstream_render(emulator_url, probe_tile(i)))
            before = upstream_renders(emulator_url)
            path = tile_path(cold.tile)
            asyncio.run(cold_miss_burst(gateway.port, path, COLDMISS_CONNECTIONS, cold, keep_alive))
            cold.upstream_calls = upstream_renders(emulator_url) - before
            cold.upstream_same_ms = asyncio.run(time_upstream_render(emulator_url, cold.tile))
            print(
                f"cold miss {i + 1}/{count} {path}: {cold.upstream_calls} upstream calls, "
                f"statuses {harness.fmt_counter(cold.statuses)}, "
                f"X-Cache {harness.fmt_counter(cold.xcache)}, p50 {cold.p50_ms:.1f} ms, "
                f"max {cold.max_ms:.1f} ms (upstream alone {cold.upstream_alone_ms:.1f} ms, "
                f"same tile after {cold.upstream_same_ms:.1f} ms)",
                flush=True,
            )
            if not cold.all_ok:
                problems.append(f"cold miss {i + 1}: not every answer was 200")
            colds.append(cold)
            procs.check_alive(gateway)
    finally:
        os.sched_setaffinity(0, allowed)
    return colds


def benchmark(args: argparse.Namespace, scratch: Path, procs: harness.Processes) -> list[str]:
    """Run every phase and print the report; returns the problems found (empty when sound).

    Raises:
        BenchError: a process died or a tool failed, so measuring cannot go on.
    """
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    if not args.no_pin and not pin:
        print("warning: fewer than 2 CPUs, nothing is pinned", flush=True)
    if not args.burst_only:
        check_tools(pin)
    elif pin and shutil.which("taskset") is None:
        raise harness.BenchError("taskset not found on PATH (Debian: apt-get install util-linux)")
    gateway_cpu, wrk_cpu = (0, 1) if pin else (None, None)
    placement = "gateway on CPU 0, wrk on CPU 1" if pin else "not pinned (shared CPUs)"
    problems: list[str] = []

    # the emulator on wrk's CPU: idle while wrk runs, and its renders during a burst do not
    # take the gateway's CPU
    emulator = harness.start_emulator(procs, "--delay-ms", f"{args.delay_ms:g}", cpu=wrk_cpu)
    emulator_url = emulator.url
    harness.reset_emulator(emulator_url)

    env = harness.gateway_env(emulator_url, scratch / "cache")
    config = scratch / "gateway.toml"
    overrides = gwconfig.default_overrides(
        access_log=args.access_log, client_limit=args.client_limit, upstream_rps=args.upstream_rps
    )
    applied, skipped = harness.write_gateway_config(config, env, required=[], optional=overrides)
    config_note = f"{harness.BASE_CONFIG.name} + overrides: {'; '.join(applied) or 'none'}"
    if skipped:
        config_note += f" ({len(skipped)} skipped, see above)"
    print(f"config: {config_note}", flush=True)
    for reason in skipped:
        print(f"  override skipped (this gateway does not accept it): {reason}", flush=True)
    gateway = harness.start_gateway(procs, config, env, args.workers, gateway_cpu)
    gateway_url = gateway.url
    print(
        f"emulator pid {emulator.pid} on {emulator_url} (delay {args.delay_ms:g} ms); "
        f"gateway pid {gateway.pid} on {gateway_url} (workers {args.workers}, {placement}); "
        f"scratch {scratch}",
        flush=True,
    )

    if args.burst_only:
        first = [tile_path(t) for t in hit_tiles()[:BURST_ONLY_WARM_TILES]]
        before = upstream_renders(emulator_url)
        warmed = asyncio.run(fetch_all(gateway_url, first, WARM_CONCURRENCY))
        warmed.upstream_calls = upstream_renders(emulator_url) - before
        print(f"before the bursts: {warmed.describe()}", flush=True)
        colds = run_bursts(
            procs,
            gateway,
            emulator_url,
            args.bursts,
            problems,
            args.burst_gap,
            wrk_cpu,
            args.burst_keep_alive,
        )
        print_report(args, None, None, [], colds, placement, config_note)
        harness.print_log_findings(procs.log_path(gateway.popen))
        return problems

    # -- warm and verify
    tiles = hit_tiles()
    paths = [tile_path(t) for t in tiles]
    paths_file = scratch / "paths.txt"
    paths_file.write_text("\n".join(paths) + "\n")
    passes = []
    for label in ("warm", "verify"):
        before = upstream_renders(emulator_url)
        result = asyncio.run(fetch_all(gateway_url, paths, WARM_CONCURRENCY))
        result.upstream_calls = upstream_renders(emulator_url) - before
        print(f"{label}: {result.describe()}", flush=True)
        for line in result.bad[:5]:
            print(f"  bad answer: {line}")
        passes.append(result)
    warm, verify = passes
    if warm.statuses != Counter({200: len(paths)}) or warm.bad:
        problems.append(
            f"warm: not every tile answered 200 PNG: {harness.fmt_counter(warm.statuses)}"
        )
    if warm.upstream_calls != len(paths):
        problems.append(f"warm: {warm.upstream_calls} upstream renders, expected {len(paths)}")
    if verify.xcache != Counter({"HIT": len(paths)}) or verify.upstream_calls != 0:
        problems.append(
            f"verify: the gateway did not serve every tile from cache: X-Cache "
            f"{harness.fmt_counter(verify.xcache)}, {verify.upstream_calls} upstream renders"
        )
    procs.check_alive(gateway)

    # -- cache HITs with wrk
    print(f"wrk warm-up {WRK_WARMUP_S} s (not recorded)", flush=True)
    run_wrk(
        procs,
        gateway_url,
        paths_file,
        WRK_WARMUP_S,
        args.connections,
        wrk_cpu,
        gateway.pid,
        emulator_url,
    )
    runs = []
    for i in range(1, args.runs + 1):
        run = run_wrk(
            procs,
            gateway_url,
            paths_file,
            args.duration,
            args.connections,
            wrk_cpu,
            gateway.pid,
            emulator_url,
        )
        print(
            f"run {i}/{args.runs}: {run.rps:,.0f} req/s, p50 {run.ms('p50'):.2f} ms, "
            f"p99 {run.ms('p99'):.2f} ms, upstream calls {run.upstream_calls}, "
            f"errors {run.errors}, non-2xx {run.summary['non2xx']}",
            flush=True,
        )
        runs.append(run)
        procs.check_alive(gateway)
    if args.profile is not None:
        profile_hits(args, procs, gateway, gateway_url, paths_file, wrk_cpu, emulator_url)
    upstream_in_runs = sum(r.upstream_calls for r in runs)
    if upstream_in_runs:
        problems.append(f"HIT runs: {upstream_in_runs} upstream calls (expected 0)")
    if any(r.errors or r.summary["non2xx"] for r in runs):
        problems.append("HIT runs: wrk saw socket errors, timeouts or non-2xx answers")

    # -- cold miss
    colds = run_bursts(
        procs,
        gateway,
        emulator_url,
        args.bursts,
        problems,
        args.burst_gap,
        wrk_cpu,
        args.burst_keep_alive,
    )

    print_report(args, warm, verify, runs, colds, placement, config_note)
    harness.print_log_findings(procs.log_path(gateway.popen))
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (0 measured, 1 broken, 130 interrupted)."""
    args = parse_args(argv)

    def anchors(args: argparse.Namespace, procs: harness.Processes) -> None:
        if args.anchors:
            run_anchors(args, procs)

    if args.compare:
        import compare  # bench/compare.py, next to this script

        return harness.run_main("bench/tiles.py --compare", "geopera-bench-", args, compare.compare)
    return harness.run_main("bench/tiles.py", "geopera-bench-", args, benchmark, after=anchors)


if __name__ == "__main__":
    sys.exit(main())
