"""Download routes: ``GET /downloads/{job_id}`` (status and files) and ``GET``/``HEAD
/downloads/{job_id}/{mosaic_type}`` (the file).

A stored file is served by aiohttp's ``FileResponse`` (sendfile; ``Range`` with one range,
``If-None-Match``, ``If-Modified-Since``, date ``If-Range``, 416) extended with ETag
``If-Range`` and multiple ranges (``multipart/byteranges``, RFC 9110 section 14.6). A file
still being transferred is streamed to the client as its bytes arrive; a range request for
it waits for the transfer to finish.
"""

from __future__ import annotations

import asyncio
import io
import os
import uuid
from email.utils import formatdate

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from werkzeug.http import parse_if_range_header, parse_range_header

from gateway.http.callers import client_address
from gateway.http.keys import AUTH, DOWNLOAD_SERVICE, SETTINGS
from gateway.http.problem import PROBLEM_JSON, Problem, bad_request
from gateway.http.urls import public_base
from gateway.logs import CLIENT_GONE_KEY
from gateway.services.downloads import (
    JOB_ID,
    MOSAIC_TYPE,
    DownloadService,
    Requester,
    Transfer,
    TransferBroken,
    content_disposition,
)
from gateway.storage.downloads import DownloadStore, StoredFile

CACHE_CONTROL = "private, max-age=86400"
"""Clip files are immutable once completed, but only for the clients allowed to fetch them."""

MAX_RANGES = 32
"""More ranges than this in one request are answered with the whole file."""

READ_CHUNK = 1 << 20


def _job_id(request: web.Request) -> str:
    job_id = request.match_info["job_id"]
    if not JOB_ID.fullmatch(job_id):
        raise bad_request("Job ids are UUIDs.", "malformed-job-id")
    return job_id


async def job_status(request: web.Request) -> web.Response:
    """``GET /downloads/{job_id}``: ``{"job_id", "status", "files": [...]}``; each file has a
    ``url`` on this gateway."""
    request.app[AUTH].authorize(request, "downloads")
    job_id = _job_id(request)
    result = await request.app[DOWNLOAD_SERVICE].job(job_id)
    base = public_base(request)
    for file in result["files"]:
        file["url"] = f"{base}/downloads/{job_id}/{file['mosaic_type']}"
    return web.json_response(result)


async def download(request: web.Request) -> web.StreamResponse:
    """``GET``/``HEAD /downloads/{job_id}/{mosaic_type}``: the clip file."""
    request.app[AUTH].authorize(request, "downloads")
    job_id = _job_id(request)
    mosaic_type = request.match_info["mosaic_type"]
    if not MOSAIC_TYPE.fullmatch(mosaic_type):
        raise bad_request(
            "Mosaic types are 1-64 lower-case letters, digits, '-' or '_', starting with a letter.",
            "malformed-mosaic-type",
        )
    service: DownloadService = request.app[DOWNLOAD_SERVICE]
    client = client_address(request, request.app[SETTINGS].server.trusted_proxies)
    requester = Requester(request.headers.get("User-Agent"), client)
    found, cache = await service.open(job_id, mosaic_type, requester)
    if isinstance(found, Transfer):
        if found.size is None or "Range" in request.headers:
            await found.finished.wait()
            if found.error is not None or found.stored is None:
                raise _broken()
            return await _serve_stored(request, found.stored, cache)
        return await _stream_transfer(request, found, cache)
    return await _serve_stored(request, found, cache)


def _broken() -> Problem:
    return Problem(
        502,
        "Bad gateway",
        "The transfer of this file from the upstream broke off; try again.",
        slug="upstream-error",
    )


def _file_headers(filename: str, cache: str) -> dict[str, str]:
    return {
        "Content-Disposition": content_disposition(filename),
        "Accept-Ranges": "bytes",
        "Cache-Control": CACHE_CONTROL,
        "X-Cache": cache,
    }


async def _stream_transfer(
    request: web.Request, transfer: Transfer, cache: str
) -> web.StreamResponse:
    """Send a file while it is being transferred, as :class:`TransferReader` yields it.

    The reader holds the last byte back until the transfer is verified and stored; when
    the transfer breaks, the client gets every byte written so far and then a cut
    connection, so it sees a short body it can resume, never a fake whole file.
    """
    headers = _file_headers(transfer.filename, cache)
    headers["ETag"] = transfer.etag
    headers["Last-Modified"] = formatdate(transfer.mtime_ns / 1e9, usegmt=True)
    if request.headers.get("If-None-Match", "").strip() in (transfer.etag, "*"):
        return web.Response(status=304, headers=headers)
    response = web.StreamResponse(headers=headers)
    response.content_type = transfer.content_type
    response.content_length = transfer.size
    try:
        reader = await asyncio.to_thread(transfer.reader)
    except TransferBroken:
        raise _broken() from None
    with reader:
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        try:
            async for chunk in reader:
                await response.write(chunk)
        except TransferBroken:
            _cut_connection(request)
            return response
        except ConnectionResetError:  # the client left; the transfer goes on and is stored
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

    def __init__(self, stored: StoredFile, store: DownloadStore, cache: str) -> None:
        super().__init__(
            stored.path, chunk_size=READ_CHUNK, headers=_file_headers(stored.filename, cache)
        )
        self.content_type = stored.content_type
        self._stored, self._store = stored, store

    async def prepare(self, request: web.BaseRequest):
        if "Range" in request.headers and not _if_range_holds(request, self._stored):
            headers = request.headers.copy()
            del headers["Range"]
            headers.popall("If-Range", None)
            request = request.clone(headers=headers)
        with self._store.serving(self._stored):  # not evicted while it is being sent
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
        self.set_status(416)
        self.headers.pop("Content-Disposition", None)
        self.headers.update(answer.headers)
        self.content_type = PROBLEM_JSON
        self.content_length = len(answer.body)
        writer = await web.StreamResponse.prepare(self, request)
        if request.method != "HEAD":
            await self.write(answer.body)
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
    start = wanted.start
    if start is None:
        return False
    if start < 0 and wanted.stop is None:  # a suffix: the last -start bytes
        start = max(0, size + start)
    return start >= size


def _if_range_holds(request: web.BaseRequest, stored: StoredFile) -> bool:
    value = request.headers.get("If-Range")
    if value is None:
        return True
    parsed = parse_if_range_header(value)
    if parsed.etag is not None:
        return f'"{parsed.etag}"' == stored.etag and not value.startswith("W/")
    return True  # a date: aiohttp's FileResponse evaluates it


async def _serve_stored(request: web.Request, stored: StoredFile, cache: str) -> web.StreamResponse:
    header = request.headers.get("Range", "")
    if "," in header and _if_range_holds(request, stored):
        ranges = parse_range_header(header)
        if ranges is not None and ranges.units == "bytes" and len(ranges.ranges) <= MAX_RANGES:
            return await _multipart_ranges(request, stored, ranges.ranges, cache)
    return StoredFileResponse(stored, request.app[DOWNLOAD_SERVICE].store, cache)


async def _multipart_ranges(
    request: web.Request, stored: StoredFile, ranges: list[tuple[int, int | None]], cache: str
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
    headers = _file_headers(stored.filename, cache)
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
    with open(stored.path, "rb") as file:
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


def add_routes(app: web.Application) -> None:
    """Register the download routes on ``app``."""
    app.router.add_get("/downloads/{job_id}", job_status, name="download_job")
    app.router.add_get("/downloads/{job_id}/{mosaic_type}", download, name="download")
