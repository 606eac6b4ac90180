"""Who is asking (the caller: the downstream client of the gateway, never the upstream
Geopera client), and the per-caller request-rate limit.

The caller is the socket's peer address, or the first untrusted address in
``X-Forwarded-For`` when the peer is one of ``server.trusted_proxies`` (walking the header
from the right, as RFC 7239 section 5.2 advises for the similar ``Forwarded`` header).

The limit is a sliding window per caller (the ``limits`` library's sliding window counter,
in process memory: two counters per caller, the current window's and the previous one's
weighted by how much of it still overlaps, so a check is O(1) whatever the rate): one
runaway script gets 429 with ``Retry-After`` and ``RateLimit-*`` headers
(draft-ietf-httpapi-ratelimit-headers) instead of spending everyone's upstream budget. It is
enforced per worker process.
"""

from __future__ import annotations

import ipaddress
import math
import time

from aiohttp import web
from limits import RateLimitItem, parse, storage, strategies

from gateway.config.settings import Network
from gateway.http.problem import Problem


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


class CallerRateLimit:
    """A sliding-window request limit per caller key (a caller address or ``token:<name>``).

    Args:
        rate: a ``limits`` rate string such as ``"100/second"`` or ``"5000/minute"``.

    Raises:
        ValueError: ``rate`` cannot be parsed.
    """

    def __init__(self, rate: str) -> None:
        self.item: RateLimitItem = parse(rate)
        # O(1) per check: the moving window keeps one entry per request in the window
        self._limiter = strategies.SlidingWindowCounterRateLimiter(storage.MemoryStorage())
        self._policy = f"{self.item.amount};w={self.item.get_expiry()}"

    def check(self, key: str) -> dict[str, str]:
        """Count one request for ``key``; returns the RateLimit headers to send.

        Raises:
            Problem: 429 with ``Retry-After`` when ``key`` is over its limit.
        """
        allowed = self._limiter.hit(self.item, key)
        stats = self._limiter.get_window_stats(self.item, key)
        reset = max(1, math.ceil(stats.reset_time - time.time()))
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
