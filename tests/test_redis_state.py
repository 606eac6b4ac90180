"""The fleet's upstream state in a real redis-server: GCRA buckets timed by Redis, one
half-open probe for the fleet, the daily budget, leases that expire with their replica,
cross-replica single-flight, client limits across processes, fail-closed on an outage; and
the local backend's breakers on an injected clock and in their versioned stored format."""

from __future__ import annotations

import asyncio
import pickle
import time

import pytest

from gateway.cli.main import main
from gateway.config.settings import LimitSettings, StateSettings
from gateway.errors import BreakerOpen, LimitExceeded
from gateway.http.callers import CallerRateLimit
from gateway.http.keys import LAYERS, TILE_CACHE, TILE_SERVICE
from gateway.http.problem import Problem
from gateway.secrets import Secret
from gateway.seed.fleet import STREAM
from gateway.storage.coalesce import RENEW_CLAIM, FleetFlight
from gateway.storage.redis_link import RedisLink, StateUnavailable
from gateway.upstream.breakers import Breakers, BreakerState, Scope
from gateway.upstream.buckets import Bucket, Priority, SharedState
from gateway.upstream.fleet import RedisUpstreamState
from tests.conftest import RedisServer, config_with, needs_redis

pytestmark = needs_redis

OP = Scope("cog.tile.render")
ASSET = Scope("cog.tile.render", "https://example.invalid/a.tif")
OLINDA = "/tiles/olinda/13/3302/4278.png"


def limits(**kw: object) -> LimitSettings:
    base: dict[str, object] = {"bytes_per_s": 0.0, "max_concurrent": 4}
    return LimitSettings(**{**base, **kw})  # type: ignore[arg-type]


async def replica(
    server: RedisServer, lease_s: float = 5.0, **kw: object
) -> tuple[RedisLink, RedisUpstreamState]:
    """One replica's link and state on ``server``."""
    link = RedisLink(Secret(server.url))
    return link, RedisUpstreamState(link, limits(**kw), lease_s=lease_s)


def bucket(rate: float, burst: float) -> Bucket:
    return Bucket("asset", "asset:a", rate, burst)


async def test_buckets_reserve_in_arrival_order_and_refuse_with_the_wait(redis_server):
    link, state = await replica(redis_server)
    b = bucket(2.0, 2.0)  # a fresh Redis: the bucket starts empty and fills at 2/s
    waits = []
    for _ in range(3):
        admitted = await state.admit([b], [1.0], [], Priority.INTERACTIVE, 5.0, False)
        waits.append(admitted.wait_s)
    # queued one behind another, half a second apart (the first waits for the empty bucket)
    assert waits == sorted(waits)
    assert waits[1] - waits[0] == pytest.approx(0.5, abs=0.05)
    assert waits[2] - waits[1] == pytest.approx(0.5, abs=0.05)
    with pytest.raises(LimitExceeded) as refused:
        await state.admit([b], [1.0], [], Priority.INTERACTIVE, 1.0, False)
    assert refused.value.scope == "asset"
    assert refused.value.retry_after_s > 1.0
    with pytest.raises(LimitExceeded):  # seeding never reserves into a deficit
        await state.admit([b], [1.0], [], Priority.SEEDING, 60.0, False)
    await link.aclose()


async def test_an_empty_redis_lets_no_burst_through(redis_server):
    link, state = await replica(redis_server)
    b = bucket(10.0, 20.0)
    admitted = [
        (await state.admit([b], [1.0], [], Priority.INTERACTIVE, 60.0, False)).wait_s
        for _ in range(20)
    ]
    # 20 calls at 10/s from an empty Redis: spread over ~2 s, not a burst of 20 at once
    assert admitted[-1] == pytest.approx(2.0, abs=0.2)
    assert sum(1 for w in admitted if w <= 0.05) <= 1
    await link.aclose()


async def test_bytes_are_charged_after_and_the_budget_refuses_once_spent(redis_server):
    link, state = await replica(redis_server, daily_egress_bytes=1000)
    await state.admit([], [], [], Priority.INTERACTIVE, 1.0, False)
    assert (await state.report()).budget_left == 1000
    await state.account(1000)
    assert (await state.report()).budget_left == 0
    with pytest.raises(LimitExceeded) as refused:
        await state.admit([], [], [], Priority.INTERACTIVE, 1.0, False)
    assert refused.value.scope == "budget"
    assert 0 < refused.value.retry_after_s <= 86400
    await link.aclose()


async def test_a_half_open_breaker_lets_exactly_one_probe_through_the_fleet(redis_server):
    replicas = [await replica(redis_server) for _ in range(3)]
    first = replicas[0][1]
    await first.open_for(ASSET, 0.0, time.time())  # open, and its time is already over
    results = await asyncio.gather(
        *(
            state.admit([], [], [OP, ASSET], Priority.INTERACTIVE, 1.0, False)
            for _, state in replicas
            for _ in range(10)
        ),
        return_exceptions=True,
    )
    probes = [r for r in results if not isinstance(r, BaseException) and r.probes]
    refused = [r for r in results if isinstance(r, BreakerOpen)]
    assert len(probes) == 1
    assert probes[0].probes == [ASSET]
    assert len(refused) == 29
    assert {b.state for b in (await first.report()).breakers} == {"half-open"}
    replicas[1][1].abandon([ASSET])  # the probe never reached the upstream: the next may go
    await replicas[1][0].flush()
    again = await replicas[2][1].admit([], [], [ASSET], Priority.INTERACTIVE, 1.0, False)
    assert again.probes == [ASSET]
    await replicas[2][1].record_success([ASSET])
    assert (await first.report()).breakers == []
    for link, _ in replicas:
        await link.aclose()


async def test_failures_open_the_operation_for_every_replica(redis_server):
    (la, a), (lb, b) = await replica(redis_server), await replica(redis_server)
    a.settings = limits(breaker_failures=2)
    await a.record_failure([OP, ASSET], time.time())
    await b.admit([], [], [OP], Priority.INTERACTIVE, 1.0, False)  # one failure: still closed
    await a.record_failure([OP, ASSET], time.time())
    with pytest.raises(BreakerOpen) as refused:
        await b.admit([], [], [OP], Priority.INTERACTIVE, 1.0, False)
    assert refused.value.scope == OP
    assert refused.value.retry_after_s > 20
    await la.aclose()
    await lb.aclose()


async def test_leases_of_a_replica_that_died_expire(redis_server):
    (la, dead), (lb, alive) = (
        await replica(redis_server, max_concurrent=2, lease_s=0.3),
        await replica(redis_server, max_concurrent=2),
    )
    for _ in range(2):
        await dead.acquire_lease(0.1, Priority.INTERACTIVE)
    with pytest.raises(LimitExceeded) as busy:
        await alive.acquire_lease(0.05, Priority.INTERACTIVE)
    assert busy.value.scope == "concurrency"
    dead._renewer.cancel()  # the replica stops: nobody renews its leases any more
    started = time.monotonic()
    lease = await alive.acquire_lease(2.0, Priority.INTERACTIVE)
    assert lease
    assert time.monotonic() - started < 1.0
    await la.aclose()
    await lb.aclose()


async def test_redis_down_fails_closed_and_comes_back_by_itself(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    link, state = await replica(server)
    await state.admit([], [], [OP], Priority.INTERACTIVE, 1.0, False)
    server.stop()
    with pytest.raises(StateUnavailable):
        await state.admit([], [], [OP], Priority.INTERACTIVE, 1.0, False)
    assert not link.reachable
    assert await state.probe() == (False, "unreachable")
    server.start()  # empty, on the same port: the link reconnects on its own
    assert await state.probe() == (True, "")
    await state.admit([], [], [OP], Priority.INTERACTIVE, 1.0, False)
    assert link.reachable
    await link.aclose()
    server.stop()


async def test_one_fetch_for_the_fleet_and_a_dead_owner_is_taken_over(redis_server):
    links = [RedisLink(Secret(redis_server.url)) for _ in range(3)]
    flights = [FleetFlight(link, 0.5, f"replica-{n}") for n, link in enumerate(links)]
    calls = 0

    async def fetch() -> bytes:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.1)
        return b"tile bytes"

    results = await asyncio.gather(*(f.run("tile/a/1/2/3", fetch, 5.0) for f in flights))
    assert calls == 1
    assert sorted(coalesced for _, coalesced in results) == [False, True, True]
    assert {payload for payload, _ in results} == {b"tile bytes"}

    # an owner that dies mid-fetch: its claim lapses within lease_s, and one waiter fetches
    async def hang() -> bytes:
        await asyncio.sleep(3600)
        return b""

    owner = asyncio.ensure_future(flights[0].run("tile/a/1/2/4", hang, 5.0))
    await asyncio.sleep(0.1)
    owner_renewal = [t for t in asyncio.all_tasks() if t.get_name().startswith("renew ")]
    assert len(owner_renewal) == 1
    for task in owner_renewal:
        task.cancel()  # the owner's process is gone: nobody renews, nobody finishes
    started = time.monotonic()
    calls = 0
    taken = await asyncio.gather(*(f.run("tile/a/1/2/4", fetch, 5.0) for f in flights[1:]))
    assert calls == 1
    assert time.monotonic() - started < 1.5
    assert {payload for payload, _ in taken} == {b"tile bytes"}
    owner.cancel()
    await asyncio.gather(owner, return_exceptions=True)
    for link in links:
        await link.aclose()


async def test_client_limits_hold_across_processes_through_redis(redis_server):
    state = StateSettings(redis_url=Secret(redis_server.url))
    workers = [CallerRateLimit("5/minute", state) for _ in range(3)]
    statuses = []
    for n in range(9):
        try:
            await workers[n % 3].check("203.0.113.7")
            statuses.append(200)
        except Problem as problem:
            statuses.append(problem.status)
    assert statuses == [200] * 5 + [429] * 4  # 5 for the client in all, not 5 per worker


async def test_a_cache_miss_costs_at_most_three_round_trips_and_a_hit_none(
    gateway_for, emulator, redis_server, tmp_path
):
    """The happy path: tokens are there. (A Redis flushed for this test starts every bucket
    empty, and at the default rates a call that must wait for its tokens takes its lease in
    a trip of its own.)"""
    config = config_with(
        tmp_path,
        ('rate_limit = "200/second"', 'rate_limit = "off"'),
        ("operation_rps = 20.0", "operation_rps = 10000.0"),
        ("asset_rps = 10.0", "asset_rps = 10000.0"),
        append=f'[state]\nredis_url = "{redis_server.url}"\n',
    )
    client = await gateway_for(emulator, config=config)
    link = client.app[TILE_SERVICE].fleet.link
    warm = await client.get("/tiles/olinda/13/3302/4279.png")  # Redis has loaded the scripts
    assert warm.headers["X-Cache"] == "MISS"
    await link.flush()
    before = link.round_trips
    miss = await client.get(OLINDA)
    assert miss.status == 200
    assert miss.headers["X-Cache"] == "MISS"
    await link.flush()  # deferred bookkeeping not yet sent would be sent now: one more trip
    assert link.round_trips - before <= 3
    before = link.round_trips
    for _ in range(5):
        hit = await client.get(OLINDA)
        assert hit.headers["X-Cache"] == "HIT"
    assert link.round_trips == before


async def test_a_purge_on_one_replica_reaches_the_others(
    gateway_for, emulator, redis_server, tmp_path
):
    """Two replicas with their own caches: a purge of one zoom on replica A empties it on B
    within about a second (B fetches it again), and leaves B's other tiles cached."""
    config = config_with(
        tmp_path,
        ('rate_limit = "200/second"', 'rate_limit = "off"'),
        append=f'[state]\nredis_url = "{redis_server.url}"\n',
    )
    a = await gateway_for(emulator, token="admin", config=config, cache_dir=tmp_path / "a")
    b = await gateway_for(emulator, token="tiles", config=config, cache_dir=tmp_path / "b")
    other = "/tiles/olinda/14/6604/8556.png"
    for path in (OLINDA, other):
        assert (await b.get(path)).status == 200  # B fetches; A is not asked
    assert (await b.get(OLINDA)).headers["X-Cache"] == "HIT"
    purge = await a.post("/admin/purge", json={"layer": "olinda", "zoom": "13"})
    assert purge.status == 200
    assert (await purge.json())["fleet"] is True
    cache = b.app[TILE_CACHE]
    key = b.app[LAYERS]["olinda"].cache_key(13, 3302, 4278, 1, "png")
    async with asyncio.timeout(5):
        while cache.get(key) is not None:  # noqa: ASYNC110 - B's follower runs on its own
            await asyncio.sleep(0.05)
    renders = emulator.renders()
    again = await b.get(OLINDA)
    assert again.headers["X-Cache"] == "MISS"
    assert emulator.renders() == renders + 1
    assert (await b.get(other)).headers["X-Cache"] == "HIT"  # zoom 14 was not purged


def test_the_purge_command_announces_to_the_fleet_and_says_when_it_cannot(
    redis_server, tmp_path, capsys
):
    config = config_with(tmp_path, append=f'[state]\nredis_url = "{redis_server.url}"\n')
    args = ["purge", "--config", str(config), "--layer", "olinda", "--zoom", "12-14"]
    assert main(args) == 0
    assert "announced to the other replicas" in capsys.readouterr().out

    async def newest() -> dict[bytes, bytes]:
        link = RedisLink(Secret(redis_server.url), None)
        try:
            [(_id, fields)] = await link.command("XREVRANGE", STREAM, "+", "-", "COUNT", 1)
        finally:
            await link.aclose()
        return dict(fields)

    fields = asyncio.run(newest())
    assert fields[b"layer"] == b"olinda"
    assert fields[b"zoom"] == b"12-14"
    down = config_with(tmp_path, append='[state]\nredis_url = "redis://127.0.0.1:9/0"\n')
    assert main([*args[:2], str(down), *args[3:]]) == 1  # purged here, not announced
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "other replicas did not get this purge" in err[0]


# --------------------------------------------------------------------------- local breakers


def test_local_breakers_on_an_injected_clock_probe_once(tmp_path):
    clock = [1_000_000.0]
    breakers = Breakers(SharedState(tmp_path / "state"), 2, 30, 10, clock=lambda: clock[0])
    breakers.open_for(ASSET, 5.0)
    with pytest.raises(BreakerOpen) as refused:
        breakers.check([ASSET])
    assert refused.value.retry_after_s == pytest.approx(5.0)
    clock[0] += 5.0
    assert breakers.check([ASSET]) == [ASSET]  # the one probe
    with pytest.raises(BreakerOpen):
        breakers.check([ASSET])  # half-open: its probe is in flight
    breakers.record_failure([ASSET])  # the probe failed: open again as long
    clock[0] += 4.9
    with pytest.raises(BreakerOpen):
        breakers.check([ASSET])
    clock[0] += 0.2
    assert breakers.check([ASSET]) == [ASSET]
    breakers.record_success([ASSET])
    assert breakers.check([ASSET]) == []
    assert list(breakers.statuses()) == []


class _OldState:  # what an older gateway pickled: a class this version does not have
    open_until = 2e9


def test_unreadable_stored_breakers_count_as_closed(tmp_path):
    state = SharedState(tmp_path / "state")
    breakers = Breakers(state, 2, 30, 10)
    state.cache.set(ASSET.key, pickle.dumps(_OldState()))  # a pickled class
    state.cache.set(OP.key, '{"v": 99, "open_until": 2e9}')  # another version
    assert breakers.check([OP, ASSET]) == []
    assert list(breakers.statuses()) == []
    stored = BreakerState(open_until=2e9, open_s=30.0).dump()
    assert stored.startswith('{"v":1,')
    assert BreakerState.load(stored) is not None


async def test_a_cancelled_redis_call_is_cancelled(redis_server):
    # A purge follower and the pub/sub listener are stopped by cancelling them, a request
    # whose client left is cancelled mid-call. A lost cancel kept the task running: with
    # redis-py's socket_timeout (its sends in asyncio.wait_for, which on Python 3.11 loses a
    # cancel that lands as the send completes) and in redis-py 8.0 and 8.1 (pinned out), in
    # about one try in two here; a claim's renewer then never ended, nor the fetch awaiting it.
    link = RedisLink(Secret(redis_server.url))
    try:

        async def renew_for_ever() -> None:
            while True:
                await link.call((RENEW_CLAIM, ["ggw:claim:cancel-test"], ["owner", 1000]))

        lost = 0
        for attempt in range(60):  # cancels landing at every point of a round trip
            task = asyncio.ensure_future(renew_for_ever())
            await asyncio.sleep(attempt * 0.00005)
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=1.0)
            if not done:
                lost += 1
                while not task.done():  # a lost cancel: ask again until it lands
                    task.cancel()
                    await asyncio.wait({task}, timeout=0.1)
            assert task.cancelled()
        assert lost == 0
    finally:
        await link.aclose()
