"""Upstream failures: each maps to a clear problem+json, and nothing that failed is cached.

Idempotent tile reads are retried (3 attempts in the demo config) on 5xx, timeouts and refused
connections, so a fault must repeat three times to reach the client.
"""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest

from gateway.emulator import FAULTS_KEY, Fault
from tests.conftest import PLANTED_KEY, config_with

OLINDA = "/tiles/olinda/13/3302/4278.png"
ATTEMPTS = 3


async def problem(response: aiohttp.ClientResponse) -> dict:
    assert response.headers["Content-Type"] == "application/problem+json"
    return await response.json(content_type=None)


async def test_a_single_5xx_is_retried_and_served(gateway, emulator):
    emulator.app[FAULTS_KEY].add(Fault("status", status=500))
    response = await gateway.get(OLINDA)
    assert response.status == 200
    assert response.headers["X-Cache"] == "MISS"
    assert emulator.stats.statuses[("cog.tile.render", 500)] == 1
    assert emulator.renders() == 2


async def test_upstream_500_after_every_retry_is_502_and_not_cached(gateway, emulator):
    emulator.app[FAULTS_KEY].add(Fault("status", status=500, count=ATTEMPTS))
    failed = await gateway.get(OLINDA)
    assert failed.status == 502
    assert (await problem(failed))["type"].endswith("upstream-error")
    assert emulator.renders() == ATTEMPTS
    recovered = await gateway.get(OLINDA)
    assert recovered.status == 200
    assert recovered.headers["X-Cache"] == "MISS"


async def test_upstream_429_is_503_with_retry_after_and_holds_off(gateway, emulator):
    emulator.app[FAULTS_KEY].add(Fault("status", status=429, retry_after="7"))
    throttled = await gateway.get(OLINDA)
    assert throttled.status == 503
    assert throttled.headers["Retry-After"] == "7"
    assert (await problem(throttled))["type"].endswith("upstream-throttled")
    assert emulator.renders() == 1  # a 429 is not retried
    held = await gateway.get(OLINDA)  # the asset's breaker is open for those 7 s
    assert held.status == 503
    assert 1 <= int(held.headers["Retry-After"]) <= 7
    assert (await problem(held))["type"].endswith("upstream-circuit-open")
    assert emulator.renders() == 1


async def test_garbage_and_wrong_content_type_are_502_and_not_cached(gateway, emulator):
    emulator.app[FAULTS_KEY].add(Fault("garbage"), Fault("wrong-type"))
    for _ in range(2):
        response = await gateway.get(OLINDA)
        assert response.status == 502
        assert (await problem(response))["type"].endswith("upstream-bad-response")
    assert (await gateway.get(OLINDA)).headers["X-Cache"] == "MISS"
    assert emulator.renders() == 3


async def test_read_timeout_is_504(gateway_for, emulator, tmp_path):
    config = config_with(tmp_path, ("read_timeout_s = 30.0", "read_timeout_s = 0.3"))
    client = await gateway_for(emulator, config=config)
    emulator.app[FAULTS_KEY].add(Fault("hang", seconds=1.0, count=ATTEMPTS))
    response = await client.get(OLINDA)
    assert response.status == 504
    assert (await problem(response))["type"].endswith("upstream-timeout")


async def test_upstream_down_is_502(gateway_for):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = await gateway_for(f"http://127.0.0.1:{port}")
    response = await client.get(OLINDA)
    assert response.status == 502
    assert "upstream" in (await problem(response))["detail"].lower()


async def test_upstream_echoing_the_key_never_reaches_client_or_log(gateway, emulator, caplog):
    emulator.app[FAULTS_KEY].add(Fault("echo-key", count=ATTEMPTS))
    response = await gateway.get(OLINDA)
    assert response.status == 502
    assert PLANTED_KEY not in await response.text()
    assert any("***" in r.getMessage() for r in caplog.records)  # redacted, but logged


async def test_coalesced_waiters_all_get_the_error_from_one_flight(gateway_for, start_upstream):
    slow = await start_upstream(delay_ms=200)
    client = await gateway_for(slow)
    slow.app[FAULTS_KEY].add(Fault("status", status=503, count=ATTEMPTS))
    responses = await asyncio.gather(*(client.get(OLINDA) for _ in range(50)))
    assert {r.status for r in responses} == {502}
    assert slow.renders() == ATTEMPTS


async def test_expired_tiles_are_fetched_again(gateway_for, emulator, tmp_path, clock):
    config = config_with(
        tmp_path,
        ("ttl_s = 86400", "ttl_s = 1"),
        ("stale_while_revalidate_s = 3600", "stale_while_revalidate_s = 0"),
    )
    client = await gateway_for(emulator, config=config, clock=clock)
    assert (await client.get(OLINDA)).headers["X-Cache"] == "MISS"
    hit = await client.get(OLINDA)
    assert hit.headers["X-Cache"] == "HIT"
    assert hit.headers["Cache-Control"] == "public, max-age=1"  # the clock stands still
    clock.advance(1.1)
    assert (await client.get(OLINDA)).headers["X-Cache"] == "MISS"
    assert emulator.renders() == 2


async def test_the_suite_wide_response_scan_catches_a_leak(emulator):
    """Guards the guard: conftest scans every response read in the suite for the key."""
    emulator.app[FAULTS_KEY].add(Fault("echo-key"))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{emulator.url}/v1/op/cog.tile.render",
            json={"url": "x", "z": 0, "x": 0, "y": 0, "format": "png"},
            headers={"Authorization": f"Bearer {PLANTED_KEY}"},
        ) as response,
    ):
        with pytest.raises(AssertionError, match="API key"):
            await response.read()  # the echoed key is caught
