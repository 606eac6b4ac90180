"""Answers more than one route module writes: a tile, for layer tiles
(:mod:`gateway.routes.tiles`) and clip tiles (:mod:`gateway.routes.clips`).

A tile goes out with its strong ``ETag``, ``Cache-Control: <visibility>, max-age=<seconds
left>`` and ``X-Cache`` (the tile service's cache status), or as 304 when ``If-None-Match``
matches (:func:`gateway.http.conditional.none_match`).

This is the cache-hit path, so it does as little as it can per request: the tile carries its
ready ``ETag`` / ``Content-Type`` pair (:attr:`~gateway.storage.tiles.CachedTile.headers`),
the ``Cache-Control`` prefixes and the common headers are constants, and only ``max-age``
(which shrinks as the tile ages) is formatted, as one integer. aiohttp builds the response's
header multidict once, from one list.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import hdrs, web

from gateway.http.conditional import none_match
from gateway.http.keys import CLOCK
from gateway.http.server import COMMON_HEADERS
from gateway.logs import UPSTREAM_TIME_KEY
from gateway.services.tiles import TileResult

_MAX_AGE_PREFIX = {False: "public, max-age=", True: "private, max-age="}
"""``Cache-Control`` up to its ``max-age`` value, by ``private``."""

_COMMON = tuple(COMMON_HEADERS.items())
"""The common headers, sent with the tile so the ``on_response_prepare`` hook
(:func:`gateway.http.middleware.common_headers`) has nothing left to add."""

_UPSTREAM_STATUSES = frozenset({"MISS", "COALESCED"})


def cache_control(private: bool, max_age: int) -> str:
    """``Cache-Control`` of a tile with ``max_age`` seconds of freshness left: ``public``, or
    ``private`` (browsers only, never a shared cache; RFC 9111 section 5.2.2.7) for tiles
    that need a token (private layers, clip layers)."""
    return _MAX_AGE_PREFIX[private] + str(max_age)


def tile_response(
    request: web.Request,
    result: TileResult,
    private: bool = False,
    clock: Callable[[], float] | None = None,
    extra: tuple[tuple[str, str], ...] = (),
) -> web.Response:
    """The answer for a tile: its body with ``ETag``, ``Cache-Control``
    (:func:`cache_control`), ``X-Cache`` and ``Content-Type``, and the common headers; 304
    (without the body and ``Content-Type``) when ``If-None-Match`` matches.

    Args:
        clock: Unix time, seconds, for ``max-age``; default: the app's (:data:`CLOCK`).
        extra: more headers (the fast path's ``RateLimit-*``, :mod:`gateway.http.hits`).
    """
    tile = result.tile
    status = result.cache_status
    if status in _UPSTREAM_STATUSES:
        request[UPSTREAM_TIME_KEY] = tile.fetch_s
    left = int(tile.fresh_until - (clock or request.app[CLOCK])())
    control = ("Cache-Control", _MAX_AGE_PREFIX[private] + (str(left) if left > 0 else "0"))
    if hdrs.IF_NONE_MATCH in request.headers and none_match(request, tile.etag):
        return web.Response(
            status=304, headers=[tile.headers[0], control, ("X-Cache", status), *_COMMON, *extra]
        )
    return web.Response(
        body=tile.body, headers=[*tile.headers, control, ("X-Cache", status), *_COMMON, *extra]
    )
