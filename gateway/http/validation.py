"""Request-shape limits checked before any route logic (hostile input).

aiohttp already refuses request lines and header fields over 8,190 bytes and more than 128
headers at the protocol level. These tighter limits answer with problem+json:

- the path longer than :data:`MAX_PATH` bytes → 414;
- the query string longer than :data:`MAX_QUERY` bytes, or more than :data:`MAX_QUERY_PARAMS`
  parameters → 414 / 400;
- more than :data:`MAX_HEADERS` request headers → 431 (RFC 6585 section 5);
- on routes whose :class:`~gateway.http.policy.RoutePolicy` lists the query parameters it
  accepts (those whose answer comes from the upstream: tiles, downloads, clip layers, the job
  listing), any other query parameter → 400, and any of them repeated → 400, so nothing a
  client adds can change what is fetched or poison the cache under another key.
"""

from __future__ import annotations

from aiohttp import web

from gateway.http.policy import RoutePolicy
from gateway.http.problem import Problem

MAX_PATH = 1024
MAX_QUERY = 1024
MAX_QUERY_PARAMS = 8
MAX_HEADERS = 64


def check_request_shape(request: web.Request, policy: RoutePolicy) -> None:
    """Raise a :class:`Problem` when the request is larger or stranger than the gateway
    serves, or carries a query parameter its route's ``policy`` does not accept; cheap
    enough for every request (length checks on the raw target; the decoded path only when
    the raw one is long, since decoding never lengthens it; the query only when there is
    one)."""
    raw = request.raw_path
    if len(raw) > MAX_PATH + MAX_QUERY:
        raise Problem(
            414,
            "URI too long",
            f"Paths and queries are limited to {MAX_PATH} bytes each.",
            slug="uri-too-long",
        )
    if len(raw) > MAX_PATH and len(request.path) > MAX_PATH:
        raise Problem(
            414, "URI too long", f"Paths are limited to {MAX_PATH} bytes.", slug="uri-too-long"
        )
    if len(request.headers) > MAX_HEADERS:
        raise Problem(
            431,
            "Request header fields too large",
            f"At most {MAX_HEADERS} request headers are accepted.",
            slug="too-many-headers",
        )
    if "?" not in raw:
        return
    query_string = request.query_string
    if not query_string:
        return
    if len(query_string) > MAX_QUERY:
        raise Problem(
            414,
            "URI too long",
            f"Query strings are limited to {MAX_QUERY} bytes.",
            slug="uri-too-long",
        )
    query = request.query
    if len(query) > MAX_QUERY_PARAMS:
        raise Problem(
            400,
            "Bad request",
            f"At most {MAX_QUERY_PARAMS} query parameters.",
            slug="too-many-query-parameters",
        )
    allowed = policy.query
    if allowed is not None:
        unknown = sorted(k for k in query if k not in allowed)
        if unknown:
            names = ", ".join(repr(k[:32]) for k in unknown[:3])
            raise Problem(
                400,
                "Bad request",
                f"Unknown query parameter {names}; this route "
                f"accepts only {', '.join(sorted(allowed))}.",
                slug="unknown-query-parameter",
            )
        repeated = sorted(k for k in set(query) if len(query.getall(k)) > 1)
        if repeated:
            raise Problem(
                400,
                "Bad request",
                f"Send {repeated[0]!r} once.",
                slug="repeated-parameter",
            )
