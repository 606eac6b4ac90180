"""The gateway's request middleware and the headers every response carries.

:func:`gateway_middleware` is the app's one middleware (each middleware layer costs every
request, cache hits included). It runs around every handler: CORS when the request has an
``Origin`` (:func:`gateway.http.cors.cors_middleware`, called from here), request-shape
checks and the route's :class:`~gateway.http.policy.RoutePolicy` (its query parameters,
the per-caller rate limit), problem+json for every error (a
:class:`~gateway.http.problem.Problem`, a domain error through
:data:`~gateway.http.problem.ERROR_TABLE`, aiohttp's own 404/405/413, or an unexpected
exception: logged, 500), the 499 of a client that left, and the HTTP metrics (bound per
route at startup: :class:`gateway.metrics.RouteObserver`).
:func:`common_headers` adds ``X-Content-Type-Options``, ``Server`` and the ``RateLimit-*``
headers as each response is prepared, streamed ones included.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from time import perf_counter

from aiohttp import hdrs, web

from gateway import metrics
from gateway.errors import GatewayError
from gateway.http.callers import caller_address
from gateway.http.cors import cors_middleware
from gateway.http.keys import AUTH, CALLER_LIMITS, SETTINGS
from gateway.http.policy import OPEN, ROUTE_POLICIES
from gateway.http.problem import Problem, problem_for
from gateway.http.server import COMMON_HEADERS
from gateway.http.validation import check_request_shape
from gateway.logs import CLIENT_CLOSED, CLIENT_GONE_KEY, CLIENT_KEY

log = logging.getLogger("gateway.app")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_NOSNIFF = "X-Content-Type-Options"
"""The common header whose presence says the answer carries them all already."""

RATE_HEADERS_KEY = web.RequestKey("gateway_rate_headers", dict)
"""Request key for the ``RateLimit-*`` headers of the caller's limit, set by the middleware
and written by :func:`common_headers`."""


@web.middleware
async def gateway_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """CORS for requests with ``Origin`` (:func:`~gateway.http.cors.cors_middleware`, around
    everything else, as when it was a middleware of its own), then :func:`_answer`."""
    if hdrs.ORIGIN in request.headers:
        return await cors_middleware(request, partial(_answer, handler=handler))
    return await _answer(request, handler)


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The route's policy (:mod:`gateway.http.policy`: allowed query parameters, the
    caller's rate limit), problem+json for every error and HTTP metrics.

    :class:`Problem` raised anywhere becomes its response, a domain error
    (:class:`~gateway.errors.GatewayError`) the response :data:`~gateway.http.problem.ERROR_TABLE`
    gives it; aiohttp's own 404/405/413 become the matching problem; anything unexpected is
    logged and answered 500 without a trace. A client that left is counted as 499.
    The common headers are added by :func:`common_headers` as each response is prepared,
    streamed ones included.
    """
    started = perf_counter()
    # set up front: a key that is absent costs every later lookup a KeyError inside
    # ``request.get`` (here, and in the access log)
    request[CLIENT_GONE_KEY] = False
    matched = request.match_info.route
    observe = metrics.route_observer(matched.name or "unmatched")
    policy = request.app[ROUTE_POLICIES].get(matched.resource, OPEN)
    try:
        check_request_shape(request, policy)
        if policy.caller_limit:
            await _check_caller_limit(request)
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
    except ConnectionError:
        # the client left while the answer was being sent: a reset (RST, as a client that
        # closes with unread data sends) comes as aiohttp's ``ConnectionError("Connection
        # lost")``, a clean close as ``ConnectionResetError``; with the client's
        # connection still open it is an error of ours
        if not client_left(request):
            response = _internal_error(request)
        else:
            request[CLIENT_GONE_KEY] = True
            response = web.Response(status=CLIENT_CLOSED)
    except asyncio.CancelledError:  # the client left and the server cancels its handlers
        observe(request.method, CLIENT_CLOSED, perf_counter() - started)
        raise
    except Exception:
        response = _internal_error(request)
    status = CLIENT_CLOSED if request.get(CLIENT_GONE_KEY) else response.status
    observe(request.method, status, perf_counter() - started)
    return response


def client_left(request: web.Request) -> bool:
    """Whether ``request``'s client connection is gone or closing (what a
    ``ConnectionError`` while writing its answer means when it is)."""
    transport = request.transport
    return transport is None or transport.is_closing()


def _internal_error(request: web.Request) -> web.Response:
    """Log the exception being handled, with its trace, and answer 500 problem+json that
    names none of it."""
    log.exception("unhandled error serving %s %s", request.method, request.path)
    return Problem(
        500,
        "Internal error",
        "The gateway failed to answer this request; the error is in its log.",
        slug="internal-error",
    ).response(request.path)


async def common_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the headers of every answer, set just before its headers are
    sent, so streamed answers (download transfers, ``multipart/byteranges``, files) carry
    them too: :data:`~gateway.http.server.COMMON_HEADERS` and, on routes with a caller limit,
    the ``RateLimit-*`` headers (draft-ietf-httpapi-ratelimit-headers). An answer that
    already carries them (a tile: :mod:`gateway.http.answers`) costs one lookup."""
    headers = response.headers
    if _NOSNIFF not in headers:
        headers.update(COMMON_HEADERS)
    rate_headers = request.get(RATE_HEADERS_KEY)
    if rate_headers is not None:
        headers.update(rate_headers)


async def common_headers_only(request: web.Request, response: web.StreamResponse) -> None:
    """:func:`common_headers` for an app without caller limits (no ``RateLimit-*`` header
    can be due, so none is looked for)."""
    headers = response.headers
    if _NOSNIFF not in headers:
        headers.update(COMMON_HEADERS)


async def _check_caller_limit(request: web.Request) -> None:
    """Count the request against its caller's limit: per token (with the token's own rate
    when it has one), else per caller address; the RateLimit headers go in
    :data:`RATE_HEADERS_KEY`.

    Raises:
        Problem: 400 for a token sent twice and 401 for a bad one (both counted against the
            caller address first), 429 over the limit.
    """
    app = request.app
    limits = app[CALLER_LIMITS]
    if not limits:
        return  # no caller limits configured: tokens are still checked by the route
    caller = caller_address(request, app[SETTINGS].server.trusted_proxies)
    request[CLIENT_KEY] = caller
    try:
        token = app[AUTH].identify(request)
    except Problem:
        # a refused token costs a request too, from the caller's address
        default = limits.get("default")
        if default is not None:
            request[RATE_HEADERS_KEY] = await default.check(caller)
        raise
    rate = token.rate_limit if token is not None and token.rate_limit else None
    limit = limits.get(rate or "default")
    if limit is not None:
        request[RATE_HEADERS_KEY] = await limit.check(
            f"token:{token.name}" if token is not None else caller
        )


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
