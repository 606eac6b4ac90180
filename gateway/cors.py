"""CORS for tiles, TileJSON and WMTS (filled in by issue 5)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Pass-through until CORS is implemented."""
    return await handler(request)
