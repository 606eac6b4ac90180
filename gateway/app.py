"""The aiohttp application factory: app state, one cleanup context per resource with a
lifetime, middleware and routes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from gateway.config.settings import Settings
from gateway.http.auth import Authenticator
from gateway.http.callers import ClientRateLimit
from gateway.http.cors import cors_middleware
from gateway.http.keys import (
    AUTH,
    CLIENT_LIMIT,
    CLIP_LAYERS,
    DOWNLOAD_SERVICE,
    GUARD,
    JOB_LISTING,
    LAYERS,
    SETTINGS,
    SHARED_STATE,
    TILE_CACHE,
    TILE_SERVICE,
    UPSTREAM,
)
from gateway.http.middleware import common_headers, gateway_middleware
from gateway.routes import admin, clips, discovery, downloads, health, listing, tiles, viewer
from gateway.services.clips import ClipLayers
from gateway.services.downloads import DownloadService
from gateway.services.listing import JobListing
from gateway.services.sources import SourceCheck
from gateway.services.stack import open_tile_stack
from gateway.storage.downloads import DownloadStore, remove_interrupted

log = logging.getLogger("gateway.app")


def create_app(settings: Settings) -> web.Application:
    """Build the gateway app for ``settings``.

    The Geopera client, the tile cache and the shared limiter state are created on startup
    and closed on cleanup (aiohttp cleanup context), so one app owns one connection pool and
    one handle on each store.
    """
    app = web.Application(
        middlewares=[cors_middleware, gateway_middleware], client_max_size=1 << 20
    )
    app[SETTINGS] = settings
    app[LAYERS] = settings.layers
    app[AUTH] = Authenticator(settings.tokens)
    state = settings.state
    limits = {
        t.rate_limit: ClientRateLimit(t.rate_limit, state) for t in settings.tokens if t.rate_limit
    }
    if settings.clients.rate_limit:
        limits["default"] = ClientRateLimit(settings.clients.rate_limit, state)
    app[CLIENT_LIMIT] = limits
    app.on_response_prepare.append(common_headers)
    app.cleanup_ctx.append(_resources)
    app.on_shutdown.append(_stop_transfers)
    clips.add_routes(app)  # before tiles: /tiles/clips/{job}/{mosaic}/tilejson.json
    discovery.add_routes(app)  # before tiles: /tiles/{layer}/tilejson.json
    tiles.add_routes(app)
    listing.add_routes(app)
    downloads.add_routes(app)
    viewer.add_routes(app)
    admin.add_routes(app)
    health.add_routes(app)
    return app


async def _resources(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    # Interrupted transfers first: on a full disk they are what fills it, and every store
    # below needs room to open.
    await asyncio.to_thread(remove_interrupted, settings.downloads.directory)
    stack = open_tile_stack(settings)
    app[TILE_CACHE], app[SHARED_STATE], app[UPSTREAM] = stack.cache, stack.state, stack.client
    app[GUARD], app[TILE_SERVICE] = stack.guard, stack.service
    store = DownloadStore(settings.downloads.directory, settings.downloads.size_limit_bytes)
    await asyncio.to_thread(store.recover)
    app[DOWNLOAD_SERVICE] = DownloadService(
        store, stack.guard, content_types=settings.downloads.content_types
    )
    app[CLIP_LAYERS] = ClipLayers(app[DOWNLOAD_SERVICE])
    if settings.downloads.organization_id is not None:
        app[JOB_LISTING] = JobListing(
            stack.guard,
            store,
            settings.downloads.organization_id,
            settings.downloads.list_ttl_s,
        )
    checking = None
    if settings.upstream.check_sources:
        sources = SourceCheck(stack.guard, stack.state, settings.layers.values())
        checking = asyncio.ensure_future(sources.run())
    try:
        yield
    finally:
        if checking is not None:
            checking.cancel()
            await asyncio.gather(checking, return_exceptions=True)
        await app[DOWNLOAD_SERVICE].aclose()
        store.close()
        await stack.aclose()


async def _stop_transfers(app: web.Application) -> None:
    """On shutdown, before aiohttp waits for open connections: stop the download transfers,
    so their readers are cut (they resume with Range) instead of holding SIGTERM for the
    whole shutdown timeout."""
    if DOWNLOAD_SERVICE in app:
        await app[DOWNLOAD_SERVICE].aclose()
