"""Wire-level error protocol shared by every emulated operation.

Follows the Geopera docs: business, auth and routing errors are RFC 9457
``application/problem+json`` documents (seeds ``001`` "Clipping", ``004`` "Python recipes");
input validation failures are FastAPI-style ``HTTPValidationError`` bodies (``{"detail":
[{"loc", "msg", "type"}, ...]}``) with status 422 and content type ``application/json``
(seeds ``004``). The docs publish no problem ``type`` URIs: the emulator's,
``https://docs.geopera.com/errors/<slug>``, are our choice (listed in the README).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

PROBLEM_TYPE_BASE = "https://docs.geopera.com/errors/"
PROBLEM_CONTENT_TYPE = "application/problem+json"

OperationHandler = Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]]
"""An operation: ``await handler(request, body)`` with the already parsed JSON object body.

Handlers return the success response and raise :class:`ProblemError` or
:class:`RequestValidationError` for failures; the dispatcher turns those into responses.
"""


def problem_response(
    status: int,
    slug: str,
    title: str,
    detail: str,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """Build a problem+json response ``{"type", "title", "status", "detail"}``; ``type`` is
    ``PROBLEM_TYPE_BASE + slug``, or ``slug`` itself when it is already a URI."""
    kind = slug if "://" in slug else PROBLEM_TYPE_BASE + slug
    body = {"type": kind, "title": title, "status": status, "detail": detail}
    response = web.json_response(body, status=status, content_type=PROBLEM_CONTENT_TYPE)
    if headers:
        response.headers.update(headers)
    return response


class ProblemError(Exception):
    """Raised by operations to answer with a problem+json document (:func:`problem_response`)."""

    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail
        self.headers = dict(headers or {})

    def to_response(self) -> web.Response:
        return problem_response(self.status, self.slug, self.title, self.detail, self.headers)


def field_error(field: str | None, msg: str, type_: str) -> dict[str, Any]:
    """One ``HTTPValidationError.detail`` entry; ``field=None`` points at the whole body."""
    loc: list[str] = ["body"] if field is None else ["body", field]
    return {"loc": loc, "msg": msg, "type": type_}


class RequestValidationError(Exception):
    """Raised when the request body fails validation; answered with 422 ``{"detail": errors}``."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(f"{len(errors)} validation error(s)")
        self.errors = errors

    @classmethod
    def single(
        cls, field: str | None, msg: str, type_: str = "value_error"
    ) -> RequestValidationError:
        return cls([field_error(field, msg, type_)])

    def to_response(self) -> web.Response:
        return web.json_response({"detail": self.errors}, status=422)
