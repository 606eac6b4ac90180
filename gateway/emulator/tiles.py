"""The ``cog.tile.render``, ``cog.tile.terrain`` and ``cog.thumbnail`` operations (Geopera COG
& tiles operations, seeds ``003``).

Request bodies follow the ``CogTileInput``, ``CogTerrainInput`` and ``CogThumbnailInput``
schemas. Success is the image (200). An empty tile (outside the COG or fully masked) is, by
default, ``404`` problem ``empty-tile``, as a TiTiler-style API answers a tile outside its
COG; ``empty_tiles=204`` (``--empty-tiles 204``) answers ``204 No Content`` instead. The docs
promise neither (our choice). A ``url`` the emulator does not know is ``404`` problem
``cog-not-found``. The ``aoi`` field is accepted (it must be a string) and ignored: tiles are
not clipped.

Both are egress-limited by COG ``url`` (:mod:`.egress`): once the body is valid and the COG
known, the limits are checked (``429`` when exceeded) before rendering, and the bytes of each
tile sent count against the bandwidth circuit breaker. A request found invalid only while
rendering (a 422 such as a band the COG lacks) gets its per-asset token back.
"""

from __future__ import annotations

import asyncio
import math
import re
from pathlib import Path
from typing import Any

from aiohttp import web
from rio_tiler.colormap import cmap

from . import egress
from .catalog import CATALOG_KEY, resolve_cog
from .defaults import DEFAULT_EMPTY_STATUS
from .protocol import OperationHandler, ProblemError, RequestValidationError, field_error
from .render import IMAGE_FORMATS, RenderInputError, render_tile, terrain_tile, thumbnail
from .schema import Field, validate_body

EMPTY_STATUS_KEY: web.AppKey[int] = web.AppKey("geopera_emulator_empty_status", int)
"""How the app answers an empty tile: 404 (problem ``empty-tile``) or 204."""

MAX_ZOOM = 30
MAX_THUMBNAIL_PX = 1024
CONTENT_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}

_TILE_FIELDS = (
    Field("url", str, required=True),
    Field("z", int, required=True, ge=0, le=MAX_ZOOM),
    Field("x", int, required=True, ge=0),
    Field("y", int, required=True, ge=0),
    Field("aoi", str),
)
RENDER_FIELDS = (
    *_TILE_FIELDS,
    Field("format", str, required=True, choices=tuple(IMAGE_FORMATS)),
    Field("bands", str),
    Field("expression", str),
    Field("rescale", str),
    Field("colormap", str),
    Field("quality", int, ge=1, le=100),
)
TERRAIN_FIELDS = (*_TILE_FIELDS, Field("invert", bool))
THUMBNAIL_FIELDS = (
    Field("url", str, required=True),
    Field("width", int, ge=1, le=MAX_THUMBNAIL_PX),
    Field("height", int, ge=1, le=MAX_THUMBNAIL_PX),
)

_BAND = re.compile(r"^[bB]?(\d+)$")
_EXPRESSION = re.compile(r"^[A-Za-z0-9\s+\-*/%().,;<>=!&|~]{1,512}$")


def _check_tile_matrix(values: dict[str, Any]) -> None:
    """x and y must lie in 0..2**z-1 (z itself is already limited to 0..MAX_ZOOM)."""
    last = 2 ** values["z"] - 1
    errors = [
        field_error(axis, f"Input should be less than or equal to {last}", "less_than_equal")
        for axis in ("x", "y")
        if values[axis] > last
    ]
    if errors:
        raise RequestValidationError(errors)


def parse_bands(text: str) -> tuple[int, ...]:
    """``"3,2,1"`` or ``"b3,b2,b1"`` -> ``(3, 2, 1)`` (1-based); 422 on anything else."""
    matches = [_BAND.match(part.strip()) for part in text.split(",")]
    if not all(matches) or any(int(m[1]) < 1 for m in matches if m):
        raise RequestValidationError.single(
            "bands", 'Value error, bands must be comma-separated 1-based indexes like "3,2,1"'
        )
    return tuple(int(m[1]) for m in matches if m)


def parse_rescale(text: str) -> tuple[tuple[float, float], ...]:
    """``"min,max"`` or per-band ``"min,max;min,max;..."`` -> ``((min, max), ...)``.

    Each pair needs finite numbers with ``min < max``; 422 otherwise.
    """
    pairs: list[tuple[float, float]] = []
    try:
        for chunk in text.split(";"):
            low_text, high_text = chunk.split(",")
            low, high = float(low_text), float(high_text)
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(chunk)
            pairs.append((low, high))
    except ValueError:
        raise RequestValidationError.single(
            "rescale",
            'Value error, rescale must be "min,max" or per-band "min,max;min,max;...", min < max',
        ) from None
    return tuple(pairs)


def _parse_colormap(name: str) -> str:
    key = name.strip().lower()
    if key not in cmap.list():
        raise RequestValidationError.single("colormap", "Value error, unknown colormap name")
    return key


def _parse_expression(text: str) -> str:
    if not _EXPRESSION.match(text):
        raise RequestValidationError.single(
            "expression", "Value error, expression contains unsupported characters"
        )
    return text


def _cog_path(request: web.Request, url: str) -> Path:
    return resolve_cog(request.app[CATALOG_KEY], url)


async def _run(
    request: web.Request, values: dict[str, Any], func: Any, *args: Any, **kwargs: Any
) -> bytes | None:
    """Apply the egress limits, then run a blocking renderer in a worker thread.

    RenderInputError becomes a 422 (and the asset token is refunded); the bytes of a
    rendered tile are accounted against the bandwidth breaker.
    """
    egress.admit(request, values)
    try:
        image = await asyncio.to_thread(func, *args, **kwargs)
    except RenderInputError as exc:
        egress.refund(request, values)
        raise RequestValidationError.single(exc.field, f"Value error, {exc}") from None
    if image is not None:
        egress.account(request, len(image))
    return image if image is None else bytes(image)


async def render_operation(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    """``cog.tile.render``: a 256x256 PNG/JPEG/WEBP tile, or 204 when empty."""
    values = validate_body(body, RENDER_FIELDS)
    _check_tile_matrix(values)
    bands = parse_bands(values["bands"]) if "bands" in values else None
    expression = _parse_expression(values["expression"]) if "expression" in values else None
    if bands is not None and expression is not None:
        raise RequestValidationError.single(
            None, "Value error, bands and expression are mutually exclusive"
        )
    rescale = parse_rescale(values["rescale"]) if "rescale" in values else None
    colormap = _parse_colormap(values["colormap"]) if "colormap" in values else None
    path = _cog_path(request, values["url"])
    image = await _run(
        request,
        values,
        render_tile,
        path,
        values["z"],
        values["x"],
        values["y"],
        img_format=values["format"],
        bands=bands,
        expression=expression,
        rescale=rescale,
        colormap=colormap,
        quality=values.get("quality"),
    )
    if image is None:
        return _empty(request)
    content_type = CONTENT_TYPES[IMAGE_FORMATS[values["format"]]]
    return web.Response(body=image, content_type=content_type)


async def terrain_operation(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    """``cog.tile.terrain``: a 256x256 Mapbox Terrain-RGB PNG (RGBA), or 204 when empty."""
    values = validate_body(body, TERRAIN_FIELDS)
    _check_tile_matrix(values)
    path = _cog_path(request, values["url"])
    image = await _run(
        request,
        values,
        terrain_tile,
        path,
        values["z"],
        values["x"],
        values["y"],
        invert=values.get("invert", False),
    )
    if image is None:
        return _empty(request)
    return web.Response(body=image, content_type="image/png")


async def thumbnail_operation(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    """``cog.thumbnail``: a JPEG of the COG's smallest overview (``width``/``height`` 1..1024
    pixels, optional)."""
    values = validate_body(body, THUMBNAIL_FIELDS)
    path = _cog_path(request, values["url"])
    image = await _run(request, values, thumbnail, path, values.get("width"), values.get("height"))
    assert image is not None
    return web.Response(body=image, content_type="image/jpeg")


def _empty(request: web.Request) -> web.Response:
    """The answer for an empty tile: 204, or 404 problem ``empty-tile``."""
    if request.app.get(EMPTY_STATUS_KEY, DEFAULT_EMPTY_STATUS) == 204:
        return web.Response(status=204)
    raise ProblemError(
        404,
        "empty-tile",
        "Not Found",
        "This tile holds no data of the COG: it lies outside it or is fully masked.",
    )


TILE_OPERATIONS: dict[str, OperationHandler] = {
    "cog.tile.render": render_operation,
    "cog.tile.terrain": terrain_operation,
    "cog.thumbnail": thumbnail_operation,
}
