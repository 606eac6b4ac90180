"""Discovery for map clients: ``/layers``, TileJSON (checked against the official 3.0.0 JSON
schema), WMTS capabilities (parsed, and read by GDAL's WMTS driver), absolute URLs behind
proxies, and CORS."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import pytest

from gateway.app import create_app
from tests.clients import needs_gdal, read_olinda_window
from tests.conftest import PRIVATE_LAYER, TOKENS, config_with

SCHEMA = json.loads((Path(__file__).parent / "data" / "tilejson-3.0.0.schema.json").read_text())
LAYERS = ["olinda", "olinda-ndvi", "bahamas", "st-helens"]
NS = {
    "wmts": "http://www.opengis.net/wmts/1.0",
    "ows": "http://www.opengis.net/ows/1.1",
    "xlink": "http://www.w3.org/1999/xlink",
}
WMTS_PATH = "/wmts/1.0.0/WMTSCapabilities.xml"
TRUSTED = ("trusted_proxies = []", 'trusted_proxies = ["127.0.0.1"]')
PUBLIC_URL = ("trusted_proxies = []", 'public_url = "https://maps.example.org/gw/"')


def base_of(client) -> str:
    return f"http://127.0.0.1:{client.server.port}"


async def test_layers_lists_every_layer_with_absolute_urls(gateway, emulator):
    response = await gateway.get("/layers")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("application/json")
    layers = await response.json()
    assert [entry["name"] for entry in layers] == LAYERS
    base = base_of(gateway)
    olinda = layers[0]
    assert olinda == {
        "name": "olinda",
        "title": "Olinda, Brazil: Landsat 7 true colour",
        "kind": "raster",
        "formats": ["png", "jpg", "webp"],
        "minzoom": 9,
        "maxzoom": 16,
        "bounds": [-34.916589, -8.040927, -34.825966, -7.949822],
        "attribution": olinda["attribution"],
        "public": True,
        "default": True,
        "tiles": f"{base}/tiles/olinda/{{z}}/{{x}}/{{y}}.png",
        "tilejson": f"{base}/tiles/olinda/tilejson.json",
    }
    assert olinda["attribution"].startswith("Landsat 7")
    assert layers[3]["kind"] == "terrain"
    # the advertised URLs work as they are
    session = gateway.session
    tile_url = olinda["tiles"].format(z=13, x=3302, y=4278)
    async with session.get(tile_url) as tile:
        assert tile.status == 200
        assert tile.headers["Content-Type"] == "image/png"
    async with session.get(layers[2]["tilejson"]) as doc:
        assert (await doc.json())["name"] == layers[2]["title"]


async def test_private_layers_are_listed_and_need_a_token(gateway_for, emulator, tmp_path):
    client = await gateway_for(emulator, config=config_with(tmp_path, append=PRIVATE_LAYER))
    layers = {entry["name"]: entry for entry in await (await client.get("/layers")).json()}
    assert layers["olinda-private"]["public"] is False
    assert layers["olinda"]["public"] is True
    response = await client.get("/tiles/olinda-private/tilejson.json")
    assert response.status == 200
    tile = await client.get("/tiles/olinda-private/13/3302/4278.png")
    assert tile.status == 401


async def test_a_query_token_is_carried_into_the_tile_urls(gateway_for, emulator, tmp_path):
    client = await gateway_for(emulator, config=config_with(tmp_path, append=PRIVATE_LAYER))
    token = TOKENS["tiles"]
    response = await client.get("/tiles/olinda-private/tilejson.json", params={"token": token})
    assert response.status == 200
    assert response.headers["Cache-Control"] == "private, no-store"
    doc = await response.json()
    url = doc["tiles"][0]
    assert url.endswith(f".png?token={token}")
    async with client.session.get(url.format(z=13, x=3302, y=4278)) as tile:
        assert tile.status == 200
    wmts = await (await client.get(WMTS_PATH, params={"token": token})).text()
    assert f"/{{TileRow}}.png?token={token}" in wmts
    # without a token, or with a header token, nothing is echoed; a bad one is refused
    plain = await (await client.get("/tiles/olinda-private/tilejson.json")).json()
    assert "token" not in plain["tiles"][0]
    bad = await client.get("/layers", params={"token": "ggw_not-ours"})
    assert bad.status == 401
    assert bad.headers["Content-Type"] == "application/problem+json"


async def test_tilejson_is_valid_tilejson_3(gateway):
    base = base_of(gateway)
    for name in LAYERS:
        response = await gateway.get(f"/tiles/{name}/tilejson.json")
        assert response.status == 200
        assert response.headers["Cache-Control"].startswith("public, max-age=")
        doc = await response.json()
        jsonschema.validate(doc, SCHEMA)
        assert doc["tilejson"] == "3.0.0"
        assert doc["tiles"] == [f"{base}/tiles/{name}/{{z}}/{{x}}/{{y}}.png"]
        assert doc["scheme"] == "xyz"
        west, south, east, north = doc["bounds"]
        lon, lat, zoom = doc["center"]
        assert west < lon < east
        assert south < lat < north
        assert doc["minzoom"] <= zoom <= doc["maxzoom"]
        assert isinstance(zoom, int)
        assert doc["name"]
        assert doc["attribution"]
        if name == "st-helens":
            assert doc["encoding"] == "mapbox"
        else:
            assert "encoding" not in doc
    olinda = await (await gateway.get("/tiles/olinda/tilejson.json")).json()
    assert (olinda["minzoom"], olinda["maxzoom"]) == (9, 16)
    assert olinda["center"] == [-34.871278, -7.995375, 12]


async def test_tilejson_of_an_unknown_layer_is_a_404_problem(gateway):
    response = await gateway.get("/tiles/atlantis/tilejson.json")
    assert response.status == 404
    assert response.headers["Content-Type"] == "application/problem+json"
    body = await response.json()
    assert body["type"].endswith("/unknown-layer")
    assert "atlantis" in body["detail"]


async def test_public_url_wins_over_request_and_forwarded_headers(gateway_for, emulator, tmp_path):
    config = config_with(tmp_path, PUBLIC_URL)
    client = await gateway_for(emulator, config=config)
    headers = {"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "http"}
    doc = await (await client.get("/tiles/olinda/tilejson.json", headers=headers)).json()
    assert doc["tiles"] == ["https://maps.example.org/gw/tiles/olinda/{z}/{x}/{y}.png"]
    layers = await (await client.get("/layers")).json()
    assert layers[0]["tilejson"] == "https://maps.example.org/gw/tiles/olinda/tilejson.json"
    wmts = await (await client.get(WMTS_PATH)).text()
    assert "https://maps.example.org/gw/tiles/olinda/{TileMatrix}/{TileCol}/{TileRow}.png" in wmts


async def test_forwarded_headers_are_ignored_from_an_untrusted_peer(gateway):
    headers = {"X-Forwarded-Host": "tiles.example.org", "X-Forwarded-Proto": "https"}
    doc = await (await gateway.get("/tiles/olinda/tilejson.json", headers=headers)).json()
    assert doc["tiles"][0].startswith(base_of(gateway) + "/tiles/olinda/")


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (
            {"X-Forwarded-Host": "tiles.example.org:8443", "X-Forwarded-Proto": "https"},
            "https://tiles.example.org:8443",
        ),
        ({"X-Forwarded-Proto": "HTTPS"}, "https://127.0.0.1:{port}"),
        # several proxies appended: the nearest (last) one's value
        (
            {"X-Forwarded-Host": "evil.example, edge.example.org", "X-Forwarded-Proto": "https"},
            "https://edge.example.org",
        ),
        # malformed values are ignored, never copied into URLs
        ({"X-Forwarded-Host": 'evil.example/"><script>'}, "http://127.0.0.1:{port}"),
        ({"X-Forwarded-Host": "user@evil.example"}, "http://127.0.0.1:{port}"),
        ({"X-Forwarded-Proto": "javascript"}, "http://127.0.0.1:{port}"),
        ({"X-Forwarded-Host": "[::1]:8080"}, "http://[::1]:8080"),
        # ports no client can connect to
        ({"X-Forwarded-Host": "tiles.example.org:0"}, "http://127.0.0.1:{port}"),
        ({"X-Forwarded-Host": "tiles.example.org:99999"}, "http://127.0.0.1:{port}"),
        ({"X-Forwarded-Host": "[::1]:65536"}, "http://127.0.0.1:{port}"),
        ({"X-Forwarded-Host": "tiles.example.org:65535"}, "http://tiles.example.org:65535"),
    ],
)
async def test_forwarded_headers_from_a_trusted_proxy(
    gateway_for, emulator, tmp_path, headers, expected
):
    client = await gateway_for(emulator, config=config_with(tmp_path, TRUSTED))
    response = await client.get("/tiles/olinda/tilejson.json", headers=headers)
    doc = await response.json()
    base = expected.format(port=client.server.port)
    assert doc["tiles"] == [f"{base}/tiles/olinda/{{z}}/{{x}}/{{y}}.png"]
    assert response.headers["Vary"] == "X-Forwarded-Proto, X-Forwarded-Host"


async def test_wmts_capabilities_list_every_layer_and_the_tile_matrices(gateway):
    response = await gateway.get(WMTS_PATH)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("application/xml")
    root = ET.fromstring(await response.read())
    assert root.tag == "{http://www.opengis.net/wmts/1.0}Capabilities"
    assert root.get("version") == "1.0.0"
    assert root.findtext("ows:ServiceIdentification/ows:ServiceType", namespaces=NS) == "OGC WMTS"
    base = base_of(gateway)
    layers = root.findall("wmts:Contents/wmts:Layer", NS)
    assert [layer.findtext("ows:Identifier", namespaces=NS) for layer in layers] == LAYERS
    olinda, st_helens = layers[0], layers[3]
    assert olinda.findtext("ows:Title", namespaces=NS) == "Olinda, Brazil: Landsat 7 true colour"
    box = olinda.find("ows:WGS84BoundingBox", NS)
    assert box.findtext("ows:LowerCorner", namespaces=NS) == "-34.916589 -8.040927"
    assert box.findtext("ows:UpperCorner", namespaces=NS) == "-34.825966 -7.949822"
    assert olinda.find("wmts:Style", NS).get("isDefault") == "true"
    assert [f.text for f in olinda.findall("wmts:Format", NS)] == [
        "image/png",
        "image/jpeg",
        "image/webp",
    ]
    assert [f.text for f in st_helens.findall("wmts:Format", NS)] == ["image/png"]
    link = olinda.find("wmts:TileMatrixSetLink", NS)
    assert link.findtext("wmts:TileMatrixSet", namespaces=NS) == "WebMercatorQuad"
    limits = link.findall("wmts:TileMatrixSetLimits/wmts:TileMatrixLimits", NS)
    assert [int(lim.findtext("wmts:TileMatrix", namespaces=NS)) for lim in limits] == list(
        range(9, 17)
    )
    z13 = {child.tag.split("}")[1]: int(child.text) for child in limits[13 - 9]}
    # the tile the other tests fetch (13/3302/4278) lies inside the z13 limits
    assert z13["MinTileCol"] <= 3302 <= z13["MaxTileCol"]
    assert z13["MinTileRow"] <= 4278 <= z13["MaxTileRow"]
    urls = olinda.findall("wmts:ResourceURL", NS)
    assert {u.get("format"): u.get("template") for u in urls} == {
        f"image/{mt}": f"{base}/tiles/olinda/{{TileMatrix}}/{{TileCol}}/{{TileRow}}.{ext}"
        for mt, ext in [("png", "png"), ("jpeg", "jpg"), ("webp", "webp")]
    }
    assert {u.get("resourceType") for u in urls} == {"tile"}

    sets = root.findall("wmts:Contents/wmts:TileMatrixSet", NS)
    assert len(sets) == 1
    tms = sets[0]
    assert tms.findtext("ows:Identifier", namespaces=NS) == "WebMercatorQuad"
    assert tms.findtext("ows:SupportedCRS", namespaces=NS) == "urn:ogc:def:crs:EPSG::3857"
    assert (
        tms.findtext("wmts:WellKnownScaleSet", namespaces=NS)
        == "urn:ogc:def:wkss:OGC:1.0:GoogleMapsCompatible"
    )
    matrices = tms.findall("wmts:TileMatrix", NS)
    assert [int(m.findtext("ows:Identifier", namespaces=NS)) for m in matrices] == list(range(17))
    for z, matrix in enumerate(matrices):
        scale = float(matrix.findtext("wmts:ScaleDenominator", namespaces=NS))
        assert scale == pytest.approx(559082264.0287178 / 2**z, rel=1e-12)
        assert matrix.findtext("wmts:TopLeftCorner", namespaces=NS) == (
            "-20037508.3427892 20037508.3427892"
        )
        for tag, value in [
            ("TileWidth", 256),
            ("TileHeight", 256),
            ("MatrixWidth", 2**z),
            ("MatrixHeight", 2**z),
        ]:
            assert int(matrix.findtext(f"wmts:{tag}", namespaces=NS)) == value
    # OGC 17-083r4 WebMercatorQuad, level 13: 68247.346683193
    assert float(matrices[13].findtext("wmts:ScaleDenominator", namespaces=NS)) == pytest.approx(
        68247.346683193
    )
    metadata = root.find("wmts:ServiceMetadataURL", NS)
    assert metadata.get(f"{{{NS['xlink']}}}href") == base + WMTS_PATH


async def test_cors_headers_on_map_client_routes(gateway):
    origin = {"Origin": "https://app.example.org"}
    for path in [
        "/tiles/olinda/13/3302/4278.png",
        "/tiles/13/3302/4278.png",
        "/tiles/olinda/tilejson.json",
        "/layers",
        WMTS_PATH,
        "/tiles/olinda/3/0/0.png",  # an error answer is readable too
    ]:
        response = await gateway.get(path, headers=origin)
        await response.read()
        assert response.headers["Access-Control-Allow-Origin"] == "*", path
        assert response.headers["Access-Control-Expose-Headers"] == "ETag, X-Cache"
        assert "Vary" not in response.headers
    # no Origin: not a CORS request, nothing added
    plain = await gateway.get("/tiles/olinda/13/3302/4278.png")
    assert "Access-Control-Allow-Origin" not in plain.headers
    # other routes get no CORS headers
    health = await gateway.get("/healthz", headers=origin)
    assert "Access-Control-Allow-Origin" not in health.headers


async def test_cors_preflight(gateway):
    headers = {
        "Origin": "https://app.example.org",
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization, if-none-match",
    }
    for path in ["/tiles/olinda/13/3302/4278.png", "/tiles/olinda/tilejson.json", "/layers"]:
        response = await gateway.options(path, headers=headers)
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert response.headers["Access-Control-Allow-Methods"] == "GET, HEAD, OPTIONS"
        assert response.headers["Access-Control-Allow-Headers"] == (
            "Authorization, If-None-Match, Range"
        )
        assert response.headers["Access-Control-Max-Age"] == "86400"
    # unknown routes stay 404 problems; plain OPTIONS is not a preflight
    unknown = await gateway.options("/nowhere", headers=headers)
    assert unknown.status == 404
    assert unknown.headers["Content-Type"] == "application/problem+json"
    plain = await gateway.options("/layers")
    assert plain.status == 405
    assert plain.headers["Content-Type"] == "application/problem+json"


async def test_cors_with_listed_origins(gateway_for, emulator, tmp_path):
    origins = ("trusted_proxies = []", 'cors_origins = ["https://app.example.org"]')
    client = await gateway_for(emulator, config=config_with(tmp_path, origins))
    allowed = await client.get("/layers", headers={"Origin": "https://app.example.org"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example.org"
    assert allowed.headers["Vary"] == "Origin"
    denied = await client.get("/layers", headers={"Origin": "https://other.example"})
    assert denied.status == 200
    assert "Access-Control-Allow-Origin" not in denied.headers
    assert denied.headers["Vary"] == "Origin"
    preflight = {"Origin": "https://other.example", "Access-Control-Request-Method": "GET"}
    refused = await client.options("/tiles/olinda/13/3302/4278.png", headers=preflight)
    assert refused.status == 204
    assert not any(h.startswith("Access-Control-") for h in refused.headers)


@needs_gdal
async def test_gdal_reads_a_window_through_wmts(aiohttp_server, settings_for, emulator, tmp_path):
    server = await aiohttp_server(create_app(settings_for(emulator)))
    source = f"WMTS:http://127.0.0.1:{server.port}{WMTS_PATH},layer=olinda"
    out = tmp_path / "olinda-wmts.tif"
    await read_olinda_window(source, out)
    assert emulator.renders() > 0


@pytest.mark.parametrize("path", ["/layers", "/tiles/olinda-private/tilejson.json", WMTS_PATH])
async def test_discovery_takes_one_token_in_one_form(gateway_for, emulator, tmp_path, path):
    client = await gateway_for(emulator, config=config_with(tmp_path, append=PRIVATE_LAYER))
    good, bad = TOKENS["tiles"], "ggw_not-ours"

    def bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    refused = {
        "both forms": await client.get(path, params={"token": good}, headers=bearer(good)),
        "a bad ?token= beside a header": await client.get(
            path, params={"token": bad}, headers=bearer(good)
        ),
        "two ?token=": await client.get(f"{path}?token={good}&token={good}"),
        "a bad header": await client.get(path, headers=bearer(bad)),
        "two headers": await client.get(path, headers=[("Authorization", f"Bearer {good}")] * 2),
    }
    for case, response in refused.items():
        assert response.status in (400, 401), case
        assert response.headers["Content-Type"] == "application/problem+json", case
        assert good not in await response.text(), case
    assert refused["a bad header"].status == 401
    header_only = await client.get(path, headers=bearer(good))
    assert header_only.status == 200
    assert good not in await header_only.text()  # a header token is never copied
