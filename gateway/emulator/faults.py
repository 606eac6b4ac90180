"""Scripted faults: make the next N calls of an operation fail in a chosen way.

For tests and failure drills of the gateway against a real HTTP upstream. Queue faults with
``app[FAULTS_KEY].add(Fault(...))`` in-process, or ``POST /_emulator/faults`` with a JSON
object or list of objects (fields as :class:`Fault`); ``DELETE /_emulator/faults`` clears
them. Like the stats endpoints these need no auth: the emulator is a loopback test tool.

Kinds (see :class:`Fault`): ``status``, ``garbage``, ``wrong-type``, ``json``, ``hang``,
``echo-key``, ``huge-png``, ``corrupt-png`` replace the operation's answer; ``truncate`` lets
the operation answer but breaks its body; ``stall`` lets a download send part of its body,
then hold the rest until released; ``no-filename`` lets a download answer without its
Content-Disposition.

A ``status`` fault's problem ``type`` is ``type`` when given (a slug under
``https://docs.geopera.com/errors/``, or a whole URI), else :data:`DEFAULT_FAULT_TYPES` for
its status (402 ``subscription-past-due``, the documented "subscription is past due" of seeds
``002``), else ``injected-fault``, a type no gateway mapping knows. For example a 429 the
gateway cannot attribute, and one it reads as organisation-wide::

    Fault("status", status=429, retry_after="5")
    Fault("status", status=429, retry_after="5", type="bandwidth-circuit-open")

``echo-key`` stands for a careless upstream that repeats the caller's ``Authorization``
header in an error detail; ``encoding`` chooses how (``plain``, ``base64``, ``base64url``
without padding, ``hex``, ``percent``: every byte as ``%XX``), so redaction can be tested
against encoded echoes too. ``huge-png`` and ``corrupt-png`` are hostile tile answers (200
``image/png``): a PNG whose header claims 30000 x 30000 pixels, and a 256 x 256 PNG whose
chunk CRCs are all valid but whose compressed pixel data is damaged. These kinds are the
emulator's own test tools, not Geopera behaviour.

``truncate`` (broken transfers; field ``bytes``, an int >= 0): the next matching *streaming
download* (:data:`STREAMING_OPERATIONS`, i.e. ``clip.job.download``) sends its status line and
headers as usual, with the full ``Content-Length``, then only the first ``bytes`` bytes of the
body, and closes the TCP connection. The client sees a short body (aiohttp raises
``ClientPayloadError``; curl reports "transfer closed with N bytes remaining"). Other operations
never consume a ``truncate`` fault, even with ``operation="*"``; a download that fails before
streaming (400, 404, 429) does consume it. ``bytes`` >= the file size sends the whole file. The
call is still counted in the stats and log, with status 200 (what the client was sent). Examples::

    app[FAULTS_KEY].add(Fault("truncate", operation="clip.job.download", bytes=1000))
    curl -X POST localhost:8081/_emulator/faults -d '{"kind": "truncate", "bytes": 1000}'

``stall`` (a transfer that is known to be still running; fields ``bytes`` and ``seconds``):
the next matching streaming download sends its headers and its first ``bytes`` bytes, then
sends nothing more until the stall is released (:meth:`FaultPlan.release`, ``POST
/_emulator/faults/release`` or ``DELETE /_emulator/faults``) or, when ``seconds`` > 0, until
that many seconds have passed; then it sends the rest. A test can so observe what a client
gets while a transfer is in progress without racing the clock.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import struct
import zlib
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web

from .protocol import problem_response

KINDS = (
    "status",
    "garbage",
    "wrong-type",
    "json",
    "hang",
    "echo-key",
    "huge-png",
    "corrupt-png",
    "truncate",
    "stall",
    "no-filename",
)

ECHO_ENCODINGS = ("plain", "base64", "base64url", "hex", "percent")
"""How an ``echo-key`` fault repeats the Authorization header."""

STREAMING_OPERATIONS = frozenset({"clip.job.download"})
"""Operations that stream a file body and honour (and consume) ``truncate``, ``stall`` and
``no-filename`` faults."""

STREAMING_KINDS = frozenset({"truncate", "stall", "no-filename"})

TRUNCATE_KEY: web.RequestKey[int] = web.RequestKey("geopera_emulator_truncate", int)
"""Set on a request by a ``truncate`` fault: how many body bytes to send before closing."""

NO_FILENAME_KEY: web.RequestKey[bool] = web.RequestKey("geopera_emulator_no_filename", bool)


@dataclass
class Stall:
    """Where a ``stall`` fault holds a download: after ``after_bytes`` body bytes, until
    ``released`` is set or ``max_s`` seconds (0: no limit) have passed."""

    after_bytes: int
    released: asyncio.Event
    max_s: float = 0.0

    async def wait(self) -> None:
        """Hold until released (or ``max_s`` seconds, when > 0)."""
        if self.max_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.released.wait(), self.max_s)
        else:
            await self.released.wait()


STALL_KEY: web.RequestKey[Stall] = web.RequestKey("geopera_emulator_stall", Stall)
"""Set on a request by a ``stall`` fault: where to hold the body."""
"""Set on a request by a ``no-filename`` fault: send the file without Content-Disposition."""

DEFAULT_FAULT_TYPES = {
    401: "unauthorized",
    402: "subscription-past-due",
    403: "insufficient-scope",
}
"""Problem type slugs of ``status`` faults without a ``type``, by status; others
``injected-fault``."""


@dataclass
class Fault:
    """One scripted misbehaviour.

    Attributes:
        kind: ``status`` (answer ``status`` as problem+json, with ``Retry-After`` if
            ``retry_after`` is set), ``garbage`` (200 ``image/png`` that is not an image),
            ``wrong-type`` (200 ``text/html``), ``json`` (200 ``application/json``, a signed
            URL descriptor like ``items.asset.download``'s), ``no-filename`` (streaming
            downloads only: no Content-Disposition), ``hang`` (sleep ``seconds``, or until
            released like a stall, then answer normally), ``echo-key`` (500 whose detail
            repeats the Authorization header, as a careless upstream might), ``truncate``
            (streaming downloads only: headers with the full ``Content-Length``, then
            ``bytes`` bytes of body, then the connection is closed), ``stall`` (streaming
            downloads only: ``bytes`` bytes of body, then nothing until released or
            ``seconds`` have passed, then the rest).
        operation: operation id it applies to, or ``*`` for any.
        status: HTTP status for ``status`` faults.
        retry_after: ``Retry-After`` header value for ``status`` faults, or None.
        seconds: how long a ``hang`` fault sleeps, and a ``stall`` holds at most (0: until
            released), in seconds.
        count: how many calls it affects.
        bytes: for ``truncate``, how many body bytes are sent before the connection closes;
            for ``stall``, how many before the body is held.
        type: for ``status``, the problem type (slug or URI); None for the default.
        detail: for ``status``, the problem's ``detail``; None for a default sentence.
        encoding: for ``echo-key``, one of :data:`ECHO_ENCODINGS`.
    """

    kind: str = "status"
    operation: str = "*"
    status: int = 500
    retry_after: str | None = None
    seconds: float = 0.0
    count: int = 1
    bytes: int = 0
    type: str | None = None
    detail: str | None = None
    encoding: str = "plain"

    @classmethod
    def from_json(cls, data: Any) -> Fault:
        """Build from a JSON object; raises ValueError on unknown kinds or fields."""
        if not isinstance(data, dict):
            raise ValueError("a fault is a JSON object")
        fault = cls(**data)
        if fault.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}")
        if isinstance(fault.bytes, bool) or not isinstance(fault.bytes, int) or fault.bytes < 0:
            raise ValueError("bytes must be an integer >= 0")
        if fault.encoding not in ECHO_ENCODINGS:
            raise ValueError(f"encoding must be one of {', '.join(ECHO_ENCODINGS)}")
        return fault


class FaultPlan:
    """The queue of pending faults, consumed in order by matching operations."""

    def __init__(self) -> None:
        self._queue: deque[Fault] = deque()
        self._stalls: list[asyncio.Event] = []
        self._taken = asyncio.Event()

    def add(self, *faults: Fault) -> None:
        """Queue ``faults`` after any already pending."""
        self._queue.extend(faults)

    def clear(self) -> None:
        """Drop every pending fault and release every stalled download."""
        self._queue.clear()
        self.release()

    def stall(self) -> asyncio.Event:
        """A new event that :meth:`release` sets, for one stalled download."""
        event = asyncio.Event()
        self._stalls.append(event)
        return event

    @property
    def held(self) -> int:
        """Stalled downloads and hanging calls started since the last release."""
        return len(self._stalls)

    def release(self) -> int:
        """Let every stalled download (and hanging call) go on; returns how many were
        held."""
        stalls, self._stalls = self._stalls, []
        for event in stalls:
            event.set()
        return len(stalls)

    def pending(self) -> int:
        """Calls the queued faults will still affect."""
        return sum(fault.count for fault in self._queue)

    def take(self, operation: str) -> Fault | None:
        """The first pending fault for ``operation`` (counting one use of it), or None.

        ``truncate`` and ``no-filename`` faults only match :data:`STREAMING_OPERATIONS`.
        """
        for fault in self._queue:
            if fault.kind in STREAMING_KINDS and operation not in STREAMING_OPERATIONS:
                continue
            if fault.operation in ("*", operation):
                fault.count -= 1
                if fault.count <= 0:
                    self._queue.remove(fault)
                self._taken.set()
                self._taken = asyncio.Event()
                return fault
        return None

    async def drained(self) -> None:
        """Return once every queued fault has been taken (checked after each take, no
        polling). Bound it with ``asyncio.timeout``."""
        while self.pending():
            await self._taken.wait()


FAULTS_KEY: web.AppKey[FaultPlan] = web.AppKey("geopera_emulator_faults", FaultPlan)


async def apply(fault: Fault, request: web.Request) -> web.StreamResponse | None:
    """The response ``fault`` replaces the operation's with, or None to answer normally.

    A ``truncate`` fault answers normally but marks the request (:data:`TRUNCATE_KEY`) so the
    streaming operation cuts its body short.
    """
    if fault.kind == "truncate":
        request[TRUNCATE_KEY] = fault.bytes
        return None
    if fault.kind == "stall":
        request[STALL_KEY] = Stall(fault.bytes, request.app[FAULTS_KEY].stall(), fault.seconds)
        return None
    if fault.kind == "no-filename":
        request[NO_FILENAME_KEY] = True
        return None
    if fault.kind == "json":
        return web.json_response(
            {
                "url": "https://storage.googleapis.com/geopera-demo/clip.tif?X-Goog-Signature=0",
                "expires_in_seconds": 900,
            }
        )
    if fault.kind == "hang":
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(request.app[FAULTS_KEY].stall().wait(), fault.seconds)
        return None
    if fault.kind == "garbage":
        return web.Response(body=b"this is not a PNG", content_type="image/png")
    if fault.kind == "wrong-type":
        return web.Response(text="<html>maintenance</html>", content_type="text/html")
    if fault.kind == "echo-key":
        echoed = _encode(request.headers.get("Authorization", ""), fault.encoding)
        detail = f"backend failed for {echoed}"
        return problem_response(500, "internal-error", "Internal Server Error", detail)
    if fault.kind == "huge-png":
        return web.Response(body=HUGE_PNG, content_type="image/png")
    if fault.kind == "corrupt-png":
        return web.Response(body=CORRUPT_PNG, content_type="image/png")
    headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
    kind = fault.type or DEFAULT_FAULT_TYPES.get(fault.status, "injected-fault")
    try:
        title = HTTPStatus(fault.status).phrase
    except ValueError:
        title = "Injected fault"
    detail = fault.detail or f"Scripted fault with status {fault.status}."
    if fault.status == 402 and fault.detail is None:
        detail = "The organization's subscription is past due (scripted fault)."
    return problem_response(fault.status, kind, title, detail, headers)


def _encode(text: str, encoding: str) -> str:
    """``text`` as an ``echo-key`` fault repeats it (see :data:`ECHO_ENCODINGS`)."""
    raw = text.encode()
    if encoding == "base64":
        return base64.b64encode(raw).decode()
    if encoding == "base64url":
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")
    if encoding == "hex":
        return raw.hex()
    if encoding == "percent":
        return "".join(f"%{b:02X}" for b in raw)
    return text


def _png(width: int, height: int, idat: bytes) -> bytes:
    """A PNG (8-bit RGBA) of the given header size and IDAT payload, every CRC valid."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


HUGE_PNG = _png(30000, 30000, zlib.compress(b"\0" * 1024))
"""A 30000 x 30000 px PNG header over a few bytes of data (a decompression bomb's shape)."""

CORRUPT_PNG = _png(256, 256, b"\x78\x9c" + b"\xff" * 64)
"""256 x 256 px, valid CRCs, but the zlib stream's first deflate block has the reserved type
(RFC 1951 section 3.2.3), so decoding the pixels fails."""


def truncate_limit(request: web.Request) -> int | None:
    """Body bytes a streaming operation may send before closing (``truncate`` fault), or None."""
    return request.get(TRUNCATE_KEY)


def stall_point(request: web.Request) -> Stall | None:
    """Where a streaming operation holds its body (``stall`` fault), or None."""
    return request.get(STALL_KEY)


def without_filename(request: web.Request) -> bool:
    """Whether a streaming operation must leave out Content-Disposition (``no-filename``)."""
    return bool(request.get(NO_FILENAME_KEY, False))


async def post_faults(request: web.Request) -> web.Response:
    """``POST /_emulator/faults``: queue one fault object or a list of them."""
    try:
        data = json.loads(await request.read())
        items = data if isinstance(data, list) else [data]
        faults = [Fault.from_json(item) for item in items]
    except (ValueError, TypeError) as exc:
        return problem_response(400, "invalid-fault", "Bad Request", str(exc))
    request.app[FAULTS_KEY].add(*faults)
    return web.json_response({"queued": len(faults)})


async def delete_faults(request: web.Request) -> web.Response:
    """``DELETE /_emulator/faults``: drop every pending fault (and release stalls)."""
    request.app[FAULTS_KEY].clear()
    return web.json_response({"queued": 0})


async def release_stalls(request: web.Request) -> web.Response:
    """``POST /_emulator/faults/release``: let every stalled download go on."""
    return web.json_response({"released": request.app[FAULTS_KEY].release()})
