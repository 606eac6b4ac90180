"""Clip layer routes: a completed clip job's file as a tile layer.

- ``GET /tiles/clips/{job_id}/{mosaic_type}/{z}/{x}/{y}[@2x].{png|webp}``: a tile, rendered
  upstream with the parameters of ``clip.job.tile_info`` (:mod:`gateway.services.clips`)
  and served by the tile service like any layer's (cache, coalescing, limits, ``X-Cache``,
  ``ETag``/304); ``Cache-Control: private``.
- ``GET /tiles/clips/{job_id}/{mosaic_type}/tilejson.json``: its TileJSON 3.0.0 document
  (:func:`gateway.routes.discovery.tilejson`).

Both need a token with the ``downloads`` scope (header or ``?token=``, for QGIS and Leaflet),
limited to the token's ``projects`` like downloads; a TileJSON asked with ``?token=`` puts
the token in its tile URLs. Job ids, mosaic types and z/x/y are validated before anything
is fetched (400 problem+json).
"""

from __future__ import annotations

from aiohttp import web

from gateway.discovery.tilejson import tilejson
from gateway.http.answers import tile_response
from gateway.http.keys import CLIP_LAYERS, TILE_SERVICE
from gateway.http.params import authorize_job, mosaic_type_of, parse_tile
from gateway.http.policy import RoutePolicy, add_get
from gateway.http.urls import public_base, token_query


async def clip_tile(request: web.Request) -> web.StreamResponse:
    """``GET /tiles/clips/{job_id}/{mosaic_type}/{z}/{x}/{y}[@2x].{fmt}``."""
    job_id, _ = await authorize_job(request)
    mosaic_type = mosaic_type_of(request)
    layer = await request.app[CLIP_LAYERS].layer(job_id, mosaic_type)
    info = request.match_info
    address = parse_tile(layer, info["z"], info["x"], info["tail"])
    return tile_response(request, await request.app[TILE_SERVICE].get(address), private=True)


async def clip_tilejson(request: web.Request) -> web.Response:
    """``GET /tiles/clips/{job_id}/{mosaic_type}/tilejson.json``: TileJSON 3.0.0."""
    job_id, _ = await authorize_job(request)
    mosaic_type = mosaic_type_of(request)
    layer = await request.app[CLIP_LAYERS].layer(job_id, mosaic_type)
    query = token_query(request)
    doc = tilejson(public_base(request), layer, query)
    cache = "private, no-store" if query else "private, max-age=300"
    return web.json_response(doc, headers={"Cache-Control": cache})


POLICY = RoutePolicy(cors=True, caller_limit=True, query=frozenset({"token"}))
"""Clip tiles and their TileJSON: read across origins, counted against the caller's limit
(both can ask the upstream), ``?token=`` the only query parameter."""


def add_routes(app: web.Application) -> None:
    """Register the clip layer routes on ``app``; before the tile routes, whose
    ``/tiles/{layer}/{z}/{x}/{tail}`` would otherwise take the TileJSON path."""
    base = "/tiles/clips/{job_id}/{mosaic_type}"
    add_get(app, base + "/tilejson.json", clip_tilejson, name="clip_tilejson", policy=POLICY)
    add_get(app, base + "/{z}/{x}/{tail}", clip_tile, name="clip_tile", policy=POLICY)
