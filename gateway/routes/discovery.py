"""Discovery routes: ``/layers``, TileJSON, WMTS capabilities (filled in by issue 5)."""

from __future__ import annotations

from aiohttp import web


def add_routes(app: web.Application) -> None:
    """Register the discovery routes on ``app`` (before the tile routes)."""
