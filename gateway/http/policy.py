"""Per-route policy, declared where each route is registered and read by the middleware.

A route module registers its routes with :func:`add_get` / :func:`add_post` and a
:class:`RoutePolicy`: whether browsers may read it across origins (CORS,
:mod:`gateway.http.cors`), whether it counts against the caller's rate limit
(:mod:`gateway.http.middleware`), and which query parameters it accepts
(:mod:`gateway.http.validation`). The policy is stored once per resource in the app's
:data:`ROUTE_POLICIES` table at registration, so a request costs one dictionary lookup
(:func:`policy_of`), whatever the policy says; a request that matches no route gets
:data:`OPEN`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractResource

from gateway import metrics

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    """What the HTTP edge enforces on one route before (and after) its handler runs.

    Attributes:
        cors: browsers may read the answers from other origins; preflights are answered
            (:mod:`gateway.http.cors`).
        caller_limit: the request counts against the caller's rate limit
            (``clients.rate_limit`` or the token's ``rate_limit``): routes whose answer can
            spend upstream calls.
        query: the only query parameters accepted, each at most once (anything else is 400
            problem+json, so nothing a caller adds can change what is fetched or poison
            the cache under another key); None accepts any.
    """

    cors: bool = False
    caller_limit: bool = False
    query: frozenset[str] | None = None


OPEN = RoutePolicy()
"""No CORS, no caller limit, any query parameter: operations routes, the viewer, admin, and
requests that match no route."""

ROUTE_POLICIES = web.AppKey("route_policies", dict[AbstractResource | None, RoutePolicy])
"""Each registered resource's policy (``None``, the resource of no match, is absent: a
lookup falls back to :data:`OPEN`). Created by :func:`policies`."""


def policies(app: web.Application) -> dict[AbstractResource | None, RoutePolicy]:
    """The app's policy table, created empty on first use."""
    table = app.get(ROUTE_POLICIES)
    if table is None:
        table = app[ROUTE_POLICIES] = {}
    return table


def add_get(
    app: web.Application, path: str, handler: Handler, *, name: str, policy: RoutePolicy = OPEN
) -> web.AbstractRoute:
    """Register ``GET`` (and ``HEAD``) ``path`` on ``app`` under ``name`` with ``policy``.

    Raises:
        ValueError: the resource already has another policy (one resource, one policy).
    """
    route = app.router.add_get(path, handler, name=name)
    _attach(app, route, policy)
    return route


def add_post(
    app: web.Application, path: str, handler: Handler, *, name: str, policy: RoutePolicy = OPEN
) -> web.AbstractRoute:
    """Register ``POST`` ``path`` on ``app`` under ``name`` with ``policy``.

    Raises:
        ValueError: the resource already has another policy.
    """
    route = app.router.add_post(path, handler, name=name)
    _attach(app, route, policy)
    return route


def _attach(app: web.Application, route: web.AbstractRoute, policy: RoutePolicy) -> None:
    """Record ``policy`` for the route's resource; bind the route's metrics now, at
    startup (:func:`gateway.metrics.route_observer`)."""
    if route.name:
        metrics.route_observer(route.name)
    resource = route.resource
    table = policies(app)
    known = table.setdefault(resource, policy)
    if known != policy:
        raise ValueError(f"{resource!r} already has the policy {known}, not {policy}")


def policy_of(app: web.Application, match_info: web.UrlMappingMatchInfo) -> RoutePolicy:
    """The policy of the route ``match_info`` found (:data:`OPEN` when it found none)."""
    return app[ROUTE_POLICIES].get(match_info.route.resource, OPEN)
