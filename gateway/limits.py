"""The upstream limiter: token buckets, a concurrency cap and a daily egress budget.

All state lives in one diskcache directory (SQLite, process-safe), so the limits hold for the
whole gateway on one host however many worker processes serve it. Each host of a multi-host
deployment has its own state: give each host its share of the upstream's limits.

Token buckets use reservation (as in GCRA / nginx ``limit_req`` with ``delay``): a request
takes its tokens at once, even if that drives the bucket below zero, and waits until the
deficit has refilled. Waiting requests are therefore served in arrival order without polling,
and a request whose wait would exceed ``max_wait_s`` reserves nothing and is refused with the
wait as its Retry-After. Seeding traffic (:attr:`Priority.SEEDING`) never reserves into a
deficit: it only takes tokens that are there now, so interactive map requests always go first.

Every operation is one short SQLite transaction (a fraction of a millisecond) and runs inline
on the event loop: a thread hop would cost more, because its result waits for the loop to come
round, which under a burst of requests takes longer than the transaction itself.

Why not a library: aiolimiter and limits keep their state in process memory (or Redis), and
none offers a token bucket whose state several processes share through a local file; the
bucket arithmetic here is a few lines over diskcache's ``transact``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.diskcaches import STORE_ERRORS, WriteHealth, open_diskcache


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


class LimitExceeded(Exception):
    """The upstream limiter refused a call: waiting would take longer than allowed.

    Attributes:
        scope: which limit (``operation``, ``asset``, ``bytes``, ``concurrency``, ``budget``).
        retry_after_s: seconds after which trying again may succeed.
    """

    def __init__(self, scope: str, retry_after_s: float, message: str) -> None:
        super().__init__(message)
        self.scope, self.retry_after_s = scope, retry_after_s


class SharedState:
    """The diskcache holding limiter, breaker and budget state for every worker on a host.

    A damaged database is moved aside and started empty when it opens (buckets start full,
    breakers closed: see :func:`gateway.diskcaches.open_diskcache`). ``health`` follows
    whether its disk accepts writes.

    Raises:
        OSError: the directory cannot be created.
        sqlite3.Error: the database cannot be opened for another reason than damage.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.cache = open_diskcache(directory, "state", timeout=5, eviction_policy="none")
        self.health = WriteHealth("state", directory)

    def probe(self) -> tuple[bool, str]:
        """Whether the state accepts a write and reads it back (readiness): ``(True, "")``
        or ``(False, reason)`` (see :func:`gateway.diskcaches.failure_reason`)."""
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
        """Close the SQLite connection of this process."""
        self.cache.close()


class TokenBuckets:
    """Atomic multi-bucket reservations in :class:`SharedState`.

    Args:
        state: the shared state.
        clock: Unix time source, seconds (tests may pass their own).
    """

    def __init__(self, state: SharedState, clock=time.time) -> None:
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
                self._cache.set(("bucket", bucket.key), (level - amount, now))
            return worst_wait

    def charge(self, bucket: Bucket, amount: float) -> float:
        """Take ``amount`` tokens after the fact (bytes received); may drive it negative.

        Returns the level left (negative: that many tokens are owed).
        """
        with self._cache.transact(retry=True):
            now = self._clock()
            level = self._level(bucket, now) - amount
            self._cache.set(("bucket", bucket.key), (level, now))
            return level

    def _level(self, bucket: Bucket, now: float) -> float:

        stored = self._cache.get(("bucket", bucket.key))
        if stored is None:
            return bucket.burst
        tokens, stamp = stored
        return min(bucket.burst, tokens + max(0.0, now - stamp) * bucket.rate)

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
        self, state: SharedState, limit: int, lease_s: float = LEASE_S, clock=time.time
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

    def _try_acquire(self, priority: Priority) -> str | None:
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
        """Wait for a slot; returns the lease to :meth:`release`. The lease is renewed for
        as long as it is held.

        Raises:
            LimitExceeded: no slot within ``max_wait_s`` seconds (scope ``concurrency``).
        """
        deadline = time.monotonic() + max_wait_s
        while True:
            lease = self._try_acquire(priority)
            if lease is not None:
                if self._renewer is None or self._renewer.done():
                    self._renewer = asyncio.ensure_future(self._renew_while_held())
                return lease
            if time.monotonic() >= deadline:
                raise LimitExceeded(
                    "concurrency", 1.0, "concurrency limit: every upstream slot is busy"
                )
            await asyncio.sleep(self.POLL_S)

    async def _renew_while_held(self) -> None:
        while self._held:
            await asyncio.sleep(self.lease_s / 4)
            try:
                self.renew()
            except STORE_ERRORS as exc:  # tried again next round; the lease may lapse
                self._state.health.failed(exc, "refusing upstream calls")

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
        for lease in list(self._held):
            with contextlib.suppress(*STORE_ERRORS):
                self.release(lease)


class EgressBudget:
    """Bytes received from the upstream per UTC day, against an optional daily budget.

    Args:
        daily_bytes: the budget; 0 means no budget (still counted, for metrics).
    """

    def __init__(self, state: SharedState, daily_bytes: int) -> None:
        self._cache = state.cache
        self.daily_bytes = daily_bytes

    @staticmethod
    def _key() -> tuple[str, str]:
        return ("egress", time.strftime("%Y-%m-%d", time.gmtime()))

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
            now = time.time()
            retry = 86400 - now % 86400  # until the next UTC midnight
            raise LimitExceeded("budget", retry, "the daily upstream egress budget is spent")

    def add(self, nbytes: int) -> None:
        """Count ``nbytes`` received (atomic across processes; kept 2 days)."""
        if nbytes > 0:
            self._cache.incr(self._key(), nbytes, default=0)
            self._cache.touch(self._key(), expire=2 * 86400)
