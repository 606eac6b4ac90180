"""The aiohttp application factory: state, resources with a lifetime, middleware, routes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from gateway import __version__, metrics
from gateway.auth import Authenticator
from gateway.cache import TileCache
from gateway.clients import ClientRateLimit, client_address
from gateway.config import Settings
from gateway.cors import cors_middleware
from gateway.errors import GatewayError
from gateway.guard import UpstreamGuard
from gateway.limits import SharedState
from gateway.logs import CLIENT_CLOSED, CLIENT_GONE_KEY, CLIENT_KEY
from gateway.problem import Problem, problem_for
from gateway.routes import admin, clips, discovery, downloads, health, listing, tiles, viewer
from gateway.services.clips import ClipLayers
from gateway.services.downloads import DownloadService
from gateway.services.listing import JobListing
from gateway.services.sources import SourceCheck
from gateway.services.tiles import TileService
from gateway.state import (
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
from gateway.store import DownloadStore, remove_interrupted
from gateway.upstream import GeoperaClient
from gateway.validation import check_request_shape

log = logging.getLogger("gateway.app")

SERVER = f"geopera-gateway/{__version__}"

LIMITED_ROUTES = frozenset(
    {
        "tile",
        "default_tile",
        "download_list",
        "download_job",
        "download",
        "download_checksum",
        "clip_tile",
        "clip_tilejson",
    }
)
"""Routes that count against the per-client rate limit (those that can spend upstream)."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def gateway_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Per-client rate limit, problem+json for every error, common headers and HTTP metrics.

    :class:`Problem` raised anywhere becomes its response, a domain error
    (:class:`~gateway.errors.GatewayError`) the response :data:`~gateway.problem.ERROR_TABLE`
    gives it; aiohttp's own 404/405/413 become the matching problem; anything unexpected is
    logged and answered 500 without a trace.
    Every response gets ``X-Content-Type-Options: nosniff`` and the ``Server`` name.
    """
    started = time.perf_counter()
    route = request.match_info.route.name or "unmatched"
    rate_headers = None
    try:
        check_request_shape(request, route)
        if route in LIMITED_ROUTES:
            rate_headers = _check_client_limit(request)
        response = await handler(request)
    except Problem as problem:
        if problem.status == 429:
            metrics.CLIENT_REJECTIONS.inc()
        response = problem.response(request.path)
    except GatewayError as exc:
        response = problem_for(exc).response(request.path)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _http_problem(request, exc)
    except ConnectionResetError:  # the client left while the answer was being sent
        request[CLIENT_GONE_KEY] = True
        response = web.Response(status=CLIENT_CLOSED)
    except asyncio.CancelledError:  # the client left and the server cancels its handlers
        metrics.observe_request(route, request.method, CLIENT_CLOSED, time.perf_counter() - started)
        raise
    except Exception:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        response = Problem(
            500,
            "Internal error",
            "The gateway failed to answer this request; the error is in its log.",
            slug="internal-error",
        ).response(request.path)
    headers = response.headers
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Server"] = SERVER
    if rate_headers is not None:
        headers.update(rate_headers)
    status = CLIENT_CLOSED if request.get(CLIENT_GONE_KEY) else response.status
    metrics.observe_request(route, request.method, status, time.perf_counter() - started)
    return response


def _check_client_limit(request: web.Request) -> dict[str, str] | None:
    """Count the request against its client's limit: per token (with the token's own rate
    when it has one), else per client address. Returns the RateLimit headers, if limited.

    Raises:
        Problem: 401 for a bad token, 429 over the limit.
    """
    app = request.app
    limits = app[CLIENT_LIMIT]
    if not limits:
        return None  # no client limits configured: tokens are still checked by the route
    token = app[AUTH].identify(request)
    client = client_address(request, app[SETTINGS].server.trusted_proxies)
    request[CLIENT_KEY] = client
    rate = token.rate_limit if token is not None and token.rate_limit else None
    limit = app[CLIENT_LIMIT].get(rate or "default")
    if limit is None:
        return None
    return limit.check(f"token:{token.name}" if token is not None else client)


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
    limits = {t.rate_limit: ClientRateLimit(t.rate_limit) for t in settings.tokens if t.rate_limit}
    if settings.clients.rate_limit:
        limits["default"] = ClientRateLimit(settings.clients.rate_limit)
    app[CLIENT_LIMIT] = limits
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


@dataclass(slots=True)
class TileStack:
    """The tile path of one process: the tile cache, the host's shared limiter state, the
    Geopera client, the upstream guard and the tile service, built as the gateway builds them.

    Used by the app (:func:`_resources`) and by ``geopera-gateway seed``, so seeding shares the
    gateway's cache, host-wide limits, breakers and coalescing.
    """

    cache: TileCache
    state: SharedState
    client: GeoperaClient
    guard: UpstreamGuard
    service: TileService

    async def aclose(self) -> None:
        """Cancel background refreshes, then close the client, the state and the cache."""
        await self.service.aclose()
        await self.client.aclose()
        self.state.close()
        self.cache.close()


def open_tile_stack(settings: Settings) -> TileStack:
    """Build the tile path for ``settings`` (cache, shared state, client, guard, tile
    service), as the gateway and the seeder use it; close it with :meth:`TileStack.aclose`.

    Raises:
        OSError: the cache or state directory cannot be created or opened.
    """
    cache = TileCache(
        settings.cache.directory, settings.cache.size_limit_bytes, settings.cache.memory_bytes
    )
    state = SharedState(settings.cache.state_directory)
    up = settings.upstream
    client = GeoperaClient(
        up.base_url,
        up.api_key,
        connect_timeout_s=up.connect_timeout_s,
        read_timeout_s=up.read_timeout_s,
        max_connections=up.max_connections,
        user_agent=SERVER,
        problem_types=up.problem_types,
    )
    guard = UpstreamGuard(client, state, settings.limits, up.read_timeout_s)
    lim = settings.limits
    longest_fetch = lim.max_wait_s + lim.retry_attempts * (up.read_timeout_s + lim.retry_max_s)
    service = TileService(cache, guard, settings.cache.empty_ttl_s, claim_s=longest_fetch + 5)
    return TileStack(cache, state, client, guard, service)


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
