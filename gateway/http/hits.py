"""The cache-hit fast path: a plain ``GET`` of a tile that this process's memory tier holds
fresh, answered without aiohttp's router, the middleware chain and the response-prepare
signal (together a fifth of a hit's time under ``wrk``; issue 15).

:func:`install` puts :func:`hit_handler`'s function in front of the app's own request
handler (aiohttp's ``Application._handle``, which resolves the route and runs the
middleware; the server calls it for every request). The fast path takes a request only when
it is, on its face, a tile request that the full path would answer from memory with the
same bytes:

- method ``GET`` (``HEAD`` and the rest: full path), HTTP/1.1 on a connection kept alive
  (HTTP/1.0 and ``Connection: close``: full path, since the ready header blocks carry no
  ``Connection`` header);
- raw target ``/tiles/{layer}/{z}/{x}/{tail}`` or ``/tiles/{z}/{x}/{tail}`` (the two tile
  routes, :mod:`gateway.routes.tiles`) with no query string but a single ``?token=`` of
  URL-safe characters, no percent sign, no segment
  starting with ``.``, not under ``/tiles/clips/``, at most
  :data:`~gateway.http.validation.MAX_PATH` bytes, and a layer that exists (for the short
  form: a default layer);
- no ``Origin`` (CORS), no ``Expect``, at most
  :data:`~gateway.http.validation.MAX_HEADERS` request headers;
- the token check passes (:meth:`~gateway.http.auth.Authenticator.authorize`), the tile
  path is valid (:func:`~gateway.http.params.parse_tile`), and the memory tier holds the
  tile fresh;
- caller limits, if any, are kept in process memory (with ``[state] redis_url`` every tile
  request takes the full path).

Anything else, and any refusal found before something was counted, goes to the full path,
which answers it as it always did (problem+json and all). A request the fast path takes gets
what the full path gives, byte for byte but for the time-dependent values: the tile (or 304)
with its ``ETag``, ``Cache-Control``, ``X-Cache``, the common headers and, with a caller
limit, the ``RateLimit-*`` headers, written as a header block made once per second and tile
(:class:`~gateway.http.answers.ReadyHeads`) and the body in one write, or the same 429; it
is counted in the same metrics (route, cache lookup, upstream calls saved, egress saved) and
logged in the same access line.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from time import perf_counter

from aiohttp import HttpVersion11, hdrs, web

from gateway import metrics
from gateway.http import answers, server
from gateway.http.answers import tile_response
from gateway.http.callers import CallerRateLimit, caller_address
from gateway.http.keys import AUTH, CALLER_LIMITS, CLOCK, LAYERS, SETTINGS, TILE_SERVICE
from gateway.http.params import parse_tile
from gateway.http.problem import Problem
from gateway.http.server import COMMON_HEADERS
from gateway.http.validation import MAX_HEADERS, MAX_PATH
from gateway.layers import Layer
from gateway.logs import CLIENT_GONE_KEY, CLIENT_KEY
from gateway.services.tiles import TileAddress, TileResult, TileService
from gateway.storage.tiles import CachedTile

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_PREFIX = "/tiles/"
_SKIP = len(_PREFIX)
_CLIPS = "clips"
"""``/tiles/clips/...`` are clip routes, registered before the tile routes."""


_TOKEN_QUERY = re.compile(r"token=[A-Za-z0-9._~-]{1,512}")
"""The one query the fast path takes: a single ``token`` of URL-safe characters (nothing to
decode; anything else, such as a second parameter or a percent sign, takes the full path)."""


def tile_route(
    raw: str, layers: Mapping[str, Layer], default_layer: Layer | None
) -> tuple[str, Layer, str, str, str] | None:
    """The tile route that the raw request target ``raw`` plainly asks for, as
    ``(route name, layer, z, x, tail)``: ``tile`` for ``/tiles/{layer}/{z}/{x}/{tail}`` with
    a layer of ``layers``, ``default_tile`` for ``/tiles/{z}/{x}/{tail}`` when there is a
    ``default_layer``; None for anything else, or anything the router might see otherwise
    (a query but a single ``?token=`` of URL-safe characters, percent-encoding, dot
    segments, ``/tiles/clips/``, over :data:`~gateway.http.validation.MAX_PATH` bytes).
    z, x and tail are not checked here."""
    if not raw.startswith(_PREFIX) or len(raw) > MAX_PATH or "%" in raw:
        return None
    raw, query, token = raw.partition("?")
    if query and _TOKEN_QUERY.fullmatch(token) is None:
        return None
    if "/." in raw:
        return None
    parts = raw[_SKIP:].split("/")
    if "" in parts:
        return None  # the router's {name} matches one character or more
    if len(parts) == 4:
        layer = layers.get(parts[0])
        if layer is None or parts[0] == _CLIPS:
            return None
        return "tile", layer, parts[1], parts[2], parts[3]
    if len(parts) == 3 and default_layer is not None:
        return "default_tile", default_layer, parts[0], parts[1], parts[2]
    return None


def install(app: web.Application) -> None:
    """Put the hit path in front of ``app``'s request handler (:meth:`HitPath.handle`) and
    in its connections (:meth:`HitPath.answer_now`, through
    :func:`gateway.http.server.install`). Call it once the routes are added and before the
    app is served (the server takes the handler when it is made)."""
    hits = HitPath(app, app._handle)
    # the server is made with ``app._handle`` (web_app.py, ``_make_handler``): shadowed on
    # the instance; object.__setattr__ skips the "custom attribute" warning of debug mode
    object.__setattr__(app, "_handle", hits.handle)
    server.install(app, hits.answer_now if hits.active else None)


def uninstall(app: web.Application) -> None:
    """Take the hit path out of ``app`` again (tests compare answers with and without it):
    every request goes through the router and the middleware."""
    del app._handle  # the class's own handler again
    server.install(app, None)


_Taken = tuple[Layer, TileAddress, CachedTile, Callable[[str, int, float], None]]
"""What :meth:`HitPath._take` found: layer, tile address, the fresh tile held in memory and
the route's latency observer."""


class HitPath:
    """The cache-hit fast path of one app (module docstring): reads the app's services on
    first use (they are made at startup).

    Args:
        app: the gateway app.
        full: the app's own request handler (router and middleware), for everything else.
    """

    def __init__(self, app: web.Application, full: Handler) -> None:
        self._app = app
        self._full = full
        settings = app[SETTINGS]
        self._layers = app[LAYERS]
        default = settings.default_layer
        self._default_layer = self._layers.get(default) if default is not None else None
        self._trusted = settings.server.trusted_proxies
        self._auth = app[AUTH]
        self._clock = app[CLOCK]
        self._limits = app[CALLER_LIMITS]
        # caller limits in Redis: every request takes the full path
        self.active = all(limit.local for limit in self._limits.values())
        self._observers = {
            "tile": metrics.route_observer("tile"),
            "default_tile": metrics.route_observer("default_tile"),
        }
        self._service: TileService | None = None  # bound on first use

    def _take(self, request: web.Request) -> _Taken | None:
        """The tile ``request`` asks for when the fast path may answer it and memory holds
        it fresh (module docstring); None, having counted nothing, otherwise."""
        if request.method != hdrs.METH_GET or request.version != HttpVersion11:
            return None
        if not request.keep_alive:  # the ready header blocks carry no Connection header
            return None
        headers = request.headers
        if hdrs.ORIGIN in headers or hdrs.EXPECT in headers or len(headers) > MAX_HEADERS:
            return None
        route = tile_route(request.raw_path, self._layers, self._default_layer)
        if route is None:
            return None
        name, layer, z, x, tail = route
        service = self._service
        if service is None:
            service = self._service = self._app[TILE_SERVICE]
        try:
            self._auth.authorize(request, "tiles", layer)
            address = parse_tile(layer, z, x, tail)
        except Problem:
            return None  # nothing counted yet: the full path answers it
        # looked up before any counting: a request the fast path does not answer must not
        # be counted against its caller's limit twice
        held = service.fresh_in_memory(address)
        if held is None:
            return None
        return layer, address, held, self._observers[name]

    def _limit(self, request: web.Request) -> tuple[CallerRateLimit | None, str]:
        """The caller limit that counts ``request`` (None: none does) and its key; sets the
        caller's address on the request for the access line."""
        caller = caller_address(request, self._trusted)
        request[CLIENT_KEY] = caller
        token = self._auth.identify(request)  # known by now: authorize identified it
        limit = self._limits.get((token.rate_limit if token is not None else None) or "default")
        return limit, f"token:{token.name}" if token is not None else caller

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The app's request handler: a hit the fast path takes is answered here (a
        :class:`~gateway.http.answers.ReadyResponse`, or the caller limit's 429), anything
        else by the full path."""
        if not self.active:
            return await self._full(request)
        started = perf_counter()
        taken = self._take(request)
        if taken is None:
            return await self._full(request)
        layer, address, held, observe = taken
        request[CLIENT_GONE_KEY] = False
        extra: tuple[tuple[str, str], ...] = ()
        if self._limits:
            limit, key = self._limit(request)
            if limit is not None:
                try:
                    rate = limit.check_local(key)
                except Problem as problem:  # 429, as the middleware answers it
                    metrics.CLIENT_REJECTIONS.inc()
                    response = problem.response(request.path)
                    response.headers.update(COMMON_HEADERS)
                    observe(hdrs.METH_GET, response.status, perf_counter() - started)
                    return response
                extra = tuple(rate.items())
        result = self._service_of().served_from_memory(address, held)
        answer = tile_response(request, result, not layer.public, self._clock, extra)
        observe(hdrs.METH_GET, answer.status, perf_counter() - started)
        return answer

    def answer_now(self, request: web.Request) -> web.StreamResponse | None:
        """Answer ``request`` at once, outside any task, when the fast path takes it and
        its answer is a ready one (:class:`~gateway.http.answers.ReadyResponse`): the
        answer is queued with this loop turn's writes
        (:data:`~gateway.http.server.DEFERRED_WRITES`) and returned (for the access line).
        None, having written and counted nothing, for anything else, the caller limit's
        refusal included (its 429 comes from :meth:`handle` or the full path, which count
        it). Installed only while :attr:`active` (:func:`install`).

        Raises:
            ConnectionResetError: the transport is closing (nothing counted then either).
        """
        started = perf_counter()
        taken = self._take(request)
        if taken is None:
            return None
        layer, address, held, observe = taken
        result = TileResult.from_memory(held)
        not_modified = answers.is_not_modified(request, held.etag)
        heads = answers.READY_HEADS
        block = heads.head(result, not layer.public, held.max_age(self._clock()), not_modified)
        if block is None or request.transport is None or request.transport.is_closing():
            return None
        extra: tuple[tuple[str, str], ...] = ()
        if self._limits:
            limit, key = self._limit(request)
            if limit is not None:
                rate = limit.try_local(key)
                if rate is None:
                    return None
                extra = tuple(rate.items())
        request[CLIENT_GONE_KEY] = False
        self._service_of().count_served(address, result)
        answer = heads.answer(block, result, not_modified, extra)
        answer.send_now(request)
        observe(hdrs.METH_GET, answer.status, perf_counter() - started)
        return answer

    def _service_of(self) -> TileService:
        service = self._service
        assert service is not None, "taken before the service was bound"
        return service
