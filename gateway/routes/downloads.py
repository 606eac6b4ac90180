"""Download routes: ``GET /downloads/{job_id}`` (status and files), ``GET``/``HEAD
/downloads/{job_id}/{mosaic_type}`` (the file) and ``GET
/downloads/{job_id}/{mosaic_type}.sha256`` (its checksum, for ``sha256sum -c``).

A stored file is served by aiohttp's ``FileResponse`` (sendfile; ``Range`` with one range,
``If-None-Match``, ``If-Modified-Since``, date ``If-Range``, 416) extended with ETag
``If-Range`` and multiple ranges (``multipart/byteranges``, RFC 9110 section 14.6), and
carries ``Repr-Digest: sha-256=:<base64>:`` (RFC 9530 section 3: the digest of the whole
representation, so 206 answers carry it too). A file still being transferred is streamed to
the client as its bytes arrive, and so is one range of it (206, RFC 9110 section 14.4): its
bytes go out as soon as they are written, the file's last byte once the file is verified and
stored; several ranges wait for the stored file. A streamed answer has no ``Repr-Digest``:
the digest is known only once the last byte is in.

``GET /fleet/downloads/{job_id}/{mosaic_type}`` sends the other replicas of a fleet the files
this one holds or is transferring, the same way (:mod:`gateway.services.peers`).
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import uuid
from collections.abc import Sequence
from email.utils import formatdate
from typing import cast

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from werkzeug.http import parse_if_range_header, parse_range_header

from gateway.errors import TransferBroken
from gateway.http.auth import presented_token
from gateway.http.callers import caller_address
from gateway.http.conditional import none_match
from gateway.http.keys import DOWNLOAD_SERVICE, SETTINGS
from gateway.http.middleware import client_left
from gateway.http.params import authorize_job, job_id_of, mosaic_type_of
from gateway.http.policy import RoutePolicy, add_get
from gateway.http.problem import PROBLEM_JSON, Problem
from gateway.http.urls import file_url, public_base
from gateway.logs import CLIENT_GONE_KEY
from gateway.services.downloads import DownloadService, Requester, content_disposition
from gateway.services.peers import PEER_PATH
from gateway.services.transfers import READ_CHUNK, Transfer
from gateway.storage.downloads import StoredFile

CACHE_CONTROL = "private, max-age=86400"
"""Clip files are immutable once completed, but only for the clients allowed to fetch them."""

MAX_RANGES = 32
"""More ranges than this in one request are answered with the whole file."""


async def job_status(request: web.Request) -> web.Response:
    """``GET /downloads/{job_id}``: ``{"job_id", "status", "files": [...]}``; each file has a
    ``url`` on this gateway and its ``sha256`` once stored (else null)."""
    job_id, _ = await authorize_job(request)
    result = await request.app[DOWNLOAD_SERVICE].job(job_id)
    result.pop("project_id", None)
    base = public_base(request)
    for file in result["files"]:
        file["url"] = file_url(base, job_id, file["mosaic_type"])
    return web.json_response(result)


async def _open(request: web.Request) -> tuple[StoredFile | Transfer, str]:
    """Authorize, validate and open the requested file (stored, or its transfer)."""
    job_id, _ = await authorize_job(request)
    mosaic_type = mosaic_type_of(request)
    service: DownloadService = request.app[DOWNLOAD_SERVICE]
    caller = caller_address(request, request.app[SETTINGS].server.trusted_proxies)
    requester = Requester(request.headers.get("User-Agent"), caller)
    return await service.open(job_id, mosaic_type, requester)


async def download(request: web.Request) -> web.StreamResponse:
    """``GET``/``HEAD /downloads/{job_id}/{mosaic_type}``: the clip file.

    Raises:
        TransferBroken: (502) the transfer broke off before anything was sent.
    """
    found, cache = await _open(request)
    return await _send(request, found, cache)


async def _send(
    request: web.Request, found: StoredFile | Transfer, cache: str
) -> web.StreamResponse:
    """Answer with a stored file, or stream the transfer fetching it (several ranges wait
    for the stored file)."""
    if isinstance(found, Transfer) and found.size is not None and not _several_ranges(request):
        return await _stream_transfer(request, found, cache)
    stored = await request.app[DOWNLOAD_SERVICE].stored(found)
    return await _serve_stored(request, stored, cache)


async def checksum(request: web.Request) -> web.Response:
    """``GET /downloads/{job_id}/{mosaic_type}.sha256``: ``<hex>  <filename>`` and a
    newline, the line ``sha256sum -c`` checks (GNU coreutils' format: the digest, two
    spaces, the file name as ``Content-Disposition`` gives it). A file not stored yet is
    transferred first (one transfer, shared with its downloads)."""
    found, cache = await _open(request)
    service: DownloadService = request.app[DOWNLOAD_SERVICE]
    stored = await service.stored(found)
    job_id, mosaic_type = request.match_info["job_id"], request.match_info["mosaic_type"]
    digest = await service.checksum(job_id, mosaic_type, stored)
    return web.Response(
        text=f"{digest}  {stored.filename}\n",
        content_type="text/plain",
        charset="utf-8",
        headers={"Cache-Control": CACHE_CONTROL, "X-Cache": cache},
    )


async def peer_download(request: web.Request) -> web.StreamResponse:
    """``GET``/``HEAD /fleet/downloads/{job_id}/{mosaic_type}``: a clip file this replica has
    stored or is transferring now, for another replica of the fleet
    (:mod:`gateway.services.peers`); never an upstream call. Only the fleet's peer token
    opens it (401 otherwise, and 404 on a replica without ``state.peer_url``); the asking
    replica has already checked its own client's token and project.

    Raises:
        Problem: 401 (no or another token), 404 (no fleet, or no such file here), 400 (job
            id or mosaic type malformed).
    """
    service: DownloadService = request.app[DOWNLOAD_SERVICE]
    if service.peers is None:
        raise Problem(404, "Not found", "No route matches this path.", slug="not-found")
    if not service.peers.accepts(presented_token(request)):
        raise Problem(
            401, "Unauthorized", "This route is for the replicas of the fleet.", slug="unauthorized"
        )
    found, cache = await service.held(job_id_of(request), mosaic_type_of(request))
    return await _send(request, found, cache)


def _several_ranges(request: web.Request) -> bool:
    return "," in request.headers.get("Range", "")


def repr_digest(sha256_hex: str) -> str:
    """The ``Repr-Digest`` value for a file's hex SHA-256: ``sha-256=:<base64>:`` (RFC 9530
    section 3, a Structured Fields dictionary whose value is a byte sequence, RFC 8941
    section 3.3.5)."""
    return "sha-256=:" + base64.b64encode(bytes.fromhex(sha256_hex)).decode() + ":"


def _file_headers(filename: str, cache: str, sha256: str | None = None) -> dict[str, str]:
    headers = {
        "Content-Disposition": content_disposition(filename),
        "Accept-Ranges": "bytes",
        "Cache-Control": CACHE_CONTROL,
        "X-Cache": cache,
    }
    if sha256 is not None:
        headers["Repr-Digest"] = repr_digest(sha256)
    return headers


def _transfer_range(request: web.Request, transfer: Transfer) -> tuple[int, int] | None:
    """The one byte range ``[start, stop)`` to send of a file being transferred, or None
    for the whole file: no ``Range``, an ``If-Range`` that does not match (RFC 9110
    section 13.1.5), or a ``Range`` the gateway ignores (malformed or not ``bytes``, as
    section 14.2 allows).

    Raises:
        Problem: 416 with ``Content-Range: bytes */<size>`` when no byte of the range
            exists.
    """
    header = request.headers.get("Range")
    size = transfer.size
    if not header or size is None or not _if_range_holds(request, transfer.etag, transfer.mtime_ns):
        return None
    ranges = parse_range_header(header)
    if ranges is None or ranges.units != "bytes" or len(ranges.ranges) != 1:
        return None
    span = ranges.range_for_length(size)
    if span is None:
        raise Problem(
            416,
            "Range not satisfiable",
            f"The file has {size} bytes.",
            slug="range-not-satisfiable",
            headers={"Content-Range": f"bytes */{size}"},
        )
    return span


async def _stream_transfer(
    request: web.Request, transfer: Transfer, cache: str
) -> web.StreamResponse:
    """Send a file, or one range of it, while it is being transferred: the chunks its
    :class:`~gateway.services.transfers.TransferReader` yields, as they come.

    The reader holds the file's last byte back until the transfer is verified and stored;
    when the transfer breaks, it raises after every byte it may send, and the connection is
    cut, so the client sees a short body it can resume, never a fake whole file.
    """
    headers = _file_headers(transfer.filename, cache)
    headers["ETag"] = transfer.etag
    headers["Last-Modified"] = formatdate(transfer.mtime_ns / 1e9, usegmt=True)
    if none_match(request, transfer.etag):
        return web.Response(status=304, headers=headers)
    span = _transfer_range(request, transfer)
    size = transfer.size or 0
    start, stop = span if span is not None else (0, size)
    if span is not None:
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    response = web.StreamResponse(status=206 if span is not None else 200, headers=headers)
    response.content_type = transfer.content_type
    response.content_length = stop - start
    # a transfer already gone raises TransferBroken here, before anything is sent: 502
    async with transfer.reader(start, stop if span is not None else None) as chunks:
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        try:
            async for chunk in chunks:
                await response.write(chunk)
        except TransferBroken:
            _cut_connection(request)
            return response
        except ConnectionError:  # reset or closed (middleware.client_left)
            if not client_left(request):
                raise
            # the client left; the transfer goes on and is stored
            request[CLIENT_GONE_KEY] = True
            return response
        await response.write_eof()
    return response


def _cut_connection(request: web.Request) -> None:
    """End the connection early so the client sees a short body, never a fake whole file.

    ``close`` (not ``abort``) sends what is already buffered first: the client keeps every
    byte it was sent, and resumes from there.
    """
    if request.transport is not None:
        request.transport.close()


class StoredFileResponse(web.FileResponse):
    """``FileResponse`` for a stored clip file, honouring an ETag ``If-Range`` too.

    aiohttp evaluates date ``If-Range`` only; with an entity tag that does not match, the
    whole file is sent (RFC 9110 section 13.1.5) by hiding ``Range`` from the base class.
    """

    def __init__(self, stored: StoredFile, service: DownloadService, cache: str) -> None:
        super().__init__(
            stored.path,
            chunk_size=READ_CHUNK,
            headers=_file_headers(stored.filename, cache, stored.sha256),
        )
        self.content_type = stored.content_type
        self._stored, self._service = stored, service

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if "Range" in request.headers and not _if_range_holds(request, self._stored.etag):
            headers = request.headers.copy()
            del headers["Range"]
            headers.popall("If-Range", None)
            request = request.clone(headers=headers)
        with self._service.serving(self._stored):  # not evicted while it is being sent
            return await super().prepare(request)

    async def _prepare_open_file(
        self,
        request: web.BaseRequest,
        fobj: io.BufferedReader,
        st: os.stat_result,
        file_encoding: str | None,
    ) -> AbstractStreamWriter | None:
        # aiohttp answers an unsatisfiable Range with an empty body of the file's type; the
        # same test on the same stat, after aiohttp's preconditions, answers problem+json
        if not _range_unsatisfiable(request, st.st_size, st.st_mtime):
            return await super()._prepare_open_file(request, fobj, st, file_encoding)
        answer = range_not_satisfiable(st.st_size).response(request.path)
        body = cast(bytes, answer.body)  # a problem+json document, serialised
        self.set_status(416)
        self.headers.pop("Content-Disposition", None)
        self.headers.update(answer.headers)
        self.content_type = PROBLEM_JSON
        self.content_length = len(body)
        writer = await web.StreamResponse.prepare(self, request)
        if request.method != "HEAD":
            await self.write(body)
        return writer


def range_not_satisfiable(size: int) -> Problem:
    """416 for a ``Range`` none of whose ranges lies within a file of ``size`` bytes, with
    ``Content-Range: bytes */<size>`` (RFC 9110 sections 14.4 and 15.5.17)."""
    return Problem(
        416,
        "Range not satisfiable",
        f"The file has {size} bytes.",
        slug="range-not-satisfiable",
        headers={"Content-Range": f"bytes */{size}"},
    )


def _range_unsatisfiable(request: web.BaseRequest, size: int, mtime: float) -> bool:
    """Whether aiohttp's ``FileResponse`` would answer 416 to ``request`` for a file of
    ``size`` bytes modified at ``mtime`` (POSIX seconds): a date ``If-Range`` that holds (or
    none), and a single ``Range`` it cannot parse or that starts at or past the end."""
    if "Range" not in request.headers:
        return False
    if_range = request.if_range
    if if_range is not None and mtime > if_range.timestamp():
        return False  # the whole file is sent
    try:
        wanted = request.http_range
    except ValueError:
        return True
    start: int | None = wanted.start
    if start is None:
        return False
    if start < 0 and wanted.stop is None:  # a suffix: the last -start bytes
        start = max(0, size + start)
    return start >= size


def _if_range_holds(request: web.BaseRequest, etag: str, mtime_ns: int | None = None) -> bool:
    """Whether ``If-Range`` (absent, an entity tag or a date) lets the ``Range`` apply (RFC
    9110 section 13.1.5: a strong match of the ETag, or a date equal to Last-Modified).
    Without ``mtime_ns`` a date is left to aiohttp's FileResponse, which evaluates it."""
    value = request.headers.get("If-Range")
    if value is None:
        return True
    parsed = parse_if_range_header(value)
    if parsed.etag is not None:
        return f'"{parsed.etag}"' == etag and not value.startswith("W/")
    if mtime_ns is None:
        return True
    return parsed.date is not None and int(parsed.date.timestamp()) == mtime_ns // 1_000_000_000


async def _serve_stored(request: web.Request, stored: StoredFile, cache: str) -> web.StreamResponse:
    header = request.headers.get("Range", "")
    # several ranges: If-None-Match first (RFC 9110 section 13.2.2), as FileResponse does
    if (
        "," in header
        and not none_match(request, stored.etag)
        and _if_range_holds(request, stored.etag)
    ):
        ranges = parse_range_header(header)
        if ranges is not None and ranges.units == "bytes" and len(ranges.ranges) <= MAX_RANGES:
            return await _multipart_ranges(request, stored, ranges.ranges, cache)
    return StoredFileResponse(stored, request.app[DOWNLOAD_SERVICE], cache)


async def _multipart_ranges(
    request: web.Request,
    stored: StoredFile,
    ranges: Sequence[tuple[int, int | None]],
    cache: str,
) -> web.StreamResponse:
    """206 ``multipart/byteranges`` for several ranges (RFC 9110 section 14.6), or 416 when
    none is satisfiable."""
    size = stored.size
    spans = []
    for start, stop in ranges:
        if start < 0:
            start, stop = max(0, size + start), size
        stop = size if stop is None else min(stop, size)
        if start < stop:
            spans.append((start, stop))
    headers = _file_headers(stored.filename, cache, stored.sha256)
    headers["ETag"] = stored.etag
    headers["Last-Modified"] = formatdate(stored.mtime_ns / 1e9, usegmt=True)
    if not spans:
        problem = range_not_satisfiable(size)
        del headers["Content-Disposition"]
        problem.headers.update(headers)
        return problem.response(request.path)
    boundary = uuid.uuid4().hex
    parts = [
        (
            f"\r\n--{boundary}\r\nContent-Type: {stored.content_type}\r\n"
            f"Content-Range: bytes {a}-{b - 1}/{size}\r\n\r\n"
        ).encode()
        for a, b in spans
    ]
    closing = f"\r\n--{boundary}--\r\n".encode()
    response = web.StreamResponse(status=206, headers=headers)
    response.content_type = "multipart/byteranges"
    response.headers["Content-Type"] = f"multipart/byteranges; boundary={boundary}"
    response.content_length = (
        sum(len(p) for p in parts) + len(closing) + sum(b - a for a, b in spans)
    )
    await response.prepare(request)
    if request.method == "HEAD":
        return response
    with await asyncio.to_thread(open, stored.path, "rb") as file:
        for part, (start, stop) in zip(parts, spans, strict=True):
            await response.write(part)
            offset = start
            while offset < stop:
                data = await asyncio.to_thread(
                    os.pread, file.fileno(), min(READ_CHUNK, stop - offset), offset
                )
                await response.write(data)
                offset += len(data)
    await response.write(closing)
    await response.write_eof()
    return response


POLICY = RoutePolicy(caller_limit=True, query=frozenset({"token"}))
"""Job status, files and checksums: counted against the caller's limit (each can ask the
upstream), ``?token=`` the only query parameter; not for other origins."""


PEER_POLICY = RoutePolicy(query=frozenset())
"""The fleet's peer route: no query parameters, not counted against caller limits (the
asking replica counted its own client), not for browsers."""


def add_routes(app: web.Application) -> None:
    """Register the download routes on ``app`` (the checksum before the file: both match
    ``/downloads/{job_id}/{name}``)."""
    add_get(app, "/downloads/{job_id}", job_status, name="download_job", policy=POLICY)
    add_get(
        app,
        "/downloads/{job_id}/{mosaic_type}.sha256",
        checksum,
        name="download_checksum",
        policy=POLICY,
    )
    add_get(app, "/downloads/{job_id}/{mosaic_type}", download, name="download", policy=POLICY)
    add_get(
        app,
        PEER_PATH + "/{job_id}/{mosaic_type}",
        peer_download,
        name="peer_download",
        policy=PEER_POLICY,
    )
