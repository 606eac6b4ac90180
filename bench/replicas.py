"""Fleet benchmark: three gateway replicas sharing one Redis.

Run it from the repository root with the project's Python (needs ``redis-server``; HAProxy
and nginx are used when installed)::

    python bench/replicas.py
    python bench/replicas.py --delay-ms 100 --asset-rps 20

Method: ``redis-server`` on a free port (no persistence), the bundled emulator with
``--delay-ms`` per call, three ``geopera-gateway serve`` replicas (each its own cache, all on
the Redis) and one more gateway without Redis (the local baseline), from ``bench/tiles.toml``
with the access log and client limits off. Then:

1. **Fleet rate.** 10x one second of ``--asset-rps`` distinct tiles of one asset, sent at
   once round-robin over the replicas (``max_wait_s`` long enough for all): upstream calls per
   second from the first to the last answer, and the same without the bucket's burst
   (``asset_burst = asset_rps``), against the configured rate.
2. **Coalesced miss.** For each of ``--runs`` new tiles, one request to each replica at
   once: the latency of the answers marked ``COALESCED`` (another replica fetched), against
   the upstream's delay. Target: within 60 ms of it.
3. **Redis cost of a miss.** ``--runs`` sequential misses on one replica and on the local
   gateway: the median difference. Target: at most 5 ms.
4. **Hits** (one tile, sequential, keep-alive): a replica directly, nginx alone (serving
   its cached copy), nginx in front of HAProxy in front of the replicas, HAProxy alone.

Exit status 0 when measured (targets are informational), 1 when something broke, 130 on
Ctrl-C. Every process is stopped by PID (``bench/harness.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import aiohttp
import mercantile

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gwconfig
import harness

BAHAMAS = (-78.95865, 23.56499, -76.57492, 25.55087)
COALESCED_TARGET_MS = 60.0
REDIS_COST_TARGET_MS = 5.0

NGINX_CONF = """daemon off;
worker_processes 1;
pid nginx.pid;
error_log error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
  proxy_temp_path tmp;
  proxy_cache_path cache keys_zone=bench:8m;
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass {upstream};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache bench;
      proxy_cache_revalidate on;
      proxy_cache_lock off;
    }}
  }}
}}
"""

HAPROXY_CONF = """defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend tiles
  bind 127.0.0.1:{port}
  default_backend gateways
backend gateways
  balance uri
  hash-type consistent
{servers}
"""


def overrides(asset_rps: float, redis_url: str | None) -> list[gwconfig.Override]:
    r = f"{asset_rps:.1f}"
    found = [
        gwconfig.Override("server.access_log = false", "[server]\naccess_log = false\n"),
        gwconfig.Override('clients.rate_limit = "off"', '[clients]\nrate_limit = "off"\n'),
        gwconfig.Override(
            f"limits: {asset_rps:g} req/s per asset, waits up to 30 s",
            f"[limits]\noperation_rps = 1000.0\noperation_burst = 1000\nasset_rps = {r}\n"
            f"asset_burst = {r}\nmax_concurrent = 64\nmax_wait_s = 30.0\n",
        ),
    ]
    if redis_url:
        found.append(gwconfig.Override("state.redis_url", f'[state]\nredis_url = "{redis_url}"\n'))
    return found


def tile_paths(zoom: int, count: int, skip: int = 0) -> list[str]:
    tiles = list(mercantile.tiles(*BAHAMAS, zoom))[skip : skip + count]
    return [f"/tiles/bahamas/{t.z}/{t.x}/{t.y}.png" for t in tiles]


async def fetch(session: aiohttp.ClientSession, url: str) -> tuple[int, str, float]:
    started = time.perf_counter()
    async with session.get(url) as response:
        await response.read()
        return response.status, response.headers.get("X-Cache", ""), time.perf_counter() - started


async def measure(args: argparse.Namespace, fleet: list[str], local: str, emulator: str) -> dict:
    out: dict = {}
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        # 1. fleet rate under 10x overload
        paths = tile_paths(12, round(args.asset_rps * 10))
        before = harness.emulator_calls(emulator, "cog.tile.render")
        started = time.perf_counter()
        answers = await asyncio.gather(
            *(fetch(session, fleet[n % len(fleet)] + p) for n, p in enumerate(paths))
        )
        span = time.perf_counter() - started
        calls = harness.emulator_calls(emulator, "cog.tile.render") - before
        # beyond the bucket's burst (asset_burst = asset_rps), the calls came at the rate
        steady = max(0, calls - args.asset_rps) / span
        out["rate"] = (calls / span, steady, [a[0] for a in answers])
        # 2. coalesced cross-replica misses
        coalesced = []
        for path in tile_paths(13, args.runs, skip=500):
            results = await asyncio.gather(*(fetch(session, base + path) for base in fleet))
            coalesced += [s for _, cache, s in results if cache == "COALESCED"]
        out["coalesced"] = coalesced
        # 3. a miss on a replica against a miss on the local gateway
        fleet_miss, local_miss = [], []
        for path in tile_paths(14, args.runs, skip=2000):
            fleet_miss.append((await fetch(session, fleet[0] + path))[2])
            local_miss.append((await fetch(session, local + path))[2])
        out["miss"] = (fleet_miss, local_miss)
    return out


async def hits(url: str, count: int) -> list[float]:
    async with aiohttp.ClientSession() as session:
        await fetch(session, url)  # warm: cached from here on
        return [(await fetch(session, url))[2] for _ in range(count)]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def benchmark(args: argparse.Namespace, scratch: Path, procs: harness.Processes) -> list[str]:
    problems: list[str] = []
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        raise harness.BenchError("redis-server is not installed (apt-get install redis-server)")
    redis_port = harness.free_port()
    procs.start(
        "redis",
        [redis_bin, "--port", str(redis_port), "--bind", harness.HOST, "--save", ""],
    )
    time.sleep(0.3)
    redis_url = f"redis://{harness.HOST}:{redis_port}/0"
    emulator = harness.start_emulator(procs, "--delay-ms", str(args.delay_ms))
    fleet = []
    for n in range(3):
        env = harness.gateway_env(emulator.url, scratch / f"cache-{n}")
        config = scratch / f"replica-{n}.toml"
        harness.write_gateway_config(config, env, overrides(args.asset_rps, redis_url))
        fleet.append(harness.start_gateway(procs, config, env).url)
    env = harness.gateway_env(emulator.url, scratch / "cache-local")
    config = scratch / "local.toml"
    harness.write_gateway_config(config, env, overrides(args.asset_rps, None))
    local = harness.start_gateway(procs, config, env).url

    results = asyncio.run(measure(args, fleet, local, emulator.url))
    rate, steady, statuses = results["rate"]
    if set(statuses) != {200}:
        problems.append(f"overload answers were not all 200: {sorted(set(statuses))}")
    coalesced = results["coalesced"]
    fleet_miss, local_miss = results["miss"]
    delay = args.delay_ms / 1000
    print("## Fleet of 3 replicas on one Redis\n")
    print(
        harness.table(
            ["figure", "value"],
            [
                ["configured asset rate (req/s)", f"{args.asset_rps:g}"],
                ["fleet upstream rate under 10x overload (req/s)", f"{rate:.2f}"],
                ["same, beyond the burst (req/s)", f"{steady:.2f}"],
                ["ratio beyond the burst / configured", f"{steady / args.asset_rps:.2f}"],
                ["upstream delay (ms)", f"{args.delay_ms:g}"],
                [
                    "coalesced cross-replica miss p50 / max (ms)",
                    f"{ms(statistics.median(coalesced))} / {ms(max(coalesced))}"
                    if coalesced
                    else "n/a",
                ],
                ["miss on a replica p50 (ms)", ms(statistics.median(fleet_miss))],
                ["miss on one host, no Redis, p50 (ms)", ms(statistics.median(local_miss))],
            ],
        )
    )
    print()
    redis_cost = statistics.median(fleet_miss) - statistics.median(local_miss)
    over = (statistics.median(coalesced) - delay) if coalesced else float("inf")
    if not coalesced:
        problems.append("no answer was COALESCED")

    # hits: direct, nginx alone, HAProxy, nginx in front of HAProxy
    hit_path = tile_paths(13, 1, skip=500)[0]
    rows = [["a replica directly", fleet[0]]]
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None
    )
    haproxy = shutil.which("haproxy")
    front = fleet[0]
    if haproxy:
        port = harness.free_port()
        servers = "\n".join(
            f"  server g{n} {base.removeprefix('http://')}" for n, base in enumerate(fleet)
        )
        (scratch / "haproxy.cfg").write_text(HAPROXY_CONF.format(port=port, servers=servers))
        procs.start("haproxy", [haproxy, "-f", str(scratch / "haproxy.cfg")])
        time.sleep(0.5)
        front = f"http://{harness.HOST}:{port}"
        rows.append(["HAProxy (balance uri)", front])
    if nginx:
        for name, upstream in (("nginx in front", front), ("nginx alone (its cache)", fleet[0])):
            port = harness.free_port()
            prefix = scratch / f"nginx-{port}"
            (prefix / "tmp").mkdir(parents=True)
            (prefix / "nginx.conf").write_text(NGINX_CONF.format(port=port, upstream=upstream))
            user = ["-g", "user root;"] if os.geteuid() == 0 else []
            procs.start("nginx", [nginx, "-p", f"{prefix}/", "-c", "nginx.conf", *user])
            time.sleep(0.5)
            rows.append([name, f"http://{harness.HOST}:{port}"])
    table_rows = []
    for name, base in rows:
        lat = asyncio.run(hits(base + hit_path, args.hits))
        table_rows.append(
            [name, ms(statistics.median(lat)), ms(statistics.quantiles(lat, n=100)[98])]
        )
    print("## Hits (one tile, sequential)\n")
    print(harness.table(["path", "p50 (ms)", "p99 (ms)"], table_rows))
    if not haproxy:
        print("\n(HAProxy not installed: its row is left out)")
    print()
    harness.print_targets(
        ["measured"],
        [
            [
                f"coalesced miss within {COALESCED_TARGET_MS:g} ms of the upstream delay",
                f"+{over * 1000:.1f} ms",
                harness.verdict(over * 1000 <= COALESCED_TARGET_MS),
            ],
            [
                f"Redis adds at most {REDIS_COST_TARGET_MS:g} ms to a miss",
                f"{redis_cost * 1000:+.1f} ms",
                harness.verdict(redis_cost * 1000 <= REDIS_COST_TARGET_MS),
            ],
            [
                "fleet rate beyond the burst within the configured one",
                f"{steady:.2f} / {args.asset_rps:g}",
                harness.verdict(steady <= args.asset_rps * 1.02),
            ],
        ],
    )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--asset-rps", type=float, default=20.0, help="asset limit (20)")
    parser.add_argument("--runs", type=int, default=20, help="coalesced and miss samples (20)")
    parser.add_argument("--hits", type=int, default=300, help="hit samples per path (300)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    harness.add_server_options(parser)
    args = harness.parse_options(
        parser,
        argv,
        {"--asset-rps": (1, 500, ""), "--runs": (2, 500, ""), "--hits": (10, 100_000, "")},
    )
    return harness.run_main("bench/replicas.py", "gateway-replicas-", args, benchmark)


if __name__ == "__main__":
    sys.exit(main())
