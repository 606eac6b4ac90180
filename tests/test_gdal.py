"""A real non-Python client: GDAL's WMS driver (TMS service) reads a layer through the gateway,
with the README's recipe (:func:`wms_xml`)."""

from __future__ import annotations

import pytest

from gateway.app import create_app
from tests.clients import needs_gdal, read_olinda_window

pytestmark = needs_gdal

WEB_MERCATOR_HALF = 20037508.342789244


def wms_xml(tile_url: str, minzoom: int, maxzoom: int, bands: int) -> str:
    """GDAL_WMS description of an XYZ layer (y from the north: YOrigin top) served from zoom
    ``minzoom`` to ``maxzoom``: full resolution at ``TileLevel`` maxzoom and one overview per
    zoom level down to minzoom (``OverviewCount``), so a zoomed-out read never asks for a
    zoom the layer does not serve (GDAL's default is overviews down to zoom 0)."""
    h = WEB_MERCATOR_HALF
    return f"""<GDAL_WMS>
  <Service name="TMS"><ServerUrl>{tile_url}</ServerUrl></Service>
  <DataWindow>
    <UpperLeftX>{-h}</UpperLeftX><UpperLeftY>{h}</UpperLeftY>
    <LowerRightX>{h}</LowerRightX><LowerRightY>{-h}</LowerRightY>
    <TileLevel>{maxzoom}</TileLevel><TileCountX>1</TileCountX><TileCountY>1</TileCountY>
    <YOrigin>top</YOrigin>
  </DataWindow>
  <Projection>EPSG:3857</Projection>
  <BlockSizeX>256</BlockSizeX><BlockSizeY>256</BlockSizeY>
  <BandsCount>{bands}</BandsCount>
  <OverviewCount>{maxzoom - minzoom}</OverviewCount>
</GDAL_WMS>
"""


@pytest.mark.parametrize(
    ("width", "zooms"),
    [
        (512, {13}),  # the window at about its native scale
        (6, {9}),  # zoomed far out: the coarsest overview, the layer's minzoom
    ],
)
async def test_gdal_reads_a_window_of_a_layer_through_xyz(
    aiohttp_server, settings_for, emulator, tmp_path, width, zooms
):
    server = await aiohttp_server(create_app(settings_for(emulator)))
    base = f"http://127.0.0.1:{server.port}"
    xml = tmp_path / "olinda.xml"
    xml.write_text(wms_xml(base + "/tiles/olinda/${z}/${x}/${y}.png", 9, 16, 4))
    out = tmp_path / "olinda.tif"
    await read_olinda_window(str(xml), out, width)
    asked = {body["z"] for operation, body, _ in emulator.stats.log if body is not None}
    assert asked == zooms
