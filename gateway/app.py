"""The aiohttp application factory: app state, one cleanup context per resource with a
lifetime, middleware and routes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from gateway.clock import Clock, system_clock
from gateway.config.settings import Settings
from gateway.http import hits
from gateway.http.auth import Authenticator
from gateway.http.callers import CallerRateLimit
from gateway.http.keys import (
    AUTH,
    CALLER_LIMITS,
    CLIP_LAYERS,
    CLOCK,
    DOWNLOAD_SERVICE,
    DOWNLOAD_STORE,
    FLEET_PURGES,
    GUARD,
    JOB_LISTING,
    LAYERS,
    SETTINGS,
    SHARED_STATE,
    TILE_CACHE,
    TILE_SERVICE,
    UPSTREAM,
)
from gateway.http.middleware import common_headers, common_headers_only, gateway_middleware
from gateway.http.policy import ROUTE_POLICIES
from gateway.routes import admin, clips, discovery, downloads, health, listing, tiles, viewer
from gateway.seed.fleet import FleetPurges
from gateway.services.clips import ClipLayers
from gateway.services.downloads import DownloadService
from gateway.services.listing import JobListing
from gateway.services.peers import PeerClient, peer_token
from gateway.services.sources import SourceCheck
from gateway.services.stack import open_tile_stack
from gateway.storage.coalesce import FleetFiles
from gateway.storage.downloads import DownloadStore, remove_interrupted

log = logging.getLogger("gateway.app")


def create_app(settings: Settings, *, clock: Clock = system_clock) -> web.Application:
    """Build the gateway app for ``settings``; tile freshness and the caller limits kept in
    process memory are measured with ``clock`` (Unix seconds, :mod:`gateway.clock`: tests
    pass one they move forward).

    The Geopera client, the tile cache, the shared limiter state, the download store and
    the download service are created on startup and closed on cleanup, one aiohttp cleanup
    context each (:data:`RESOURCES`), so one app owns one connection pool and one handle on
    each store, and a start that fails part-way closes exactly what had started.
    """
    # one middleware: CORS runs inside it (each middleware layer costs every request)
    app = web.Application(middlewares=[gateway_middleware], client_max_size=1 << 20)
    app[SETTINGS] = settings
    app[CLOCK] = clock
    app[LAYERS] = settings.layers
    app[AUTH] = Authenticator(settings.tokens)
    state = settings.state
    limits = {
        t.rate_limit: CallerRateLimit(t.rate_limit, state, clock)
        for t in settings.tokens
        if t.rate_limit
    }
    if settings.clients.rate_limit:
        limits["default"] = CallerRateLimit(settings.clients.rate_limit, state, clock)
    app[CALLER_LIMITS] = limits
    app[ROUTE_POLICIES] = {}  # each route module declares its routes' policies
    app.on_response_prepare.append(common_headers if limits else common_headers_only)
    app.cleanup_ctx.extend(RESOURCES)
    app.on_shutdown.append(_stop_transfers)
    clips.add_routes(app)  # before tiles: /tiles/clips/{job}/{mosaic}/tilejson.json
    discovery.add_routes(app)  # before tiles: /tiles/{layer}/tilejson.json
    tiles.add_routes(app)
    listing.add_routes(app)
    downloads.add_routes(app)
    viewer.add_routes(app)
    admin.add_routes(app)
    health.add_routes(app)
    hits.install(app)  # the cache-hit fast path, in front of the router and the middleware
    return app


async def _interrupted_transfers(app: web.Application) -> AsyncIterator[None]:
    """Delete the temporary files of transfers that stopped with their process; first of all:
    on a full disk they are what fills it, and every store below needs room to open."""
    await asyncio.to_thread(remove_interrupted, app[SETTINGS].downloads.directory)
    yield


async def _tile_stack(app: web.Application) -> AsyncIterator[None]:
    """The tile path: tile cache, shared limiter state, Geopera client, guard, tile service."""
    stack = open_tile_stack(app[SETTINGS], app[CLOCK])
    app[TILE_CACHE], app[SHARED_STATE], app[UPSTREAM] = stack.cache, stack.state, stack.client
    app[GUARD], app[TILE_SERVICE] = stack.guard, stack.service
    try:
        yield
    finally:
        await stack.aclose()


async def _download_store(app: web.Application) -> AsyncIterator[None]:
    """The download store, made to agree with its files (crash recovery) before use."""
    downloads = app[SETTINGS].downloads
    store = DownloadStore(downloads.directory, downloads.size_limit_bytes)
    try:
        await asyncio.to_thread(store.recover)
    except BaseException:
        store.close()  # opened, but its start-up failed: nothing else will close it
        raise
    app[DOWNLOAD_STORE] = store
    try:
        yield
    finally:
        store.close()


async def _download_service(app: web.Application) -> AsyncIterator[None]:
    """The download service and what is built on it: clip layers, the job listing."""
    settings, store, guard = app[SETTINGS], app[DOWNLOAD_STORE], app[GUARD]
    fleet, peers = _fleet_files(app)
    service = DownloadService(
        store, guard, content_types=settings.downloads.content_types, fleet=fleet, peers=peers
    )
    app[DOWNLOAD_SERVICE] = service
    app[CLIP_LAYERS] = ClipLayers(service)
    if settings.downloads.organization_id is not None:
        app[JOB_LISTING] = JobListing(
            guard, store, settings.downloads.organization_id, settings.downloads.list_ttl_s
        )
    try:
        yield
    finally:
        await service.aclose()


def _fleet_files(app: web.Application) -> tuple[FleetFiles | None, PeerClient | None]:
    """With ``[state] redis_url`` and ``peer_url``: the fleet's single-flight of clip files
    and the client that pulls them from other replicas; else ``(None, None)``."""
    settings = app[SETTINGS]
    tile_fleet = app[TILE_SERVICE].fleet
    if tile_fleet is None:
        return None, None
    if settings.state.peer_url is None:
        log.info("state.peer_url is not set: this replica fetches its own copy of each clip file")
        return None, None
    fleet = FleetFiles(tile_fleet.link, settings.state.lease_s, settings.state.peer_url)
    # the sending replica may itself wait on the upstream as long as its read timeout
    read_timeout_s = settings.upstream.read_timeout_s + PEER_READ_MARGIN_S
    return fleet, PeerClient(peer_token(settings.upstream.api_key), read_timeout_s)


PEER_READ_MARGIN_S = 5.0
"""How much longer a replica waits for bytes from another one than that one waits on the
upstream, seconds."""


async def _source_check(app: web.Application) -> AsyncIterator[None]:
    """The background check that the upstream knows every layer's source
    (``upstream.check_sources``)."""
    settings = app[SETTINGS]
    if not settings.upstream.check_sources:
        yield
        return
    sources = SourceCheck(app[GUARD], app[SHARED_STATE], settings.layers.values())
    checking = asyncio.ensure_future(sources.run())
    try:
        yield
    finally:
        checking.cancel()
        await asyncio.gather(checking, return_exceptions=True)


async def _fleet_purges(app: web.Application) -> AsyncIterator[None]:
    """With ``[state] redis_url``: purges announced to the other replicas, and theirs applied
    here in the background (:mod:`gateway.seed.fleet`)."""
    fleet = app[TILE_SERVICE].fleet
    if fleet is None:
        yield
        return
    purges = FleetPurges(fleet.link, app[TILE_CACHE], app[LAYERS])
    app[FLEET_PURGES] = purges
    follower = asyncio.ensure_future(purges.follow())
    try:
        yield
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)


RESOURCES = (
    _interrupted_transfers,
    _tile_stack,
    _fleet_purges,
    _download_store,
    _download_service,
    _source_check,
)
"""The app's cleanup contexts, one per resource, in start-up order. aiohttp closes those
that started, in reverse order, and never one whose start-up failed (web_advanced.rst,
"Cleanup Context"), so a failed start leaves nothing open."""


async def _stop_transfers(app: web.Application) -> None:
    """On shutdown, before aiohttp waits for open connections: stop the download transfers,
    so their readers are cut (they resume with Range) instead of holding SIGTERM for the
    whole shutdown timeout."""
    if DOWNLOAD_SERVICE in app:
        await app[DOWNLOAD_SERVICE].aclose()
