"""Hostile input: a standing corpus against every route, wrong methods, oversized requests,
and property-based tests of the path parsers. Every case must get a clean 4xx problem+json,
never a 5xx, and never an upstream call."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.http.params import parse_tile
from gateway.http.problem import Problem
from gateway.routes.listing import STATUS
from gateway.services.downloads import JOB_ID, MOSAIC_TYPE, content_disposition
from gateway.services.transfers import clean_filename
from tests.conftest import TOKENS
from tests.hostile.corpus import VALUES

if TYPE_CHECKING:
    from gateway.layers import Layer
    from gateway.services.tiles import TileAddress

CASES_RUN: list[int] = []

# Where each hostile value is put: a path segment or a query value / name of a route.
TEMPLATES = [
    "/tiles/{v}/13/3302/4278.png",
    "/tiles/olinda/{v}/3302/4278.png",
    "/tiles/olinda/13/{v}/4278.png",
    "/tiles/olinda/13/3302/{v}",
    "/tiles/olinda/13/3302/{v}.png",
    "/tiles/13/3302/{v}",
    "/tiles/{v}/3302/4278.png",
    "/tiles/olinda/13/3302/4278.png?{v}=1",
    "/tiles/olinda/13/3302/4278.png?token={v}",
    "/downloads/{v}",
    "/downloads/{v}/rgb",
    "/downloads/0b7c6a52-1111-4222-8333-444455556666/{v}",
    "/downloads/{v}/rgb.sha256",
    "/downloads/0b7c6a52-1111-4222-8333-444455556666/{v}.sha256",
    "/downloads?status={v}",
    "/downloads?limit={v}",
    "/downloads?offset={v}",
    "/downloads?{v}=1",
    "/tiles/clips/{v}/rgb/9/145/220.png",
    "/tiles/clips/0b7c6a52-1111-4222-8333-444455556666/{v}/9/145/220.png",
    "/tiles/clips/0b7c6a52-1111-4222-8333-444455556666/{v}/tilejson.json",
    "/tiles/clips/{v}/rgb/tilejson.json",
    "/{v}",
    "/tiles/{v}",
    "/tiles/{v}/tilejson.json",
    "/viewer/assets/{v}",
    "/wmts/{v}/WMTSCapabilities.xml",
]


async def assert_clean_4xx(response, label: str) -> None:
    assert 400 <= response.status < 500, (label, response.status)
    assert response.headers["Content-Type"] == "application/problem+json", label
    problem = await response.json(content_type=None)
    assert problem["status"] == response.status, label
    assert problem["detail"], label
    assert "Traceback" not in problem["detail"]
    assert 'File "' not in problem["detail"]


@pytest.mark.parametrize("template", TEMPLATES)
async def test_hostile_values_in_every_route_get_clean_4xx(gateway_for, emulator, template):
    client = await gateway_for(emulator, token="downloads")
    for value in VALUES:
        if "0b7c6a52-1111-4222-8333-444455556666/{v}" in template and MOSAIC_TYPE.fullmatch(value):
            continue  # a well-formed mosaic type: only the upstream knows whether it exists
        if template.startswith("/downloads?status=") and STATUS.fullmatch(value):
            continue  # a well-formed status: the upstream lists such jobs (none)
        path = template.format(v=quote(value, safe=""))
        response = await client.get(path)
        if response.url.path in ("/", "/tiles", "/downloads"):
            continue  # the client itself resolved ".." away: not the hostile request any more
        await assert_clean_4xx(response, f"{template} <- {value!r}")
        CASES_RUN.append(1)
    assert emulator.renders() == 0
    assert sum(emulator.stats.calls.values()) == 0


async def test_hostile_values_in_admin_purge_get_clean_4xx(gateway_for, emulator):
    client = await gateway_for(emulator, token="admin")
    await client.get("/tiles/olinda/13/3302/4278.png")  # something that could be purged
    for field in ("layer", "bbox", "zoom"):
        for value in VALUES:
            body = {"layer": "olinda", field: value}
            response = await client.post("/admin/purge", json=body)
            if field != "layer" and value in ("",):
                continue  # an empty optional field means "all": not hostile
            await assert_clean_4xx(response, f"purge {field}={value!r}")
            CASES_RUN.append(1)
    for raw in (b"{", b"[]", b"null", b'{"layer": ["olinda"]}', b"\\xff\\xfe", b"x" * 5000):
        response = await client.post(
            "/admin/purge", data=raw, headers={"Content-Type": "application/json"}
        )
        await assert_clean_4xx(response, f"purge body {raw[:20]!r}")
        CASES_RUN.append(1)
    assert (await client.get("/tiles/olinda/13/3302/4278.png")).headers["X-Cache"] == "HIT"
    assert emulator.renders() == 1


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_wrong_methods_get_405(gateway, emulator, method):
    for path in (
        "/tiles/olinda/13/3302/4278.png",
        "/tiles/13/3302/4278.png",
        "/downloads/job",
        "/downloads/job/rgb",
        "/healthz",
        "/metrics",
    ):
        response = await gateway.request(method, path)
        assert response.status == 405, (method, path)
        await assert_clean_4xx(response, f"{method} {path}")
        assert "GET" in response.headers["Allow"]
        CASES_RUN.append(1)
    assert emulator.renders() == 0


async def test_oversized_requests_are_refused(gateway, emulator):
    cases = {
        "/tiles/olinda/13/3302/" + "1" * 2000 + ".png": 414,
        "/tiles/olinda/13/3302/4278.png?token=" + "t" * 2000: 414,
        "/tiles/olinda/13/3302/4278.png?" + "&".join(f"a{i}=1" for i in range(20)): 400,
        "/tiles/olinda/13/3302/4278.png?token=a&token=b": 400,
    }
    for path, status in cases.items():
        response = await gateway.get(path)
        assert response.status == status, path[:80]
        await assert_clean_4xx(response, path[:80])
        CASES_RUN.append(1)
    many = {f"X-Filler-{i}": "1" for i in range(80)}
    response = await gateway.get("/tiles/olinda/13/3302/4278.png", headers=many)
    assert response.status == 431
    await assert_clean_4xx(response, "80 headers")
    CASES_RUN.append(1)
    assert emulator.renders() == 0


async def test_a_query_parameter_cannot_change_the_cached_tile(gateway, emulator):
    clean = await gateway.get("/tiles/olinda/13/3302/4278.png")
    assert clean.status == 200
    tricked = await gateway.get("/tiles/olinda/13/3302/4278.png?bands=1,1,1")
    assert tricked.status == 400
    again = await gateway.get(f"/tiles/olinda/13/3302/4278.png?token={TOKENS['tiles']}")
    assert again.headers["X-Cache"] == "HIT"  # the token is not part of the cache key
    assert await again.read() == await clean.read()
    assert emulator.renders() == 1


def parsed(layer: Layer, z: str, x: str, tail: str) -> TileAddress | Problem:
    """The tile address of a path's parts, or the problem the parser raised."""
    try:
        return parse_tile(layer, z, x, tail)
    except Problem as problem:
        return problem


@settings(max_examples=300, deadline=None)
@given(z=st.text(max_size=12), x=st.text(max_size=12), tail=st.text(max_size=16))
def test_tile_path_parser_accepts_only_valid_tiles(z, x, tail, demo_layer):
    address = parsed(demo_layer, z, x, tail)
    if isinstance(address, Problem):
        assert address.status == 400
        return
    assert demo_layer.minzoom <= address.z <= demo_layer.maxzoom
    assert 0 <= address.x < 2**address.z
    assert 0 <= address.y < 2**address.z
    assert address.scale in (1, 2)
    assert address.fmt in demo_layer.formats
    assert z == str(address.z)
    assert x == str(address.x)


@settings(max_examples=300, deadline=None)
@given(
    z=st.integers(min_value=-10, max_value=40),
    x=st.integers(min_value=-5, max_value=2**40),
    y=st.integers(min_value=-5, max_value=2**40),
    fmt=st.sampled_from(["png", "jpg", "webp", "gif"]),
)
def test_tile_parser_on_numbers(z, x, y, fmt, demo_layer):
    address = parsed(demo_layer, str(z), str(x), f"{y}.{fmt}")
    if isinstance(address, Problem):
        assert address.status == 400
        assert not (
            demo_layer.minzoom <= z <= demo_layer.maxzoom
            and 0 <= x < 2**z
            and 0 <= y < 2**z
            and fmt in demo_layer.formats
        )
        return
    assert (address.z, address.x, address.y, address.fmt) == (z, x, y, fmt)


@given(st.text(max_size=300))
def test_job_ids_and_mosaic_types_are_safe_path_parts(text):
    for pattern in (JOB_ID, MOSAIC_TYPE):
        if pattern.fullmatch(text):
            assert "/" not in text
            assert "\\" not in text
            assert ".." not in text
            assert text.isascii()
            assert text.isprintable()
            assert "\x00" not in text


@given(st.text(max_size=300))
def test_download_names_never_split_headers(name):
    cleaned = clean_filename(name, "fallback.tif")
    assert cleaned
    assert "/" not in cleaned
    assert "\\" not in cleaned
    assert all(c.isprintable() for c in cleaned)
    header = content_disposition(cleaned)
    assert "\r" not in header
    assert "\n" not in header
    assert header.isascii()


@pytest.fixture(scope="module")
def demo_layer():
    from gateway.config.settings import load_settings
    from tests.conftest import DEFAULT_CONFIG

    return load_settings(DEFAULT_CONFIG, environ={"GEOPERA_API_KEY": "gpra_x12345678"}).layers[
        "olinda"
    ]
