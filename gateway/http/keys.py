"""Typed application state keys (``web.AppKey``), shared by the app factory and the routes."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from gateway.config.settings import Settings
from gateway.http.auth import Authenticator
from gateway.http.callers import CallerRateLimit
from gateway.layers import Layer
from gateway.seed.fleet import FleetPurges
from gateway.services.clips import ClipLayers
from gateway.services.downloads import DownloadService
from gateway.services.listing import JobListing
from gateway.services.tiles import TileService
from gateway.storage.downloads import DownloadStore
from gateway.storage.tiles import TileCache
from gateway.upstream.buckets import SharedState
from gateway.upstream.client import GeoperaClient
from gateway.upstream.guard import UpstreamGuard

SETTINGS = web.AppKey("settings", Settings)
CLOCK: web.AppKey[Callable[[], float]] = web.AppKey("clock")
"""The app's :data:`gateway.clock.Clock` (Unix seconds)."""
LAYERS = web.AppKey("layers", dict[str, Layer])
CALLER_LIMITS = web.AppKey("caller_limits", dict[str, CallerRateLimit])
"""The callers' (downstream clients') rate limits by rate: ``"default"``
(``clients.rate_limit``, absent when off) and one per distinct token ``rate_limit``."""
AUTH = web.AppKey("auth", Authenticator)
TILE_CACHE = web.AppKey("tile_cache", TileCache)
SHARED_STATE = web.AppKey("shared_state", SharedState)
UPSTREAM = web.AppKey("upstream", GeoperaClient)
GUARD = web.AppKey("guard", UpstreamGuard)
TILE_SERVICE = web.AppKey("tile_service", TileService)
DOWNLOAD_STORE = web.AppKey("download_store", DownloadStore)
"""For the app factory's contexts; routes reach files through :data:`DOWNLOAD_SERVICE`."""
DOWNLOAD_SERVICE = web.AppKey("download_service", DownloadService)
CLIP_LAYERS = web.AppKey("clip_layers", ClipLayers)
JOB_LISTING = web.AppKey("job_listing", JobListing)
"""Present only when ``downloads.organization_id`` is configured."""
FLEET_PURGES = web.AppKey("fleet_purges", FleetPurges)
"""Purges shared with the other replicas (only with ``[state] redis_url``)."""
