"""Three gateway processes, each with its own local cache, sharing one real redis-server and
one emulator: the fleet keeps one upstream rate, fetches a tile once, survives a replica
killed mid-fetch, and fails closed (hits still served) while Redis is down."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import aiohttp
import mercantile
import redis.asyncio as aioredis

from gateway.emulator import FAULTS_KEY, LIMITS_KEY, Fault
from tests.conftest import PLANTED_KEY, Emulator, RedisServer, config_with, needs_redis
from tests.test_cli import free_port, running, wait_healthy

pytestmark = needs_redis

OLINDA = "/tiles/olinda/13/3302/4278.png"
OLINDA_BOUNDS = (-34.916589, -8.040927, -34.825966, -7.949822)
NO_CLIENT_LIMIT = ('rate_limit = "200/second"', 'rate_limit = "off"')
TIMEOUT = aiohttp.ClientTimeout(total=30)


@asynccontextmanager
async def fleet(
    upstream: Emulator, config: Path, redis_url: str, tmp_path: Path, replicas: int = 3
) -> AsyncIterator[list[tuple[str, asyncio.subprocess.Process]]]:
    """``replicas`` processes of ``geopera-gateway serve``, each with its own cache
    directory, all on ``redis_url``; yields ``(base URL, process)`` for each, healthy."""
    async with AsyncExitStack() as stack:

        async def start(n: int) -> tuple[str, asyncio.subprocess.Process]:
            port = free_port()
            env = {
                "GEOPERA_BASE_URL": upstream.url,
                "GEOPERA_API_KEY": PLANTED_KEY,
                "GEOPERA_CACHE_DIR": str(tmp_path / f"replica-{n}"),
                "GATEWAY_REDIS_URL": redis_url,
            }
            args = ("serve", "--config", str(config), "--port", str(port), "--workers", "1")
            process, _ = await stack.enter_async_context(running(*args, env=env))
            # read its output as it comes: a full pipe would block the process on its logging
            drained = asyncio.ensure_future(drain(process))
            stack.callback(drained.cancel)
            base = f"http://127.0.0.1:{port}"
            await wait_healthy(base)
            return base, process

        yield list(await asyncio.gather(*(start(n) for n in range(replicas))))


async def drain(process: asyncio.subprocess.Process) -> None:
    """Read ``process``'s output until it ends."""
    assert process.stdout is not None
    while await process.stdout.read(1 << 16):
        pass


async def claim_holder(redis_url: str) -> int:
    """The pid of the replica holding the one claim in Redis (waits for it)."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        async with asyncio.timeout(10):
            while True:
                for key in await client.keys("ggw:claim:*"):
                    holder = await client.get(key)
                    if holder is not None:
                        return int(holder.decode().split(":")[1])
                await asyncio.sleep(0.02)
    finally:
        await client.aclose()


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, str], bytes]:
    async with session.get(url) as response:
        return response.status, dict(response.headers), await response.read()


async def test_an_overloaded_asset_keeps_the_fleet_within_its_rate(
    start_upstream, redis_server, tmp_path
):
    upstream = await start_upstream()
    upstream.app[LIMITS_KEY].asset_rps = 12  # the upstream throttles above 12 requests/s
    config = config_with(
        tmp_path,
        ("asset_rps = 10.0", "asset_rps = 10.0"),
        ("asset_burst = 20", "asset_burst = 5"),
        ("max_wait_s = 10.0", "max_wait_s = 1.0"),
        NO_CLIENT_LIMIT,
    )
    tiles = list(mercantile.tiles(*OLINDA_BOUNDS, 16))[:100]  # 10x one second of the limit
    async with (
        fleet(upstream, config, redis_server.url, tmp_path) as replicas,
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
    ):
        started = time.monotonic()
        answers = await asyncio.gather(
            *(
                get(session, f"{replicas[n % 3][0]}/tiles/olinda/16/{t.x}/{t.y}.png")
                for n, t in enumerate(tiles)
            )
        )
        elapsed = time.monotonic() - started
    statuses = [status for status, _, _ in answers]
    assert set(statuses) <= {200, 503}
    assert upstream.stats.throttled == 0  # not one upstream 429
    served = statuses.count(200)
    assert served == upstream.renders()
    # an empty Redis starts each bucket empty: at most 10/s from the first request on
    assert served <= 10 * elapsed + 1, (served, elapsed)
    assert served >= 10  # the limit's worth got through, over the replicas together
    for status, headers, _ in answers:
        if status == 503:
            assert int(headers["Retry-After"]) >= 1


async def test_one_upstream_call_for_a_tile_across_replicas_even_when_its_fetcher_dies(
    start_upstream, redis_server, tmp_path
):
    upstream = await start_upstream()
    config = config_with(tmp_path, NO_CLIENT_LIMIT, append="[state]\nlease_s = 1.0\n")
    async with (
        fleet(upstream, config, redis_server.url, tmp_path) as replicas,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=TIMEOUT) as session,
    ):
        upstream.app[FAULTS_KEY].add(Fault("hang", seconds=0.5))  # a slow render
        answers = await asyncio.gather(
            *(get(session, replicas[n % 3][0] + OLINDA) for n in range(200))
        )
        assert {status for status, _, _ in answers} == {200}
        assert len({body for _, _, body in answers}) == 1
        assert upstream.renders() == 1
        caches = {headers["X-Cache"] for _, headers, _ in answers}
        assert caches == {"MISS", "COALESCED"}

        # the replica fetching a new tile is killed: the others answer, at most one more call
        other = "/tiles/olinda/13/3302/4279.png"
        upstream.app[FAULTS_KEY].add(Fault("hang", seconds=30))  # until released
        waiting = [
            asyncio.ensure_future(get(session, replicas[n % 3][0] + other)) for n in range(30)
        ]
        try:
            pid = await claim_holder(redis_server.url)
            async with asyncio.timeout(10):  # its call has reached the upstream (and hangs)
                await upstream.app[FAULTS_KEY].drained()
            victim = next(process for _, process in replicas if process.pid == pid)
            os.kill(pid, signal.SIGKILL)
            await victim.wait()
        finally:
            answers = await asyncio.gather(*waiting, return_exceptions=True)
            upstream.app[FAULTS_KEY].release()  # the killed replica's call, still hanging
        survivors = [a for n, a in enumerate(answers) if replicas[n % 3][1] is not victim]
        assert len(survivors) == 20
        assert {a[0] for a in survivors if not isinstance(a, BaseException)} == {200}
        assert upstream.renders() <= 3  # the killed fetch, and at most one more


async def test_redis_down_serves_hits_refuses_misses_and_recovers(start_upstream, tmp_path):
    upstream = await start_upstream()
    server = RedisServer(tmp_path)
    server.start()
    config = config_with(tmp_path)  # client limits on, kept in Redis
    try:
        async with (
            fleet(upstream, config, server.url, tmp_path, replicas=2) as replicas,
            aiohttp.ClientSession(timeout=TIMEOUT) as session,
        ):
            bases = [base for base, _ in replicas]
            for base in bases:
                status, headers, _ = await get(session, base + OLINDA)
                assert status == 200
            calls = upstream.renders()
            server.stop()
            for base in bases:
                status, headers, _ = await get(session, base + OLINDA)
                assert status == 200
                assert headers["X-Cache"] == "HIT"
                status, headers, body = await get(session, base + "/tiles/olinda/14/6605/8556.png")
                assert status == 503
                assert int(headers["Retry-After"]) >= 1
                assert headers["Content-Type"].startswith("application/problem+json")
                assert PLANTED_KEY.encode() not in body
                assert server.url.encode() not in body
                status, _, body = await get(session, base + "/readyz")
                assert status == 503
                assert b"limiter state" in body
                _, _, text = await get(session, base + "/metrics")
                assert b"gateway_state_reachable 0.0" in text
            assert upstream.renders() == calls  # the upstream was not called
            server.start()  # empty
            for base in bases:
                async with asyncio.timeout(10):
                    # another process's readiness: nothing to wait on but its answer
                    while (await get(session, base + "/readyz"))[0] != 200:  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
            status, headers, body = await get(session, bases[0] + "/tiles/olinda/14/6605/8556.png")
            assert status == 200, body
            assert headers["X-Cache"] == "MISS"
    finally:
        server.stop()
