"""The clip job listing behind ``GET /downloads``: the organisation's jobs, newest first.

Jobs come from ``clip.jobs.list`` (Clipping guide, seeds ``001``: "use ``clip.jobs.list``
with the ``organization_id`` and an optional ``status`` filter. It is paginated with
``limit`` (default 50) and ``offset``"). The gateway always asks for whole upstream pages of
:data:`UPSTREAM_PAGE` jobs at offsets that are multiples of it, and keeps each page for
``downloads.list_ttl_s`` seconds in the worker's memory; concurrent asks for one page share
one upstream call (single-flight). A client's ``limit``/``offset`` window is cut from those
pages, so clients paging at any stride cost the same few upstream calls.

The answer's shape is not documented. The gateway reads a JSON object with a ``jobs`` array
(the emulator's choice, like ``items.list``'s ``{items, total}`` envelope, seeds ``002``) or
a bare array, each job as ``clip.job.get`` answers it: ``id`` (or ``job_id``), ``status``,
``created_at``, ``project_id``, ``output_name`` (or ``name``), and for completed jobs
``output_artifacts.clips`` (the file descriptors). Whether more jobs follow is known from a
page holding fewer than :data:`UPSTREAM_PAGE` jobs, never from ``total``.

A client whose token is limited to projects sees only those projects' jobs: the gateway
walks the organisation's pages from the newest job on, at most :data:`SCOPED_SCAN_JOBS`
jobs, and cuts the window from the jobs it keeps. Every job's project and every completed
job's file list are remembered in the download store's index, so fetching a listed job
needs no further ``clip.job.get``.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.errors import UpstreamBadResponse
from gateway.services.downloads import (
    JOB_ID,
    file_descriptor,
    job_project,
    printable_text,
)
from gateway.storage.coalesce import SingleFlight
from gateway.storage.downloads import DownloadStore
from gateway.upstream.guard import UpstreamGuard

log = logging.getLogger("gateway.listing")

UPSTREAM_PAGE = 200
"""Jobs per ``clip.jobs.list`` call: the gateway's own page size upstream."""

MAX_LIMIT = 200
"""Largest ``?limit=`` a client may ask for."""

DEFAULT_LIMIT = 50
"""``?limit=`` when absent (the upstream's own default, Clipping guide)."""

MAX_OFFSET = 1_000_000
"""Largest ``?offset=`` a client may ask for."""

SCOPED_SCAN_JOBS = 5_000
"""How many of the organisation's newest jobs are looked through for a token limited to
projects (its listing holds its projects' jobs among these)."""

MAX_CACHED_PAGES = 256
"""Upstream pages kept in memory per worker, at most."""

MAX_NAME_CHARS = 200
MAX_TIME_CHARS = 64


@dataclass(frozen=True, slots=True)
class ListedJob:
    """One job of the listing.

    Attributes:
        job_id: the job's UUID.
        status: as the upstream says (``running``, ``completed``, ``failed``...).
        name: the output name given at creation, or None.
        created_at: the upstream's creation time text (ISO 8601), or None.
        project_id: the job's project, or None when the upstream names none.
        files: the file descriptors of a completed job when the listing carries them
            (``{"mosaic_type", "filename", "size_bytes"}``), else None.
    """

    job_id: str
    status: str
    name: str | None
    created_at: str | None
    project_id: str | None
    files: tuple[dict[str, Any], ...] | None


@dataclass(frozen=True, slots=True)
class JobPage:
    """A client's window of the listing: ``jobs``, and ``more`` when jobs follow it."""

    jobs: list[ListedJob]
    more: bool


def parse_jobs(content: bytes) -> list[ListedJob]:
    """The jobs of one ``clip.jobs.list`` answer (see the module docstring), in its order;
    entries without a usable UUID are skipped.

    Raises:
        UpstreamBadResponse: not JSON, or neither an object with a ``jobs`` array nor an
            array.
    """
    try:
        data = json.loads(content)
    except ValueError:
        raise UpstreamBadResponse("clip.jobs.list", "answer is not JSON", 200) from None
    raw_jobs = data.get("jobs") if isinstance(data, dict) else data
    if not isinstance(raw_jobs, list):
        raise UpstreamBadResponse("clip.jobs.list", "the answer holds no list of jobs", 200)
    jobs = []
    for raw in raw_jobs:
        if not isinstance(raw, dict):
            continue
        job_id = raw.get("id", raw.get("job_id"))
        if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
            continue
        status = raw.get("status")
        name = raw.get("output_name", raw.get("name"))
        created = raw.get("created_at")
        clips = (raw.get("output_artifacts") or {}).get("clips")
        files = None
        if isinstance(clips, list):
            found = (file_descriptor(d) for d in clips if isinstance(d, dict))
            files = tuple(f for f in found if f is not None)
        jobs.append(
            ListedJob(
                job_id=job_id,
                status=printable_text(status, 32) if isinstance(status, str) else "unknown",
                name=printable_text(name, MAX_NAME_CHARS) if isinstance(name, str) else None,
                created_at=(
                    printable_text(created, MAX_TIME_CHARS) if isinstance(created, str) else None
                ),
                project_id=job_project(raw),
                files=files,
            )
        )
    return jobs


class JobListing:
    """Pages of the organisation's clip jobs (``clip.jobs.list``), cached and coalesced.

    Args:
        guard: the protected upstream client.
        store: the download store, whose index learns each listed job's project and each
            completed job's files.
        organization_id: the organisation whose jobs are listed (``downloads.organization_id``).
        ttl_s: how long an upstream page is reused, seconds (``downloads.list_ttl_s``).
        clock: monotonic time source, seconds.
    """

    def __init__(
        self,
        guard: UpstreamGuard,
        store: DownloadStore,
        organization_id: str,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.guard, self.store = guard, store
        self.organization_id, self.ttl_s, self.clock = organization_id, ttl_s, clock
        self._pages: dict[tuple[str | None, int], tuple[float, list[ListedJob]]] = {}
        self._flights: SingleFlight[list[ListedJob]] = SingleFlight()

    async def page(
        self,
        *,
        status: str | None = None,
        limit: int = DEFAULT_LIMIT,
        offset: int = 0,
        projects: frozenset[str] | None = None,
    ) -> JobPage:
        """Jobs ``offset`` to ``offset + limit - 1`` of the listing, newest first, of
        ``status`` only when given, of ``projects`` only when given.

        Raises:
            UpstreamError, HeldBack: a ``clip.jobs.list`` call failed or was held back.
            ValueError: ``limit`` outside 1..:data:`MAX_LIMIT` or ``offset`` outside
                0..:data:`MAX_OFFSET` (the route validates first).
        """
        if not 1 <= limit <= MAX_LIMIT or not 0 <= offset <= MAX_OFFSET:
            raise ValueError("limit or offset out of range")
        if projects is None:  # the window maps onto upstream positions directly
            upstream_offset = offset - offset % UPSTREAM_PAGE
            skip = offset - upstream_offset
        else:  # only the projects' jobs count: walk from the newest
            upstream_offset, skip = 0, offset
        jobs: list[ListedJob] = []
        while True:
            page = await self._upstream_page(status, upstream_offset)
            for job in page:
                if projects is not None and job.project_id not in projects:
                    continue
                if skip:
                    skip -= 1
                    continue
                if len(jobs) == limit:
                    return JobPage(jobs, more=True)
                jobs.append(job)
            upstream_offset += UPSTREAM_PAGE
            if len(page) < UPSTREAM_PAGE:
                return JobPage(jobs, more=False)
            if projects is not None and upstream_offset >= SCOPED_SCAN_JOBS:
                return JobPage(jobs, more=False)

    async def _upstream_page(self, status: str | None, offset: int) -> list[ListedJob]:
        """One upstream page, from memory while it is younger than ``ttl_s``."""
        key = (status, offset)
        cached = self._pages.get(key)
        now = self.clock()
        if cached is not None and cached[0] > now:
            return cached[1]
        jobs, _ = await self._flights.run(
            f"{status or ''}\0{offset}", lambda: self._fetch(status, offset)
        )
        return jobs

    async def _fetch(self, status: str | None, offset: int) -> list[ListedJob]:
        body: dict[str, Any] = {
            "organization_id": self.organization_id,
            "limit": UPSTREAM_PAGE,
            "offset": offset,
        }
        if status is not None:
            body["status"] = status
        response = await self.guard.call(
            "clip.jobs.list", body, asset=f"organization:{self.organization_id}"
        )
        jobs = parse_jobs(response.content)
        self._remember(jobs)
        now = self.clock()
        self._pages = {k: v for k, v in self._pages.items() if v[0] > now}
        if len(self._pages) >= MAX_CACHED_PAGES:
            self._pages.pop(next(iter(self._pages)))
        self._pages[(status, offset)] = (now + self.ttl_s, jobs)
        return jobs

    def _remember(self, jobs: list[ListedJob]) -> None:
        """Record projects and completed jobs' files in the store's index (best effort)."""
        try:
            for job in jobs:
                if job.project_id is not None:
                    self.store.remember_project(job.job_id, job.project_id)
                known = self.store.descriptors(job.job_id) is not None
                if job.status == "completed" and job.files and not known:
                    self.store.remember_descriptors(job.job_id, [dict(f) for f in job.files])
        except (OSError, sqlite3.Error) as exc:  # a full disk: the listing still answers
            log.warning("could not cache listed jobs: %s", type(exc).__name__)
