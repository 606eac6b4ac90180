"""A real non-Python client: GDAL's WMS driver (TMS service) reads a layer through the gateway."""

from __future__ import annotations

import asyncio
import os
import shutil

import numpy as np
import pytest
import rasterio

from gateway.app import create_app

pytestmark = pytest.mark.skipif(
    shutil.which("gdal_translate") is None and not os.environ.get("CI"),
    reason="GDAL command-line tools not installed (CI installs gdal-bin)",
)

WEB_MERCATOR_HALF = 20037508.342789244


def wms_xml(tile_url: str, max_level: int, bands: int) -> str:
    """GDAL_WMS description of an XYZ layer (y from the north: YOrigin top)."""
    h = WEB_MERCATOR_HALF
    return f"""<GDAL_WMS>
  <Service name="TMS"><ServerUrl>{tile_url}</ServerUrl></Service>
  <DataWindow>
    <UpperLeftX>{-h}</UpperLeftX><UpperLeftY>{h}</UpperLeftY>
    <LowerRightX>{h}</LowerRightX><LowerRightY>{-h}</LowerRightY>
    <TileLevel>{max_level}</TileLevel><TileCountX>1</TileCountX><TileCountY>1</TileCountY>
    <YOrigin>top</YOrigin>
  </DataWindow>
  <Projection>EPSG:3857</Projection>
  <BlockSizeX>256</BlockSizeX><BlockSizeY>256</BlockSizeY>
  <BandsCount>{bands}</BandsCount>
</GDAL_WMS>
"""


async def test_gdal_reads_a_window_of_a_layer_through_xyz(
    aiohttp_server, settings_for, emulator, tmp_path
):
    server = await aiohttp_server(create_app(settings_for(emulator)))
    base = f"http://127.0.0.1:{server.port}"
    xml = tmp_path / "olinda.xml"
    xml.write_text(wms_xml(base + "/tiles/olinda/${z}/${x}/${y}.png", 16, 4))
    out = tmp_path / "olinda.tif"
    # a window over Olinda (lon/lat), 512 px wide: GDAL picks zoom 13 tiles for it
    process = await asyncio.create_subprocess_exec(
        "gdal_translate",
        "-q",
        "-of",
        "GTiff",
        "-projwin_srs",
        "EPSG:4326",
        "-projwin",
        "-34.91",
        "-7.955",
        "-34.83",
        "-8.035",
        "-outsize",
        "512",
        "0",
        str(xml),
        str(out),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "GDAL_HTTP_TIMEOUT": "30", "CPL_VSIL_CURL_USE_HEAD": "NO"},
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, stderr.decode()
    with rasterio.open(out) as dataset:
        assert dataset.count == 4
        data = dataset.read()
    alpha = data[3]
    assert (alpha > 0).mean() > 0.5  # most of the window holds imagery
    rgb = data[:3][:, alpha > 0]
    assert rgb.std() > 5  # real texture, not a flat fill
    assert emulator.renders() > 0
    assert np.unique(rgb.reshape(3, -1), axis=1).shape[1] > 100
