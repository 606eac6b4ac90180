"""The aiohttp application factory: state, resources with a lifetime, middleware, routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from gateway import __version__
from gateway.cache import TileCache
from gateway.config import Settings
from gateway.problem import Problem
from gateway.routes import health, tiles
from gateway.services.tiles import TileService
from gateway.state import LAYERS, SETTINGS, TILE_CACHE, TILE_SERVICE, UPSTREAM
from gateway.upstream import GeoperaClient

log = logging.getLogger("gateway.app")

SERVER = f"geopera-gateway/{__version__}"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every error as problem+json (RFC 9457), never with a stack trace.

    :class:`Problem` raised anywhere becomes its response; aiohttp's own 404/405/413 become
    the matching problem; anything unexpected is logged and answered 500. Every response
    also gets ``X-Content-Type-Options: nosniff`` and the ``Server`` name.
    """
    try:
        response = await handler(request)
    except Problem as problem:
        response = problem.response(request.path)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _http_problem(request, exc)
    except Exception:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        response = Problem(
            500,
            "Internal error",
            "The gateway failed to answer this request; the error is in its log.",
            slug="internal-error",
        ).response(request.path)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Server"] = SERVER
    return response


def _http_problem(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's own HTTP errors (no route, wrong method, body too large) as problem+json."""
    headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
    title = exc.reason or "Error"
    detail = {
        404: "No route matches this path.",
        405: f"{request.method} is not allowed here.",
    }.get(exc.status, title)
    slug = title.lower().replace(" ", "-")
    return Problem(exc.status, title, detail, slug=slug, headers=headers).response(request.path)


def create_app(settings: Settings) -> web.Application:
    """Build the gateway app for ``settings``.

    The Geopera client and the tile cache are created on startup and closed on cleanup
    (aiohttp cleanup context), so one app owns one connection pool and one cache handle.
    """
    app = web.Application(middlewares=[problem_middleware], client_max_size=1 << 20)
    app[SETTINGS] = settings
    app[LAYERS] = settings.layers
    app.cleanup_ctx.append(_resources)
    tiles.add_routes(app)
    health.add_routes(app)
    return app


async def _resources(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    cache = TileCache(
        settings.cache.directory, settings.cache.size_limit_bytes, settings.cache.memory_bytes
    )
    up = settings.upstream
    client = GeoperaClient(
        up.base_url,
        up.api_key,
        connect_timeout_s=up.connect_timeout_s,
        read_timeout_s=up.read_timeout_s,
        max_connections=up.max_connections,
        user_agent=f"geopera-gateway/{__version__}",
    )
    app[TILE_CACHE] = cache
    app[UPSTREAM] = client
    app[TILE_SERVICE] = TileService(cache, client, settings.cache.empty_ttl_s)
    try:
        yield
    finally:
        await client.aclose()
        cache.close()
