"""Typed application state keys (``web.AppKey``), shared by the app factory and the routes."""

from __future__ import annotations

from aiohttp import web

from gateway.cache import TileCache
from gateway.config import Settings
from gateway.layers import Layer
from gateway.services.tiles import TileService
from gateway.upstream import GeoperaClient

SETTINGS = web.AppKey("settings", Settings)
LAYERS = web.AppKey("layers", dict[str, Layer])
TILE_CACHE = web.AppKey("tile_cache", TileCache)
UPSTREAM = web.AppKey("upstream", GeoperaClient)
TILE_SERVICE = web.AppKey("tile_service", TileService)
