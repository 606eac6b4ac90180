"""Logging set-up (one stderr handler whose records pass through the secret redactor) and
the structured access log."""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import sys
import threading
import time
from json.encoder import encode_basestring_ascii as _json_string
from typing import TextIO, TypedDict

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from gateway.secrets import RedactingFilter, redact

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
        self.standard = fmt == FORMAT and datefmt is None
        """Whether this formatter writes :data:`FORMAT` with the standard timestamp."""

    def format(self, record: logging.LogRecord) -> str:
        if (
            not self.standard
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

    def prefix(self, created: float, name: str, process: int) -> str:
        """What :meth:`format` writes before the message of an INFO record of logger
        ``name`` made at Unix time ``created`` in process ``process`` (with :data:`FORMAT`):
        ``2026-01-31 12:00:00,123 INFO gateway.access [4242] ``."""
        record = _TimeOnly(created)
        return f"{self.formatTime(record)} INFO {name} [{process}] "  # type: ignore[arg-type]


class _TimeOnly:
    """What :meth:`GatewayFormatter.formatTime` reads of a record: ``created``, ``msecs``."""

    __slots__ = ("created", "msecs")

    def __init__(self, created: float) -> None:
        self.created = created
        self.msecs = int((created - int(created)) * 1000) + 0.0


class GatewayStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The gateway's stderr handler (:func:`configure_logging`): a ``StreamHandler`` with
    :class:`RedactingFilter` and :class:`GatewayFormatter`, which the access log may write a
    batch of lines to at once (:meth:`write_lines`) when it is the only handler their records
    would reach."""

    def write_lines(self, text: str) -> None:
        """Write ``text`` (whole lines, each ending in a newline) as the records would be
        written: through the secret redactor, under the handler's lock, then flushed."""
        text = redact(text)
        with self.lock:  # type: ignore[union-attr]
            self.stream.write(text)
            self.stream.flush()


def gateway_handler(stream: TextIO) -> GatewayStreamHandler:
    """The gateway's log handler writing to ``stream``: :class:`GatewayStreamHandler` with
    :class:`GatewayFormatter` (:data:`FORMAT`) and :class:`RedactingFilter`."""
    handler = GatewayStreamHandler(stream)
    handler.setFormatter(GatewayFormatter(FORMAT))
    handler.addFilter(RedactingFilter())
    return handler


def configure_logging(level: str = "INFO") -> None:
    """Log to stderr at ``level`` through :func:`gateway_handler`.

    Replaces handlers on the root logger, so it is safe to call once per process.
    """
    handler = gateway_handler(sys.stderr)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


AccessFields = tuple["str | None", str, str, int, int, float, "str | None", "float | None", float]
"""What one access line says, taken when the request ends: remote, method, path (at most
512 characters), status, bytes, duration (seconds), cache (``X-Cache``), upstream time
(seconds) and the Unix time the line is logged at."""


def access_fields(request: BaseRequest, response: StreamResponse, seconds: float) -> AccessFields:
    """The fields of the access line of ``request`` (:data:`AccessFields`), taken now: the
    request object is not kept. Status 499 for a client that left first."""
    status = CLIENT_CLOSED if request.get(CLIENT_GONE_KEY) else response.status
    return (
        request.get(CLIENT_KEY) or request.remote,
        request.method,
        request.path[:512],
        status,
        response.body_length,
        seconds,
        response.headers.get("X-Cache"),
        request.get(UPSTREAM_TIME_KEY),
        time.time(),
    )


def access_text(fields: AccessFields) -> str:
    """The access line of ``fields`` (:func:`access_fields`): compact JSON, the same text
    ``json.dumps(record, separators=(",", ":"))`` gives, written directly (string fields
    through the json module's own escaping)."""
    remote, method, path, status, sent, seconds, cache, upstream, _ = fields
    parts = [
        '{"remote":',
        "null" if remote is None else _json_string(remote),
        ',"method":',
        _json_string(method),
        ',"path":',
        _json_string(path),
        f',"status":{status},"bytes":{sent},"duration_ms":{round(seconds * 1000, 2)!r}',
    ]
    if cache:
        parts += (',"cache":', _json_string(cache))
    if upstream is not None:
        parts.append(f',"upstream_ms":{round(upstream * 1000, 2)!r}')
    parts.append("}")
    return "".join(parts)


def access_line(request: BaseRequest, response: StreamResponse, seconds: float) -> str:
    """The access log line of one request (the fields of :class:`JsonAccessLogger`, in that
    order): :func:`access_text` of :func:`access_fields`."""
    return access_text(access_fields(request, response, seconds))


class AccessLines:
    """The access lines of this event-loop turn, written together at the start of the next
    turn (``loop.call_soon``), as nginx's ``access_log ... buffer=`` writes its lines in
    batches: per request only the fields are taken (:func:`access_fields`); the JSON, the
    records and the write happen once per batch, on warm caches.

    When the ``gateway.access`` records would reach only the gateway's own stderr handler
    (:func:`configure_logging`: no other handler or filter on the way, the standard
    format), the batch is one write of the very text those records would have made, through
    the same redactor. Otherwise (another handler, e.g. a test's log capture, or a custom
    set-up), each line is its own record on the ``gateway.access`` logger, as before.

    Lines wait at most one loop turn; :meth:`flush` also runs at exit. A process killed with
    SIGKILL loses at most the lines of its last turn. Without a running loop (a thread, a
    script), :meth:`add` writes at once.
    """

    def __init__(self) -> None:
        self._pending: list[AccessFields] = []
        self._flush_on: asyncio.AbstractEventLoop | None = None  # the loop a flush is due on
        self._logger: logging.Logger | None = None
        self._template: dict[str, object] | None = None
        self._template_thread = -1
        self._template_created = self._template_relative = 0.0

    def add(self, logger: logging.Logger, fields: AccessFields) -> None:
        """Queue the line of ``fields`` for ``logger`` (the ``gateway.access`` logger)."""
        if self._logger is not logger:
            self.flush()
            self._logger = logger
        self._pending.append(fields)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if self._flush_on is not loop:  # not yet due on this loop (or due on one now gone)
            self._flush_on = loop
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write the queued lines now (nothing when none are queued)."""
        self._flush_on = None
        batch, self._pending = self._pending, []
        logger = self._logger
        if not batch or logger is None:
            return
        handler = _only_handler(logger)
        if handler is not None:
            formatter = handler.formatter
            assert isinstance(formatter, GatewayFormatter)
            name, process = logger.name, os.getpid()
            handler.write_lines(
                "".join(
                    [
                        f"{formatter.prefix(fields[-1], name, process)}{access_text(fields)}\n"
                        for fields in batch
                    ]
                )
            )
            return
        for fields in batch:
            logger.handle(self.record(logger, access_text(fields), fields[-1]))

    def record(self, logger: logging.Logger, line: str, created: float) -> logging.LogRecord:
        """An INFO record of ``line`` on ``logger`` made at Unix time ``created``, as
        ``Logger.info`` would make it, at a fraction of the cost: no caller lookup (the
        file, line and function would be aiohttp's anyway) and the attributes that do not
        change between two records of one thread (level, names, thread, process) copied
        from the first record, so only the message and the times are set per record."""
        template = self._template
        if template is None or threading.get_ident() != self._template_thread:
            first = logger.makeRecord(logger.name, logging.INFO, "", 0, line, (), None)
            template = self._template = dict(first.__dict__)
            self._template_thread = first.thread or -1
            self._template_created, self._template_relative = first.created, first.relativeCreated
        record = logging.LogRecord.__new__(logging.LogRecord)
        fields = record.__dict__
        fields.update(template)
        fields["msg"] = line
        fields["created"] = created
        fields["msecs"] = int((created - int(created)) * 1000) + 0.0
        elapsed_ms = (created - self._template_created) * 1000
        fields["relativeCreated"] = self._template_relative + elapsed_ms
        return record


def _only_handler(logger: logging.Logger) -> GatewayStreamHandler | None:
    """The handler that ``logger``'s INFO records reach when it is the only one, is the
    gateway's own (:class:`GatewayStreamHandler` with :class:`GatewayFormatter` in the
    standard format, filtered by :class:`RedactingFilter` only) and nothing on the way
    filters; else None."""
    found: list[logging.Handler] = []
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters or current.disabled:
            return None
        found += current.handlers
        if not current.propagate:
            break
        current = current.parent
    if len(found) != 1 or not logger.isEnabledFor(logging.INFO):
        return None
    handler = found[0]
    if type(handler) is not GatewayStreamHandler or handler.level > logging.INFO:
        return None
    formatter = handler.formatter
    if type(formatter) is not GatewayFormatter or not formatter.standard:
        return None
    if [type(f) for f in handler.filters] != [RedactingFilter] or not logging.logProcesses:
        return None
    return handler


ACCESS_LINES = AccessLines()
"""The process's queue of access lines (:class:`AccessLines`)."""
atexit.register(ACCESS_LINES.flush)


class JsonAccessLogger(AbstractAccessLogger):
    """One JSON line per request on the ``gateway.access`` logger, written in batches
    (:class:`AccessLines`).

    Fields: ``remote`` (client address), ``method``, ``path`` (never the query string, which
    may carry tokens), ``status``, ``bytes`` (bytes sent), ``duration_ms``, ``cache``
    (``X-Cache``), ``upstream_ms`` (upstream time spent for this request, when any).
    A client that closed its connection before the answer was sent is logged with status
    499, as nginx logs it.
    """

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        ACCESS_LINES.add(self.logger, access_fields(request, response, time))

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
