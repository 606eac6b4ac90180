"""Discovery routes: what map clients read before they ask for tiles.

- ``GET /layers``: a JSON array, one object per layer (private layers too, with
  ``public: false``): ``name``, ``title``, ``kind``, ``formats``, ``minzoom``, ``maxzoom``,
  ``bounds`` (``[west, south, east, north]``, degrees), ``attribution``, ``public``,
  ``default``, ``tiles`` (absolute XYZ URL template in the layer's first format) and
  ``tilejson`` (absolute URL).
- ``GET /tiles/{layer}/tilejson.json``: TileJSON 3.0.0 (https://github.com/mapbox/tilejson-spec
  /tree/master/3.0.0) for MapLibre GL, Leaflet plugins, deck.gl. 404 problem+json for an
  unknown layer.
- ``GET /wmts/1.0.0/WMTSCapabilities.xml``: OGC WMTS 1.0.0 RESTful capabilities (QGIS, GDAL,
  ArcGIS), built by :func:`wmts_document`.

Absolute URLs come from :func:`gateway.http.urls.public_base`. When the request carries a valid
``?token=`` (and no ``Authorization`` header), the tile URLs in the answer carry it too, and
the answer is ``Cache-Control: private, no-store``; a bad token there is 401.
"""

from __future__ import annotations

from aiohttp import web

from gateway.discovery.tilejson import layer_summary, tilejson
from gateway.discovery.wmts import CAPABILITIES_PATH, wmts_document
from gateway.http.keys import LAYERS, SETTINGS
from gateway.http.policy import RoutePolicy, add_get
from gateway.http.problem import not_found
from gateway.http.urls import depends_on_request, public_base, token_query

MAX_AGE_S = 300
"""How long clients and caches may keep a discovery document, seconds."""


def _headers(request: web.Request, query: str) -> dict[str, str]:
    if query:
        return {"Cache-Control": "private, no-store"}
    headers = {"Cache-Control": f"public, max-age={MAX_AGE_S}"}
    if depends_on_request(request) and request.app[SETTINGS].server.trusted_proxies:
        headers["Vary"] = "X-Forwarded-Proto, X-Forwarded-Host"
    return headers


async def layers(request: web.Request) -> web.Response:
    """``GET /layers``: every configured layer, with absolute tile and TileJSON URLs."""
    query = token_query(request)
    base = public_base(request)
    default = request.app[SETTINGS].default_layer
    body = [
        layer_summary(base, layer, layer.name == default, query)
        for layer in request.app[LAYERS].values()
    ]
    return web.json_response(body, headers=_headers(request, query))


async def layer_tilejson(request: web.Request) -> web.Response:
    """``GET /tiles/{layer}/tilejson.json``.

    Raises:
        Problem: 404 for an unknown layer, 401 for a bad ``?token=``.
    """
    name = request.match_info["layer"]
    layer = request.app[LAYERS].get(name)
    if layer is None:
        raise not_found(f"No layer named {name[:64]!r}; GET /layers lists them.", "unknown-layer")
    query = token_query(request)
    doc = tilejson(public_base(request), layer, query)
    return web.json_response(doc, headers=_headers(request, query))


async def wmts_capabilities(request: web.Request) -> web.Response:
    """``GET /wmts/1.0.0/WMTSCapabilities.xml``: ``application/xml``."""
    query = token_query(request)
    body = wmts_document(public_base(request), request.app[LAYERS].values(), query)
    headers = _headers(request, query)
    headers["Content-Type"] = "application/xml; charset=utf-8"
    return web.Response(body=body, headers=headers)


POLICY = RoutePolicy(cors=True)
"""Discovery documents: read by map clients across origins; they never call the upstream,
so no caller limit, and any query parameter is ignored."""


def add_routes(app: web.Application) -> None:
    """Register the discovery routes on ``app`` (before the tile routes)."""
    add_get(app, "/layers", layers, name="layers", policy=POLICY)
    add_get(app, "/tiles/{layer}/tilejson.json", layer_tilejson, name="tilejson", policy=POLICY)
    add_get(app, CAPABILITIES_PATH, wmts_capabilities, name="wmts", policy=POLICY)
