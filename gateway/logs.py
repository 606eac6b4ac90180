"""Logging set-up (one stderr handler whose records pass through the secret redactor) and
the structured access log."""

from __future__ import annotations

import logging
import sys
import threading
import time
from json.encoder import encode_basestring_ascii as _json_string
from typing import TypedDict

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from gateway.secrets import RedactingFilter

FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"


class GatewayFormatter(logging.Formatter):
    """``logging.Formatter`` whose default timestamp (``asctime``, no ``datefmt``) is the
    standard one, ``2026-01-31 12:00:00,123``, with the part up to the second formatted once
    per second instead of once per record (one record per request with the access log).
    With :data:`FORMAT` (``%`` style), a record without exception or stack text is written
    with one f-string instead of ``%`` over the record's ``__dict__``: the same text."""

    _second = -1
    _second_text = ""

    def __init__(self, fmt: str | None = None, datefmt: str | None = None) -> None:
        super().__init__(fmt, datefmt)
        self._standard = fmt == FORMAT and datefmt is None

    def format(self, record: logging.LogRecord) -> str:
        if (
            not self._standard
            or record.exc_info
            or record.exc_text
            or record.stack_info
            or type(record.process) is not int
        ):
            return super().format(record)
        record.message = message = record.getMessage()
        record.asctime = asctime = self.formatTime(record)
        return f"{asctime} {record.levelname} {record.name} [{record.process}] {message}"

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._second_text = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        msec_format = self.default_msec_format or "%s,%03d"
        return msec_format % (self._second_text, record.msecs)


def configure_logging(level: str = "INFO") -> None:
    """Log to stderr at ``level`` with :class:`RedactingFilter` on the handler.

    Replaces handlers on the root logger, so it is safe to call once per process.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(GatewayFormatter(FORMAT))
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

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        self._template: dict[str, object] | None = None
        self._template_thread = -1
        self._template_created = self._template_relative = 0.0

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        self.logger.handle(self.record(access_line(request, response, time)))

    def record(self, line: str) -> logging.LogRecord:
        """An INFO record of ``line`` on this logger, as ``Logger.info`` would make it, at a
        fraction of the cost: no caller lookup (the file, line and function would be
        aiohttp's anyway) and the attributes that do not change between two records of one
        thread (level, names, thread, process) copied from the first record, so only the
        message and the times are set per record."""
        now = time.time()
        template = self._template
        if template is None or threading.get_ident() != self._template_thread:
            first = self.logger.makeRecord(self.logger.name, logging.INFO, "", 0, line, (), None)
            self._template, self._template_thread = dict(first.__dict__), first.thread or -1
            self._template_created, self._template_relative = first.created, first.relativeCreated
            return first
        record = logging.LogRecord.__new__(logging.LogRecord)
        fields = record.__dict__
        fields.update(template)
        fields["msg"] = line
        fields["created"] = now
        fields["msecs"] = int((now - int(now)) * 1000) + 0.0
        elapsed_ms = (now - self._template_created) * 1000
        fields["relativeCreated"] = self._template_relative + elapsed_ms
        return record

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


def access_line(request: BaseRequest, response: StreamResponse, seconds: float) -> str:
    """The access log line of one request (the fields of :class:`JsonAccessLogger`, in that
    order): compact JSON, the same text ``json.dumps(record, separators=(",", ":"))`` gives,
    written directly (string fields through the json module's own escaping)."""
    status = CLIENT_CLOSED if request.get(CLIENT_GONE_KEY) else response.status
    remote = request.get(CLIENT_KEY) or request.remote
    parts = [
        '{"remote":',
        "null" if remote is None else _json_string(remote),
        ',"method":',
        _json_string(request.method),
        ',"path":',
        _json_string(request.path[:512]),
        f',"status":{status},"bytes":{response.body_length},"duration_ms":'
        f"{round(seconds * 1000, 2)!r}",
    ]
    cache = response.headers.get("X-Cache")
    if cache:
        parts += (',"cache":', _json_string(cache))
    upstream = request.get(UPSTREAM_TIME_KEY)
    if upstream is not None:
        parts.append(f',"upstream_ms":{round(upstream * 1000, 2)!r}')
    parts.append("}")
    return "".join(parts)


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
