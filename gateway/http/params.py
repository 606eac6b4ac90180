"""Path parameters of the routes, validated before anything is fetched (400 problem+json),
shared by the route modules so none imports another: tile paths (layer tiles and clip
tiles), job ids and mosaic types (downloads, clip layers), and the check that a token may
reach a job.
"""

from __future__ import annotations

import re

from aiohttp import web

from gateway.config.settings import TokenSettings
from gateway.http.keys import AUTH, DOWNLOAD_SERVICE
from gateway.http.problem import bad_request
from gateway.layers import Layer
from gateway.services.downloads import JOB_ID, MOSAIC_TYPE
from gateway.services.tiles import TileAddress

_Z = re.compile(r"0|[1-9][0-9]?")
_XY = re.compile(r"0|[1-9][0-9]{0,8}")
_TAIL = re.compile(r"(?P<y>0|[1-9][0-9]{0,8})(?:@(?P<scale>[12])x)?\.(?P<fmt>[a-z0-9]{1,5})")

PARSED_TILES_MAX = 8192
"""Tile paths whose parse :func:`parse_tile` remembers (the tiles a map view is served again
and again); the memo starts over when it is full."""

_parsed: dict[tuple[int, str, str, str], TileAddress] = {}


def parse_tile(layer: Layer, z: str, x: str, tail: str) -> TileAddress:
    """Validate a tile path against ``layer`` (:func:`check_tile`); a path that was valid
    before is answered from a memo of the last :data:`PARSED_TILES_MAX` (only valid paths
    are remembered, with their layer object, so another layer of the same name, in another
    app, is checked afresh).

    Raises:
        Problem: 400, as :func:`check_tile`.
    """
    key = (id(layer), z, x, tail)
    address = _parsed.get(key)
    if address is not None and address.layer is layer:
        return address
    address = check_tile(layer, z, x, tail)
    if len(_parsed) >= PARSED_TILES_MAX:
        _parsed.clear()
    _parsed[key] = address
    return address


def check_tile(layer: Layer, z: str, x: str, tail: str) -> TileAddress:
    """Validate a tile path against ``layer``.

    Args:
        z, x: path segments; ``tail`` is ``{y}.{fmt}`` or ``{y}@2x.{fmt}``.

    Raises:
        Problem: 400 for a malformed segment, a format the layer does not serve, a zoom
            outside ``layer.minzoom..layer.maxzoom``, or x/y outside ``0..2^z-1``.
    """
    tail_match = _TAIL.fullmatch(tail)
    if not _Z.fullmatch(z) or not _XY.fullmatch(x) or tail_match is None:
        raise bad_request(
            "Tile paths look like /tiles/{layer}/{z}/{x}/{y}.{format} or "
            "{y}@2x.{format}, with decimal z, x and y.",
            "malformed-tile-path",
        )
    zoom, col, row = int(z), int(x), int(tail_match["y"])
    scale = int(tail_match["scale"] or 1)
    fmt = tail_match["fmt"]
    if fmt not in layer.formats:
        raise bad_request(
            f"Layer {layer.name!r} serves {', '.join(layer.formats)}, not {fmt!r}.",
            "unsupported-format",
        )
    if not layer.minzoom <= zoom <= layer.maxzoom:
        raise bad_request(
            f"Layer {layer.name!r} has zoom levels {layer.minzoom} to "
            f"{layer.maxzoom}; {zoom} is outside.",
            "zoom-out-of-range",
        )
    limit = 1 << zoom
    if col >= limit or row >= limit:
        raise bad_request(f"At zoom {zoom}, x and y must be 0 to {limit - 1}.", "tile-out-of-range")
    return TileAddress(layer, zoom, col, row, scale, fmt)


def job_id_of(request: web.Request) -> str:
    """The request's ``{job_id}``, checked to be a UUID
    (:data:`~gateway.services.downloads.JOB_ID`).

    Raises:
        Problem: 400 ``malformed-job-id``.
    """
    job_id = request.match_info["job_id"]
    if not JOB_ID.fullmatch(job_id):
        raise bad_request("Job ids are UUIDs.", "malformed-job-id")
    return job_id


def mosaic_type_of(request: web.Request) -> str:
    """The request's ``{mosaic_type}``, checked against
    :data:`~gateway.services.downloads.MOSAIC_TYPE`.

    Raises:
        Problem: 400 ``malformed-mosaic-type``.
    """
    mosaic_type = request.match_info["mosaic_type"]
    if not MOSAIC_TYPE.fullmatch(mosaic_type):
        raise bad_request(
            "Mosaic types are 1-64 lower-case letters, digits, '-' or '_', starting with a letter.",
            "malformed-mosaic-type",
        )
    return mosaic_type


async def authorize_job(request: web.Request) -> tuple[str, TokenSettings | None]:
    """Check the request's ``downloads`` token and job id, and that the token may reach the
    job's project; returns the job id and the token.

    Raises:
        Problem: 401/403 (token), 400 (job id); ProjectForbidden and the job errors of
            :meth:`~gateway.services.downloads.DownloadService.check_project`.
    """
    token = request.app[AUTH].authorize(request, "downloads")
    job_id = job_id_of(request)
    projects = token.projects if token is not None else None
    await request.app[DOWNLOAD_SERVICE].check_project(job_id, projects)
    return job_id, token
