"""Three gateway processes, each with its own local cache, sharing one real redis-server and
one emulator: the fleet keeps one upstream rate, fetches a tile once, survives a replica
killed mid-fetch, and fails closed (hits still served) while Redis is down."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import aiohttp
import mercantile
import redis.asyncio as aioredis

from gateway.emulator import FAULTS_KEY, LIMITS_KEY, Fault
from gateway.secrets import Secret
from gateway.services.peers import peer_token
from tests.conftest import PLANTED_KEY, TOKENS, Emulator, RedisServer, config_with, needs_redis
from tests.test_cli import free_port, running, wait_healthy
from tests.test_download_faults import read_until_cut
from tests.test_downloads import create_job, downloads, upstream_bytes

pytestmark = needs_redis

OLINDA = "/tiles/olinda/13/3302/4278.png"
OLINDA_BOUNDS = (-34.916589, -8.040927, -34.825966, -7.949822)
NO_CLIENT_LIMIT = ('rate_limit = "200/second"', 'rate_limit = "off"')
TIMEOUT = aiohttp.ClientTimeout(total=30)
DOWNLOADS = {"Authorization": f"Bearer {TOKENS['downloads']}"}


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
                "GATEWAY_PEER_URL": f"http://127.0.0.1:{port}",
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
    """Read ``process``'s output until it ends, into the test's captured stderr (shown when
    the test fails)."""
    assert process.stdout is not None
    while data := await process.stdout.read(1 << 16):
        sys.stderr.write(data.decode(errors="replace"))


async def claim_holder(redis_url: str, pattern: str = "ggw:claim:*") -> str:
    """The owner token of the one claim matching ``pattern`` in Redis (waits for it)."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        async with asyncio.timeout(10):
            while True:
                for key in await client.keys(pattern):
                    holder = await client.get(key)
                    if holder is not None:
                        return str(holder.decode())
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
            pid = int((await claim_holder(redis_server.url)).split(":")[1])
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


async def first_bytes(
    session: aiohttp.ClientSession, url: str
) -> tuple[aiohttp.ClientResponse, bytes]:
    """A download's response once its first body bytes have arrived, and those bytes."""
    response = await session.get(url, headers=DOWNLOADS)
    assert response.status == 200, await response.text()
    return response, await response.content.readany()


async def rest_of(started: tuple[aiohttp.ClientResponse, bytes]) -> tuple[bytes, bool]:
    """Every body byte of a download :func:`first_bytes` started, and whether the connection
    was cut short."""
    response, first = started
    try:
        rest, cut = await read_until_cut(response)
    finally:
        response.release()
    return first + rest, cut


async def test_a_clip_file_crosses_the_upstream_once_for_the_fleet_even_when_its_fetcher_dies(
    start_upstream, redis_server, tmp_path
):
    upstream = await start_upstream(clip_delay_s=0)
    faults = upstream.app[FAULTS_KEY]
    config = config_with(tmp_path, NO_CLIENT_LIMIT, append="[state]\nlease_s = 1.0\n")
    size = 3_000_000
    job_id, other_job = [await create_job(upstream, f"synthetic-{size}") for _ in range(2)]
    whole = await upstream_bytes(upstream, job_id, "data")
    async with (
        fleet(upstream, config, redis_server.url, tmp_path) as replicas,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=TIMEOUT) as session,
    ):
        bases = [base for base, _ in replicas]
        before = downloads(upstream)
        # the upstream sends 1 MB, then holds the rest until released: 30 downloads, spread
        # over the three replicas, all start while the one transfer runs
        faults.add(Fault("stall", operation="clip.job.download", bytes=1_000_000))
        path = f"/downloads/{job_id}/data"
        started = [await first_bytes(session, bases[0] + path)]
        started += await asyncio.gather(
            *(first_bytes(session, bases[n % 3] + path) for n in range(1, 30))
        )
        faults.release()
        bodies = await asyncio.gather(*(rest_of(r) for r in started))
        assert {len(body) for body, _ in bodies} == {size}
        assert all(body == whole and not cut for body, cut in bodies)
        assert downloads(upstream) == before + 1  # one upstream transfer for the fleet
        caches = [r.headers["X-Cache"] for r, _ in started]
        assert caches[0] == "MISS"
        assert set(caches[1:]) == {"COALESCED"}
        for base in bases:  # every replica stored its own copy
            status, headers, body = await get_file(session, base + path)
            assert (status, headers["X-Cache"], body) == (200, "HIT", whole)
        assert downloads(upstream) == before + 1

        # a file one replica has stored: another streams it from there, not the upstream
        stored_path = f"/downloads/{await create_job(upstream, 'synthetic-200000')}/data"
        _, _, stored = await get_file(session, bases[1] + stored_path)
        before = downloads(upstream)
        status, headers, body = await get_file(session, bases[2] + stored_path)
        assert (status, headers["X-Cache"], body) == (200, "COALESCED", stored)
        assert downloads(upstream) == before

        # the replica fetching another file is killed midway: the others' clients get a cut
        # body (never a whole-looking one), and their next request costs one more transfer
        faults.add(Fault("stall", operation="clip.job.download", bytes=1_000_000))
        path = f"/downloads/{other_job}/data"
        first = await first_bytes(session, bases[0] + path)
        fetcher = (await claim_holder(redis_server.url, "ggw:file-claim:*")).split(" ")[0]
        victim = next(process for base, process in replicas if base == fetcher)
        survivors = [base for base in bases if base != fetcher]
        pulling = [await first_bytes(session, base + path) for base in survivors]
        os.kill(victim.pid, signal.SIGKILL)
        await victim.wait()
        faults.release()  # the killed replica's transfer, still held at the upstream
        for body, cut in [await rest_of(r) for r in [first, *pulling]]:
            assert cut
            assert len(body) < size
        before = downloads(upstream)
        answers = await asyncio.gather(*(get_file(session, base + path) for base in survivors))
        other_whole = await upstream_bytes(upstream, other_job, "data")
        assert [(status, body) for status, _, body in answers] == [(200, other_whole)] * 2
        assert downloads(upstream) == before + 1 + 1  # one transfer, and upstream_bytes


async def get_file(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, str], bytes]:
    async with session.get(url, headers=DOWNLOADS) as response:
        return response.status, dict(response.headers), await response.read()


async def test_the_peer_route_answers_only_the_fleet_and_never_calls_the_upstream(
    gateway_for, start_upstream, redis_server, tmp_path
):
    emulator = await start_upstream(clip_delay_s=0)
    fleet_config = config_with(
        tmp_path,
        append=f'[state]\nredis_url = "{redis_server.url}"\npeer_url = "http://127.0.0.1:9"\n',
    )
    client = await gateway_for(emulator, config=fleet_config)
    job_id = await create_job(emulator, "synthetic-100000")
    path = f"/fleet/downloads/{job_id}/data"
    right = f"Bearer {peer_token(Secret(PLANTED_KEY)).reveal()}"
    for header in (None, "Bearer wrong", f"Bearer {TOKENS['downloads']}", right.upper()):
        response = await client.get(path, headers={"Authorization": header} if header else {})
        assert response.status == 401, await response.text()
        assert response.content_type == "application/problem+json"
    response = await client.get(path, headers={"Authorization": right})
    assert response.status == 404  # not held here, and not fetched for the asker
    assert downloads(emulator) == 0
    assert emulator.stats.calls["clip.job.get"] == 0
    assert (await client.get(path + "?job=1", headers={"Authorization": right})).status == 400

    # a download through the gateway stores the file: then the peer route sends it
    response = await client.get(f"/downloads/{job_id}/data", headers=DOWNLOADS)
    whole = await response.read()
    response = await client.get(path, headers={"Authorization": right})
    assert (response.status, await response.read()) == (200, whole)
    assert response.headers["Repr-Digest"].startswith("sha-256=:")
    assert downloads(emulator) == 1

    alone = await gateway_for(emulator)  # no fleet: no such route
    response = await alone.get(path, headers={"Authorization": right})
    assert response.status == 404
