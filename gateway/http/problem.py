"""RFC 9457 problem details (``application/problem+json``) for every error the gateway answers.

Two ways in, both turned into a response by the middleware in :mod:`gateway.http.middleware`:

- route handlers raise :class:`Problem` for what is wrong with the request itself (400,
  404, 401/403 of client tokens...);
- services raise domain errors (:mod:`gateway.errors`) and :data:`ERROR_TABLE`, the one
  table at the HTTP edge, says how each is answered (:func:`problem_for`).

``detail`` is written for the client: it never carries a stack trace, an upstream URL or a
secret (a failed clip job's reason is the one piece of upstream text, cleaned first).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway import errors
from gateway.errors import GatewayError

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://geopera-gateway.dev/problems/"


class Problem(Exception):
    """An error with an HTTP status, answered as problem+json (RFC 9457 section 3).

    Args:
        status: HTTP status code.
        title: short, stable summary of the problem type.
        detail: what went wrong with this request, for a person.
        slug: problem type name; the ``type`` member is ``TYPE_BASE + slug``.
        headers: extra response headers (``Retry-After``, ``Allow``...).
        extra: extension members added to the body.
    """

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        slug: str,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.slug = status, title, detail, slug
        self.headers = dict(headers or {})
        self.extra = extra

    def response(self, instance: str | None = None) -> web.Response:
        """The ``application/problem+json`` response for this problem."""
        body: dict[str, Any] = {
            "type": TYPE_BASE + self.slug,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance:
            body["instance"] = instance
        body.update(self.extra)
        return web.Response(
            status=self.status,
            body=json.dumps(body).encode(),
            content_type=PROBLEM_JSON,
            headers=self.headers,
        )


def bad_request(detail: str, slug: str = "bad-request") -> Problem:
    """400: the request itself is malformed."""
    return Problem(400, "Bad request", detail, slug=slug)


def not_found(detail: str, slug: str = "not-found") -> Problem:
    """404: nothing here by that name."""
    return Problem(404, "Not found", detail, slug=slug)


# --- the domain error -> problem+json table ---------------------------------------------


@dataclass(frozen=True, slots=True)
class ProblemSpec:
    """How one domain error class is answered.

    Attributes:
        status: HTTP status code.
        title: the problem type's fixed summary.
        slug: the problem type name (``type`` is ``TYPE_BASE + slug``).
        detail: the client's ``detail`` for an error (never upstream text, except a failed
            job's cleaned reason).
        retry_after: send ``Retry-After`` from the error's ``retry_after_s`` (seconds,
            rounded, at least 1).
        members: extension members for an error, or None.
    """

    status: int
    title: str
    slug: str
    detail: Callable[[Any], str]
    retry_after: bool = False
    members: Callable[[Any], dict[str, Any]] | None = None


def _subject(exc: GatewayError, default: str = "this request") -> str:
    return exc.subject or default


def _seconds(exc: Any) -> int:
    return max(1, round(float(exc.retry_after_s)))


NOT_READY_RETRY_S = 5
"""Retry-After sent with 409 while a clip job is still running, seconds (the Clipping
guide, seeds ``001``: poll with backoff)."""

_BUDGET_SPENT = ProblemSpec(
    503,
    "Egress budget spent",
    "egress-budget-spent",
    lambda e: (
        "The gateway's daily upstream egress budget is spent; only cached data is "
        "served until it renews at 00:00 UTC."
    ),
    retry_after=True,
)
_LIMIT_REACHED = ProblemSpec(
    503,
    "Upstream limit reached",
    "upstream-limit",
    lambda e: (
        f"The gateway's {e.scope} limit towards the upstream is saturated; retry "
        f"after {_seconds(e)} s."
    ),
    retry_after=True,
)
_ORGANISATION_PAUSED = ProblemSpec(
    503,
    "Upstream paused",
    "upstream-paused",
    lambda e: (
        "Every call to the upstream is paused for the gateway's organisation "
        f"(throttled organisation-wide, or its subscription is past due); retry after "
        f"{_seconds(e)} s."
    ),
    retry_after=True,
)
_CIRCUIT_OPEN = ProblemSpec(
    503,
    "Upstream circuit open",
    "upstream-circuit-open",
    lambda e: (
        f"Calls to the upstream for {_subject(e)} are paused after errors or "
        f"throttling; retry after {_seconds(e)} s."
    ),
    retry_after=True,
)


_LIMITER_UNAVAILABLE = ProblemSpec(
    503,
    "Upstream limiter unavailable",
    "limiter-unavailable",
    lambda e: (
        "The gateway cannot read or write its own upstream limits (its disk is full or "
        "damaged, or the fleet's Redis cannot be reached), so it sends nothing upstream; "
        f"retry after {_seconds(e)} s."
    ),
    retry_after=True,
)


def _limit(exc: Any) -> ProblemSpec:
    if exc.scope == "state":
        return _LIMITER_UNAVAILABLE
    return _BUDGET_SPENT if exc.scope == "budget" else _LIMIT_REACHED


def _breaker(exc: Any) -> ProblemSpec:
    return _ORGANISATION_PAUSED if exc.scope.kind == "organisation" else _CIRCUIT_OPEN


ERROR_TABLE: dict[type[GatewayError], ProblemSpec | Callable[[Any], ProblemSpec]] = {
    errors.LimitExceeded: _limit,
    errors.BreakerOpen: _breaker,
    errors.UpstreamRateLimited: ProblemSpec(
        503,
        "Upstream throttled",
        "upstream-throttled",
        lambda e: f"The upstream is rate limiting {_subject(e)}; retry after {_seconds(e)} s.",
        retry_after=True,
    ),
    errors.UpstreamPaymentRequired: ProblemSpec(
        503,
        "Upstream payment required",
        "upstream-payment-required",
        lambda e: (
            "The upstream refuses the gateway's organisation until its subscription "
            f"is settled (402); an operator has been alerted. Retry after {_seconds(e)} s."
        ),
        retry_after=True,
    ),
    errors.UpstreamAuthError: ProblemSpec(
        502,
        "Upstream authorization failed",
        "upstream-auth",
        lambda e: (
            "The gateway's upstream credentials were refused; an operator has been "
            "alerted in the gateway log."
        ),
    ),
    errors.UpstreamTimeout: ProblemSpec(
        504,
        "Upstream timeout",
        "upstream-timeout",
        lambda e: "The upstream did not answer in time.",
    ),
    errors.UpstreamBadResponse: ProblemSpec(
        502,
        "Bad upstream response",
        "upstream-bad-response",
        lambda e: (
            f"The upstream answered {_subject(e)} with something that is not what was "
            "asked for; nothing was stored."
        ),
    ),
    errors.UpstreamError: ProblemSpec(
        502,
        "Bad gateway",
        "upstream-error",
        lambda e: f"The upstream failed to deliver {_subject(e)}.",
    ),
    errors.JobNotFound: ProblemSpec(
        404, "Not found", "unknown-download", lambda e: "No such clip job or mosaic type."
    ),
    errors.JobForbidden: ProblemSpec(
        403,
        "Forbidden",
        "job-forbidden",
        lambda e: "This clip job belongs to another organisation than the gateway's.",
    ),
    errors.ProjectForbidden: ProblemSpec(
        403,
        "Forbidden",
        "project-forbidden",
        lambda e: "This token may not read clip jobs of this job's project.",
    ),
    errors.NoTileLayer: ProblemSpec(
        404,
        "Not found",
        "no-clip-layer",
        lambda e: "This clip file has no map layer: the upstream gives no tile parameters for it.",
    ),
    errors.JobNotCompleted: ProblemSpec(
        409,
        "Job not completed",
        "job-not-completed",
        lambda e: (
            f"The clip job is {e.job_status}; its files can be downloaded once it is completed."
        ),
        members=lambda e: {"job_status": e.job_status},
    ),
    errors.JobFailed: ProblemSpec(
        410,
        "Job failed",
        "job-failed",
        lambda e: (
            f"The clip job {e.job_status}; its files will never exist. Reason given "
            f"by the upstream: {e.reason}"
        ),
        members=lambda e: {"job_status": e.job_status},
    ),
    errors.StoreUnavailable: ProblemSpec(
        503,
        "Download store full",
        "download-store-unavailable",
        lambda e: (
            "The gateway cannot store this file right now (its download store is full or "
            f"unwritable); an operator has been told in the log. Retry after {_seconds(e)} s."
        ),
        retry_after=True,
    ),
    errors.TransferFailed: ProblemSpec(
        502,
        "Bad gateway",
        "upstream-error",
        lambda e: "The transfer of this file broke off; try again.",
    ),
}
"""Every domain error class (:mod:`gateway.errors`) and its answer, most specific class
first by method resolution order (titiler's ``errors.py`` pattern); a value may choose its
spec from the error (limits: budget or not; breakers: organisation or not)."""


def problem_for(exc: GatewayError) -> Problem:
    """The problem+json answer for a domain error, from :data:`ERROR_TABLE`.

    Raises:
        LookupError: ``exc`` is of no class in the table (a bug: every domain error has one).
    """
    for cls in type(exc).__mro__:
        entry = ERROR_TABLE.get(cls)
        if entry is None:
            continue
        spec = entry if isinstance(entry, ProblemSpec) else entry(exc)
        headers: dict[str, str] = {}
        if spec.retry_after:
            headers["Retry-After"] = str(_seconds(exc))
        elif spec.status == 409:
            headers["Retry-After"] = str(NOT_READY_RETRY_S)
        members = spec.members(exc) if spec.members is not None else {}
        return Problem(
            spec.status, spec.title, spec.detail(exc), slug=spec.slug, headers=headers, **members
        )
    raise LookupError(f"no problem+json for {type(exc).__name__}")
