"""Logging set-up (one stderr handler whose records pass through the secret redactor) and
the structured access log."""

from __future__ import annotations

import json
import logging
import sys
from typing import TypedDict

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from gateway.secrets import RedactingFilter

FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"


def configure_logging(level: str = "INFO") -> None:
    """Log to stderr at ``level`` with :class:`RedactingFilter` on the handler.

    Replaces handlers on the root logger, so it is safe to call once per process.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


class JsonAccessLogger(AbstractAccessLogger):
    """One JSON line per request on the ``gateway.access`` logger.

    Fields: ``remote`` (client address), ``method``, ``path`` (never the query string, which
    may carry tokens), ``status``, ``bytes`` (body bytes sent), ``duration_ms``, ``cache``
    (``X-Cache``), ``upstream_ms`` (upstream time spent for this request, when any).
    A client that closed its connection before the answer was sent is logged with status
    499, as nginx logs it.
    """

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        record = {
            "remote": request.get(CLIENT_KEY) or request.remote,
            "method": request.method,
            "path": request.path[:512],
            "status": CLIENT_CLOSED if request.get(CLIENT_GONE_KEY) else response.status,
            "bytes": response.body_length,
            "duration_ms": round(time * 1000, 2),
        }
        cache = response.headers.get("X-Cache")
        if cache:
            record["cache"] = cache
        upstream = request.get(UPSTREAM_TIME_KEY)
        if upstream is not None:
            record["upstream_ms"] = round(upstream * 1000, 2)
        self.logger.info(json.dumps(record, separators=(",", ":")))

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


class AccessLogOptions(TypedDict, total=False):
    """The access-log keyword arguments of ``web.AppRunner`` (and aiohttp's test server)."""

    access_log: logging.Logger | None
    access_log_class: type[AbstractAccessLogger]


def access_log_options(enabled: bool) -> AccessLogOptions:
    """Keyword arguments for ``web.run_app`` / ``web.AppRunner``: the JSON access log on the
    ``gateway.access`` logger, or none."""
    if not enabled:
        return {"access_log": None}
    return {"access_log": logging.getLogger("gateway.access"), "access_log_class": JsonAccessLogger}


CLIENT_KEY = web.RequestKey("gateway_client", str)
"""Request key under which the middleware stores the client address."""

UPSTREAM_TIME_KEY = web.RequestKey("gateway_upstream_s", float)
"""Request key under which handlers store the upstream time spent, seconds."""

CLIENT_GONE_KEY = web.RequestKey("gateway_client_gone", bool)
"""Request key set when the client closed its connection before the whole answer was sent."""

CLIENT_CLOSED = 499
"""The status logged and counted for a request whose client left first (nginx's 499)."""
