"""Terrain-RGB tiles carry a height in every pixel: nodata pixels get ``nodata_height_m``.

MapLibre's ``raster-dem`` ignores alpha, so an upstream pixel without data (transparent,
RGB 0,0,0) would read as -10,000 m. These tests decode what the gateway serves.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from gateway.config.settings import load_settings
from gateway.config.tables import ConfigError
from gateway.imaging import fill_terrain_nodata, terrain_rgb
from tests.conftest import PLANTED_KEY, config_with

EDGE_TILE = "/tiles/st-helens/11/328/727.png"
"""At the DEM's edge: 27 % of it holds data (shared/data/datasets.json)."""


def heights(body: bytes) -> np.ndarray:
    """Terrain-RGB decoded to metres (Mapbox encoding), and every pixel must be opaque."""
    image = np.asarray(Image.open(io.BytesIO(body)).convert("RGBA"), dtype=np.int64)
    assert (image[..., 3] == 255).all()
    return -10000 + (image[..., 0] * 65536 + image[..., 1] * 256 + image[..., 2]) * 0.1


def with_nodata_height(tmp_path, height: str):
    return config_with(
        tmp_path,
        ("nodata_height_m = 0 ", f"nodata_height_m = {height} "),
    )


async def test_edge_tile_nodata_is_sea_level_by_default(gateway, emulator):
    response = await gateway.get(EDGE_TILE)
    assert response.status == 200
    assert response.headers["X-Cache"] == "MISS"
    metres = heights(await response.read())
    nodata = np.isclose(metres, 0.0)
    assert 0.70 < nodata.mean() < 0.75  # the pixels outside the DEM
    assert metres[~nodata].min() > 600  # the rest is the mountain, untouched
    assert metres.min() >= 0  # no pit to -10 km anywhere


async def test_nodata_height_applies_to_partial_blank_and_retina_tiles(
    gateway_for, emulator, tmp_path
):
    client = await gateway_for(emulator, config=with_nodata_height(tmp_path, "500.5"))
    partial = heights(await (await client.get(EDGE_TILE)).read())
    assert 0.70 < np.isclose(partial, 500.5).mean() < 0.75
    assert partial.min() == pytest.approx(500.5)
    # outside the layer's bounds: a blank tile, no upstream call
    renders = emulator.renders()
    blank = await client.get("/tiles/st-helens/11/300/700.png")
    assert blank.headers["X-Cache"] == "EMPTY"
    assert emulator.renders() == renders
    assert np.allclose(heights(await blank.read()), 500.5)
    # @2x: children filled, and empty children too
    retina = await client.get("/tiles/st-helens/10/164/363@2x.png")
    assert retina.status == 200
    metres = heights(await retina.read())
    assert metres.shape == (512, 512)
    assert metres.min() == pytest.approx(500.5)
    assert np.isclose(metres, 500.5).mean() > 0.7


def test_fill_recognises_transparent_and_black_pixels():
    image = Image.new("RGBA", (4, 1), (*terrain_rgb(0), 255))
    assert terrain_rgb(0) == (1, 134, 160)
    assert terrain_rgb(1000) == (1, 173, 176)
    image.putpixel((1, 0), (7, 8, 9, 0))  # transparent
    image.putpixel((2, 0), (0, 0, 0, 255))  # -10,000 m
    image.putpixel((3, 0), (*terrain_rgb(1000), 255))
    out = io.BytesIO()
    image.save(out, "PNG")
    filled = heights(fill_terrain_nodata(out.getvalue(), -12.3))
    assert filled.ravel().tolist() == pytest.approx([0.0, -12.3, -12.3, 1000.0])
    solid = io.BytesIO()
    Image.new("RGB", (2, 2), terrain_rgb(1000)).save(solid, "PNG")
    assert fill_terrain_nodata(solid.getvalue(), 0) == solid.getvalue()  # nothing to do


@pytest.mark.parametrize(
    ("value", "message"),
    [("-10001", "must be -10000 to"), ("1667722", "must be -10000 to"), ('"low"', "a number")],
)
def test_nodata_height_is_checked(tmp_path, value, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(with_nodata_height(tmp_path, value), {"GEOPERA_API_KEY": PLANTED_KEY})


def test_nodata_height_is_for_terrain_layers_only(tmp_path):
    config = config_with(
        tmp_path, ('colormap = "viridis"\n', 'colormap = "viridis"\nnodata_height_m = 0\n')
    )
    with pytest.raises(ConfigError, match=r"layers\[1\]\.nodata_height_m: unknown key"):
        load_settings(config, {"GEOPERA_API_KEY": PLANTED_KEY})
