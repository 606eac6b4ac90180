"""Tests for the Geopera API emulator (real rio-tiler rendering of the packaged sample COGs)."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from PIL import Image

from gateway.emulator import (
    SAMPLE_COGS,
    STATS_KEY,
    EmulatorStats,
    create_emulator_app,
    start_emulator,
)
from gateway.emulator.render import encode_terrain_rgb

EXAMPLES = Path(__file__).resolve().parent / "data"
"""Golden tiles from the project's sample data (tests/data/README.md)."""
BASE = "https://demo.geopera.invalid/cogs/"
OLINDA = BASE + "landsat7_olinda_6band_cog.tif"
BAHAMAS = BASE + "landsat7_bahamas_rgb_cog.tif"
DEM = BASE + "dem_mount_st_helens_cog.tif"
TOKEN = "gpra_test_key_123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RENDER = "/v1/op/cog.tile.render"
TERRAIN = "/v1/op/cog.tile.terrain"
TRUE_COLOUR = {
    "url": OLINDA,
    "z": 13,
    "x": 3302,
    "y": 4278,
    "format": "png",
    "bands": "3,2,1",
    "rescale": "20,110;25,110;45,130",
}


@pytest.fixture
async def client(aiohttp_client: Any) -> Any:
    return await aiohttp_client(create_emulator_app())


def rgba(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"), dtype=np.int32)


def example(name: str) -> np.ndarray:
    return np.asarray(Image.open(EXAMPLES / name).convert("RGBA"), dtype=np.int32)


def decode_terrain(img: np.ndarray) -> np.ndarray:
    return -10000 + (img[..., 0] * 65536 + img[..., 1] * 256 + img[..., 2]) * 0.1


async def post(client: Any, body: Any, path: str = RENDER, headers: Any = AUTH) -> Any:
    return await client.post(path, json=body, headers=headers)


def test_sample_cogs_are_packaged() -> None:
    assert set(SAMPLE_COGS) == {
        BASE + "landsat7_olinda_6band_cog.tif",
        BASE + "landsat7_bahamas_rgb_cog.tif",
        BASE + "dem_mount_st_helens_cog.tif",
    }
    assert all(path.is_file() for path in SAMPLE_COGS.values())
    assert (next(iter(SAMPLE_COGS.values())).parent / "ATTRIBUTION.md").is_file()


def test_terrain_rgb_encoding_round_trips() -> None:
    heights = np.array([[-10000.0, 0.0], [682.0, 2543.4]])
    rgb = encode_terrain_rgb(heights)
    assert rgb.shape == (3, 2, 2)
    assert rgb[:, 0, 0].tolist() == [0, 0, 0]
    np.testing.assert_allclose(decode_terrain(np.moveaxis(rgb.astype(np.int64), 0, -1)), heights)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Basic Z3ByYV94eHh4eHh4eHh4"},
        {"Authorization": "Bearer gpra_short"},
        {"Authorization": "Bearer not-a-geopera-key-123456"},
    ],
)
async def test_auth_required_and_token_not_echoed(client: Any, headers: dict[str, str]) -> None:
    resp = await post(client, TRUE_COLOUR, headers=headers)
    assert resp.status == 401
    assert resp.content_type == "application/problem+json"
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    text = await resp.text()
    for secret in ("gpra_short", "not-a-geopera-key", "Z3ByYV94"):
        assert secret not in text
    problem = await resp.json()
    assert problem["status"] == 401
    assert problem["type"].startswith("https://docs.geopera.com/errors/")


async def test_explicit_api_keys(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_emulator_app(api_keys={"secret-one"}))
    assert (await post(client, TRUE_COLOUR)).status == 401
    ok = await post(client, TRUE_COLOUR, headers={"Authorization": "Bearer secret-one"})
    assert ok.status == 200


async def test_render_true_colour_matches_example(client: Any) -> None:
    resp = await post(client, TRUE_COLOUR)
    assert resp.status == 200
    assert resp.content_type == "image/png"
    img = rgba(await resp.read())
    assert img.shape == (256, 256, 4)
    assert np.abs(img - example("olinda_truecolor_13_3302_4278.png")).mean() < 2


async def test_render_ndvi_viridis_matches_example(client: Any) -> None:
    body = {**TRUE_COLOUR, "expression": "(b4-b3)/(b4+b3)", "rescale": "-0.5,0.8"}
    del body["bands"]
    resp = await post(client, {**body, "colormap": "viridis"})
    assert resp.status == 200
    img = rgba(await resp.read())
    assert np.abs(img - example("olinda_ndvi_viridis_13_3302_4278.png")).mean() < 2


@pytest.mark.parametrize(
    ("fmt", "content_type"),
    [("jpg", "image/jpeg"), ("jpeg", "image/jpeg"), ("webp", "image/webp")],
)
async def test_render_jpeg_and_webp(client: Any, fmt: str, content_type: str) -> None:
    resp = await post(client, {**TRUE_COLOUR, "format": fmt, "quality": 80})
    assert resp.status == 200
    assert resp.content_type == content_type
    image = Image.open(io.BytesIO(await resp.read()))
    assert image.size == (256, 256)
    assert image.format == ("JPEG" if content_type == "image/jpeg" else "WEBP")


async def test_masked_pixels_alpha_in_png_webp_black_in_jpeg(client: Any) -> None:
    body = {"url": BAHAMAS, "z": 8, "x": 72, "y": 109, "format": "png", "rescale": "0,180"}
    png = rgba(await (await post(client, body)).read())
    webp = rgba(await (await post(client, {**body, "format": "webp"})).read())
    jpg_image = Image.open(io.BytesIO(await (await post(client, {**body, "format": "jpg"})).read()))
    assert jpg_image.mode == "RGB"
    jpg = np.asarray(jpg_image, dtype=np.int32)
    masked = png[..., 3] == 0
    assert 0.2 < masked.mean() < 0.5
    assert (webp[..., 3] == 0).mean() == pytest.approx(masked.mean(), abs=0.02)
    assert jpg[masked].mean() < 3


async def test_terrain_rgb_heights_match_example(client: Any) -> None:
    resp = await post(client, {"url": DEM, "z": 13, "x": 1315, "y": 2907}, path=TERRAIN)
    assert resp.status == 200
    assert resp.content_type == "image/png"
    img = rgba(await resp.read())
    assert img.shape == (256, 256, 4)
    assert (img[..., 3] == 255).all()
    heights = decode_terrain(img)
    assert heights.min() >= 682
    assert heights.max() <= 2543
    expected = decode_terrain(example("st_helens_terrainrgb_13_1315_2907.png"))
    assert np.abs(heights - expected).mean() < 10  # bilinear here vs nearest in the example


async def test_terrain_partial_tile_transparent_and_invert(client: Any) -> None:
    body = {"url": DEM, "z": 12, "x": 657, "y": 1453}
    img = rgba(await (await post(client, body, path=TERRAIN)).read())
    inverted = rgba(await (await post(client, {**body, "invert": True}, path=TERRAIN)).read())
    valid = img[..., 3] == 255
    assert 0.5 < valid.mean() < 0.95
    assert (img[~valid] == 0).all()
    np.testing.assert_allclose(decode_terrain(inverted)[valid], -decode_terrain(img)[valid])


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (RENDER, {**TRUE_COLOUR, "x": 3305}),  # outside the COG bounds
        (TERRAIN, {"url": DEM, "z": 13, "x": 1318, "y": 2908}),
        (RENDER, {"url": BAHAMAS, "z": 10, "x": 287, "y": 436, "format": "png"}),  # all masked
    ],
)
async def test_empty_tile_is_404_by_default_or_204(
    client: Any, aiohttp_client: Any, path: str, body: dict[str, Any]
) -> None:
    resp = await post(client, body, path=path)
    assert resp.status == 404
    assert resp.content_type == "application/problem+json"
    assert (await resp.json())["type"] == "https://docs.geopera.com/errors/empty-tile"
    old_style = await aiohttp_client(create_emulator_app(empty_tiles=204))
    resp = await post(old_style, body, path=path)
    assert resp.status == 204
    assert await resp.read() == b""


async def test_unknown_cog_and_empty_tile_differ_by_problem_type(client: Any) -> None:
    unknown = await (await post(client, {**TRUE_COLOUR, "url": BASE + "nope.tif"})).json()
    empty = await (await post(client, {**TRUE_COLOUR, "x": 3305})).json()
    assert unknown["status"] == empty["status"] == 404
    assert unknown["type"].endswith("/cog-not-found")
    assert empty["type"].endswith("/empty-tile")


async def test_thumbnail_is_a_jpeg_of_the_cog(client: Any) -> None:
    resp = await post(client, {"url": OLINDA, "width": 64, "height": 48}, "/v1/op/cog.thumbnail")
    assert resp.status == 200
    assert resp.content_type == "image/jpeg"
    image = Image.open(io.BytesIO(await resp.read()))
    assert image.format == "JPEG"
    assert image.size == (64, 48)
    assert np.asarray(image).std() > 5  # imagery, not a flat fill
    dem = await post(client, {"url": DEM}, "/v1/op/cog.thumbnail")
    assert max(Image.open(io.BytesIO(await dem.read())).size) == 256
    assert (await post(client, {"url": BASE + "nope.tif"}, "/v1/op/cog.thumbnail")).status == 404
    assert (await post(client, {"url": DEM, "width": 0}, "/v1/op/cog.thumbnail")).status == 422


async def test_scopes_per_key_and_session_tokens(aiohttp_client: Any) -> None:
    keys = ["gpra_tiles_only_key_1=tiles:read", "gpra_everything_key_2", "sess.abc=clip:read"]
    app = create_emulator_app(api_keys=keys)
    scoped = await aiohttp_client(app)
    tiles_only = {"Authorization": "Bearer gpra_tiles_only_key_1"}
    assert (await post(scoped, TRUE_COLOUR, headers=tiles_only)).status == 200
    job = {"job_id": "0f0e0d0c-0b0a-4908-8706-050403020100"}
    refused = await post(scoped, job, "/v1/op/clip.job.get", headers=tiles_only)
    assert refused.status == 403
    problem = await refused.json()
    assert problem["type"].endswith("/insufficient-scope")
    assert "clip:read" in problem["detail"]
    session = {"Authorization": "Bearer sess.abc"}
    assert (await post(scoped, TRUE_COLOUR, headers=session)).status == 403
    everything = {"Authorization": "Bearer gpra_everything_key_2"}
    assert (await post(scoped, TRUE_COLOUR, headers=everything)).status == 200
    default = await aiohttp_client(create_emulator_app())
    jwt = {"Authorization": "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJkZW1vIn0.c2lnbmF0dXJlLXg"}
    assert (await post(default, TRUE_COLOUR, headers=jwt)).status == 200
    assert (
        await post(default, TRUE_COLOUR, headers={"Authorization": "Bearer a.b.c"})
    ).status == 401


async def test_resource_path_alias(client: Any) -> None:
    resp = await post(client, TRUE_COLOUR, path="/v1/cog/tile/render")
    assert resp.status == 200
    assert resp.content_type == "image/png"
    terrain = {"url": DEM, "z": 13, "x": 1315, "y": 2907}
    assert (await post(client, terrain, path="/v1/cog/tile/terrain")).status == 200


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"z": None}, "z"),
        ({"format": "gif"}, "format"),
        ({"x": "3302"}, "x"),
        ({"expression": "b1*2"}, None),  # bands and expression together
        ({"z": 31}, "z"),
        ({"x": 8192}, "x"),  # 2**13
        ({"rescale": "20,110;25"}, "rescale"),
        ({"colormap": "no-such-map", "bands": "4"}, "colormap"),
        ({"bands": "7,2,1"}, "bands"),
        ({"quality": 0}, "quality"),
    ],
)
async def test_validation_errors_are_422(
    client: Any, change: dict[str, Any], field: str | None
) -> None:
    body = {k: v for k, v in {**TRUE_COLOUR, **change}.items() if v is not None}
    resp = await post(client, body)
    assert resp.status == 422
    assert resp.content_type == "application/json"
    detail = (await resp.json())["detail"]
    expected_loc = ["body"] if field is None else ["body", field]
    assert any(entry["loc"] == expected_loc for entry in detail), detail
    assert all({"loc", "msg", "type"} <= entry.keys() for entry in detail)


async def test_bad_json_is_400(client: Any) -> None:
    resp = await client.post(RENDER, data=b"{not json", headers=AUTH)
    assert resp.status == 400
    assert resp.content_type == "application/problem+json"


async def test_not_found_and_method_not_allowed(client: Any) -> None:
    unknown_cog = await post(client, {**TRUE_COLOUR, "url": BASE + "nope.tif"})
    assert unknown_cog.status == 404
    assert unknown_cog.content_type == "application/problem+json"
    assert (await post(client, {}, path="/v1/op/cog.nothing")).status == 404
    route = await client.get("/nowhere")
    assert route.status == 404
    assert route.content_type == "application/problem+json"
    method = await client.get(RENDER, headers=AUTH)
    assert method.status == 405
    assert method.content_type == "application/problem+json"


async def test_stats_count_per_operation(client: Any) -> None:
    stats = client.app[STATS_KEY]
    assert isinstance(stats, EmulatorStats)
    await post(client, TRUE_COLOUR)
    await post(client, TRUE_COLOUR, headers={})
    await post(client, {**TRUE_COLOUR, "x": 3305})
    await post(client, {"url": DEM, "z": 13, "x": 1315, "y": 2907}, path="/v1/cog/tile/terrain")
    assert stats.calls == {"cog.tile.render": 3, "cog.tile.terrain": 1}
    assert stats.statuses[("cog.tile.render", 200)] == 1
    assert stats.statuses[("cog.tile.render", 401)] == 1
    assert stats.statuses[("cog.tile.render", 404)] == 1
    assert stats.log[0] == ("cog.tile.render", TRUE_COLOUR, 200)
    assert stats.log[1] == ("cog.tile.render", None, 401)

    over_http = await (await client.get("/_emulator/stats")).json()
    assert over_http["calls"] == {"cog.tile.render": 3, "cog.tile.terrain": 1}
    assert over_http["statuses"]["cog.tile.render 404"] == 1
    assert (await client.post("/_emulator/reset")).status == 200
    assert not stats.calls
    assert not stats.log
    assert (await (await client.get("/_emulator/stats")).json())["calls"] == {}


async def test_delay_ms(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_emulator_app(delay_ms=300))
    started = time.perf_counter()
    resp = await post(client, {**TRUE_COLOUR, "x": 3305})
    assert resp.status == 404
    assert time.perf_counter() - started >= 0.3


async def test_start_emulator_picks_free_port() -> None:
    runner, url = await start_emulator(port=0)
    try:
        port = int(url.rsplit(":", 1)[1])
        assert port > 0
        assert url == f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession(url) as session:
            resp = await session.post(RENDER, json=TRUE_COLOUR, headers=AUTH)
            assert resp.status == 200
            assert resp.content_type == "image/png"
    finally:
        await runner.cleanup()
