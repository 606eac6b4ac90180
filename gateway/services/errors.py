"""Upstream failures as the client's problem+json, one mapping for every service.

The client learns what kind of failure it was and when to retry, never the upstream's own
text (which may echo secrets or internals). Operators learn the rest from the log: a refused
key is a CRITICAL line naming ``GEOPERA_API_KEY``.
"""

from __future__ import annotations

import logging

from gateway.breaker import BreakerOpen
from gateway.limits import LimitExceeded
from gateway.problem import Problem
from gateway.upstream import (
    UpstreamAuthError,
    UpstreamQuotaExceeded,
    UpstreamRateLimited,
    UpstreamTimeout,
)

log = logging.getLogger("gateway.upstream")


def _retry(seconds: float) -> tuple[int, dict[str, str]]:
    retry = max(1, round(seconds))
    return retry, {"Retry-After": str(retry)}


def upstream_problem(exc: Exception, subject: str, scope: str) -> Problem:
    """The problem for a failed upstream fetch.

    Args:
        exc: the failure (limiter refusal, open breaker, or an upstream error).
        subject: what was being fetched, for the detail ("tiles of layer 'olinda'").
        scope: the Geopera scope the operation needs, for the operator's log line.

    Returns:
        503 + Retry-After (daily budget spent, limiter queue full or its state unusable,
        breaker open, upstream 429), 502 (credentials refused, quota spent, any other
        failure), 504 (timeout).
    """
    if isinstance(exc, LimitExceeded):
        retry, headers = _retry(exc.retry_after_s)
        if exc.scope == "budget":
            return Problem(
                503,
                "Egress budget spent",
                "The gateway's daily upstream egress "
                "budget is spent; only cached data is served until it renews at "
                "00:00 UTC.",
                slug="egress-budget-spent",
                headers=headers,
            )
        if exc.scope == "state":
            return Problem(
                503,
                "Upstream limiter unavailable",
                "The gateway cannot read or write its own upstream limits (its disk is full "
                f"or damaged), so it sends nothing upstream; retry after {retry} s.",
                slug="limiter-unavailable",
                headers=headers,
            )
        return Problem(
            503,
            "Upstream limit reached",
            f"The gateway's {exc.scope} limit "
            f"towards the upstream is saturated; retry after {retry} s.",
            slug="upstream-limit",
            headers=headers,
        )
    if isinstance(exc, BreakerOpen):
        retry, headers = _retry(exc.retry_after_s)
        return Problem(
            503,
            "Upstream circuit open",
            f"Calls to the upstream for {subject} are "
            f"paused after errors or throttling; retry after {retry} s.",
            slug="upstream-circuit-open",
            headers=headers,
        )
    if isinstance(exc, UpstreamRateLimited):
        retry, headers = _retry(exc.retry_after_s)
        log.warning("upstream throttled %s; retry after %ss", exc.operation, retry)
        return Problem(
            503,
            "Upstream throttled",
            f"The upstream is rate limiting {subject}; retry after {retry} s.",
            slug="upstream-throttled",
            headers=headers,
        )
    if isinstance(exc, UpstreamAuthError):
        log.critical(
            "UPSTREAM REJECTED THE GATEWAY'S CREDENTIALS (%s) for %s: the Geopera "
            "API key is wrong, expired or lacks the %s scope; fix GEOPERA_API_KEY",
            exc.status,
            exc.operation,
            scope,
        )
        return Problem(
            502,
            "Upstream authorization failed",
            "The gateway's upstream "
            "credentials were refused; an operator has been alerted in the gateway "
            "log.",
            slug="upstream-auth",
        )
    if isinstance(exc, UpstreamTimeout):
        log.warning("upstream timed out: %s", exc)
        return Problem(
            504, "Upstream timeout", "The upstream did not answer in time.", slug="upstream-timeout"
        )
    log.error("upstream failed for %s: %s", subject, exc)
    detail = (
        "The upstream quota for this gateway is spent."
        if isinstance(exc, UpstreamQuotaExceeded)
        else f"The upstream failed to deliver {subject}."
    )
    return Problem(502, "Bad gateway", detail, slug="upstream-error")
