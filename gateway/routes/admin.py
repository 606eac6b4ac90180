"""Admin routes (``admin`` scope): purging the tile cache.

``POST /admin/purge`` with ``layer`` (required), ``bbox`` (``"W,S,E,N"`` in degrees) and
``zoom`` (``"A-B"`` or ``"A"``), as a JSON object body or as query parameters (the body
wins), removes the layer's cached tiles (all, or those overlapping ``bbox`` within ``zoom``;
every scale and format) and answers ``200 {"layer": name, "removed": n}``. Every worker's
memory tier drops its copies within about a second (:meth:`gateway.storage.tiles.TileCache.purge`).
With ``[state] redis_url`` the purge is also announced to the other replicas, which purge
their own caches within about a second (:mod:`gateway.seed.fleet`); the answer then carries
``"fleet": true``, or ``false`` when Redis could not be reached (the purge stayed here).
It never calls the upstream.

Errors (problem+json): 401 without a valid token, 403 without the ``admin`` scope, 400 for a
body that is not a JSON object, a missing or unknown layer, or a malformed bbox or zoom.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web

from gateway.http.keys import AUTH, FLEET_PURGES, LAYERS, TILE_CACHE
from gateway.http.policy import add_post
from gateway.http.problem import bad_request
from gateway.seed.area import AreaError, parse_bbox, parse_zoom
from gateway.seed.purge import purge_tiles_async
from gateway.storage.redis_link import StateUnavailable

log = logging.getLogger("gateway.admin")


async def _parameters(request: web.Request) -> dict[str, Any]:
    """The query parameters, overridden by a JSON object body when there is one.

    Raises:
        Problem: 400 for a body that is not a JSON object.
    """
    params: dict[str, Any] = dict(request.query)
    params.pop("token", None)  # a credential, not a parameter
    if request.can_read_body:
        raw = await request.read()
        if raw.strip():
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError):  # RecursionError: nested too deeply
                body = None
            if not isinstance(body, dict):
                raise bad_request(
                    'The body must be a JSON object like {"layer": "olinda", '
                    '"bbox": "W,S,E,N", "zoom": "12-14"}.',
                    "malformed-body",
                )
            params.update(body)
    return params


def _text(value: Any, name: str) -> str | None:
    """A parameter as text: strings as they are, a JSON list of numbers (bbox) or a number
    (zoom) in their text form; None when absent."""
    if value is None:
        return None
    if name == "bbox" and isinstance(value, list):
        return ",".join(str(v) for v in value)
    if name == "zoom" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise bad_request(f"{name} must be a string.", f"invalid-{name}")
    return value


async def purge(request: web.Request) -> web.Response:
    """``POST /admin/purge`` → ``{"layer", "removed"}``."""
    request.app[AUTH].authorize(request, "admin")
    params = await _parameters(request)
    name = _text(params.get("layer"), "layer")
    if not name:
        raise bad_request("layer is required: the name of the layer to purge.", "missing-layer")
    layer = request.app[LAYERS].get(name)
    if layer is None:
        raise bad_request(f"No layer named {name[:64]!r}; GET /layers lists them.", "unknown-layer")
    bbox_text, zoom_text = _text(params.get("bbox"), "bbox"), _text(params.get("zoom"), "zoom")
    try:
        bbox = parse_bbox(bbox_text) if bbox_text is not None else None
    except AreaError as exc:
        raise bad_request(f"{exc}.", "invalid-bbox") from None
    try:
        zooms = parse_zoom(zoom_text) if zoom_text is not None else None
    except AreaError as exc:
        raise bad_request(f"{exc}.", "invalid-zoom") from None
    removed = await purge_tiles_async(request.app[TILE_CACHE], layer.name, bbox, zooms)
    answer: dict[str, object] = {"layer": layer.name, "removed": removed}
    fleet = request.app.get(FLEET_PURGES)
    if fleet is not None:  # the other replicas purge their own caches within about a second
        try:
            await fleet.announce(layer.name, bbox, zooms)
            answer["fleet"] = True
        except StateUnavailable:
            log.warning("purge of layer %s stayed on this replica: Redis unreachable", layer.name)
            answer["fleet"] = False
    return web.json_response(answer)


def add_routes(app: web.Application) -> None:
    """Register the admin routes on ``app``."""
    add_post(app, "/admin/purge", purge, name="admin_purge")
