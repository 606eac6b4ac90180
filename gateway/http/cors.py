"""CORS (the Fetch standard's CORS protocol) for the routes browsers read across origins:
tiles (both forms), TileJSON, ``/layers`` and the WMTS capabilities.

``server.cors_origins`` (default ``["*"]``) lists the origins allowed to read them:

- a request without ``Origin`` is not a CORS request: the middleware returns at once,
  so the tile hit path pays one header lookup;
- an actual request from an allowed origin gets ``Access-Control-Allow-Origin`` (``*``, or
  the origin itself plus ``Vary: Origin`` when origins are listed) and
  ``Access-Control-Expose-Headers: ETag, X-Cache``, on errors (problem+json) too;
- a preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) to one of
  those routes from an allowed origin is answered 204 with ``Access-Control-Allow-Methods:
  GET, HEAD, OPTIONS``, ``Access-Control-Allow-Headers: Authorization, If-None-Match,
  Range`` and ``Access-Control-Max-Age: 86400``;
- a disallowed origin gets no CORS headers at all (its preflight is answered 204 without
  them), so the browser refuses the response; other routes and plain ``OPTIONS`` requests
  go on to the router (404/405 problem+json).

Credentials (cookies) are never allowed: tokens travel in ``Authorization`` or ``?token=``.

Why not aiohttp-cors: it must be registered route by route (``cors.add(route, ...)``, plus
an ``OPTIONS`` resource for each), and it does its work in an ``on_response_prepare``
signal that runs for every response of the app, tile hits included. This middleware is a
few lines, covers the routes whose :class:`~gateway.http.policy.RoutePolicy` says ``cors``
(declared where each route is registered; the short tile form and error answers included),
and costs nothing when there is no ``Origin`` header.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.http.keys import SETTINGS
from gateway.http.policy import policy_of

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

EXPOSE_HEADERS = "ETag, X-Cache"
ALLOW_METHODS = "GET, HEAD, OPTIONS"
ALLOW_HEADERS = "Authorization, If-None-Match, Range"
MAX_AGE_S = 86400


def allowed_origin(origin: str, origins: tuple[str, ...]) -> str | None:
    """The ``Access-Control-Allow-Origin`` value for ``origin``: ``*`` when every origin is
    allowed, ``origin`` when it is listed (compared without a trailing slash), else None."""
    if "*" in origins:
        return "*"
    origin = origin.rstrip("/")
    return origin if origin in origins else None


def _add_vary(headers: web.StreamResponse, value: str) -> None:
    vary = headers.headers.get("Vary")
    if vary is None:
        headers.headers["Vary"] = value
    elif value.lower() not in (v.strip().lower() for v in vary.split(",")):
        headers.headers["Vary"] = f"{vary}, {value}"


async def _preflight_allowed(request: web.Request) -> bool:
    """Whether the route a preflight's actual GET would reach answers cross-origin requests."""
    match = await request.app.router.resolve(request.clone(method="GET"))
    if match.http_exception is not None:
        return False
    return policy_of(request.app, match).cors


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Add CORS headers to the answers of routes whose policy has ``cors`` and answer their
    preflights."""
    origin = request.headers.get("Origin")
    if origin is None:
        return await handler(request)
    origins = request.app[SETTINGS].server.cors_origins
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        if not await _preflight_allowed(request):
            return await handler(request)
        preflight = web.Response(status=204)
        allow = allowed_origin(origin, origins)
        if allow is not None:
            headers = preflight.headers
            headers["Access-Control-Allow-Origin"] = allow
            headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
            headers["Access-Control-Allow-Headers"] = ALLOW_HEADERS
            headers["Access-Control-Max-Age"] = str(MAX_AGE_S)
        if allow != "*":
            _add_vary(preflight, "Origin")
        return preflight
    response = await handler(request)
    if not policy_of(request.app, request.match_info).cors or response.prepared:
        return response
    allow = allowed_origin(origin, origins)
    if allow is not None:
        response.headers["Access-Control-Allow-Origin"] = allow
        response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
    if allow != "*":
        _add_vary(response, "Origin")
    return response
