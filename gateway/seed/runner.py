"""Seeding: fetch a plan's tiles through the gateway's own tile path, at seeding priority.

Each tile goes through :class:`TileService` (the gateway's :class:`TileService`: cache,
cross-process claims, the upstream guard with its host-wide buckets, concurrency cap,
breakers and budget) with :attr:`Priority.SEEDING`, so seeding only takes tokens that are
there now and map users always go first. Per tile:

- fresh in the cache (or stored by another process meanwhile) → ``skipped``;
- fetched with data → ``fetched`` (its stored bytes counted), reported empty → ``empty``;
- the gateway's own limiter has no token or slot now → wait as long as it says, then try
  again (pacing, not a failure, however often);
- a breaker is open, the upstream throttled (429) or paused the organisation (402) → wait
  Retry-After and try again, at most :data:`RETRIES` times (and only for waits up to
  :data:`MAX_RETRY_WAIT_S`); then ``failed``; any other failure (502, 504, a bad tile) →
  ``failed`` at once;
- the daily egress budget is spent → the seed stops, leaving the tile to a later resume.

:meth:`Seeder.interrupt` (Ctrl+C) stops dispatching: tiles being fetched finish, tiles
waiting to retry are left for the resume. A second call cancels the fetches in flight.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from gateway.errors import (
    BreakerOpen,
    GatewayError,
    LimitExceeded,
    UpstreamPaymentRequired,
    UpstreamRateLimited,
)
from gateway.seed.plan import SeedPlan
from gateway.seed.resume import ResumeState
from gateway.services.tiles import FETCH_ERRORS, TileAddress, TileService
from gateway.storage.redis_link import wait_any
from gateway.upstream.buckets import Priority

log = logging.getLogger("gateway.seed")

RETRIES = 3
"""Retries of a tile after a retryable failure (breaker open, upstream 429)."""

MAX_RETRY_WAIT_S = 300.0
"""A Retry-After longer than this, seconds, fails the tile instead of waiting."""

CHECKPOINT_S = 1.0
"""How often the resume state is written while seeding, at most, seconds."""

Outcome = Literal["fetched", "skipped", "empty", "failed"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do after a failed attempt: ``pace`` (wait, try again, no limit), ``retry``
    (wait, try again, counted), ``stop`` (budget spent: stop seeding) or ``fail``."""

    action: Literal["pace", "retry", "stop", "fail"]
    wait_s: float = 0.0


def classify(exc: GatewayError) -> Verdict:
    """The :class:`Verdict` for one failed attempt, from its domain error class
    (:mod:`gateway.errors`)."""
    if isinstance(exc, LimitExceeded):
        if exc.scope == "budget":
            return Verdict("stop")
        return Verdict("pace", exc.retry_after_s)
    if isinstance(exc, BreakerOpen | UpstreamRateLimited | UpstreamPaymentRequired):
        return Verdict("retry", exc.retry_after_s)
    return Verdict("fail")


def describe(exc: GatewayError) -> str:
    """``"<ErrorClass>: <text>"`` for the seed log (the text names no secret: upstream
    errors are redacted when made)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass(slots=True)
class SeedSummary:
    """Counts of one seed run.

    Attributes:
        total: addresses in the plan.
        start: index this run started at (> 0 when resumed).
        fetched, skipped, empty, failed: tiles by outcome in this run.
        bytes: bytes of the tiles fetched and stored (for ``@2x``, the composed tiles).
        elapsed_s: wall time of this run, seconds.
        next_index: every address before it is done (the resume point).
        stopped: None when the walk ran to its end, else ``"interrupted"`` or ``"budget"``.
    """

    total: int
    start: int
    fetched: int = 0
    skipped: int = 0
    empty: int = 0
    failed: int = 0
    bytes: int = 0
    elapsed_s: float = 0.0
    next_index: int = 0
    stopped: str | None = None

    @property
    def done(self) -> int:
        """Tiles finished in this run, whatever the outcome."""
        return self.fetched + self.skipped + self.empty + self.failed

    @property
    def complete(self) -> bool:
        """Whether every address of the plan is done (over all runs)."""
        return self.next_index >= self.total

    @property
    def rate(self) -> float:
        """Tiles finished per second in this run."""
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0


class Seeder:
    """Walks a :class:`SeedPlan` with ``concurrency`` tiles in flight.

    Args:
        service: the tile service (from :func:`gateway.services.stack.open_tile_stack`).
        plan: what to seed.
        concurrency: tiles in flight at once (the host-wide caps apply on top).
        state: where to record progress for a resume, or None.
        on_tile: called after each finished tile with the outcome and the running summary.
        on_address: called after each finished tile with its address and outcome, before
            ``on_tile`` (the export writes the tile there).
    """

    def __init__(
        self,
        service: TileService,
        plan: SeedPlan,
        concurrency: int = 4,
        state: ResumeState | None = None,
        on_tile: Callable[[Outcome, SeedSummary], None] | None = None,
        on_address: Callable[[TileAddress, Outcome], None] | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be 1 or more")
        self.service = service
        self.plan = plan
        self.concurrency = concurrency
        self.state = state
        self.on_tile = on_tile
        self.on_address = on_address
        self._stop = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._pending: set[int] = set()
        self._dispatched = 0
        self._saved_at = 0.0
        self.summary = SeedSummary(total=0, start=0)

    def interrupt(self) -> None:
        """First call: stop dispatching and let tiles in flight finish. Second: cancel them."""
        if self.summary.stopped is None:
            self.summary.stopped = "interrupted"
        if self._stop.is_set():
            for task in self._workers:
                task.cancel()
        self._stop.set()

    async def run(self, total: int, start: int = 0) -> SeedSummary:
        """Seed addresses ``start..total-1`` of the plan; returns the summary.

        ``total`` is :meth:`SeedPlan.count` (passed in: counting walks the plan).
        """
        summary = self.summary = SeedSummary(total=total, start=start, next_index=start)
        self._dispatched = start
        started = time.monotonic()
        addresses = self.plan.addresses(start)
        self._workers = [
            asyncio.ensure_future(self._work(addresses)) for _ in range(self.concurrency)
        ]
        try:
            await asyncio.wait(self._workers)
            for task in self._workers:
                failure = None if task.cancelled() else task.exception()
                if failure is not None:
                    raise failure  # a bug, not a tile failure
        finally:
            summary.elapsed_s = time.monotonic() - started
            summary.next_index = self._watermark()
            await self.service.drain()
            self._checkpoint(force=True)
        return summary

    async def _work(self, addresses: Iterator[tuple[int, TileAddress]]) -> None:
        while not self._stop.is_set():
            try:
                index, address = next(addresses)
            except StopIteration:
                return
            self._pending.add(index)
            self._dispatched = index + 1
            outcome = await self._seed_one(address)
            if outcome is None:
                continue  # left for a resume: stays pending, so the resume point stays before
            self._pending.discard(index)
            if self.on_address is not None:
                self.on_address(address, outcome[0])
            self._count(outcome)

    def _count(self, outcome: tuple[Outcome, int]) -> None:
        kind, nbytes = outcome
        summary = self.summary
        setattr(summary, kind, getattr(summary, kind) + 1)
        summary.bytes += nbytes
        self._checkpoint()
        if self.on_tile is not None:
            self.on_tile(kind, summary)

    def _watermark(self) -> int:
        """The lowest index not yet done: the resume point."""
        return min(self._pending) if self._pending else self._dispatched

    def _checkpoint(self, force: bool = False) -> None:
        if self.state is None:
            return
        now = time.monotonic()
        if force or now - self._saved_at >= CHECKPOINT_S:
            self._saved_at = now
            self.state.save(self._watermark(), self.summary.total)

    async def _seed_one(self, address: TileAddress) -> tuple[Outcome, int] | None:
        """One tile to its outcome and stored bytes; None when left for a resume."""
        stored = self.service.cache.get(address.key, from_disk=True)
        if stored is not None and stored.is_fresh():
            return "skipped", 0
        retries = 0
        while True:
            try:
                fetched, nbytes = await self.service.fetch_now(address, Priority.SEEDING)
            except FETCH_ERRORS as exc:
                verdict = classify(exc)
                if verdict.action == "stop":
                    log.warning("the daily egress budget is spent: seeding stops here")
                    self.summary.stopped = "budget"
                    self._stop.set()
                    return None
                if verdict.action == "retry" and (
                    retries >= RETRIES or verdict.wait_s > MAX_RETRY_WAIT_S
                ):
                    verdict = Verdict("fail")
                if verdict.action == "fail":
                    log.warning(
                        "seed: %s %d/%d/%d@%dx.%s failed: %s",
                        address.layer.name,
                        address.z,
                        address.x,
                        address.y,
                        address.scale,
                        address.fmt,
                        describe(exc),
                    )
                    return "failed", 0
                retries += verdict.action == "retry"
                jitter = random.uniform(0.0, 0.05)  # noqa: S311 (spreading waits, not crypto)
                if await self._sleep_or_stop(max(0.01, verdict.wait_s) + jitter):
                    return None
                continue
            if not fetched:
                return "skipped", 0
            return ("fetched", nbytes) if nbytes else ("empty", 0)

    async def _sleep_or_stop(self, seconds: float) -> bool:
        """Sleep ``seconds``; True (early) when seeding is being stopped."""
        return await wait_any(self._stop.wait(), seconds)
