"""XYZ tiles through the gateway against the bundled emulator as a real HTTP server."""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
from urllib.parse import urlsplit

import aiohttp
import numpy as np
import psutil
import pytest
from PIL import Image

from gateway.http.keys import LAYERS, TILE_SERVICE
from gateway.services import tiles as tiles_service
from gateway.services.tiles import TileAddress
from gateway.upstream import local as local_state
from tests.conftest import PLANTED_KEY, config_with

OLINDA = "/tiles/olinda/13/3302/4278.png"  # fully covered (shared/data README)


def decode(body: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(body))
    image.load()
    return image


async def test_miss_then_hit_crosses_upstream_once(gateway, emulator):
    first = await gateway.get(OLINDA)
    assert first.status == 200
    assert first.headers["X-Cache"] == "MISS"
    assert first.headers["Content-Type"] == "image/png"
    assert first.headers["Cache-Control"].startswith("public, max-age=")
    body = await first.read()
    image = decode(body)
    assert image.size == (256, 256)
    assert np.asarray(image.convert("RGB")).std() > 5  # real imagery, not a flat tile

    second = await gateway.get(OLINDA)
    assert second.headers["X-Cache"] == "HIT"
    assert await second.read() == body
    assert second.headers["ETag"] == first.headers["ETag"]
    assert emulator.stats.calls["cog.tile.render"] == 1
    op, sent, status = emulator.stats.log[-1]
    assert (op, status) == ("cog.tile.render", 200)
    assert sent["z"] == 13
    assert sent["x"] == 3302
    assert sent["y"] == 4278
    assert sent["bands"] == "3,2,1"
    assert sent["format"] == "png"


async def test_if_none_match_gets_304(gateway, emulator):
    first = await gateway.get(OLINDA)
    etag = first.headers["ETag"]
    assert etag.startswith('"')
    assert not etag.startswith("W/")
    again = await gateway.get(OLINDA, headers={"If-None-Match": etag})
    assert again.status == 304
    assert await again.read() == b""
    assert again.headers["ETag"] == etag
    other = await gateway.get(OLINDA, headers={"If-None-Match": '"something-else"'})
    assert other.status == 200
    # a list and a weak tag, compared weakly (RFC 9110 section 13.1.2), as downloads do
    for value in (f'"something-else", {etag}', f"W/{etag}", "*"):
        assert (await gateway.get(OLINDA, headers={"If-None-Match": value})).status == 304, value
    assert emulator.renders() == 1


async def test_200_concurrent_requests_for_a_new_tile_make_one_upstream_call(
    gateway_for, start_upstream, tmp_path
):
    slow = await start_upstream(delay_ms=300)
    no_client_limit = config_with(tmp_path, ('rate_limit = "200/second"', 'rate_limit = "off"'))
    client = await gateway_for(slow, config=no_client_limit)
    url = client.make_url(OLINDA)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        responses = await asyncio.gather(*(session.get(url) for _ in range(200)))
        bodies = {await r.read() for r in responses}
    assert [r.status for r in responses] == [200] * 200
    assert len(bodies) == 1
    caches = [r.headers["X-Cache"] for r in responses]
    # connections past the test server's accept backlog (128) arrive after the fetch: HIT
    assert caches.count("MISS") == 1
    assert caches.count("COALESCED") >= 100
    assert caches.count("COALESCED") + caches.count("HIT") == 199
    assert slow.renders() == 1


def _waiting_upstream_bytes(port: int) -> bytes:
    """What the gateway has sent, unread so far, on its connections to the in-process
    upstream listening on ``port`` (peeked at on the upstream's side, in the kernel: the
    upstream's own reads happen only when the event loop polls)."""
    pending = b""
    for conn in psutil.Process().net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == "ESTABLISHED":
            with (
                socket.fromfd(conn.fd, socket.AF_INET, socket.SOCK_STREAM) as sock,
                contextlib.suppress(BlockingIOError),  # nothing waiting on this one
            ):
                pending += sock.recv(1 << 16, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    return pending


async def test_a_new_tiles_upstream_request_is_written_before_its_burst_is_taken_in(
    gateway, emulator, monkeypatch
):
    """50 requests for a new tile, all queued on the event loop at once (a burst read in one
    go): the first one's upstream request has reached the upstream before the last of them
    reaches the tile service (not after every request of the burst has been taken as far
    as it goes), and the burst costs one upstream call. (The claim and the admission are
    waited for without a time limit here: on a busy machine the I/O thread may take longer
    than the few milliseconds the loop waits for it; that fallback is the next test's.)"""
    monkeypatch.setattr(tiles_service, "PROMPT_WAIT_S", 30.0)
    monkeypatch.setattr(local_state, "PROMPT_WAIT_S", 30.0)
    assert (await gateway.get(OLINDA)).status == 200  # a pooled upstream connection
    service, layer = gateway.app[TILE_SERVICE], gateway.app[LAYERS]["olinda"]
    address = TileAddress(layer, 13, 3303, 4278, 1, "png")
    port = urlsplit(emulator.url).port
    assert _waiting_upstream_bytes(port) == b""
    renders = emulator.renders()
    seen: list[bytes] = []

    async def last():
        seen.append(_waiting_upstream_bytes(port))
        return await service.get(address)

    results = await asyncio.gather(*(service.get(address) for _ in range(49)), last())
    assert seen[0].startswith(b"POST /v1/op/cog.tile.render ")
    assert [r.cache_status for r in results] == ["MISS"] + ["COALESCED"] * 49
    assert len({r.tile.body for r in results}) == 1
    assert emulator.renders() == renders + 1


@pytest.mark.parametrize("wait_s", [0.0, 30.0])
async def test_a_miss_whose_prompt_wait_runs_out_goes_on_as_any_other(
    gateway, emulator, monkeypatch, wait_s
):
    """When the loop's brief wait for the claim and the admission runs out (here: at once),
    the miss goes on through the event loop as before: one upstream call for a burst, the
    claim given back, and the tile cached."""
    monkeypatch.setattr(tiles_service, "PROMPT_WAIT_S", wait_s)
    monkeypatch.setattr(local_state, "PROMPT_WAIT_S", wait_s)
    assert (await gateway.get(OLINDA)).status == 200
    service, layer = gateway.app[TILE_SERVICE], gateway.app[LAYERS]["olinda"]
    address = TileAddress(layer, 13, 3303, 4278, 1, "png")
    renders = emulator.renders()
    results = await asyncio.gather(*(service.get(address) for _ in range(20)))
    assert sorted(r.cache_status for r in results) == ["COALESCED"] * 19 + ["MISS"]
    assert emulator.renders() == renders + 1
    again = await gateway.get("/tiles/olinda/13/3303/4278.png")
    assert again.headers["X-Cache"] == "HIT"
    assert emulator.renders() == renders + 1


async def test_a_cancelled_first_request_leaves_the_fetch_to_the_others(gateway, emulator):
    """The request whose miss started the fetch is cancelled (its handler stopped) while
    the upstream call is under way: the others still get the tile, from that one call, and
    the tile is cached."""
    assert (await gateway.get(OLINDA)).status == 200
    service, layer = gateway.app[TILE_SERVICE], gateway.app[LAYERS]["olinda"]
    address = TileAddress(layer, 13, 3303, 4278, 1, "png")
    renders = emulator.renders()
    first, *others = [asyncio.ensure_future(service.get(address)) for _ in range(20)]
    await asyncio.sleep(0)  # every request has reached the service
    assert not first.done()
    first.cancel()
    results = await asyncio.gather(*others)
    assert first.cancelled()
    assert [r.cache_status for r in results] == ["COALESCED"] * 19
    assert emulator.renders() == renders + 1
    again = await gateway.get("/tiles/olinda/13/3303/4278.png")
    assert again.headers["X-Cache"] == "HIT"
    assert emulator.renders() == renders + 1


async def test_formats_and_content_types(gateway, emulator):
    for ext, media, pil in (("jpg", "image/jpeg", "JPEG"), ("webp", "image/webp", "WEBP")):
        response = await gateway.get(f"/tiles/olinda/13/3302/4278.{ext}")
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"] == media
        assert decode(await response.read()).format == pil
    assert emulator.renders() == 2


async def test_short_form_serves_the_default_layer(gateway):
    short = await gateway.get("/tiles/13/3302/4278.png")
    named = await gateway.get(OLINDA)
    assert short.status == 200
    assert await short.read() == await named.read()


async def test_retina_2x_is_composed_from_four_children(gateway, emulator):
    response = await gateway.get("/tiles/olinda/12/1651/2139@2x.png")
    assert response.status == 200
    image = decode(await response.read())
    assert image.size == (512, 512)
    children = {(e[1]["z"], e[1]["x"], e[1]["y"]) for e in emulator.stats.log}
    assert children == {(13, 3302, 4278), (13, 3303, 4278), (13, 3302, 4279), (13, 3303, 4279)}
    # the top-left quarter is exactly the 13/3302/4278 tile
    child = decode(await (await gateway.get(OLINDA)).read()).convert("RGBA")
    quarter = image.convert("RGBA").crop((0, 0, 256, 256))
    assert np.array_equal(np.asarray(quarter), np.asarray(child))
    assert emulator.renders() == 4  # the child came from the cache


async def test_terrain_layer_uses_cog_tile_terrain(gateway, emulator):
    response = await gateway.get("/tiles/st-helens/13/1315/2907.png")
    assert response.status == 200
    rgb = np.asarray(decode(await response.read()).convert("RGBA")).astype(np.int64)
    valid = rgb[..., 3] > 0
    heights = -10000 + (rgb[..., 0] * 65536 + rgb[..., 1] * 256 + rgb[..., 2]) * 0.1
    assert valid.any()
    assert heights[valid].min() > 600
    assert heights[valid].max() < 2600
    assert emulator.stats.calls["cog.tile.terrain"] == 1
    assert "format" not in emulator.stats.log[-1][1]


async def test_outside_bounds_is_blank_without_upstream_call(gateway, emulator):
    png = await gateway.get("/tiles/olinda/13/3305/4278.png")
    assert png.status == 200
    assert png.headers["X-Cache"] == "EMPTY"
    image = decode(await png.read())
    assert image.size == (256, 256)
    assert image.mode == "RGBA"
    assert np.asarray(image)[..., 3].max() == 0  # fully transparent
    jpg = await gateway.get("/tiles/olinda/13/3305/4278.jpg")
    assert jpg.headers["Content-Type"] == "image/jpeg"
    assert np.asarray(decode(await jpg.read())).max() < 8  # black: JPEG has no alpha
    retina = await gateway.get("/tiles/olinda/13/3305/4278@2x.webp")
    assert decode(await retina.read()).size == (512, 512)
    assert emulator.renders() == 0


async def test_upstream_empty_answer_is_negatively_cached(gateway, emulator):
    # 8/72/109 overlaps the Bahamas bounds box but 8/71/109 holds only the nodata collar
    url = "/tiles/bahamas/8/71/109.png"
    first = await gateway.get(url)
    second = await gateway.get(url)
    assert first.status == second.status == 200
    assert first.headers["X-Cache"] == second.headers["X-Cache"] == "EMPTY"
    assert emulator.stats.statuses[("cog.tile.render", 404)] == 1  # 404 empty-tile
    assert emulator.renders() == 1
    max_age = int(second.headers["Cache-Control"].rsplit("=", 1)[1])
    assert 0 < max_age <= 300  # the negative TTL, not the layer's day


async def test_bad_paths_are_problems_without_upstream_calls(gateway, emulator):
    cases = {
        "/tiles/olinda/13/3302/4278.gif": 400,
        "/tiles/olinda/13/3302/-1.png": 400,
        "/tiles/olinda/013/3302/4278.png": 400,
        "/tiles/olinda/13/99999/4278.png": 400,
        "/tiles/olinda/13/3302/4278@3x.png": 400,
        "/tiles/olinda/3/3/3.png": 400,  # below minzoom
        "/tiles/olinda/17/0/0.png": 400,  # above maxzoom
        "/tiles/st-helens/13/1315/2907.jpg": 400,  # terrain is PNG only
        "/tiles/nowhere/13/3302/4278.png": 404,
        "/tiles/olinda/13/3302/4278.png/extra": 404,
    }
    for path, status in cases.items():
        response = await gateway.get(path)
        assert response.status == status, path
        assert response.headers["Content-Type"] == "application/problem+json", path
        problem = await response.json(content_type=None)
        assert problem["status"] == status, path
        assert problem["title"], path
        assert problem["detail"], path
    assert emulator.renders() == 0


async def test_changing_layer_parameters_renders_again(gateway_for, emulator, tmp_path):
    cache = tmp_path / "shared-cache"
    before = await gateway_for(emulator, cache_dir=cache)
    one = await (await before.get("/tiles/olinda-ndvi/13/3302/4278.png")).read()
    changed = config_with(tmp_path, ('colormap = "viridis"', 'colormap = "magma"'))
    after = await gateway_for(emulator, config=changed, cache_dir=cache)
    response = await after.get("/tiles/olinda-ndvi/13/3302/4278.png")
    assert response.headers["X-Cache"] == "MISS"
    assert await response.read() != one
    assert emulator.stats.log[-1][1]["colormap"] == "magma"
    assert emulator.renders() == 2


async def test_cache_survives_a_restart(gateway_for, emulator, tmp_path):
    cache = tmp_path / "persist"
    first = await gateway_for(emulator, cache_dir=cache)
    await first.get(OLINDA)
    await first.close()
    second = await gateway_for(emulator, cache_dir=cache)
    response = await second.get(OLINDA)
    assert response.headers["X-Cache"] == "HIT"
    assert emulator.renders() == 1


async def test_wrong_key_is_a_502_that_never_shows_a_key(gateway_for, emulator, caplog):
    wrong = "gpra_WRONG-but-also-secret-123"
    client = await gateway_for(emulator, api_key=wrong)
    response = await client.get(OLINDA)
    assert response.status == 502
    assert response.headers["Content-Type"] == "application/problem+json"
    text = await response.text()
    assert wrong not in text
    assert PLANTED_KEY not in text
    assert (await response.json(content_type=None))["type"].endswith("upstream-auth")
    assert any(
        r.levelname == "CRITICAL" and "GEOPERA_API_KEY" in r.getMessage() for r in caplog.records
    )
    assert wrong not in caplog.text
    again = await client.get(OLINDA)
    assert again.status == 502  # not cached
    assert emulator.renders() == 2


async def test_key_never_in_any_response(gateway, emulator):
    paths = [
        OLINDA,
        "/tiles/olinda/13/3305/4278.png",
        "/tiles/nowhere/1/1/1.png",
        "/healthz",
        "/nope",
        "/tiles/olinda/13/3302/4278@2x.webp",
    ]
    for path in paths:
        response = await gateway.get(path)
        raw = await response.read()
        assert PLANTED_KEY.encode() not in raw
        assert all(PLANTED_KEY not in v for v in response.headers.values())
