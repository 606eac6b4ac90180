"""Egress limits of the Geopera emulator: per-asset rate limit and bandwidth circuit breaker.

The rules come from the Geopera docs (Clipping guide, Managing data guide): downloads are
"subject to per-asset rate limits and a per-organization bandwidth circuit breaker. A 429 means
you have hit a download limit".
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import gateway.emulator.__main__ as emulator_main
from gateway.emulator import (
    DEFAULT_ASSET_RPS,
    DEFAULT_BANDWIDTH,
    LIMITS_KEY,
    STATS_KEY,
    EgressLimits,
    create_emulator_app,
    start_emulator,
)
from gateway.emulator.protocol import ProblemError

BASE = "https://demo.geopera.invalid/cogs/"
BAHAMAS = BASE + "landsat7_bahamas_rgb_cog.tif"
OLINDA = BASE + "landsat7_olinda_6band_cog.tif"
DEM = BASE + "dem_mount_st_helens_cog.tif"
AUTH = {"Authorization": "Bearer gpra_test_key_123456"}
RENDER = "/v1/op/cog.tile.render"
TERRAIN = "/v1/op/cog.tile.terrain"
TILE = {"url": BAHAMAS, "z": 9, "x": 145, "y": 220, "format": "png"}
OLINDA_TILE = {"url": OLINDA, "z": 13, "x": 3302, "y": 4278, "format": "png", "bands": "3,2,1"}
DEM_TILE = {"url": DEM, "z": 13, "x": 1315, "y": 2907}
ERRORS = "https://docs.geopera.com/errors/"


async def render(client: Any, body: Any = TILE, headers: Any = AUTH, path: str = RENDER) -> Any:
    resp = await client.post(path, json=body, headers=headers)
    await resp.read()
    return resp


async def problem(resp: Any) -> dict[str, Any]:
    assert resp.content_type == "application/problem+json"
    return await resp.json(content_type=None)


def retry_after(resp: Any) -> int:
    value = int(resp.headers["Retry-After"])
    assert value >= 1
    return value


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --- EgressLimits on a fake monotonic clock ---------------------------------------------


def test_asset_bucket_burst_refill_and_retry_after() -> None:
    clock = FakeClock()
    limits = EgressLimits(asset_rps=2, bandwidth=None, clock=clock)
    limits.admit("a")
    limits.admit("a")
    with pytest.raises(ProblemError) as exc:
        limits.admit("a")
    assert exc.value.status == 429
    assert exc.value.slug == "asset-rate-limited"
    assert exc.value.headers["Retry-After"] == "1"
    limits.admit("b")  # another asset has its own bucket
    clock.now += 0.5  # one token back at 2 requests/s
    limits.admit("a")
    with pytest.raises(ProblemError):
        limits.admit("a")


def test_slow_asset_rate_gives_longer_retry_after() -> None:
    clock = FakeClock()
    limits = EgressLimits(asset_rps=0.25, bandwidth=None, clock=clock)
    limits.admit("a")  # capacity is max(1, rate): one request
    with pytest.raises(ProblemError) as exc:
        limits.admit("a")
    assert exc.value.headers["Retry-After"] == "4"
    clock.now += 4
    limits.admit("a")


def test_bandwidth_bucket_goes_negative_then_refills() -> None:
    clock = FakeClock()
    limits = EgressLimits(asset_rps=None, bandwidth=1000, clock=clock)
    limits.admit("a")
    limits.account(3500)  # allowed while positive; now at -2500 bytes
    with pytest.raises(ProblemError) as exc:
        limits.admit("b")
    assert exc.value.slug == "bandwidth-circuit-open"
    assert exc.value.title == "Bandwidth circuit breaker open"
    assert "bandwidth circuit breaker" in exc.value.detail
    assert exc.value.headers["Retry-After"] == "3"  # positive again after 2.5 s
    clock.now += 2.5
    with pytest.raises(ProblemError):
        limits.admit("b")  # exactly 0 bytes: not yet
    clock.now += 0.5
    limits.admit("b")


def test_zero_or_none_disables_and_bad_values_are_refused() -> None:
    clock = FakeClock()
    for off in (0, None):
        limits = EgressLimits(asset_rps=off, bandwidth=off, clock=clock)
        limits.account(10**12)
        for _ in range(100):
            limits.admit("a")
        assert limits.as_json() == {"asset_rps": None, "bandwidth": None}
    for bad in (-1, float("nan"), float("inf"), "5", True):
        with pytest.raises(ValueError, match=r"^asset_rps must be a"):
            EgressLimits(asset_rps=bad)
        with pytest.raises(ValueError, match=r"^bandwidth must be a"):
            EgressLimits(bandwidth=bad)


def test_setting_a_limit_refills_its_buckets() -> None:
    clock = FakeClock()
    limits = EgressLimits(asset_rps=1, bandwidth=100, clock=clock)
    limits.admit("a")
    limits.account(10_000)
    limits.asset_rps = 1
    limits.bandwidth = 100
    limits.admit("a")


# --- Over HTTP ----------------------------------------------------------------------------


async def test_asset_rate_limit_burst(aiohttp_client: Any) -> None:
    app = create_emulator_app(asset_rps=2)
    client = await aiohttp_client(app)
    burst = await asyncio.gather(*(render(client) for _ in range(5)))
    limited = [resp for resp in burst if resp.status == 429]
    assert {resp.status for resp in burst} == {200, 429}
    assert 1 <= len(limited) <= 3  # a burst of two, then 2 requests/s
    body = await problem(limited[0])
    assert body["type"] == ERRORS + "asset-rate-limited"
    assert body["status"] == 429
    wait = max(retry_after(resp) for resp in limited)
    assert wait == 1  # at 2 requests/s one token is back within 0.5 s

    assert (await render(client, OLINDA_TILE)).status == 200  # other asset unaffected

    await asyncio.sleep(wait)
    assert (await render(client)).status == 200  # the asset works again
    assert (await render(client, DEM_TILE, path=TERRAIN)).status == 200

    stats = app[STATS_KEY]
    assert stats.statuses[("cog.tile.render", 429)] == len(limited)
    assert stats.throttled == len(limited)
    over_http = await (await client.get("/_emulator/stats")).json()
    assert over_http["throttled"] == len(limited)
    assert over_http["statuses"]["cog.tile.render 429"] == len(limited)


async def test_bandwidth_circuit_breaker(aiohttp_client: Any) -> None:
    app = create_emulator_app(bandwidth=50_000)
    client = await aiohttp_client(app)
    first = await render(client)
    assert first.status == 200
    assert len(await first.read()) > 50_000  # one z9 tile overdraws the 1 s budget
    for body in (OLINDA_TILE, TILE, {**TILE, "format": "jpeg"}):
        resp = await render(client, body)
        assert resp.status == 429
        doc = await problem(resp)
        assert doc["type"] == ERRORS + "bandwidth-circuit-open"
        assert doc["title"] == "Bandwidth circuit breaker open"
        assert "bandwidth circuit breaker" in doc["detail"]
        assert retry_after(resp) >= 2  # the tile was over twice the budget
    assert (await render(client, DEM_TILE, path=TERRAIN)).status == 429  # across operations
    assert app[STATS_KEY].throttled == 4
    assert (await (await client.get("/_emulator/stats")).json())["throttled"] == 4

    app[LIMITS_KEY].bandwidth = DEFAULT_BANDWIDTH  # tests may lift the limit at run time
    assert (await render(client)).status == 200


async def test_defaults_do_not_throttle_a_few_requests(aiohttp_client: Any) -> None:
    app = create_emulator_app()
    limits = app[LIMITS_KEY]
    assert (limits.asset_rps, limits.bandwidth) == (DEFAULT_ASSET_RPS, DEFAULT_BANDWIDTH)
    assert (DEFAULT_ASSET_RPS, DEFAULT_BANDWIDTH) == (50.0, 50_000_000)
    client = await aiohttp_client(app)
    for _ in range(8):
        assert (await render(client)).status == 200
    assert app[STATS_KEY].throttled == 0
    assert (await (await client.get("/_emulator/stats")).json())["throttled"] == 0


async def test_invalid_requests_do_not_consume_tokens(aiohttp_client: Any) -> None:
    app = create_emulator_app(asset_rps=1, bandwidth=None)
    client = await aiohttp_client(app)
    for _ in range(3):
        assert (await render(client, headers={})).status == 401
        assert (await render(client, {**TILE, "x": 999})).status == 422
        assert (await render(client, {**TILE, "format": "gif"})).status == 422
        assert (await render(client, {**TILE, "url": BASE + "nope.tif"})).status == 404
        assert (await render(client, {**TILE, "bands": "7"})).status == 422  # found rendering
    assert (await render(client)).status == 200  # the single token was still there
    assert (await render(client)).status == 429
    assert app[STATS_KEY].throttled == 1


async def test_auth_and_validation_come_before_the_breaker(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_emulator_app(bandwidth=50_000))
    assert (await render(client)).status == 200  # breaker now open
    assert (await render(client, headers={})).status == 401
    assert (await render(client, {**TILE, "z": 99})).status == 422
    assert (await render(client)).status == 429


async def test_limits_endpoint(aiohttp_client: Any) -> None:
    app = create_emulator_app()
    client = await aiohttp_client(app)
    resp = await client.post("/_emulator/limits", json={"asset_rps": 5, "bandwidth": 1000000})
    assert resp.status == 200
    assert await resp.json() == {"asset_rps": 5.0, "bandwidth": 1000000.0}
    assert (app[LIMITS_KEY].asset_rps, app[LIMITS_KEY].bandwidth) == (5.0, 1_000_000.0)
    assert await (await client.get("/_emulator/limits")).json() == {
        "asset_rps": 5.0,
        "bandwidth": 1000000.0,
    }
    resp = await client.post("/_emulator/limits", json={"asset_rps": None})
    assert await resp.json() == {"asset_rps": None, "bandwidth": 1000000.0}
    for bad in ({"asset_rps": -1}, {"bandwidth": "lots"}, {"burst": 3}, [1]):
        resp = await client.post("/_emulator/limits", json=bad)
        assert resp.status == 400
        assert (await problem(resp))["type"] == ERRORS + "invalid-limits"
    assert app[LIMITS_KEY].as_json() == {"asset_rps": None, "bandwidth": 1000000.0}

    await client.post("/_emulator/limits", json={"asset_rps": 1, "bandwidth": 0})
    assert (await render(client)).status == 200
    assert (await render(client)).status == 429
    await client.post("/_emulator/limits", json={})  # refills the buckets
    assert (await render(client)).status == 200


async def test_start_emulator_and_cli_pass_the_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    runner, _url = await start_emulator(asset_rps=3, bandwidth=0)
    try:
        assert runner.app[LIMITS_KEY].as_json() == {"asset_rps": 3.0, "bandwidth": None}
    finally:
        await runner.cleanup()
    with pytest.raises(ValueError, match="asset_rps must be a finite number >= 0"):
        create_emulator_app(asset_rps=-1)

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr("gateway.emulator.run_emulator", lambda *a, **kw: calls.append(kw))
    emulator_main.main(["--asset-rps", "7.5", "--bandwidth", "1000"])
    emulator_main.main([])
    assert (calls[0]["asset_rps"], calls[0]["bandwidth"]) == (7.5, 1000.0)
    assert (calls[1]["asset_rps"], calls[1]["bandwidth"]) == (DEFAULT_ASSET_RPS, DEFAULT_BANDWIDTH)


def test_gateway_cli_defaults_match_the_emulator():
    from gateway.cli.main import build_parser
    from gateway.emulator import DEFAULT_ASSET_RPS, DEFAULT_BANDWIDTH, DEFAULT_CLIP_DELAY_S

    args = build_parser().parse_args(["emulator"])
    assert (args.asset_rps, args.bandwidth) == (DEFAULT_ASSET_RPS, DEFAULT_BANDWIDTH)
    assert args.clip_delay_s == DEFAULT_CLIP_DELAY_S
