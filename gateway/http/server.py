"""aiohttp's HTTP server with the gateway's answers to requests it cannot parse.

When aiohttp's parser refuses a request (a space, tab, NUL or DEL in the request target, a
NUL or obsolete line folding in a header, a line over 8,190 bytes), its
``RequestHandler.handle_error`` logs an ERROR with a traceback whose message quotes the raw
request line or header, and answers ``text/plain`` echoing it. Both would carry whatever
the client put there, ``?token=`` and ``Authorization`` included.

:class:`GatewayRequestHandler` answers those requests with 400 problem+json naming only
the kind of mistake, and logs one line with the client address and the exception's class
name, never request text. :class:`GatewayRunner` is ``web.AppRunner`` serving with it;
``serve`` and ``demo`` run the app through it (:func:`gateway.cli.serve.serve_app`).
"""

from __future__ import annotations

import logging

from aiohttp import http_exceptions, web
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
    """aiohttp's connection handler, answering its own errors as problem+json.

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


class GatewayServer(web.Server):
    """``web.Server`` whose connections are handled by :class:`GatewayRequestHandler`."""

    def __call__(self) -> RequestHandler:
        return GatewayRequestHandler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` serving the app through :class:`GatewayServer`.

    Takes the same arguments as ``web.AppRunner`` (``access_log_class``, ``access_log``,
    ``handle_signals``...).
    """

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return GatewayServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )
