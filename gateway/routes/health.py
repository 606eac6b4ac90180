"""Operations endpoints: ``/healthz`` (liveness), ``/readyz`` (readiness), ``/metrics``."""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway import metrics
from gateway.http.keys import GUARD, SHARED_STATE, TILE_CACHE, UPSTREAM
from gateway.http.policy import add_get
from gateway.storage.diskcaches import STORE_ERRORS
from gateway.upstream.alerts import SOURCE_UNKNOWN, Alert
from gateway.upstream.breakers import BreakerStatus


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: 200 ``{"status": "ok"}`` while the process serves requests."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """``GET /readyz``: 200 when this worker can serve, 503 when it cannot.

    Ready means the config loaded (the app exists), the tile cache accepts a write and reads
    it back (else fetched tiles are served uncached), and so does the host's limiter state
    (else no call goes upstream); a 503 says why in ``reason``. Upstream reachability,
    breakers refusing calls (``"all operations (organisation, open)"`` while every call is
    paused after a 402 or an organisation-wide 429), operator alerts
    (:mod:`gateway.upstream.alerts`: refused key, missing scope, 402, unknown layer sources),
    the layers whose source the upstream does not know and the egress budget are reported too
    but do not make the gateway unready: with the upstream down it still serves every cached
    tile, which a load balancer should keep sending it traffic for.
    """
    app = request.app
    guard = app[GUARD]
    cache_ok, cache_why = await app[TILE_CACHE].run(app[TILE_CACHE].probe)
    state_ok, state_why = await guard.limiter.probe()
    reasons = []
    if not cache_ok:
        reasons.append(f"the tile cache cannot store tiles ({cache_why}): serving them uncached")
    if not state_ok:
        reasons.append(f"the limiter state cannot be written ({state_why}): no upstream calls")
    alerts: list[Alert] | None
    try:
        breakers, budget_left, alerts = await _state_report(app)
        open_breakers: list[str] | None = [_breaker_name(b) for b in breakers]
    except (*STORE_ERRORS, *guard.limiter.errors):
        open_breakers, budget_left, alerts = None, None, None
    ready = cache_ok and state_ok
    body: dict[str, object] = {
        "status": "ready" if ready else "unready",
        "checks": {
            "config": "ok",
            "cache_writable": cache_ok,
            "state_writable": state_ok,
            "state_backend": guard.limiter.kind,
            "upstream_reachable": await app[UPSTREAM].ping(),
            "open_breakers": open_breakers,
            "egress_budget_remaining_bytes": budget_left,
            "alerts": None if alerts is None else [a.as_json() for a in alerts],
            "unknown_sources": None
            if alerts is None
            else sorted(a.subject for a in alerts if a.kind == SOURCE_UNKNOWN),
        },
    }
    if reasons:
        body["reason"] = "; ".join(reasons)
    return web.json_response(body, status=200 if ready else 503)


async def _state_report(
    app: web.Application,
) -> tuple[list[BreakerStatus], int | None, list[Alert]]:
    """The breakers refusing calls, the egress budget left (the upstream state) and the
    active operator alerts (the host's state, in its I/O thread)."""
    guard, state = app[GUARD], app[SHARED_STATE]
    report = await guard.limiter.report()
    alerts = await state.run(guard.alerts.active)
    return report.breakers, report.budget_left, alerts


def _breaker_name(status: BreakerStatus) -> str:
    """``"<operation> (<scope kind>, <state>)"``; the organisation's is "all operations"."""
    scope = status.scope
    name = "all operations" if scope.kind == "organisation" else scope.operation
    return f"{name} ({scope.kind}, {status.state})"


async def metrics_endpoint(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text exposition format."""
    cache, guard = request.app[TILE_CACHE], request.app[GUARD]
    try:
        breakers, budget_left, alerts = await _state_report(request.app)
    except (*STORE_ERRORS, *guard.limiter.errors):
        breakers, budget_left, alerts = [], None, []
    collector = metrics.StateCollector(
        cache_bytes=cache.volume_bytes,
        open_breakers=lambda: [(b.scope.operation, b.scope.kind, b.state) for b in breakers],
        budget_left=lambda: budget_left,
        alerts=lambda: [(a.kind, a.subject) for a in alerts],
    )
    body, content_type = await asyncio.to_thread(metrics.render, collector)
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


def add_routes(app: web.Application) -> None:
    """Register the operations routes on ``app`` (policy :data:`~gateway.http.policy.OPEN`:
    never limited, so a probe or a scrape is never refused)."""
    add_get(app, "/healthz", healthz, name="healthz")
    add_get(app, "/readyz", readyz, name="readyz")
    add_get(app, "/metrics", metrics_endpoint, name="metrics")
