"""aiohttp's HTTP server with the gateway's answers to requests it cannot parse.

When aiohttp's parser refuses a request (a space, tab, NUL or DEL in the request target, a
NUL or obsolete line folding in a header, a line over 8,190 bytes), its
``RequestHandler.handle_error`` logs an ERROR with a traceback whose message quotes the raw
request line or header, and answers ``text/plain`` echoing it. Both would carry whatever
the client put there, ``?token=`` and ``Authorization`` included.

:class:`GatewayRequestHandler` answers those requests with 400 problem+json naming only
the kind of mistake, and logs one line with the client address and the exception's class
name, never request text. :func:`install` (called by :func:`gateway.app.create_app`) makes
every runner serve the app with it: ``serve`` and ``demo``'s ``web.AppRunner``
(:func:`gateway.cli.serve.serve_app`) and aiohttp's test server alike.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

from aiohttp import http_exceptions, web
from aiohttp.http_writer import StreamWriter
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler

from gateway import __version__
from gateway.http.problem import Problem

log = logging.getLogger("gateway.http")

SERVER = f"geopera-gateway/{__version__}"
"""The ``Server`` header of every answer."""

COMMON_HEADERS = {"X-Content-Type-Options": "nosniff", "Server": SERVER}
"""Headers every response carries, error answers of the HTTP layer included."""

_PARSE_ERRORS: tuple[tuple[type[Exception], str, str], ...] = (
    (
        http_exceptions.LineTooLong,
        "line-too-long",
        "The request line or a header field is longer than the gateway accepts (8,190 bytes).",
    ),
    (
        http_exceptions.InvalidURLError,
        "malformed-request-target",
        "The request target holds characters a URL may not hold (spaces, tabs, control "
        "characters); percent-encode them.",
    ),
    (
        http_exceptions.BadStatusLine,
        "malformed-request-line",
        "The request line is not 'METHOD /path HTTP/1.1'.",
    ),
    (
        http_exceptions.BadHttpMessage,
        "malformed-header",
        "A header field is malformed (control characters, obsolete line folding or a "
        "missing colon) or the message framing is invalid.",
    ),
)
"""aiohttp's parse errors (most specific first): problem type slug and detail."""


def parse_error_problem(exc: BaseException, status: int = 400) -> Problem:
    """The problem answered for a request aiohttp could not parse (``exc``), with ``status``
    (aiohttp's, 400). The detail names the kind of mistake and never quotes the request."""
    for kind, slug, detail in _PARSE_ERRORS:
        if isinstance(exc, kind):
            return Problem(status, "Bad request", detail, slug=slug)
    return Problem(status, "Bad request", "The request is not valid HTTP/1.1.", slug="bad-request")


class GatewayRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering its own errors as problem+json, and cache
    hits from ``data_received`` (:attr:`instant`).

    **Hits on the spot.** aiohttp turns each request into a task, which the connection's
    own task awaits: on Python 3.11 two task steps per request. While the connection is idle
    (its task waits for a request, none is queued, nothing is paused or upgraded),
    :meth:`data_received` parses what arrived with aiohttp's own parser and offers each
    request, in order, to :attr:`instant` (:meth:`gateway.http.hits.HitPath.answer_now`),
    which answers a fresh tile held in memory outside any task, in this loop turn's writes
    (:class:`DeferredWrites`). The first request it leaves, and every one after it, goes to
    aiohttp's queue as aiohttp would have queued them. For each request answered on the
    spot the handler does what aiohttp's request loop does after an answer: frees the
    parser's queue slot, counts the request, restarts the keep-alive timer and writes the
    access line (aiohttp 3.14: ``_waiter``, ``_messages``, ``_parser``, checked against
    aiohttp's own answers by ``tests/test_hot_path.py`` and ``tests/test_instant_answers.py``).
    In the README's benchmarks this made cache hits 24-33 % faster.

    ``handle_error`` is what aiohttp calls for a request it could not parse (status 400, the
    parser's ``HttpProcessingError``), and for exceptions that escape the app's middleware
    (500) or a handler timeout (504). Each answer is problem+json with :data:`COMMON_HEADERS`,
    and closes the connection, as aiohttp's own does.
    """

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Log the error (no request text for a parse error) and return its problem+json.

        Raises:
            ConnectionError: part of a response was already sent (as aiohttp does).
        """
        if isinstance(exc, http_exceptions.HttpProcessingError):
            problem = parse_error_problem(exc, status)
            # the exception's text quotes the raw request: log its class name only
            log.info(
                "refused a request from %s that is not valid HTTP (%s)",
                request.remote,
                type(exc).__name__,
            )
        elif status == 504:
            problem = Problem(
                504,
                "Gateway timeout",
                "The gateway did not finish this answer in time.",
                slug="timeout",
            )
        else:
            log.error("error serving a request from %s", request.remote, exc_info=exc)
            problem = Problem(
                500,
                "Internal error",
                "The gateway failed to answer this request; the error is in its log.",
                slug="internal-error",
            )
        if request.writer.output_size > 0:
            raise ConnectionError("part of the response was sent; cannot send an error answer")
        response = problem.response()
        response.headers.update(COMMON_HEADERS)
        response.force_close()
        return response

    instant: InstantAnswer | None = None

    def data_received(self, data: bytes) -> None:
        """Answer what :attr:`instant` takes on the spot; hand the rest to aiohttp."""
        instant, waiter = self.instant, self._waiter
        if (
            instant is None
            or not data
            or waiter is None
            or waiter.done()
            or self._messages
            or self._force_close
            or self._close
            or self._paused
            or self._buffer_paused
            or self._upgraded
            or self._payload_parser is not None
            or self._parser is None
        ):
            super().data_received(data)
            return
        parser = self._parser
        try:
            messages, upgraded, tail = parser.feed_data(data)
        except http_exceptions.HttpProcessingError as exc:
            self._hand_over(parser, exc)
            return
        answered = 0
        transport = self.transport
        for message, payload in messages:
            if payload is not EMPTY_PAYLOAD or transport is None:
                break
            if DEFERRED_WRITES.queued(transport) >= INSTANT_BYTES_PER_TURN:
                break
            if not self._answer_now(instant, message, payload):
                break
            answered += 1
            parser.message_consumed()
        if answered < len(messages) or upgraded:
            self._hand_over(parser, (list(messages[answered:]), upgraded, tail))

    def _hand_over(
        self, parser: Any, parsed: tuple[list[Any], bool, bytes] | BaseException
    ) -> None:
        """Let aiohttp's ``data_received`` take ``parsed`` (or raise the parse error) as if
        its parser had just returned it."""
        replay = _Replay(parsed) if not isinstance(parsed, BaseException) else _Refusal(parsed)
        self._parser = replay  # type: ignore[assignment]
        try:
            super().data_received(b"")
        finally:
            current: object = self._parser  # aiohttp drops it when the connection is lost
            if current is replay:
                self._parser = parser

    def _answer_now(self, instant: InstantAnswer, message: Any, payload: Any) -> bool:
        """Offer one parsed request to ``instant``; True when it was answered."""
        if message.method != "GET" or message.should_close or message.upgrade:
            return False
        loop = self._loop
        start = loop.time() if self._logging_enabled else None
        factory, task = self._request_factory, self._task_handler
        if factory is None or task is None:
            return False
        request = factory(message, payload, self, StreamWriter(self, loop), task)
        try:
            answer = instant(cast(web.Request, request))
        except ConnectionResetError:
            return False
        if answer is None:
            return False
        self._request_count += 1
        if self._manager is not None:
            self._manager.requests_count += 1
        self._keepalive = True
        if self._keepalive_timeout > 0:
            close_time = loop.time() + self._keepalive_timeout
            self._next_keepalive_close_time = close_time
            if self._keepalive_handle is None:
                self._keepalive_handle = loop.call_at(close_time, self._process_keepalive)
        self.log_access(request, answer, start)
        return True


class DeferredWrites:
    """The answers written from ``data_received`` in this event-loop turn, sent together
    when the turn's I/O callbacks are done (``loop.call_soon``), as aiohttp's request tasks
    send theirs: first every readable connection is read, then every answer written.

    Written one at a time between the reads instead, each answer reached a client that had
    gone back to waiting, and woke it again: on this 2-core VM that cost the server 4-5 µs
    of system time a hit and made the answers on the spot 15 % slower than aiohttp's own
    path (README: Benchmarks); sent together they are faster. A connection that closes
    before its turn's writes go out gets nothing (its client left). Not thread-safe: one
    event loop per process.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[asyncio.BaseTransport, tuple[bytes, ...]]] = []
        self._bytes: dict[asyncio.BaseTransport, int] = {}  # queued, by transport
        self._flush_on: asyncio.AbstractEventLoop | None = None  # the loop a flush is due on

    def write(self, transport: asyncio.BaseTransport, parts: tuple[bytes, ...]) -> None:
        """Queue ``parts`` (bytes, sent in one ``writelines``) for ``transport``."""
        loop = asyncio.get_running_loop()
        if self._flush_on is not loop:  # none due yet, or due on a loop now gone
            if self._flush_on is not None:  # that loop stopped before its flush ran
                self._pending.clear()  # (a test's loop, a stopped server): its clients
                self._bytes.clear()  # are gone with it
            self._flush_on = loop
            loop.call_soon(self.flush)
        self._pending.append((transport, parts))
        self._bytes[transport] = self._bytes.get(transport, 0) + sum(map(len, parts))

    def queued(self, transport: asyncio.BaseTransport) -> int:
        """Bytes queued for ``transport`` in this turn and not sent yet, plus what its own
        write buffer still holds."""
        held = cast(asyncio.WriteTransport, transport).get_write_buffer_size()
        return self._bytes.get(transport, 0) + held

    def flush(self) -> None:
        """Send the queued writes now, in the order they were queued."""
        self._flush_on = None
        self._bytes.clear()
        batch, self._pending = self._pending, []
        for transport, parts in batch:
            if not transport.is_closing():
                try:
                    cast(asyncio.WriteTransport, transport).writelines(parts)
                except (ConnectionError, RuntimeError):  # gone meanwhile: its client left
                    continue


DEFERRED_WRITES = DeferredWrites()
"""This process's :class:`DeferredWrites`."""


INSTANT_BYTES_PER_TURN = 256 << 10
"""Answer bytes a connection may have queued on the spot in one loop turn, bytes: the
requests past it (pipelined by a client that may not read) go to aiohttp's queue, whose
answers wait for the client to drain each, so a read of many small requests cannot make the
gateway buffer thousands of tiles."""


InstantAnswer = Callable[[web.Request], web.StreamResponse | None]
"""Answers a request on the spot, from ``data_received``, or returns None having done
nothing (:meth:`gateway.http.hits.HitPath.answer_now`)."""


class _Refusal:
    """The parser's stand-in (:class:`_Replay`) for a request it refused: ``feed_data``
    raises the parser's error, so aiohttp answers it as its own (400 through
    :meth:`GatewayRequestHandler.handle_error`)."""

    def __init__(self, error: BaseException) -> None:
        self._error = error

    def feed_data(self, data: bytes) -> tuple[list[Any], bool, bytes]:
        raise self._error


class _Replay:
    """A one-shot stand-in for aiohttp's request parser: its ``feed_data`` returns what the
    real parser already returned (the messages not answered at once), so aiohttp's own
    ``data_received`` queues them as if it had parsed them itself."""

    def __init__(self, parsed: tuple[list[Any], bool, bytes]) -> None:
        self._parsed = parsed

    def feed_data(self, data: bytes) -> tuple[list[Any], bool, bytes]:
        return self._parsed


class GatewayServer(web.Server):
    """``web.Server`` whose connections are handled by :class:`GatewayRequestHandler`,
    with the app's :data:`InstantAnswer` (None: none)."""

    def __init__(
        self, handler: Any, *, instant: InstantAnswer | None = None, **kwargs: Any
    ) -> None:
        super().__init__(handler, **kwargs)
        self.instant = instant

    def __call__(self) -> RequestHandler:
        handler = GatewayRequestHandler(self, loop=self._loop, **self._kwargs)
        handler.instant = self.instant
        return handler


def install(app: web.Application, instant: InstantAnswer | None) -> None:
    """Serve ``app`` through :class:`GatewayServer` (with ``instant``), whichever runner
    serves it (``serve``'s, aiohttp's test server): its ``_make_handler`` (what
    ``web.AppRunner`` makes the server with) is shadowed on the instance."""
    make = type(app)._make_handler.__get__(app)

    def make_handler(**kwargs: Any) -> web.Server:
        made = make(**kwargs)
        return GatewayServer(
            made.request_handler,
            instant=instant,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=made._loop,
            **made._kwargs,
        )

    object.__setattr__(app, "_make_handler", make_handler)
