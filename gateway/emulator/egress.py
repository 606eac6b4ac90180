"""Egress limits: a per-asset request rate limit and the organization's bandwidth breaker.

Source of the rules (Geopera docs): the Clipping guide
(https://docs.geopera.com/api-reference/guides/clipping) says ``clip.job.download`` is
"egress-enforced: per-asset rate limits and a circuit breaker apply, so a throttled request
returns 429", and the Managing data guide says ``items.asset.download`` is "egress-tracked and
subject to per-asset rate limits and a per-organization bandwidth circuit breaker. A 429 means
you have hit a download limit". The docs give no numbers; the defaults below are the
emulator's own. The emulator applies the same two limits to its tile operations too, so the
gateway can be tested against them.

Units: request rates in requests per second, bandwidth in bytes per second of response
bodies, ``Retry-After`` in whole seconds (at least 1); time comes from :func:`time.monotonic`.

- **Per-asset rate limit** (:attr:`EgressLimits.asset_rps`): one token bucket per asset (the
  body's ``url`` for ``cog.tile.*``, its ``job_id`` for ``clip.*``), capacity
  ``max(1, asset_rps)`` requests (one second of burst), refilled at ``asset_rps`` per second.
  A request needs a whole token; otherwise ``429`` ``asset-rate-limited``.
- **Bandwidth circuit breaker** (:attr:`EgressLimits.bandwidth`): one byte bucket for the
  whole emulator (one organization), capacity ``bandwidth`` bytes (one second of burst),
  refilled at ``bandwidth`` bytes per second. A request is admitted while the bucket is
  positive; the size of its response body is then subtracted, so the bucket can go negative
  and later requests wait. Otherwise ``429`` ``bandwidth-circuit-open``.

``0`` or ``None`` disables a limit. Operations apply the limits themselves, after auth and
body validation and before doing the work: ``admit(request, values)`` first, then
``account(request, nbytes)`` for the body they send (``refund(request, values)`` instead if
the request turns out invalid while being worked on). Change the limits at run time with
``app[LIMITS_KEY].asset_rps = ...`` / ``.bandwidth = ...`` or ``POST /_emulator/limits``
(``{"asset_rps": 5, "bandwidth": 1000000}``; ``GET`` shows them); either refills the buckets.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from .defaults import DEFAULT_ASSET_RPS, DEFAULT_BANDWIDTH
from .protocol import ProblemError, problem_response

ASSET_FIELDS = ("url", "job_id")
"""Body fields naming the asset a request is limited by, first present wins."""

MAX_IDLE_BUCKETS = 4096
"""Above this many per-asset buckets, full (idle) ones are dropped: they equal a new bucket."""

_EPSILON = 1e-9


def _checked_limit(name: str, value: Any) -> float | None:
    """``value`` as a float limit, or ``None`` when disabled (``None`` or 0)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number or null")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (0 disables it)")
    return float(value) or None


def retry_after_seconds(wait_s: float) -> int:
    """Whole seconds to send in ``Retry-After`` for a wait of ``wait_s`` seconds (>= 1)."""
    return max(1, math.ceil(wait_s - _EPSILON))


class _Bucket:
    """Token count as of ``stamp`` (monotonic seconds)."""

    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp

    def refill(self, now: float, rate: float, capacity: float) -> float:
        """Add ``rate`` tokens per second elapsed since the last refill, up to ``capacity``."""
        self.tokens = min(capacity, self.tokens + max(0.0, now - self.stamp) * rate)
        self.stamp = now
        return self.tokens


class EgressLimits:
    """The emulator's egress limits and their token buckets (``app[LIMITS_KEY]``).

    Args:
        asset_rps: per-asset limit in requests per second; ``0``/``None`` disables it.
        bandwidth: response-body limit in bytes per second; ``0``/``None`` disables it.
        clock: monotonic time source in seconds (tests may inject a fake one).

    Setting :attr:`asset_rps` or :attr:`bandwidth` validates the value (``ValueError`` if
    negative, non-finite or not a number) and refills the buckets it governs.
    """

    def __init__(
        self,
        asset_rps: float | None = DEFAULT_ASSET_RPS,
        bandwidth: float | None = DEFAULT_BANDWIDTH,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self._asset_rps = _checked_limit("asset_rps", asset_rps)
        self._bandwidth = _checked_limit("bandwidth", bandwidth)
        self._assets: dict[str, _Bucket] = {}
        self._bytes = _Bucket(self._bandwidth or 0.0, clock())

    @property
    def asset_rps(self) -> float | None:
        """Requests per second allowed per asset, or ``None`` when unlimited."""
        return self._asset_rps

    @asset_rps.setter
    def asset_rps(self, value: float | None) -> None:
        self._asset_rps = _checked_limit("asset_rps", value)
        self._assets.clear()

    @property
    def bandwidth(self) -> float | None:
        """Response-body bytes per second allowed in total, or ``None`` when unlimited."""
        return self._bandwidth

    @bandwidth.setter
    def bandwidth(self, value: float | None) -> None:
        self._bandwidth = _checked_limit("bandwidth", value)
        self._bytes = _Bucket(self._bandwidth or 0.0, self.clock())

    def reset(self) -> None:
        """Refill every bucket, as if no request had been made."""
        self._assets.clear()
        self._bytes = _Bucket(self._bandwidth or 0.0, self.clock())

    def as_json(self) -> dict[str, float | None]:
        """``{"asset_rps": ..., "bandwidth": ...}`` (``null`` = disabled)."""
        return {"asset_rps": self._asset_rps, "bandwidth": self._bandwidth}

    def admit(self, asset: str | None) -> None:
        """Let one request for ``asset`` through or raise a 429 :class:`ProblemError`.

        The bandwidth breaker is checked first and takes nothing; then the request takes one
        token of ``asset``'s bucket (``asset=None``: no per-asset limit applies).
        """
        now = self.clock()
        self._check_bandwidth(now)
        if asset is not None:
            self._take_asset_token(asset, now)

    def account(self, nbytes: int) -> None:
        """Subtract ``nbytes`` of response body from the bandwidth bucket (may go negative)."""
        rate = self._bandwidth
        if rate is None or nbytes <= 0:
            return
        self._bytes.refill(self.clock(), rate, rate)
        self._bytes.tokens -= nbytes

    def refund(self, asset: str | None) -> None:
        """Give back the token :meth:`admit` took for ``asset`` (a request found invalid)."""
        rate = self._asset_rps
        bucket = None if asset is None or rate is None else self._assets.get(asset)
        if bucket is not None and rate is not None:
            bucket.tokens = min(max(1.0, rate), bucket.tokens + 1.0)

    def _check_bandwidth(self, now: float) -> None:
        rate = self._bandwidth
        if rate is None:
            return
        tokens = self._bytes.refill(now, rate, rate)
        if tokens > 0:
            return
        # Admitted again once the bucket is positive, i.e. strictly after -tokens / rate s.
        retry = max(1, math.floor(-tokens / rate) + 1)
        raise ProblemError(
            429,
            "bandwidth-circuit-open",
            "Bandwidth circuit breaker open",
            f"The organization's bandwidth circuit breaker is open: responses exceeded "
            f"{rate:g} bytes/s. Retry after {retry} s.",
            headers={"Retry-After": str(retry)},
        )

    def _take_asset_token(self, asset: str, now: float) -> None:
        rate = self._asset_rps
        if rate is None:
            return
        capacity = max(1.0, rate)
        bucket = self._assets.get(asset)
        if bucket is None:
            if len(self._assets) >= MAX_IDLE_BUCKETS:
                self._drop_full_buckets(now, rate, capacity)
            bucket = self._assets[asset] = _Bucket(capacity, now)
        tokens = bucket.refill(now, rate, capacity)
        if tokens >= 1.0 - _EPSILON:
            bucket.tokens = tokens - 1.0
            return
        retry = retry_after_seconds((1.0 - tokens) / rate)
        raise ProblemError(
            429,
            "asset-rate-limited",
            "Asset rate limit exceeded",
            f"Too many requests for this asset: the limit is {rate:g} requests/s per asset. "
            f"Retry after {retry} s.",
            headers={"Retry-After": str(retry)},
        )

    def _drop_full_buckets(self, now: float, rate: float, capacity: float) -> None:
        for key, bucket in list(self._assets.items()):
            if bucket.refill(now, rate, capacity) >= capacity:
                del self._assets[key]


LIMITS_KEY: web.AppKey[EgressLimits] = web.AppKey("geopera_emulator_limits", EgressLimits)


def asset_of(body: Mapping[str, Any]) -> str | None:
    """The asset a request is limited by: its ``url`` or ``job_id`` (first string present)."""
    for field in ASSET_FIELDS:
        value = body.get(field)
        if isinstance(value, str):
            return value
    return None


def admit(request: web.Request, values: Mapping[str, Any]) -> None:
    """For operations: apply the app's limits to this validated request (raises a 429)."""
    request.app[LIMITS_KEY].admit(asset_of(values))


def refund(request: web.Request, values: Mapping[str, Any]) -> None:
    """For operations: a request :func:`admit` let through turned out invalid (no work done)."""
    request.app[LIMITS_KEY].refund(asset_of(values))


def account(request: web.Request, nbytes: int) -> None:
    """For operations: count ``nbytes`` of response body against the bandwidth breaker."""
    request.app[LIMITS_KEY].account(nbytes)


async def get_limits(request: web.Request) -> web.Response:
    """``GET /_emulator/limits``: the current limits."""
    return web.json_response(request.app[LIMITS_KEY].as_json())


async def post_limits(request: web.Request) -> web.Response:
    """``POST /_emulator/limits``: set ``asset_rps`` and/or ``bandwidth``; refills the buckets."""
    limits = request.app[LIMITS_KEY]
    try:
        data = json.loads(await request.read() or b"{}")
        if not isinstance(data, dict):
            raise ValueError("limits are a JSON object")
        unknown = sorted(set(data) - {"asset_rps", "bandwidth"})
        if unknown:
            raise ValueError(f"unknown field(s): {', '.join(unknown)}")
        for name, value in data.items():
            _checked_limit(name, value)
    except (ValueError, UnicodeDecodeError) as exc:
        return problem_response(400, "invalid-limits", "Bad Request", str(exc))
    if "asset_rps" in data:
        limits.asset_rps = data["asset_rps"]
    if "bandwidth" in data:
        limits.bandwidth = data["bandwidth"]
    limits.reset()
    return web.json_response(limits.as_json())
