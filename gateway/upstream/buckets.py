"""The upstream limiter: token buckets, a concurrency cap and a daily egress budget.

All state lives in one diskcache directory (SQLite, process-safe), so the limits hold for the
whole gateway on one host however many worker processes serve it. Several replicas share the
same state through Redis instead (:mod:`gateway.upstream.fleet`); both backends sit behind
:class:`gateway.upstream.state.UpstreamState`.

Token buckets use reservation (as in GCRA / nginx ``limit_req`` with ``delay``): a request
takes its tokens at once, even if that drives the bucket below zero, and waits until the
deficit has refilled. Waiting requests are therefore served in arrival order without polling,
and a request whose wait would exceed ``max_wait_s`` reserves nothing and is refused with the
wait as its Retry-After. Seeding traffic (:attr:`Priority.SEEDING`) never reserves into a
deficit: it only takes tokens that are there now, so interactive map requests always go first.

Every operation is one short SQLite transaction (a fraction of a millisecond). The gateway runs
them in the state's own I/O thread (:meth:`SharedState.run`, :meth:`SharedState.submit`):
inline on the event loop, a flood of cache misses (several transactions each) kept the loop so
busy that cache hits waited behind them. Bookkeeping after a call (releasing its lease,
counting its bytes) is queued without waiting.

Why not a library: aiolimiter and limits keep their state in process memory (or Redis), and
none offers a token bucket whose state several processes share through a local file; the
bucket arithmetic here is a few lines over diskcache's ``transact``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import functools
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from gateway.clock import Clock, system_clock
from gateway.errors import LimitExceeded  # defined with the other domain errors
from gateway.storage.diskcaches import STORE_ERRORS, WriteHealth, open_diskcache

log = logging.getLogger("gateway.limits")

T = TypeVar("T")


class Priority(enum.IntEnum):
    """Who is asking: map users (interactive) before bulk seeding."""

    INTERACTIVE = 0
    SEEDING = 1


@dataclass(frozen=True, slots=True)
class Bucket:
    """A token bucket: ``rate`` tokens per second up to ``burst`` tokens.

    ``scope`` is the label used in errors and metrics (``operation``, ``asset``, ``bytes``),
    ``key`` the bucket's identity in the shared state (may hold a COG URL: never a label).
    """

    scope: str
    key: str
    rate: float
    burst: float


class SharedState:
    """The diskcache holding limiter, breaker and budget state for every worker on a host.

    A damaged database is moved aside and started empty when it opens (buckets start full,
    breakers closed: see :func:`gateway.storage.diskcaches.open_diskcache`). ``health`` follows
    whether its disk accepts writes.

    Raises:
        OSError: the directory cannot be created.
        sqlite3.Error: the database cannot be opened for another reason than damage.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.cache = open_diskcache(directory, "state", timeout=5, eviction_policy="none")
        self.health = WriteHealth("state", directory)
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="limiter-state-io")

    async def run(self, function: Callable[..., T], *args: object) -> T:
        """Run ``function(*args)`` (limiter, breaker or budget work on this state) in the
        state's I/O thread and wait for its result or exception.

        One thread: this process's transactions run one after another in the order they
        were asked for (so a call sees the bookkeeping of the calls before it), without
        lock contention among themselves, and the event loop never waits on SQLite.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._io, functools.partial(function, *args))

    async def run_or_undo(
        self,
        function: Callable[..., T],
        *args: object,
        undo: Callable[[T], object],
        wait_s: float = 0.0,
    ) -> T:
        """Like :meth:`run`, for work that takes something (a lease): if the caller is
        cancelled while ``function`` runs, ``undo(result)`` is queued once it has finished,
        so nothing taken for a caller that is gone stays taken.

        With ``wait_s``, the result is first waited for on the calling thread (the event
        loop's), for up to ``wait_s`` seconds: returned then without an event-loop step,
        else awaited as usual. ``function`` runs in the I/O thread either way, after the
        work queued before it."""
        job = self._io.submit(functools.partial(function, *args))
        if wait_s > 0:
            concurrent.futures.wait((job,), timeout=wait_s)
            if job.done():
                return job.result()
        future = asyncio.wrap_future(job)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:

            def give_back(done: asyncio.Future[T]) -> None:
                if not done.cancelled() and done.exception() is None:
                    self.submit(undo, done.result())

            future.add_done_callback(give_back)
            raise

    def submit(self, function: Callable[..., object], *args: object) -> None:
        """Queue ``function(*args)`` in the state's I/O thread without waiting (bookkeeping
        after a call: releasing a lease, recording a breaker outcome, counting bytes). It
        runs before anything asked for later; a state that cannot be written is reported
        through ``health``, never raised."""

        def job() -> None:
            try:
                function(*args)
            except STORE_ERRORS as exc:
                self.health.failed(exc, "refusing upstream calls")
            except Exception:
                log.exception("limiter bookkeeping failed")

        with contextlib.suppress(RuntimeError):  # closed: nothing more is recorded
            self._io.submit(job)

    def probe(self) -> tuple[bool, str]:
        """Whether the state accepts a write and reads it back (readiness): ``(True, "")``
        or ``(False, reason)`` (see :func:`gateway.storage.diskcaches.failure_reason`)."""
        value = time.time()
        try:
            self.cache.set("readyz-probe", value, expire=60)
            ok = self.cache.get("readyz-probe") == value
        except STORE_ERRORS as exc:
            return False, self.health.failed(exc, "refusing upstream calls")
        if not ok:
            return False, "io-error"
        self.health.succeeded()
        return True, ""

    def close(self) -> None:
        """Finish the queued work, stop the I/O thread and close this process's SQLite
        connections."""
        with contextlib.suppress(RuntimeError):  # already closed
            self._io.submit(self.cache.close)
        self._io.shutdown(wait=True)
        self.cache.close()


def _bucket_key(bucket: Bucket) -> str:
    """A bucket's key in the shared state. Keys are strings throughout the state: diskcache
    stores those as they are, and pickles (and optimises) any other on every access."""
    return "bucket/" + bucket.key


class TokenBuckets:
    """Atomic multi-bucket reservations in :class:`SharedState`.

    Args:
        state: the shared state.
        clock: Unix time source, seconds (tests may pass their own).
    """

    def __init__(self, state: SharedState, clock: Clock = system_clock) -> None:
        self._cache = state.cache
        self._clock = clock

    def reserve(
        self,
        buckets: Sequence[Bucket],
        cost: Sequence[float],
        max_wait_s: float,
        priority: Priority = Priority.INTERACTIVE,
    ) -> float:
        """Reserve ``cost[i]`` tokens in ``buckets[i]``, all or none.

        Returns:
            Seconds the caller must wait before using the reservation (0 when tokens were
            there). For :attr:`Priority.SEEDING` it is always 0.

        Raises:
            LimitExceeded: the wait would exceed ``max_wait_s`` (interactive), or any bucket
                lacks the tokens right now (seeding; ``retry_after_s`` says when they will be
                there). Nothing is reserved then.
        """
        with self._cache.transact(retry=True):
            now = self._clock()
            levels = []
            worst_wait, worst_scope = 0.0, ""
            for bucket, amount in zip(buckets, cost, strict=True):
                level = self._level(bucket, now)
                wait = max(0.0, (amount - level) / bucket.rate)
                if wait > worst_wait:
                    worst_wait, worst_scope = wait, bucket.scope
                levels.append(level)
            if priority is Priority.SEEDING and worst_wait > 0:
                raise LimitExceeded(
                    worst_scope, worst_wait, f"{worst_scope} limit: no tokens for seeding now"
                )
            if worst_wait > max_wait_s:
                raise LimitExceeded(
                    worst_scope,
                    worst_wait,
                    f"{worst_scope} limit: the queue is {worst_wait:.1f} s long",
                )
            for bucket, amount, level in zip(buckets, cost, levels, strict=True):
                self._store(bucket, level - amount, now)
            return worst_wait

    def charge(self, bucket: Bucket, amount: float) -> float:
        """Take ``amount`` tokens after the fact (bytes received); may drive it negative.

        Returns the level left (negative: that many tokens are owed).
        """
        with self._cache.transact(retry=True):
            now = self._clock()
            level = self._level(bucket, now) - amount
            self._store(bucket, level, now)
            return level

    def _store(self, bucket: Bucket, level: float, now: float) -> None:
        """Write a bucket's level; it expires once it would be full again (then a missing
        bucket reads as full), so buckets of assets no longer asked for do not pile up."""
        refill_s = (bucket.burst - level) / bucket.rate
        self._cache.set(_bucket_key(bucket), (level, now), expire=refill_s + 60)

    def _level(self, bucket: Bucket, now: float) -> float:

        stored = self._cache.get(_bucket_key(bucket))
        if stored is None:
            return bucket.burst
        tokens, stamp = stored  # diskcache's untyped value: (level, Unix time) floats
        return min(bucket.burst, float(tokens) + max(0.0, now - float(stamp)) * bucket.rate)

    def level(self, bucket: Bucket) -> float:
        """Tokens available now (negative while reservations are queued)."""
        return self._level(bucket, self._clock())


LEASE_S = 60.0
"""How long a concurrency lease lasts unless its process renews it, seconds."""

HOST = os.uname().nodename
"""This host's name, stored with each lease: process ids are only checked on the host (PID
namespace) that issued them."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (``kill(pid, 0)``; one owned by another
    user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ConcurrencyCap:
    """At most ``limit`` upstream calls in flight on this host, across worker processes.

    Each call holds a lease in the shared state: ``{lease id: (host, pid, expires at)}``
    under one key. A lease belongs to a live process: any acquirer drops leases whose process
    is gone (``kill(pid, 0)``, for leases of this host), so a crashed or killed worker's
    slots come back at once. Leases also expire ``lease_s`` seconds after they were taken or
    last renewed, which covers a reused process id and a process that hangs: while this
    process holds leases, a task renews them every ``lease_s / 4`` seconds, however long the
    call (a download may stream for hours). Seeding may use at most three quarters of the
    slots.

    Args:
        state: the shared state.
        limit: slots on the host.
        lease_s: lease lifetime without renewal, seconds.
        clock: Unix time source, seconds (tests may pass their own).
    """

    POLL_S = 0.02

    def __init__(
        self, state: SharedState, limit: int, lease_s: float = LEASE_S, clock: Clock = system_clock
    ) -> None:
        self._state = state
        self._cache = state.cache
        self.limit = limit
        self.lease_s = lease_s
        self._clock = clock
        self._pid = os.getpid()
        self._prefix = f"{self._pid}-{uuid.uuid4().hex[:8]}-"
        self._held: set[str] = set()
        self._renewer: asyncio.Task[None] | None = None

    def _live(self, now: float) -> dict[str, tuple[str, int, float]]:
        """The stored leases that still count: unexpired, of a process that is alive.

        Leases stored by older versions (``{lease id: expires at}``, the id starting with
        the pid) are read as this host's.
        """
        live = {}
        for lease, value in (self._cache.get("inflight") or {}).items():
            if isinstance(value, tuple):
                host, pid, expires = value
            else:
                host, pid, expires = HOST, int(str(lease).split("-", 1)[0] or 0), value
            if expires <= now:
                continue
            if host == HOST and pid != self._pid and not pid_alive(pid):
                continue
            live[lease] = (host, pid, expires)
        return live

    def try_acquire(self, priority: Priority) -> str | None:
        """A lease now, or None when every slot ``priority`` may use is taken (blocking:
        run it in the state's I/O thread). Call :meth:`keep_renewed` on the event loop
        once it is held."""
        allowed = self.limit if priority is Priority.INTERACTIVE else max(1, self.limit * 3 // 4)
        with self._cache.transact(retry=True):
            now = self._clock()
            leases = self._live(now)
            if len(leases) >= allowed:
                self._cache.set("inflight", leases)
                return None
            lease = self._prefix + uuid.uuid4().hex[:8]
            leases[lease] = (HOST, self._pid, now + self.lease_s)
            self._cache.set("inflight", leases)
        self._held.add(lease)
        return lease

    async def acquire(self, max_wait_s: float, priority: Priority) -> str:
        """Wait for a slot; returns the lease to :meth:`release` (in the state's I/O thread:
        ``state.submit(cap.release, lease)``). The lease is renewed for as long as it is held.

        Raises:
            LimitExceeded: no slot within ``max_wait_s`` seconds (scope ``concurrency``).
        """
        deadline = time.monotonic() + max_wait_s
        while True:
            lease = await self._state.run_or_undo(
                self.try_acquire, priority, undo=self._release_if_taken
            )
            if lease is not None:
                self.keep_renewed()
                return lease
            if time.monotonic() >= deadline:
                raise LimitExceeded(
                    "concurrency", 1.0, "concurrency limit: every upstream slot is busy"
                )
            await asyncio.sleep(self.POLL_S)

    def keep_renewed(self) -> None:
        """Make sure the task renewing this process's leases runs (on the event loop)."""
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.ensure_future(self._renew_while_held())

    async def _renew_while_held(self) -> None:
        while self._held:
            await asyncio.sleep(self.lease_s / 4)
            self._state.submit(self.renew)  # a failure is reported; tried again next round

    def renew(self) -> None:
        """Extend this process's leases to ``lease_s`` from now (one transaction). A lease
        that lapsed meanwhile (the process stalled longer than ``lease_s``) is not taken
        back: its slot may be another's by now."""
        if not self._held:
            return
        with self._cache.transact(retry=True):
            now = self._clock()
            leases = self._live(now)
            for lease in self._held & leases.keys():
                leases[lease] = (HOST, self._pid, now + self.lease_s)
            self._cache.set("inflight", leases)

    def _release_if_taken(self, lease: str | None) -> None:
        if lease is not None:
            self.release(lease)

    def release(self, lease: str) -> None:
        """Give the slot back (idempotent)."""
        self._held.discard(lease)
        with self._cache.transact(retry=True):
            leases = self._cache.get("inflight") or {}
            if leases.pop(lease, None) is not None:
                self._cache.set("inflight", leases)

    def in_flight(self) -> int:
        """Leases currently held on this host (by live processes)."""
        return len(self._live(self._clock()))

    async def aclose(self) -> None:
        """Stop renewing and give back every lease this process still holds (shutdown)."""
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        with contextlib.suppress(*STORE_ERRORS):
            await self._state.run(self._release_all)

    def _release_all(self) -> None:
        for lease in list(self._held):
            self.release(lease)


class EgressBudget:
    """Bytes received from the upstream per UTC day, against an optional daily budget.

    Args:
        daily_bytes: the budget; 0 means no budget (still counted, for metrics).
        clock: Unix time source, seconds (tests pass their own).
    """

    def __init__(
        self, state: SharedState, daily_bytes: int, clock: Callable[[], float] = time.time
    ) -> None:
        self._cache = state.cache
        self.daily_bytes = daily_bytes
        self._clock = clock

    def _key(self) -> str:
        return "egress/" + time.strftime("%Y-%m-%d", time.gmtime(self._clock()))

    def spent(self) -> int:
        """Bytes received today (UTC)."""
        return int(self._cache.get(self._key(), 0))

    def remaining(self) -> int | None:
        """Bytes left today, or None without a budget."""
        if not self.daily_bytes:
            return None
        return max(0, self.daily_bytes - self.spent())

    def check(self) -> None:
        """Raises LimitExceeded (scope ``budget``) once today's budget is spent."""
        remaining = self.remaining()
        if remaining is not None and remaining <= 0:
            now = self._clock()
            retry = 86400 - now % 86400  # until the next UTC midnight
            raise LimitExceeded("budget", retry, "the daily upstream egress budget is spent")

    def add(self, nbytes: int) -> None:
        """Count ``nbytes`` received (atomic across processes; kept 2 days). One
        transaction except on the first bytes of a day."""
        if nbytes <= 0:
            return
        key = self._key()
        try:
            self._cache.incr(key, nbytes, default=None)
        except KeyError:  # a new day: create it with its expiry, then count
            self._cache.add(key, 0, expire=2 * 86400)
            self._cache.incr(key, nbytes, default=0)
