"""A completed clip as a tile layer: ``/tiles/clips/{job_id}/{mosaic_type}/...`` rendered
with ``clip.job.tile_info``'s parameters, through the tile cache, coalescing and limits."""

from __future__ import annotations

import asyncio
import io
import uuid

import mercantile
import numpy as np
import pytest
from PIL import Image

from gateway.services.clips import clip_layer
from tests.conftest import TOKENS
from tests.test_downloads import create_job
from tests.test_listing import settled

ST_HELENS_AOI = {
    "type": "Polygon",
    "coordinates": [
        [[-122.22, 46.16], [-122.16, 46.16], [-122.16, 46.22], [-122.22, 46.22], [-122.22, 46.16]]
    ],
}


@pytest.fixture
async def clip_emulator(start_upstream):
    return await start_upstream(clip_delay_s=0.05)


def renders(emulator) -> int:
    return emulator.renders()


def middle_tile(doc: dict) -> mercantile.Tile:
    west, south, east, north = doc["bounds"]
    return mercantile.tile((west + east) / 2, (south + north) / 2, doc["maxzoom"])


async def test_a_clip_layer_tile_is_real_imagery_cached_and_coalesced(gateway_for, clip_emulator):
    client = await gateway_for(clip_emulator, token="downloads")
    job_id = await create_job(clip_emulator)
    await settled(clip_emulator, job_id)
    base = str(client.make_url("")).rstrip("/")

    response = await client.get(f"/tiles/clips/{job_id}/rgb/tilejson.json")
    assert response.status == 200
    assert response.headers["Cache-Control"] == "private, max-age=300"
    doc = await response.json()
    assert doc["tilejson"] == "3.0.0"
    assert doc["scheme"] == "xyz"
    assert doc["tiles"] == [f"{base}/tiles/clips/{job_id}/rgb/{{z}}/{{x}}/{{y}}.png"]
    assert doc["name"] == "harbour_rgb.tif"
    west, south, east, north = doc["bounds"]
    assert -77.95 < west < east < -77.45
    assert 24.25 < south < north < 24.75
    assert 0 <= doc["minzoom"] <= doc["maxzoom"] <= 24
    assert "encoding" not in doc

    tile = middle_tile(doc)
    url = f"/tiles/clips/{job_id}/rgb/{tile.z}/{tile.x}/{tile.y}.png"
    first = await client.get(url)
    assert (first.status, first.headers["X-Cache"]) == (200, "MISS")
    assert first.headers["Content-Type"] == "image/png"
    assert first.headers["Cache-Control"].startswith("private, max-age=")
    image = np.asarray(Image.open(io.BytesIO(await first.read())).convert("RGBA"))
    alpha, rgb = image[..., 3], image[..., :3]
    assert (alpha > 0).mean() > 0.1  # the clip (at its native zoom) covers part of this tile
    assert rgb[alpha > 0].std() > 5  # texture, not a flat fill
    assert len(np.unique(rgb[alpha > 0].reshape(-1, 3), axis=0)) > 100
    _, body, _ = clip_emulator.stats.log[-1]
    assert body["url"].startswith("https://demo.geopera.invalid/clips/")  # the upstream's COG
    assert body["bands"] == "1,2,3"
    assert len(body["rescale"].split(";")) == 3

    again = await client.get(url)
    assert again.headers["X-Cache"] == "HIT"
    before = renders(clip_emulator)
    webp = f"/tiles/clips/{job_id}/rgb/{tile.z}/{tile.x}/{tile.y}.webp"  # another cache key
    burst = await asyncio.gather(*(client.get(webp) for _ in range(8)))
    assert {(r.status, r.headers["Content-Type"]) for r in burst} == {(200, "image/webp")}
    assert sorted(r.headers["X-Cache"] for r in burst).count("MISS") == 1
    assert renders(clip_emulator) == before + 1  # eight clients, one render
    retina = await client.get(f"/tiles/clips/{job_id}/rgb/{tile.z}/{tile.x}/{tile.y}@2x.png")
    assert Image.open(io.BytesIO(await retina.read())).size == (512, 512)
    assert clip_emulator.stats.calls["clip.job.tile_info"] == 1


async def test_clip_layers_take_a_query_token_and_refuse_bad_requests(gateway_for, clip_emulator):
    anonymous = await gateway_for(clip_emulator)
    job_id = await create_job(clip_emulator)
    await settled(clip_emulator, job_id)
    path = f"/tiles/clips/{job_id}/rgb/tilejson.json"
    assert (await anonymous.get(path)).status == 401
    tiles_only = await gateway_for(clip_emulator, token="tiles")
    assert (await tiles_only.get(path)).status == 403
    token = TOKENS["downloads"]
    response = await anonymous.get(path, params={"token": token})
    assert response.status == 200
    assert response.headers["Cache-Control"] == "private, no-store"
    doc = await response.json()
    assert doc["tiles"][0].endswith(f"/{{z}}/{{x}}/{{y}}.png?token={token}")
    tile = middle_tile(doc)
    tile_url = f"/tiles/clips/{job_id}/rgb/{tile.z}/{tile.x}/{tile.y}.png"
    assert (await anonymous.get(tile_url, params={"token": token})).status == 200

    client = await gateway_for(clip_emulator, token="downloads")
    for bad, status in [
        (f"/tiles/clips/not-a-uuid/rgb/{tile.z}/{tile.x}/{tile.y}.png", 400),
        (f"/tiles/clips/{job_id}/RGB/{tile.z}/{tile.x}/{tile.y}.png", 400),
        (f"/tiles/clips/{job_id}/rgb/{tile.z}/{tile.x}/{tile.y}.jpg", 400),
        (f"/tiles/clips/{job_id}/rgb/{tile.z}/{2**tile.z}/{tile.y}.png", 400),
        (f"/tiles/clips/{job_id}/rgb/30/0/0.png", 400),
        (f"/tiles/clips/{job_id}/rgb/{tile.z}/{tile.x}/{tile.y}.png?url=x", 400),
        (f"/tiles/clips/{job_id}/nir/{tile.z}/{tile.x}/{tile.y}.png", 404),
        (f"/tiles/clips/{uuid.uuid4()}/rgb/tilejson.json", 404),
    ]:
        response = await client.get(bad)
        assert response.status == status, bad
        assert response.headers["Content-Type"] == "application/problem+json", bad


async def test_dem_clips_are_terrain_and_other_files_have_no_layer(gateway_for, start_upstream):
    slow = await start_upstream(clip_delay_s=60)
    waiting = await gateway_for(slow, token="downloads")
    running = await create_job(slow)
    early = await waiting.get(f"/tiles/clips/{running}/rgb/tilejson.json")
    assert early.status == 409
    assert early.headers["Retry-After"] == "5"

    upstream = await start_upstream(clip_delay_s=0.05)
    client = await gateway_for(upstream, token="downloads")
    dem = await create_job(upstream, "st-helens", aoi_geometry=ST_HELENS_AOI)
    data = await create_job(upstream, "synthetic-1000")
    for job_id in (dem, data):
        await settled(upstream, job_id)
    doc = await (await client.get(f"/tiles/clips/{dem}/dem/tilejson.json")).json()
    assert doc["encoding"] == "mapbox"
    assert doc["tiles"][0].endswith("/{z}/{x}/{y}.png")
    tile = middle_tile(doc)
    response = await client.get(f"/tiles/clips/{dem}/dem/{tile.z}/{tile.x}/{tile.y}.png")
    assert response.status == 200
    pixels = np.asarray(Image.open(io.BytesIO(await response.read())).convert("RGBA"))
    valid = pixels[pixels[..., 3] > 0][:, :3].astype(np.int64)
    heights = -10000 + (valid[:, 0] * 65536 + valid[:, 1] * 256 + valid[:, 2]) * 0.1
    heights = heights[~np.isclose(heights, 0.0)]  # nodata pixels: the layer's 0 m, not holes
    assert heights.size > 0
    assert 500 < heights.min() < heights.max() < 3000  # Mount St. Helens, metres
    assert upstream.stats.calls["cog.tile.terrain"] == 1
    webp = await client.get(f"/tiles/clips/{dem}/dem/{tile.z}/{tile.x}/{tile.y}.webp")
    assert webp.status == 400  # Terrain-RGB is PNG only

    none = await client.get(f"/tiles/clips/{data}/data/tilejson.json")
    assert none.status == 404
    assert (await none.json())["type"].endswith("/no-clip-layer")


def test_tile_info_entries_never_carry_unknown_parameters():
    job_id = str(uuid.uuid4())
    entry = {
        "mosaic_type": "rgb",
        "operation": "cog.tile.render",
        "url": "https://demo.geopera.invalid/clips/x.tif",
        "bounds": [1, 2, 3, 4],
        "minzoom": 5,
        "maxzoom": 12,
        "render": {"bands": "1,2,3", "url": "https://evil.example/", "quality": True},
    }
    layer = clip_layer(job_id, entry)
    assert layer is not None
    assert dict(layer.render) == {"bands": "1,2,3"}
    assert layer.name == f"clips/{job_id}/rgb"
    assert layer.formats == ("png", "webp")
    assert (layer.bounds, layer.minzoom, layer.maxzoom) == ((1.0, 2.0, 3.0, 4.0), 5, 12)
    body = layer.upstream_body(12, 1, 2, "png")
    assert body["url"] == entry["url"]
    assert "evil" not in str(body)
    odd = clip_layer(job_id, {**entry, "bounds": [0, 0, float("nan"), 1], "maxzoom": 99})
    assert odd is not None
    assert odd.bounds[0] == -180.0
    assert (odd.minzoom, odd.maxzoom) == (0, 18)
    assert clip_layer(job_id, {**entry, "operation": "cog.statistics"}) is None
    assert clip_layer(job_id, {**entry, "mosaic_type": "../x"}) is None
    assert clip_layer(job_id, {**entry, "url": 7}) is None
