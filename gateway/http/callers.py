"""Who is asking (the caller: the downstream client of the gateway, never the upstream
Geopera client), and the per-caller request-rate limit.

The caller is the socket's peer address, or the first untrusted address in
``X-Forwarded-For`` when the peer is one of ``server.trusted_proxies`` (walking the header
from the right, as RFC 7239 section 5.2 advises for the similar ``Forwarded`` header).

The limit is a sliding window counter per caller (the algorithm of the ``limits`` library's
``SlidingWindowCounterRateLimiter``: two counters per caller, the current window's and the
previous one's weighted by how much of it still overlaps, windows aligned on multiples of
their length in Unix time, so a check is O(1) whatever the rate): one runaway script gets
429 with ``Retry-After`` and ``RateLimit-*`` headers (draft-ietf-httpapi-ratelimit-headers)
instead of spending everyone's upstream budget. On one host it is kept in process memory
(per worker process) by :class:`LocalWindows`, three numbers per caller and no lock, thread
or timer (the check runs on every cache hit; ``limits``' own memory storage takes a lock per
counter and starts an expiry thread up to 100 times a second, which cost a cache hit a
seventh of its time); with ``[state] redis_url`` it is kept in Redis (``limits``' async
Redis storage on redis-py), so a caller gets its configured rate across every worker and
replica. While Redis
cannot be reached, each process counts in its own memory instead, and retries Redis after
:data:`REDIS_RETRY_S`: the caller limit never stops cache hits.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections.abc import Callable

from aiohttp import web
from limits import RateLimitItem, WindowStats, parse
from limits.aio import storage, strategies
from limits.errors import StorageError

from gateway.config.settings import Network, StateSettings
from gateway.http.problem import Problem
from gateway.storage.redis_link import COMMAND_TIMEOUT_S, CONNECT_TIMEOUT_S

log = logging.getLogger("gateway.callers")

REDIS_RETRY_S = 5.0
"""How long client limits stay in process memory after Redis failed, seconds."""


def is_trusted(address: str, networks: tuple[Network, ...]) -> bool:
    """Whether ``address`` (an IP literal) lies in one of ``networks``; False for garbage."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def caller_address(request: web.Request, trusted: tuple[Network, ...]) -> str:
    """The caller's IP address as a string ("unknown" when the socket has none)."""
    peer = request.remote or "unknown"
    if not trusted or not is_trusted(peer, trusted):
        return peer
    forwarded = request.headers.getall("X-Forwarded-For", [])
    hops = [h.strip() for value in forwarded for h in value.split(",") if h.strip()]
    for hop in reversed(hops):
        if not is_trusted(hop, trusted):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # garbage in the header: fall back to the proxy itself
    return hops[0] if hops else peer


class LocalWindows:
    """Sliding window counters in this process's memory: for each key, the index of its
    current window (Unix time // window length), that window's count and the previous
    window's. Not thread-safe: one event loop uses it.

    Args:
        amount: requests allowed per window.
        window_s: the window's length, seconds.
        clock: Unix time, seconds.
    """

    PRUNE_AT = 65_536
    """Keys held before windows that ended are dropped (then again at twice the keys left)."""

    def __init__(
        self, amount: int, window_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.amount = amount
        self.window_s = window_s
        self._clock = clock
        self._windows: dict[str, list[int]] = {}  # key: [window index, current, previous]
        self._prune_at = self.PRUNE_AT

    def hit(self, key: str) -> tuple[bool, WindowStats]:
        """Count one request for ``key`` if the weighted count allows it (as ``limits``'
        ``acquire_sliding_window_entry``): ``(allowed, stats after it)``, where the stats
        are ``limits``' ``WindowStats`` (``reset_time`` in Unix seconds, ``remaining``)."""
        now = self._clock()
        window_s = self.window_s
        index = int(now // window_s)
        entry = self._windows.get(key)
        if entry is None:
            if len(self._windows) >= self._prune_at:
                self._prune(index)
            entry = self._windows[key] = [index, 0, 0]
        elif entry[0] != index:
            entry[2] = entry[1] if entry[0] == index - 1 else 0
            entry[1] = 0
            entry[0] = index
        left_s = window_s - (now - index * window_s)  # of the current window
        previous = entry[2]
        weighted = previous * left_s / window_s + entry[1]
        allowed = math.floor(weighted) + 1 <= self.amount
        if allowed:
            entry[1] += 1
            weighted += 1
        remaining = max(0, self.amount - math.floor(weighted))
        if not (previous or entry[1]):
            return allowed, WindowStats(now, remaining)
        reset_in = left_s if entry[1] else math.inf
        if previous:
            reset_in = min(reset_in, left_s % (window_s / previous))
        return allowed, WindowStats(now + reset_in, remaining)

    def _prune(self, index: int) -> None:
        """Drop the keys whose windows both ended before window ``index``."""
        self._windows = {k: e for k, e in self._windows.items() if e[0] >= index - 1}
        self._prune_at = max(self.PRUNE_AT, 2 * len(self._windows))


class CallerRateLimit:
    """A sliding-window request limit per caller key (a caller address or ``token:<name>``).

    Args:
        rate: a ``limits`` rate string such as ``"100/second"`` or ``"5000/minute"``.
        state: where the fleet's state lives; with a Redis URL the windows are kept there.
        clock: Unix time, seconds, of the windows kept in process memory (the app's clock,
            :mod:`gateway.clock`; Redis windows run on real time).

    Raises:
        ValueError: ``rate`` cannot be parsed.
    """

    def __init__(
        self,
        rate: str,
        state: StateSettings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.item: RateLimitItem = parse(rate)
        self._clock = clock
        self._local = LocalWindows(self.item.amount, self.item.get_expiry(), clock)
        self._shared: strategies.SlidingWindowCounterRateLimiter | None = None
        self._local_until = 0.0  # monotonic time until which Redis is not tried again
        if state is not None and state.redis_url is not None:
            options: dict[str, float | str | bool] = {
                "socket_connect_timeout": CONNECT_TIMEOUT_S,
                "socket_timeout": COMMAND_TIMEOUT_S,
            }
            if state.password is not None:
                options["password"] = state.password.reveal()
            redis_storage = storage.RedisStorage(
                "async+" + state.redis_url.reveal(),
                wrap_exceptions=True,
                implementation="redispy",
                key_prefix="ggw:clients",
                **options,
            )
            self._shared = strategies.SlidingWindowCounterRateLimiter(redis_storage)
        self._policy = f"{self.item.amount};w={self.item.get_expiry()}"

    @property
    def local(self) -> bool:
        """Whether this limit is kept in process memory only (no ``[state] redis_url``), so
        :meth:`check_local` may count for it."""
        return self._shared is None

    def check_local(self, key: str) -> dict[str, str]:
        """:meth:`check` for a :attr:`local` limit, without a coroutine.

        Raises:
            Problem: 429 with ``Retry-After`` when ``key`` is over its limit.
        """
        return self._answer(*self._local.hit(key), self._clock())

    def try_local(self, key: str) -> dict[str, str] | None:
        """:meth:`check_local` without the refusal: the RateLimit headers when ``key`` is
        within its limit (the request is counted), None when it is over (nothing is
        counted, so :meth:`check_local` refuses it the same way right after)."""
        allowed, stats = self._local.hit(key)
        return self._answer(True, stats, self._clock()) if allowed else None

    async def check(self, key: str) -> dict[str, str]:
        """Count one request for ``key``; returns the RateLimit headers to send.

        Raises:
            Problem: 429 with ``Retry-After`` when ``key`` is over its limit.
        """
        shared = self._shared
        if shared is not None and time.monotonic() >= self._local_until:
            try:
                allowed = await shared.hit(self.item, key)
                stats = await shared.get_window_stats(self.item, key)
                return self._answer(allowed, stats, time.time())
            except StorageError as exc:
                log.warning(
                    "caller limits fall back to process memory for %.0f s: Redis failed (%s)",
                    REDIS_RETRY_S,
                    type(exc.storage_error).__name__,
                )
                self._local_until = time.monotonic() + REDIS_RETRY_S
        return self._answer(*self._local.hit(key), self._clock())

    def _answer(self, allowed: bool, stats: WindowStats, now: float) -> dict[str, str]:
        """The RateLimit headers for a check's outcome at Unix time ``now``; raises the 429
        when not allowed."""
        reset = max(1, math.ceil(stats.reset_time - now))
        headers = {
            "RateLimit-Limit": str(self.item.amount),
            "RateLimit-Remaining": str(stats.remaining),
            "RateLimit-Reset": str(reset),
            "RateLimit-Policy": self._policy,
        }
        if not allowed:
            raise Problem(
                429,
                "Too many requests",
                f"This client is limited to {self.item.amount} requests per "
                f"{self.item.get_expiry()} s; retry after {reset} s.",
                slug="client-rate-limited",
                headers={**headers, "Retry-After": str(reset)},
            )
        return headers
