"""Operations endpoints: ``/healthz`` (liveness), ``/readyz`` (readiness), ``/metrics``."""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway import metrics
from gateway.state import GUARD, TILE_CACHE, UPSTREAM


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: 200 ``{"status": "ok"}`` while the process serves requests."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """``GET /readyz``: 200 when this worker can serve, 503 when it cannot.

    Ready means the config loaded (the app exists) and the tile cache accepts a write and
    reads it back. Upstream reachability and open breakers are reported too but do not make
    the gateway unready: with the upstream down it still serves every cached tile, which a
    load balancer should keep sending it traffic for.
    """
    cache_ok = await asyncio.to_thread(request.app[TILE_CACHE].probe)
    guard = request.app[GUARD]
    open_breakers = [
        f"{b.scope.operation} ({b.scope.kind}, {b.state})" for b in guard.breakers.statuses()
    ]
    body = {
        "status": "ready" if cache_ok else "unready",
        "checks": {
            "config": "ok",
            "cache_writable": cache_ok,
            "upstream_reachable": await request.app[UPSTREAM].ping(),
            "open_breakers": open_breakers,
            "egress_budget_remaining_bytes": guard.budget.remaining(),
        },
    }
    return web.json_response(body, status=200 if cache_ok else 503)


async def metrics_endpoint(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text exposition format."""
    cache, guard = request.app[TILE_CACHE], request.app[GUARD]
    collector = metrics.StateCollector(
        cache_bytes=cache.volume_bytes,
        open_breakers=lambda: [
            (b.scope.operation, b.scope.kind, b.state) for b in guard.breakers.statuses()
        ],
        budget_left=guard.budget.remaining,
    )
    body, content_type = await asyncio.to_thread(metrics.render, collector)
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


def add_routes(app: web.Application) -> None:
    """Register the operations routes on ``app``."""
    app.router.add_get("/healthz", healthz, name="healthz")
    app.router.add_get("/readyz", readyz, name="readyz")
    app.router.add_get("/metrics", metrics_endpoint, name="metrics")
