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

A ``GET`` over HTTP/1.1 kept alive without ``Origin`` (what map clients send; the fast path
of :mod:`gateway.http.hits`, and the tile routes for misses and joined fetches) goes
further: :class:`ReadyHeads` keeps each tile's whole header block as bytes for the current
second (``Date`` and ``max-age`` change once a second), and :class:`ReadyResponse` writes it
and the body in one ``writelines``, without aiohttp's header multidict, its header checks,
the prepare signal and its serialiser (a fifth of a hit's time under ``wrk``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import ClientConnectionResetError, HttpVersion11, hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import rfc822_formatted_time

from gateway.http.conditional import none_match
from gateway.http.keys import CLOCK
from gateway.http.middleware import RATE_HEADERS_KEY
from gateway.http.server import COMMON_HEADERS, DEFERRED_WRITES
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


def is_not_modified(request: web.BaseRequest, etag: str) -> bool:
    """Whether ``request``'s ``If-None-Match`` matches ``etag`` (a 304 is due); the header
    is parsed only when sent (:func:`gateway.http.conditional.none_match`)."""
    return hdrs.IF_NONE_MATCH in request.headers and none_match(request, etag)


def tile_response(
    request: web.Request,
    result: TileResult,
    private: bool = False,
    clock: Callable[[], float] | None = None,
    extra: tuple[tuple[str, str], ...] = (),
) -> web.StreamResponse:
    """The answer for a tile: its body with ``ETag``, ``Cache-Control``
    (:func:`cache_control`), ``X-Cache`` and ``Content-Type``, and the common headers; 304
    (without the body and ``Content-Type``) when ``If-None-Match`` matches.

    A ``GET`` over HTTP/1.1 kept alive, without ``Origin`` (whose CORS headers the middleware
    adds to the response afterwards), gets a :class:`ReadyResponse` (:data:`READY_HEADS`,
    the caller limit's ``RateLimit-*`` headers included); anything else an aiohttp
    ``Response`` (aiohttp adds ``Connection``, leaves the body out for ``HEAD``).

    Args:
        clock: Unix time, seconds, for ``max-age``; default: the app's (:data:`CLOCK`).
        extra: more headers (the fast path's ``RateLimit-*``, :mod:`gateway.http.hits`).
    """
    tile = result.tile
    status = result.cache_status
    if status in _UPSTREAM_STATUSES:
        request[UPSTREAM_TIME_KEY] = tile.fetch_s
    left = tile.max_age((clock or request.app[CLOCK])())
    not_modified = is_not_modified(request, tile.etag)
    if (
        request.method == hdrs.METH_GET
        and request.version == HttpVersion11
        and request.keep_alive
        and hdrs.ORIGIN not in request.headers
    ):
        rate = request.get(RATE_HEADERS_KEY)
        ready = READY_HEADS.response(
            result, private, left, not_modified, (*extra, *rate.items()) if rate else extra
        )
        if ready is not None:
            return ready
    control = ("Cache-Control", _MAX_AGE_PREFIX[private] + str(left))
    if not_modified:
        return web.Response(
            status=304, headers=[tile.headers[0], control, ("X-Cache", status), *_COMMON, *extra]
        )
    return web.Response(
        body=tile.body, headers=[*tile.headers, control, ("X-Cache", status), *_COMMON, *extra]
    )


_HEAD_STATUS = {200: "HTTP/1.1 200 OK\r\n", 304: "HTTP/1.1 304 Not Modified\r\n"}


class ReadyResponse(web.StreamResponse):
    """An answer whose status line and header block are bytes made beforehand: ``prepare``
    sends nothing and ``write_eof`` writes ``head`` and ``body`` in one ``writelines`` (the
    one write aiohttp's own coalescing of headers and a body makes), then waits for the
    transport to drain as aiohttp's writer does. For HTTP/1.1 keep-alive requests only: the
    block carries no ``Connection`` header.

    ``headers`` holds only ``X-Cache`` (what the access line reads); ``body_length`` is the
    bytes written, header block included, as aiohttp counts it. Uses aiohttp's response
    state (``_req``, ``_payload_writer``, ``_eof_sent``, ``_body_length``, ``_keep_alive``:
    aiohttp 3.14, checked against the full path by ``tests/test_hot_path.py``).

    Raises (from ``write_eof``):
        ConnectionResetError: the client's connection is closing (aiohttp's own
            ``ClientConnectionResetError``, which its request handler expects).
    """

    def __init__(self, status: int, head: bytes, body: bytes, cache_status: str) -> None:
        super().__init__(status=status, headers={"X-Cache": cache_status})
        self._head = head
        self._ready_body = body

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self._eof_sent:
            return None
        if self._payload_writer is None:
            self._req = request
            self._keep_alive = True
            self._payload_writer = request.writer
        return self._payload_writer

    async def write_eof(self, data: bytes = b"") -> None:
        if self._eof_sent:
            return
        writer = self._payload_writer
        assert writer is not None, "write_eof before prepare"
        self._send(self._req)
        await writer.drain()
        self._end()

    def send_now(self, request: web.BaseRequest) -> None:
        """Send the answer to ``request`` with this loop turn's other answers
        (:data:`~gateway.http.server.DEFERRED_WRITES`), without waiting for the transport to
        drain (for :class:`~gateway.http.server.GatewayRequestHandler`, which answers from
        its ``data_received`` only while the transport takes writes: aiohttp's writer would
        not wait either).

        Raises:
            ConnectionResetError: as :meth:`write_eof`.
        """
        self._req, self._payload_writer = request, request.writer
        self._send(request, deferred=True)
        self._end()

    def _send(self, request: web.BaseRequest | None, deferred: bool = False) -> None:
        """Write the block and the body to ``request``'s transport in one call (now, or
        ``deferred`` to the end of the loop turn), counted on its writer as aiohttp counts
        a write."""
        writer = self._payload_writer
        assert request is not None, "write_eof before prepare"
        assert writer is not None, "write_eof before prepare"
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ClientConnectionResetError("Cannot write to closing transport")
        head, body = self._head, self._ready_body
        parts = (head, body) if body else (head,)
        if deferred:
            DEFERRED_WRITES.write(transport, parts)
        else:
            transport.writelines(parts)
        size = len(head) + len(body)
        writer.buffer_size += size
        writer.output_size += size

    def _end(self) -> None:
        writer = self._payload_writer
        assert writer is not None
        self._eof_sent = True
        self._keep_alive = True
        self._body_length = writer.output_size
        self._req = None
        self._payload_writer = None


class ReadyHeads:
    """The header blocks of tile answers, made once per second and tile: status line,
    ``ETag``, ``Content-Type``, ``Cache-Control``, ``X-Cache``, the common headers,
    ``Content-Length`` and ``Date``, then per request the ``extra`` headers; the same bytes,
    in the same order, as :func:`tile_response` gets from aiohttp. All blocks are dropped
    when the second (of ``Date``) changes, so at most one second's distinct tiles are held.

    Not thread-safe: one event loop uses it.
    """

    def __init__(self) -> None:
        self._second = -1
        self._date = ""
        self._blocks: dict[tuple[object, ...], tuple[bytes, int]] = {}  # by _block's arguments

    def response(
        self,
        result: TileResult,
        private: bool,
        left: int,
        not_modified: bool,
        extra: tuple[tuple[str, str], ...] = (),
    ) -> ReadyResponse | None:
        """:func:`tile_response`'s answer for ``result`` with ``left`` seconds of freshness
        (``max-age``): 200, or 304 when ``not_modified`` (``If-None-Match`` matched), as a
        :class:`ReadyResponse`; None when a header value holds a line break (then
        :func:`tile_response` answers through aiohttp, whose serialiser refuses it)."""
        block = self.head(result, private, left, not_modified)
        return None if block is None else self.answer(block, result, not_modified, extra)

    def head(
        self, result: TileResult, private: bool, left: int, not_modified: bool
    ) -> tuple[bytes, int] | None:
        """The first step of :meth:`response`: the header block of ``result``'s answer and
        where the extra headers go in it, or None when the answer cannot have one."""
        now = int(time.time())
        if now != self._second:
            self._blocks.clear()
            self._second, self._date = now, rfc822_formatted_time()
        tile, status = result.tile, result.cache_status
        key = (tile.headers, len(tile.body), left, private, status, not_modified)
        block = self._blocks.get(key)
        if block is None:
            block = self._blocks[key] = self._block(*key)
        return None if block[1] < 0 else block

    @staticmethod
    def answer(
        block: tuple[bytes, int],
        result: TileResult,
        not_modified: bool,
        extra: tuple[tuple[str, str], ...] = (),
    ) -> ReadyResponse:
        """The second step of :meth:`response`: the answer with ``block`` (from
        :meth:`head`) and the ``extra`` headers (values without line breaks: the caller
        limit's numbers)."""
        head, split = block
        if extra:
            lines = "".join([f"{name}: {value}\r\n" for name, value in extra]).encode()
            head = head[:split] + lines + head[split:]
        if not_modified:
            return ReadyResponse(304, head, b"", result.cache_status)
        return ReadyResponse(200, head, result.tile.body, result.cache_status)

    def _block(
        self,
        headers: tuple[tuple[str, str], ...],
        length: int,
        left: int,
        private: bool,
        status: str,
        not_modified: bool,
    ) -> tuple[bytes, int]:
        """The header block of a tile answer (:meth:`response`) and the offset where the
        extra headers go in it (before the blank line that ends it: the full path's prepare
        hook adds them after ``Date``); ``(b"", -1)`` when a value holds a line break."""
        before = [headers[0]] if not_modified else list(headers)
        before += [
            ("Cache-Control", _MAX_AGE_PREFIX[private] + str(left)),
            ("X-Cache", status),
            *_COMMON,
        ]
        after = [("Date", self._date)]
        if not not_modified:
            after.insert(0, ("Content-Length", str(length)))
        if any("\r" in value or "\n" in value for _, value in before + after):
            return b"", -1
        start = _HEAD_STATUS[304 if not_modified else 200] + "".join(
            [f"{name}: {value}\r\n" for name, value in before]
        )
        end = "".join([f"{name}: {value}\r\n" for name, value in after]) + "\r\n"
        block = (start + end).encode()
        return block, len(block) - 2


READY_HEADS = ReadyHeads()
"""This process's ready header blocks (one event loop per process)."""
