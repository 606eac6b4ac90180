"""Protecting the upstream: breakers, stale serving, limiter queue, client limits, budget,
metrics, readiness, the access log, and limits that hold across worker processes."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import aiohttp
import pytest

from gateway.app import create_app
from gateway.emulator import FAULTS_KEY, LIMITS_KEY, Fault
from gateway.http.callers import LocalWindows
from gateway.http.keys import LAYERS, TILE_CACHE, TILE_SERVICE
from gateway.logs import access_log_options
from gateway.upstream.buckets import Bucket, LimitExceeded, Priority, SharedState, TokenBuckets
from tests.conftest import DEFAULT_CONFIG, PLANTED_KEY, TOKENS, config_with
from tests.test_cli import serving_workers

OLINDA = "/tiles/olinda/13/3302/4278.png"
OLINDA_TILES = [
    f"/tiles/olinda/14/{x}/{y}.png" for x in range(6603, 6607) for y in range(8555, 8559)
]  # 16 fully covered tiles
SHORT_TTL = (("ttl_s = 86400", "ttl_s = 1"),)


async def test_429_opens_the_breaker_until_retry_after_has_passed(gateway_for, emulator, clock):
    gateway = await gateway_for(emulator, clock=clock)
    emulator.app[FAULTS_KEY].add(Fault("status", status=429, retry_after="1"))
    assert (await gateway.get(OLINDA)).status == 503
    for _ in range(5):
        assert (await gateway.get(OLINDA)).status == 503
    assert emulator.renders() == 1  # nothing reached the upstream while the breaker was open
    clock.advance(1.1)
    response = await gateway.get(OLINDA)
    assert response.status == 200
    assert response.headers["X-Cache"] == "MISS"
    assert emulator.renders() == 2


async def test_repeated_failures_open_the_operation_breaker(gateway_for, emulator, tmp_path):
    config = config_with(
        tmp_path,
        ("retry_attempts = 3", "retry_attempts = 1"),
        ("breaker_failures = 5", "breaker_failures = 2"),
    )
    client = await gateway_for(emulator, config=config)
    emulator.app[FAULTS_KEY].add(Fault("status", status=500, count=2))
    assert (await client.get(OLINDA)).status == 502
    assert (await client.get("/tiles/bahamas/9/145/220.png")).status == 502
    blocked = await client.get("/tiles/olinda-ndvi/13/3302/4278.png")  # same operation
    assert blocked.status == 503
    assert int(blocked.headers["Retry-After"]) >= 1
    terrain = await client.get("/tiles/st-helens/13/1315/2907.png")  # another operation
    assert terrain.status == 200
    assert emulator.stats.calls["cog.tile.render"] == 2


async def test_stale_if_error_serves_the_expired_tile(gateway_for, emulator, tmp_path, clock):
    config = config_with(
        tmp_path, *SHORT_TTL, ("stale_while_revalidate_s = 3600", "stale_while_revalidate_s = 0")
    )
    client = await gateway_for(emulator, config=config, clock=clock)
    first = await client.get(OLINDA)
    body = await first.read()
    clock.advance(1.1)
    emulator.app[FAULTS_KEY].add(Fault("status", status=503, count=3))
    stale = await client.get(OLINDA)
    assert stale.status == 200
    assert stale.headers["X-Cache"] == "STALE"
    assert await stale.read() == body
    emulator.app[FAULTS_KEY].add(Fault("status", status=429, retry_after="30"))
    assert (await client.get(OLINDA)).headers["X-Cache"] == "STALE"  # 429, then breaker
    assert (await client.get(OLINDA)).headers["X-Cache"] == "STALE"


async def test_stale_while_revalidate_serves_at_once_and_refreshes_once(
    gateway_for, start_upstream, tmp_path, clock
):
    slow = await start_upstream(delay_ms=2000)
    client = await gateway_for(slow, config=config_with(tmp_path, *SHORT_TTL), clock=clock)
    await client.get(OLINDA)
    clock.advance(1.1)
    started = time.monotonic()
    responses = await asyncio.gather(*(client.get(OLINDA) for _ in range(20)))
    assert time.monotonic() - started < 1.5  # did not wait for the 2 s upstream
    assert {r.headers["X-Cache"] for r in responses} == {"STALE"}
    async with asyncio.timeout(10):
        await client.app[TILE_SERVICE].drain()  # the background refresh has stored its tile
    assert slow.renders() == 2  # exactly one background refresh
    refreshed = await client.get(OLINDA)
    assert refreshed.headers["X-Cache"] == "HIT"


async def test_queue_wait_limit_answers_503_with_retry_after(gateway_for, emulator, tmp_path):
    config = config_with(
        tmp_path,
        ("asset_rps = 10.0", "asset_rps = 1.0"),
        ("asset_burst = 20", "asset_burst = 1"),
        ("max_wait_s = 10.0", "max_wait_s = 1.5"),
    )
    client = await gateway_for(emulator, config=config)
    started = time.monotonic()
    responses = await asyncio.gather(*(client.get(p) for p in OLINDA_TILES[:5]))
    elapsed = time.monotonic() - started
    statuses = sorted(r.status for r in responses)
    assert statuses == [200, 200, 503, 503, 503]  # burst 1, then one within 1.5 s of queue
    refused = [r for r in responses if r.status == 503]
    for response in refused:
        assert int(response.headers["Retry-After"]) >= 1
        problem = await response.json(content_type=None)
        assert problem["type"].endswith("upstream-limit")
        assert "asset" in problem["detail"]
    assert elapsed < 1.5 + 1.0  # nobody waited past the maximum wait plus a second
    assert emulator.stats.calls["cog.tile.render"] == 2


def test_seeding_never_reserves_ahead_of_map_users(tmp_path):
    clock = [1000.0]
    buckets = TokenBuckets(SharedState(tmp_path / "state"), clock=lambda: clock[0])
    bucket = Bucket("asset", "a", rate=1.0, burst=1.0)
    assert buckets.reserve([bucket], [1], 5, Priority.SEEDING) == 0  # a token was there
    with pytest.raises(LimitExceeded) as seeding:
        buckets.reserve([bucket], [1], 5, Priority.SEEDING)
    assert seeding.value.retry_after_s == pytest.approx(1.0)
    assert buckets.reserve([bucket], [1], 5, Priority.INTERACTIVE) == pytest.approx(1.0)
    assert buckets.reserve([bucket], [1], 5, Priority.INTERACTIVE) == pytest.approx(2.0)
    clock[0] += 2.5  # the interactive reservations are served; seeding still waits
    with pytest.raises(LimitExceeded):
        buckets.reserve([bucket], [1], 5, Priority.SEEDING)
    clock[0] += 1.0
    assert buckets.reserve([bucket], [1], 5, Priority.SEEDING) == 0


async def test_client_rate_limit_answers_429_with_ratelimit_headers(
    gateway_for, emulator, tmp_path
):
    config = config_with(tmp_path, ('rate_limit = "200/second"', 'rate_limit = "3/minute"'))
    client = await gateway_for(emulator, config=config)
    ok = [await client.get(OLINDA) for _ in range(3)]
    assert [r.status for r in ok] == [200, 200, 200]
    assert ok[-1].headers["RateLimit-Remaining"] == "0"
    limited = await client.get(OLINDA)
    assert limited.status == 429
    assert limited.headers["Content-Type"] == "application/problem+json"
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert limited.headers["RateLimit-Limit"] == "3"
    assert (await client.get("/healthz")).status == 200  # only tile routes count
    assert emulator.renders() == 1


def test_local_caller_windows_slide_and_forget_old_callers():
    now = [1_000_000.0]  # the start of a 10 s window
    windows = LocalWindows(4, 10.0, clock=lambda: now[0])
    answers = [windows.hit("a") for _ in range(5)]
    assert [allowed for allowed, _ in answers] == [True, True, True, True, False]
    assert [stats.remaining for _, stats in answers] == [3, 2, 1, 0, 0]
    assert answers[-1][1].reset_time == pytest.approx(now[0] + 10.0)
    assert windows.hit("b")[0]  # each caller has its own window
    now[0] += 15.0  # half-way through the next window: the previous 4 weigh 2
    assert [windows.hit("a")[0] for _ in range(3)] == [True, True, False]
    now[0] += 20.0  # two windows later nothing is left of them
    allowed, stats = windows.hit("a")
    assert (allowed, stats.remaining) == (True, 3)
    assert stats.reset_time == pytest.approx(now[0] + 5.0)  # the end of this window
    windows._prune_at = 2  # as if 65,536 callers had come by
    now[0] += 30.0
    windows.hit("d")  # the windows of "a" and "b" ended long ago: dropped, not kept forever
    assert set(windows._windows) == {"d"}


async def test_daily_egress_budget_serves_cache_only_once_spent(gateway_for, emulator, tmp_path):
    config = config_with(tmp_path, ("daily_egress_bytes = 0", "daily_egress_bytes = 1000"))
    client = await gateway_for(emulator, config=config)
    assert (await client.get(OLINDA)).status == 200  # spends more than 1000 bytes
    refused = await client.get("/tiles/olinda/13/3303/4278.png")
    assert refused.status == 503
    problem = await refused.json(content_type=None)
    assert problem["type"].endswith("egress-budget-spent")
    assert int(refused.headers["Retry-After"]) > 0
    assert (await client.get(OLINDA)).headers["X-Cache"] == "HIT"
    ready = await (await client.get("/readyz")).json()
    assert ready["checks"]["egress_budget_remaining_bytes"] == 0
    assert emulator.renders() == 1


async def test_metrics_move_with_traffic(gateway, emulator):
    await gateway.get(OLINDA)
    await gateway.get(OLINDA)
    await gateway.get("/tiles/olinda/13/3305/4278.png")  # outside: empty, no upstream call
    response = await gateway.get("/metrics")
    assert response.headers["Content-Type"].startswith("text/plain")
    text = await response.text()

    def value(line_start: str) -> float:
        lines = [line for line in text.splitlines() if line.startswith(line_start)]
        assert lines, line_start
        return float(lines[0].rsplit(" ", 1)[1])

    assert value('gateway_cache_lookups_total{result="miss"}') >= 1
    assert value('gateway_cache_lookups_total{result="hit"}') >= 1
    assert value('gateway_cache_lookups_total{result="empty"}') >= 1
    assert value('gateway_upstream_requests_total{operation="cog.tile.render",status="200"}') >= 1
    assert value('gateway_upstream_received_bytes_total{operation="cog.tile.render"}') > 1000
    assert value("gateway_upstream_calls_saved_total") >= 2
    assert value("gateway_cache_size_bytes") > 0
    assert 'gateway_http_requests_total{method="GET",route="tile",status="200"}' in text
    assert "gateway_http_request_duration_seconds_bucket" in text
    labels = " ".join(line.split("}")[0] for line in text.splitlines() if "{" in line)
    assert "4278" not in labels
    assert "demo.geopera.invalid" not in labels
    assert PLANTED_KEY not in text


async def test_readyz_and_healthz(gateway):
    assert (await (await gateway.get("/healthz")).json()) == {"status": "ok"}
    ready = await gateway.get("/readyz")
    assert ready.status == 200
    checks = (await ready.json())["checks"]
    assert checks["cache_writable"] is True
    assert checks["upstream_reachable"] is True
    assert checks["open_breakers"] == []


async def test_one_json_access_log_line_per_request(aiohttp_server, settings_for, emulator, caplog):
    server = await aiohttp_server(create_app(settings_for(emulator)), **access_log_options(True))
    url = f"http://127.0.0.1:{server.port}{OLINDA}?token={TOKENS['tiles']}"
    async with aiohttp.ClientSession() as session, session.get(url):
        pass

    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]
    assert len(lines) == 1
    line = lines[0]
    assert line["path"] == OLINDA
    assert "token" not in json.dumps(line)
    assert TOKENS["tiles"] not in caplog.text
    assert line["status"] == 200
    assert line["cache"] == "MISS"
    assert line["upstream_ms"] > 0
    assert line["bytes"] > 1000
    assert line["duration_ms"] > 0


async def test_limits_hold_across_two_worker_processes(start_upstream, tmp_path):
    upstream = await start_upstream()
    upstream.app[LIMITS_KEY].asset_rps = 3  # the emulator throttles above 3 requests/s
    config = config_with(
        tmp_path,
        ("asset_rps = 10.0", "asset_rps = 2.0"),
        ("asset_burst = 20", "asset_burst = 2"),
        ('rate_limit = "200/second"', 'rate_limit = "off"'),
    )
    async with serving_workers(upstream, config, tmp_path / "cache") as (base, _):

        async def fetch(path: str) -> int:
            # a connection per request, so the kernel spreads them over both workers
            async with aiohttp.ClientSession() as session, session.get(base + path) as r:
                await r.read()
                return r.status

        started = time.monotonic()
        statuses = await asyncio.gather(*(fetch(p) for p in OLINDA_TILES[:8]))
        elapsed = time.monotonic() - started
    assert statuses == [200] * 8
    assert upstream.stats.throttled == 0
    assert upstream.stats.calls["cog.tile.render"] == 8
    assert elapsed >= 2.5  # 2 at once, then 2/s for the other 6: one shared bucket


def test_default_config_stays_below_the_emulator_defaults():
    from gateway.config.settings import load_settings
    from gateway.emulator import DEFAULT_ASSET_RPS, DEFAULT_BANDWIDTH

    limits = load_settings(DEFAULT_CONFIG, environ={"GEOPERA_API_KEY": "gpra_x12345678"}).limits
    assert limits.asset.rps <= DEFAULT_ASSET_RPS
    assert limits.asset.burst <= DEFAULT_ASSET_RPS
    assert limits.bytes_per_s <= DEFAULT_BANDWIDTH
    assert limits.bytes_burst <= DEFAULT_BANDWIDTH


def test_bytes_received_hold_back_later_calls(tmp_path):
    clock = [50.0]
    buckets = TokenBuckets(SharedState(tmp_path / "state"), clock=lambda: clock[0])
    egress = Bucket("bytes", "bytes", rate=1000.0, burst=1000.0)
    assert buckets.reserve([egress], [0], 5) == 0
    buckets.charge(egress, 3000)  # a 3 kB answer against 1 kB/s with 1 kB of burst
    assert buckets.reserve([egress], [0], 5) == pytest.approx(2.0)
    with pytest.raises(LimitExceeded) as refused:
        buckets.reserve([egress], [0], 1.0)
    assert refused.value.scope == "bytes"


async def test_misses_beyond_the_tile_creators_queue_without_claims_and_hits_go_first(
    gateway_for, start_upstream, tmp_path
):
    """With ``max_concurrent = 1`` one miss is worked on at a time; the others wait in the
    tile-creator queue holding nothing (no cross-worker claim, so another worker is never
    held up by a miss this one has not started), one that waits past ``max_wait_s`` is a
    503 with Retry-After, and a cache hit is answered at once meanwhile."""
    slow = await start_upstream(delay_ms=1500)
    config = config_with(
        tmp_path,
        ("max_concurrent = 16", "max_concurrent = 1"),
        ("max_wait_s = 10.0", "max_wait_s = 2.0"),
    )
    client = await gateway_for(slow, config=config)
    assert (await client.get(OLINDA)).headers["X-Cache"] == "MISS"
    misses = [asyncio.ensure_future(client.get(p)) for p in OLINDA_TILES[:3]]
    await asyncio.sleep(0.3)  # the first miss is upstream (for 1.5 s), the other two queue
    cache, layer = client.app[TILE_CACHE], client.app[LAYERS]["olinda"]
    keys = [layer.cache_key(*_zxy(p), 1, "png") for p in OLINDA_TILES]
    claimed = await cache.run(lambda: [k for k in keys if cache.claimed(k)])
    assert len(claimed) == 1
    started = time.monotonic()
    hit = await client.get(OLINDA)
    assert hit.headers["X-Cache"] == "HIT"
    assert time.monotonic() - started < 0.75  # not behind the queue (1.5 s per miss)
    responses = await asyncio.gather(*misses)
    assert sorted(r.status for r in responses) == [200, 200, 503]
    refused = next(r for r in responses if r.status == 503)
    assert int(refused.headers["Retry-After"]) >= 1
    problem = await refused.json(content_type=None)
    assert problem["type"].endswith("upstream-limit")
    assert "concurrency" in problem["detail"]
    assert slow.renders() == 3  # the refused miss never reached the upstream


async def test_a_burst_of_disk_hits_reads_once_and_frees_its_tile_creator_slot(
    gateway_for, emulator, tmp_path
):
    """Without a memory tier every hit reads the disk: a burst for one tile reads it once
    (taking the one free tile-creator slot for that read, with ``max_concurrent = 1``), is
    all ``HIT``, and leaves the slot free, so the next miss is fetched, not refused."""
    config = config_with(
        tmp_path,
        ("max_concurrent = 16", "max_concurrent = 1"),
        ("max_wait_s = 10.0", "max_wait_s = 1.0"),
        ("memory_bytes = 268_435_456", "memory_bytes = 0"),
    )
    client = await gateway_for(emulator, config=config)
    assert (await client.get(OLINDA_TILES[0])).headers["X-Cache"] == "MISS"
    cache, service = client.app[TILE_CACHE], client.app[TILE_SERVICE]
    arrived, reads, everyone_in = 0, 0, threading.Event()
    real_read, real_get = cache.read_disk, service.get

    def held_read(key: str):  # in the cache's I/O thread: waits for the whole burst
        nonlocal reads
        reads += 1
        everyone_in.wait(10)
        return real_read(key)

    async def counted_get(*args, **kwargs):
        nonlocal arrived
        arrived += 1
        if arrived == 20:
            everyone_in.set()
        return await real_get(*args, **kwargs)

    cache.read_disk, service.get = held_read, counted_get
    try:
        hits = await asyncio.gather(*(client.get(OLINDA_TILES[0]) for _ in range(20)))
    finally:
        everyone_in.set()
    assert [r.headers["X-Cache"] for r in hits] == ["HIT"] * 20
    assert reads == 1
    following = await client.get(OLINDA_TILES[1])
    assert following.status == 200
    assert following.headers["X-Cache"] == "MISS"
    assert emulator.renders() == 2


def _zxy(path: str) -> tuple[int, int, int]:
    """``(z, x, y)`` of an XYZ tile ``path`` such as :data:`OLINDA`."""
    z, x, y = (int(part) for part in path.removesuffix(".png").split("/")[-3:])
    return z, x, y
