"""Admin routes (``admin`` scope): purging the tile cache (filled in by issue 5)."""

from __future__ import annotations

from aiohttp import web


def add_routes(app: web.Application) -> None:
    """Register the admin routes on ``app``."""
