"""Liveness: ``GET /healthz`` answers 200 while the process serves requests."""

from __future__ import annotations

from aiohttp import web


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: ``{"status": "ok"}``."""
    return web.json_response({"status": "ok"})


def add_routes(app: web.Application) -> None:
    """Register the health routes on ``app``."""
    app.router.add_get("/healthz", healthz)
