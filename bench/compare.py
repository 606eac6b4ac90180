"""``bench/tiles.py --compare``: cache hits of the gateway side by side with nginx and the bare
aiohttp ceiling, in one invocation, for two tile sizes.

The reference anchors (``../shared/bench-anchors``, see its README) are started from that
folder at run time, unchanged: its fake upstream (``upstream.py --body-bytes N``), nginx with
its ``nginx.conf.tmpl`` (``worker_processes 1``: ``proxy_cache`` on disk, ``sendfile on``,
``access_log off``) and its anchor C (``aio_tiles.py --mode memory --uvloop``: one fixed PNG
from memory, the "Python ceiling"). Anchor C always serves ``tilepng.make_png()``; to serve
the same N bytes as the upstream, it is run through a three-line shim that binds
``tilepng.make_png`` to N before ``aio_tiles.py`` runs. Every Python process here (the
ceiling included) runs on this project's interpreter, so the ceiling has the gateway's
aiohttp and uvloop.

For each size (default ``20480,81920`` bytes: the anchors' 20 KB tile, and ~80 KB, what a
real imagery tile such as the emulator's Olinda z15 weighs), the upstream starts (never
pinned), then each target in turn, pinned to CPU 0 with wrk on CPU 1 (``--no-pin``: shared):

1. ``nginx w=1``;
2. ``aiohttp ceiling``;
3. ``gateway, anchors' settings``: access log off, no per-client limit
   (``bench/anchor_target.py``'s config), default memory tier;
4. ``gateway, as shipped``: access log on, the per-client limit on (at 1,000,000/second,
   so wrk, one client, is never refused but every request is counted);
5. only when 1,000 tiles of that size do not fit in 64 MiB (the default memory tier until
   2026-12-02; now 256 MiB): ``gateway, anchors' settings, memory tier 64 MiB``, a cycle
   over more tiles than the tier holds, to show what the tier's size and policy cost;
6. with ``--compare-baseline DIR``: the ``gateway`` package of the source tree ``DIR``
   (another version: ``git archive main | tar -x -C DIR``), anchors' settings and as
   shipped, for an A/B in the same run.

Each target warms the 1,000 z12 tiles of the anchors (x 2000-2039, y 1300-1324), 32 at a
time (proxies: exactly 1,000 upstream calls), a second pass must make no upstream call, then
an unrecorded 2 s wrk warm-up and ``--runs`` wrk runs of ``--duration`` s (``-t1 -c64``,
``bench/tiles.lua``), median per metric. The table: req/s, p50, p99, ratio to nginx, share
of the ceiling, server and wrk CPU, and the DISTURBED note (``bench/harness.py``) of the
worst run. Nothing is asserted; the exit status is 1 only when something broke.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anchor_target
import harness
import tiles

DEFAULT_SIZES = "20480,81920"
ANCHOR_FILES = ("upstream.py", "aio_tiles.py", "tilepng.py", "nginx.conf.tmpl")
COMPARE_TILES = [(12, x, y) for y in range(1300, 1325) for x in range(2000, 2040)]
"""The anchors' 1,000 z12 tiles."""
WARM_CONCURRENCY = 32
SMALL_MEMORY_BYTES = 64 << 20
"""A memory tier that the 1,000 tiles of 80 KB do not fit in (the default until 2026-12-02)."""
AS_SHIPPED_CLIENT_LIMIT = "1000000/second"

NGINX = "nginx w=1"
NGINX_AUTO = "nginx w=auto, unpinned"
CEILING = "aiohttp ceiling (memory, uvloop)"
GATEWAY = "gateway, anchors' settings"
AS_SHIPPED = "gateway, as shipped (access log, client limit)"
SMALL_MEMORY = f"gateway, anchors' settings, memory tier {SMALL_MEMORY_BYTES >> 20} MiB"
BASELINE = "baseline gateway (--compare-baseline), anchors' settings"
BASELINE_SHIPPED = "baseline gateway (--compare-baseline), as shipped"
GATEWAY_W2 = "gateway --workers 2, unpinned, anchors' settings"
ACCESS_LOG_ONLY = "gateway, anchors' settings + access log"
CLIENT_LIMIT_ONLY = "gateway, anchors' settings + client limit"
PARTNERS = {GATEWAY: BASELINE, AS_SHIPPED: BASELINE_SHIPPED}
"""With ``--compare-interleave``: the baseline target measured turn about with each."""
UNPINNED = frozenset({NGINX_AUTO, GATEWAY_W2})
"""Targets run with nothing pinned (several processes: on one core they would share it)."""
GATEWAY_CONFIGS: dict[str, dict[str, object]] = {
    GATEWAY: {},
    BASELINE: {},
    BASELINE_SHIPPED: {"access_log": True, "client_limit": AS_SHIPPED_CLIENT_LIMIT},
    GATEWAY_W2: {},
    AS_SHIPPED: {"access_log": True, "client_limit": AS_SHIPPED_CLIENT_LIMIT},
    ACCESS_LOG_ONLY: {"access_log": True},
    CLIENT_LIMIT_ONLY: {"client_limit": AS_SHIPPED_CLIENT_LIMIT},
    SMALL_MEMORY: {"memory_bytes": SMALL_MEMORY_BYTES},
}
"""``anchor_target.write_config`` options of each gateway target."""

CEILING_SHIM = (
    "import functools, runpy, sys\n"
    "here, size = sys.argv[1], int(sys.argv[2])\n"
    "sys.path.insert(0, here)\n"
    "import tilepng\n"
    "tilepng.make_png = functools.partial(tilepng.make_png, size)\n"
    "sys.argv = [here + '/aio_tiles.py', *sys.argv[3:]]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)
"""Runs the anchors' ``aio_tiles.py`` with ``tilepng.make_png`` bound to ``size`` bytes."""


@dataclass
class Row:
    """One target at one size: its recorded wrk runs."""

    size: int
    target: str
    runs: list[tiles.WrkRun]
    note: str = ""

    def median(self, value: Callable[[tiles.WrkRun], float]) -> float:
        """The median of ``value`` over the runs."""
        return statistics.median(value(r) for r in self.runs)

    @property
    def rps(self) -> float:
        """Median requests per second."""
        return self.median(lambda r: r.rps)


NGINX_CHANGES = (("tcp_nopush on;", "tcp_nopush off;"),)
"""What ``start_nginx`` changes in the anchors' ``nginx.conf.tmpl``: ``tcp_nopush`` back to
nginx's default, off. With ``sendfile on`` and ``tcp_nopush on`` (TCP_CORK), an answer
longer than one loopback segment (MTU 65,536: an 80 KB tile is two segments) waits for the
client's delayed ACK, about 40 ms, on every request: nginx served 1,600 req/s at 14 % CPU
with p50 44 ms, whatever ``tcp_nodelay`` says; with ``tcp_nopush off`` 17,000 req/s. The
anchors' 20 KB tile fits in one segment, so their figures never showed it."""


def _fill(template: Path, out: Path, **subs: object) -> None:
    text = template.read_text()
    for key, value in subs.items():
        text = text.replace(f"@@{key}@@", str(value))
    for old, new in NGINX_CHANGES if template.name == "nginx.conf.tmpl" else ():
        if old not in text:
            raise harness.BenchError(f"--compare: {template} no longer says {old!r}")
        text = text.replace(old, new)
    out.write_text(text)


def start_nginx(
    procs: harness.Processes,
    anchors: Path,
    run_dir: Path,
    upstream_port: int,
    cpu: int | None,
    workers: str = "1",
) -> harness.Server:
    """The anchors' nginx (``worker_processes`` ``workers``: ``1`` or ``auto``) in
    ``run_dir``, in front of the upstream, with :data:`NGINX_CHANGES`."""
    shutil.rmtree(run_dir, ignore_errors=True)
    # the workers run as nobody: they must reach run_dir (the scratch dir is 0700)
    run_dir.parent.chmod(0o711)
    for sub in ("cache", "tmp"):
        (run_dir / sub).mkdir(parents=True)
        shutil.chown(run_dir / sub, "nobody", "nogroup")  # the workers run as nobody
    conf = run_dir / "nginx.conf"
    port = harness.free_port()
    _fill(
        anchors / "nginx.conf.tmpl",
        conf,
        WORKERS=workers,
        RUN=run_dir,
        PORT=port,
        UPSTREAM_PORT=upstream_port,
    )
    argv = ["nginx", "-p", str(run_dir), "-c", str(conf), "-e", str(run_dir / "error.log")]
    popen = procs.start("nginx", argv, cpu=cpu)
    server = harness.Server("nginx", f"http://{harness.HOST}:{port}", port, popen)
    procs.wait_ready(server.url + "/health", popen)
    return server


def start_ceiling(
    procs: harness.Processes, anchors: Path, size: int, cpu: int | None
) -> harness.Server:
    """The anchors' bare aiohttp app (memory mode, uvloop) answering ``size`` bytes."""
    port = harness.free_port()
    argv = [sys.executable, "-c", CEILING_SHIM, str(anchors), str(size)]
    argv += ["--port", str(port), "--mode", "memory", "--uvloop"]
    popen = procs.start("aiohttp-ceiling", argv, cpu=cpu)
    server = harness.Server("aiohttp ceiling", f"http://{harness.HOST}:{port}", port, popen)
    procs.wait_ready(server.url + "/health", popen)
    return server


def start_gateway(
    procs: harness.Processes,
    upstream_url: str,
    scratch: Path,
    cpu: int | None,
    workers: int,
    source: Path | None = None,
    **config: object,
) -> harness.Server:
    """The gateway with ``bench/anchor_target.py``'s config (plus ``config``) in front of
    the anchors' upstream; with ``source``, the ``gateway`` package of that source tree
    (another version, e.g. ``git archive main | tar -x -C DIR``) instead of this one."""
    env = harness.gateway_env()
    path = anchor_target.write_config(upstream_url, scratch, env, **config)  # type: ignore[arg-type]
    if source is not None:
        env["PYTHONPATH"] = str(source.resolve())  # found before the installed package
        # and before the working directory, which ``python -m`` puts first on sys.path: run
        # from this repository, it would import this version's package instead of DIR's
        env["PYTHONSAFEPATH"] = "1"
        found = subprocess.run(
            [sys.executable, "-c", "import gateway; print(gateway.__file__)"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        if not Path(found).resolve().is_relative_to(source.resolve()):
            raise harness.BenchError(f"--compare-baseline: imports {found!r}, not {source}'s")
    return harness.start_gateway(procs, path, env, workers, cpu)


def warm(
    args: argparse.Namespace,
    procs: harness.Processes,
    server: harness.Server,
    upstream_url: str,
    paths_file: Path,
    paths: list[str],
    wrk_cpu: int | None,
    proxy: bool,
) -> list[str]:
    """Warm and verify ``server``, then the unrecorded wrk warm-up; returns the problems."""
    problems: list[str] = []

    def upstream_calls() -> int:
        return int(harness.http_json(upstream_url + "/count")["total"])

    for label, expected in (("warm", len(paths) if proxy else 0), ("verify", 0)):
        before = upstream_calls()
        result = asyncio.run(tiles.fetch_all(server.url, paths, WARM_CONCURRENCY))
        calls = upstream_calls() - before
        if result.bad or calls != expected:
            problems.append(
                f"{server.name} {label}: {len(result.bad)} bad answers "
                f"({'; '.join(result.bad[:2])}), {calls} upstream calls, expected {expected}"
            )
    tiles.run_wrk(
        procs,
        server.url,
        paths_file,
        tiles.WRK_WARMUP_S,
        args.connections,
        wrk_cpu,
        server.pid,
        upstream_calls,
    )
    return problems


def run_once(
    args: argparse.Namespace,
    procs: harness.Processes,
    server: harness.Server,
    upstream_url: str,
    paths_file: Path,
    wrk_cpu: int | None,
    problems: list[str],
) -> tiles.WrkRun:
    """One recorded wrk run against ``server``; a HIT run's problems go in ``problems``."""

    def upstream_calls() -> int:
        return int(harness.http_json(upstream_url + "/count")["total"])

    run = tiles.run_wrk(
        procs,
        server.url,
        paths_file,
        args.duration,
        args.connections,
        wrk_cpu,
        server.pid,
        upstream_calls,
    )
    if run.upstream_calls or run.errors or run.summary["non2xx"]:
        problems.append(
            f"{server.name}: {run.upstream_calls} upstream calls, {run.errors} errors, "
            f"{run.summary['non2xx']} non-2xx in a HIT run"
        )
    procs.check_alive(server)
    return run


def measure(
    args: argparse.Namespace,
    procs: harness.Processes,
    server: harness.Server,
    upstream_url: str,
    paths_file: Path,
    paths: list[str],
    wrk_cpu: int | None,
    proxy: bool,
) -> tuple[list[tiles.WrkRun], list[str]]:
    """Warm, verify and run wrk against ``server``; returns the runs and the problems."""
    problems = warm(args, procs, server, upstream_url, paths_file, paths, wrk_cpu, proxy)
    runs = [
        run_once(args, procs, server, upstream_url, paths_file, wrk_cpu, problems)
        for _ in range(args.runs)
    ]
    return runs, problems


def measure_pair(
    args: argparse.Namespace,
    procs: harness.Processes,
    servers: tuple[harness.Server, harness.Server],
    upstream_url: str,
    paths_file: Path,
    paths: list[str],
    wrk_cpu: int | None,
) -> tuple[tuple[list[tiles.WrkRun], list[tiles.WrkRun]], list[str]]:
    """``--compare-interleave``: two gateways running side by side (the idle one costs
    nothing), warmed one after the other, then their wrk runs alternate (A B, B A, A B...),
    so a disturbance of the machine falls on both alike."""
    problems: list[str] = []
    for server in servers:
        problems += warm(args, procs, server, upstream_url, paths_file, paths, wrk_cpu, True)
    runs: tuple[list[tiles.WrkRun], list[tiles.WrkRun]] = ([], [])
    for i in range(args.runs):
        for which in (0, 1) if i % 2 == 0 else (1, 0):
            run = run_once(args, procs, servers[which], upstream_url, paths_file, wrk_cpu, problems)
            runs[which].append(run)
    return runs, problems


def profile(
    args: argparse.Namespace,
    procs: harness.Processes,
    server: harness.Server,
    upstream_url: str,
    paths_file: Path,
    wrk_cpu: int | None,
    size: int,
    target: str,
) -> None:
    """``--profile SVG`` with ``--compare``: one more wrk run of a gateway target (not
    counted) under py-spy (``tiles.profile_hits``), into ``SVG``'s name plus the size and the
    target, e.g. ``hits-20480-gateway-anchors-settings.svg``."""
    slug = "-".join("".join(c if c.isalnum() else " " for c in target.lower()).split())
    svg = args.profile.with_name(f"{args.profile.stem}-{size}-{slug}{args.profile.suffix}")
    one = argparse.Namespace(**{**vars(args), "profile": svg})

    def upstream_calls() -> int:
        return int(harness.http_json(upstream_url + "/count")["total"])

    tiles.profile_hits(one, procs, server, server.url, paths_file, wrk_cpu, upstream_calls)


def compare(args: argparse.Namespace, scratch: Path, procs: harness.Processes) -> list[str]:
    """Run every size and target, print the table; returns the problems found.

    Raises:
        BenchError: an anchor file or tool is missing, or a process died.
    """
    anchors: Path = args.anchors_dir
    missing = [f for f in ANCHOR_FILES if not (anchors / f).exists()]
    if missing:
        raise harness.BenchError(f"--compare: {', '.join(missing)} not in {anchors}")
    if shutil.which("nginx") is None:
        raise harness.BenchError("--compare: nginx not found (Debian: apt-get install nginx)")
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    tiles.check_tools(pin)
    server_cpu, wrk_cpu = (0, 1) if pin else (None, None)
    paths = [f"/tiles/{z}/{x}/{y}.png" for z, x, y in COMPARE_TILES]
    paths_file = scratch / "compare-paths.txt"
    paths_file.write_text("\n".join(paths) + "\n")
    sizes = [int(s) for s in args.compare_sizes.split(",")]
    rows: list[Row] = []
    problems: list[str] = []
    for size in sizes:
        up_port = harness.free_port()
        argv = [sys.executable, str(anchors / "upstream.py"), "--port", str(up_port)]
        argv += ["--delay-ms", f"{args.delay_ms:g}", "--body-bytes", str(size)]
        upstream = procs.start(f"upstream-{size}", argv)
        upstream_url = f"http://{harness.HOST}:{up_port}"
        procs.wait_ready(upstream_url + "/health", upstream)
        targets = [NGINX, CEILING, GATEWAY, AS_SHIPPED]
        if len(paths) * size > SMALL_MEMORY_BYTES:
            targets.append(SMALL_MEMORY)
        if args.compare_baseline is not None:
            targets += [BASELINE, BASELINE_SHIPPED]
        if args.compare_workers2:
            targets += [NGINX_AUTO, GATEWAY_W2]
        if args.compare_parts:
            targets += [ACCESS_LOG_ONLY, CLIENT_LIMIT_ONLY]
        if args.compare_only:
            wanted = [w.strip() for w in args.compare_only.split(",") if w.strip()]
            targets = [t for t in targets if any(w in t for w in wanted)]

        def start(
            name: str,
            cpu: int | None,
            size: int = size,
            up_port: int = up_port,
            upstream_url: str = upstream_url,
        ) -> harness.Server:
            if name in (NGINX, NGINX_AUTO):
                workers = "auto" if name == NGINX_AUTO else "1"
                run_dir = scratch / f"nginx-{workers}-{size}"
                return start_nginx(procs, anchors, run_dir, up_port, cpu, workers)
            if name == CEILING:
                return start_ceiling(procs, anchors, size, cpu)
            return start_gateway(
                procs,
                upstream_url,
                scratch / f"gw-{len(rows)}-{len(name)}",
                cpu,
                2 if name == GATEWAY_W2 else args.workers,
                source=args.compare_baseline if name.startswith("baseline") else None,
                **GATEWAY_CONFIGS[name],
            )

        def record(name: str, runs: list[tiles.WrkRun], size: int = size) -> None:
            row = Row(size, name, runs)
            rows.append(row)
            print(
                f"[{size:,} B] {name}: {row.rps:,.0f} req/s, p50 "
                f"{row.median(lambda r: r.ms('p50')):.2f} ms, p99 "
                f"{row.median(lambda r: r.ms('p99')):.2f} ms",
                flush=True,
            )

        paired = {}
        if args.compare_interleave:
            paired = {a: b for a, b in PARTNERS.items() if a in targets and b in targets}
        for name in targets:
            if name in paired.values():
                continue  # measured with its partner
            print(f"[{size:,} B] {name}: starting", flush=True)
            cpu, w_cpu = (None, None) if name in UNPINNED else (server_cpu, wrk_cpu)
            partner = paired.get(name)
            if partner is not None:
                servers = (start(name, cpu), start(partner, cpu))
                try:
                    (runs, partner_runs), found = measure_pair(
                        args, procs, servers, upstream_url, paths_file, paths, w_cpu
                    )
                    if args.profile is not None:
                        for target, server in zip((name, partner), servers, strict=True):
                            profile(
                                args, procs, server, upstream_url, paths_file, w_cpu, size, target
                            )
                finally:
                    for server in servers:
                        procs.stop(server.popen)
                problems += found
                record(name, runs)
                record(partner, partner_runs)
                continue
            server = start(name, cpu)
            try:
                runs, found = measure(
                    args, procs, server, upstream_url, paths_file, paths, w_cpu, name != CEILING
                )
                if args.profile is not None and name in GATEWAY_CONFIGS:
                    profile(args, procs, server, upstream_url, paths_file, w_cpu, size, name)
            finally:
                procs.stop(server.popen)
            problems += found
            record(name, runs)
        procs.stop(upstream)
    print_table(args, rows, pin)
    return problems


def print_table(args: argparse.Namespace, rows: list[Row], pin: bool) -> None:
    """The comparison table, one row per size and target."""
    placement = "server on CPU 0, wrk on CPU 1" if pin else "not pinned (shared CPUs)"
    if args.compare_workers2:
        placement += f" (rows {', '.join(sorted(UNPINNED))}: not pinned)"
    print()
    print(
        f"## Cache hits side by side: wrk -t1 -c{args.connections} -d{args.duration}s, "
        f"{args.runs} runs (medians), {len(COMPARE_TILES):,} distinct z12 tiles, {placement}, "
        f"gateway workers={args.workers}, {os.cpu_count()} CPUs"
    )
    print()
    body = []
    for row in rows:
        same = [r for r in rows if r.size == row.size]
        # unpinned rows against nginx w=auto; the ceiling is one process, pinned
        base = NGINX_AUTO if row.target in UNPINNED else NGINX
        nginx = next((r.rps for r in same if r.target == base), float("nan"))
        ceiling = next((r.rps for r in same if r.target == CEILING), float("nan"))
        if row.target in UNPINNED:
            ceiling = float("nan")
        worst = max(row.runs, key=lambda r: r.cpu.other_cpu_pct(r.gateway_cpu_pct, r.wrk_cpu_pct))
        body.append(
            [
                f"{row.size:,}",
                row.target,
                f"{row.rps:,.0f}",
                f"{row.median(lambda r: r.ms('p50')):.2f}",
                f"{row.median(lambda r: r.ms('p99')):.2f}",
                f"{row.rps / nginx:.2f}x" if nginx == nginx else "-",
                f"{row.rps / ceiling:.0%}" if ceiling == ceiling else "-",
                f"{row.median(lambda r: r.gateway_cpu_pct):.0f}",
                f"{row.median(lambda r: r.wrk_cpu_pct):.0f}",
                worst.note,
            ]
        )
    print(
        harness.table(
            [
                "tile bytes",
                "target",
                "req/s",
                "p50 ms",
                "p99 ms",
                "vs nginx",
                "of ceiling",
                "server CPU %",
                "wrk CPU %",
                "worst run",
            ],
            body,
        )
    )
