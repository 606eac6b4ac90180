"""RFC 9457 problem details (``application/problem+json``) for every error the gateway answers.

Handlers and services raise :class:`Problem` (or a subclass); the middleware in
:mod:`gateway.app` turns it into a response. ``detail`` is written for the client: it never
carries a stack trace, an upstream URL or a secret.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

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
