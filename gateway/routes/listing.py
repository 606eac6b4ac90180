"""``GET /downloads``: the organisation's clip jobs, newest first, as JSON or as a page.

Query parameters (each at most once; anything else is 400 problem+json):

- ``status``: only jobs with this status (1-32 lower-case letters or ``_``, e.g.
  ``completed``), passed to ``clip.jobs.list``;
- ``limit``: jobs per page, 1 to :data:`~gateway.services.listing.MAX_LIMIT` (default
  :data:`~gateway.services.listing.DEFAULT_LIMIT`);
- ``offset``: jobs to skip, 0 to :data:`~gateway.services.listing.MAX_OFFSET`;
- ``token``: the client token, where no header can be sent (a browser).

JSON (the default): ``{"jobs": [{"job_id", "status", "name", "created_at", "files"}],
"next"}``, where ``files`` is the absolute URL of the job on this gateway
(``GET /downloads/{job_id}``) and ``next`` the URL of the next page, or null. With
``Accept`` preferring ``text/html`` (a browser), the same page as HTML: each job with its
status and, once completed, its files with size, SHA-256 (once stored), a download link,
a checksum link and a "view on map" link to the viewer for files that have a clip layer.

Needs a token with the ``downloads`` scope; a token limited to ``projects`` sees only those
projects' jobs. The page holds no token: its script adds the page's own ``?token=`` to the
gateway links it shows, as the viewer does (:mod:`gateway.routes.viewer`).
"""

from __future__ import annotations

import asyncio
import html
import re
import secrets
from functools import cache
from importlib import resources
from typing import Any
from urllib.parse import urlencode

from aiohttp import web
from werkzeug.datastructures import MIMEAccept
from werkzeug.http import parse_accept_header

from gateway.errors import GatewayError
from gateway.http.keys import AUTH, CLIP_LAYERS, DOWNLOAD_SERVICE, JOB_LISTING
from gateway.http.pages import fill
from gateway.http.policy import RoutePolicy, add_get
from gateway.http.problem import bad_request, not_found
from gateway.http.urls import file_url, job_url, public_base
from gateway.humanize import human_bytes
from gateway.services.listing import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    MAX_OFFSET,
    JobPage,
    ListedJob,
)

STATUS = re.compile(r"[a-z][a-z_]{0,31}")
"""Allowed ``?status=`` values: lower-case letters and ``_``, 1-32 characters."""

_DECIMAL = re.compile(r"0|[1-9][0-9]{0,6}")

JSON_TYPE, HTML_TYPE = "application/json", "text/html"


def listing_query(request: web.Request) -> tuple[str | None, int, int]:
    """``(status, limit, offset)`` from the query string, validated.

    Raises:
        Problem: 400 for a malformed status, or a limit or offset out of range.
    """
    query = request.query
    status = query.get("status")
    if status is not None and not STATUS.fullmatch(status):
        raise bad_request(
            "status is 1-32 lower-case letters or '_', e.g. status=completed.", "bad-status"
        )
    limit = _integer(query.get("limit"), DEFAULT_LIMIT, 1, MAX_LIMIT, "limit")
    offset = _integer(query.get("offset"), 0, 0, MAX_OFFSET, "offset")
    return status, limit, offset


def _integer(text: str | None, default: int, low: int, high: int, name: str) -> int:
    if text is None:
        return default
    if not _DECIMAL.fullmatch(text) or not low <= int(text) <= high:
        raise bad_request(f"{name} is a whole number from {low} to {high}.", f"bad-{name}")
    return int(text)


def page_url(base: str, status: str | None, limit: int, offset: int) -> str:
    """Absolute URL of one page of the listing (no token: clients send theirs again)."""
    params: dict[str, Any] = {"limit": limit, "offset": offset}
    if status is not None:
        params = {"status": status, **params}
    return f"{base}/downloads?{urlencode(params)}"


async def list_jobs(request: web.Request) -> web.Response:
    """``GET /downloads``: one page of the organisation's clip jobs (JSON or HTML)."""
    token = request.app[AUTH].authorize(request, "downloads")
    status, limit, offset = listing_query(request)
    listing = request.app.get(JOB_LISTING)
    if listing is None:
        raise not_found(
            "Job listing is not configured: set downloads.organization_id.",
            "listing-not-configured",
        )
    projects = token.projects if token is not None else None
    page = await listing.page(status=status, limit=limit, offset=offset, projects=projects)
    base = public_base(request)
    following = page_url(base, status, limit, offset + limit) if page.more else None
    accept = parse_accept_header(request.headers.get("Accept", ""), MIMEAccept)
    headers = {"Vary": "Accept", "Cache-Control": "private, no-store"}
    if accept.best_match([JSON_TYPE, HTML_TYPE], default=JSON_TYPE) == HTML_TYPE:
        return await _page(request, base, page, status, limit, offset, following, headers)
    body = {
        "jobs": [
            {
                "job_id": job.job_id,
                "status": job.status,
                "name": job.name,
                "created_at": job.created_at,
                "files": job_url(base, job.job_id),
            }
            for job in page.jobs
        ],
        "next": following,
    }
    return web.json_response(body, headers=headers)


# --- the HTML page ------------------------------------------------------------------------


@cache
def template() -> str:
    """The page template (package data ``gateway/viewer/downloads.html``), read once."""
    return (resources.files("gateway") / "viewer" / "downloads.html").read_text(encoding="utf-8")


async def _details(request: web.Request, job: ListedJob) -> tuple[list[dict[str, Any]], set[str]]:
    """A completed job's files (with ``sha256`` when stored) and the mosaic types that have
    a clip layer; nothing for other jobs or when the upstream cannot say now."""
    if job.status != "completed":
        return [], set()
    service = request.app[DOWNLOAD_SERVICE]
    try:
        if job.files is not None:
            files = service.with_sha256(job.job_id, job.files)
        else:
            files = (await service.job(job.job_id))["files"]
    except GatewayError:
        return [], set()
    try:
        mapped = set(await request.app[CLIP_LAYERS].layers(job.job_id))
    except GatewayError:
        mapped = set()
    return files, mapped


def _file_item(base: str, job_id: str, file: dict[str, Any], mapped: bool) -> str:
    mosaic = file["mosaic_type"]
    url = file_url(base, job_id, mosaic)
    size = file.get("size_bytes")
    sha256 = file.get("sha256")
    parts = [
        f'<a class="download" data-token href="{html.escape(url)}">'
        f"{html.escape(file['filename'])}</a>",
        f'<span class="size">{human_bytes(size)}</span>' if isinstance(size, int) else "",
        f'<span class="mosaic">{html.escape(mosaic)}</span>',
        (
            f'<code class="sha256" title="SHA-256">{html.escape(sha256)}</code>'
            if sha256
            else '<span class="sha256 pending">SHA-256 once stored</span>'
        ),
        f'<a class="checksum" data-token href="{html.escape(url)}.sha256">.sha256</a>',
    ]
    if mapped:
        viewer = f"{base}/?{urlencode({'clip': f'{job_id}/{mosaic}'})}"
        parts.append(f'<a class="map" data-token href="{html.escape(viewer)}">view on map</a>')
    return f'<li data-mosaic="{html.escape(mosaic)}">{" ".join(p for p in parts if p)}</li>'


def _row(base: str, job: ListedJob, files: list[dict[str, Any]], mapped: set[str]) -> str:
    items = "".join(_file_item(base, job.job_id, f, f["mosaic_type"] in mapped) for f in files)
    name = html.escape(job.name) if job.name else "<em>unnamed</em>"
    status = html.escape(job.status)
    return (
        f'<tr data-job="{html.escape(job.job_id)}">'
        f'<td><span class="name">{name}</span><br>'
        f'<a class="job" data-token href="{html.escape(job_url(base, job.job_id))}">'
        f"<code>{html.escape(job.job_id)}</code></a></td>"
        f'<td><span class="status status-{status}">{status}</span></td>'
        f'<td class="created">{html.escape(job.created_at or "")}</td>'
        f"<td>{f'<ul>{items}</ul>' if items else '&mdash;'}</td></tr>"
    )


async def _page(
    request: web.Request,
    base: str,
    page: JobPage,
    status: str | None,
    limit: int,
    offset: int,
    following: str | None,
    headers: dict[str, str],
) -> web.Response:
    details = await asyncio.gather(*(_details(request, job) for job in page.jobs))
    rows = "".join(_row(base, job, *detail) for job, detail in zip(page.jobs, details, strict=True))
    if not rows:
        rows = '<tr><td colspan="4" class="empty">No clip jobs here.</td></tr>'
    links = []
    if offset > 0:
        previous = page_url(base, status, limit, max(0, offset - limit))
        links.append(f'<a rel="prev" data-token href="{html.escape(previous)}">newer</a>')
    if following is not None:
        links.append(f'<a rel="next" data-token href="{html.escape(following)}">older</a>')
    filters = []
    for name in (None, "running", "completed", "failed"):
        url = page_url(base, name, limit, 0)
        label = name or "all"
        current = ' aria-current="page"' if name == status else ""
        filters.append(f'<a data-token href="{html.escape(url)}"{current}>{label}</a>')
    nonce = secrets.token_urlsafe(18)
    text = fill(
        template(),
        {
            "nonce": nonce,
            "filters": " ".join(filters),
            "rows": rows,
            "pager": " ".join(links),
            "range": f"{offset + 1}-{offset + len(page.jobs)}" if page.jobs else "none",
        },
    )
    csp = "; ".join(
        [
            "default-src 'none'",
            f"script-src 'nonce-{nonce}'",
            f"style-src 'nonce-{nonce}'",
            "img-src data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    return web.Response(
        text=text,
        content_type="text/html",
        headers={**headers, "Content-Security-Policy": csp, "Referrer-Policy": "no-referrer"},
    )


POLICY = RoutePolicy(caller_limit=True, query=frozenset({"token", "status", "limit", "offset"}))
"""The listing: counted against the caller's limit (a page can ask ``clip.jobs.list``), and
only the query parameters above."""


def add_routes(app: web.Application) -> None:
    """Register ``GET /downloads`` on ``app``."""
    add_get(app, "/downloads", list_jobs, name="download_list", policy=POLICY)
