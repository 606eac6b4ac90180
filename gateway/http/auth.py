"""Client access control: tokens configured by their SHA-256, scopes, private layers.

A client presents a token as ``Authorization: Bearer <token>`` or, for XYZ clients that cannot
set headers (Leaflet, QGIS XYZ), as a ``token`` query parameter, which is never logged and
never part of a cache key. The gateway hashes what it is given and compares the digest with
every configured one in constant time (``hmac.compare_digest``, no early exit), so neither
the token nor its position in the list leaks through timing.

Scopes: ``tiles`` (private layers; public layers need no token), ``downloads`` and ``admin``
(always needed on those routes). A bad token is 401 wherever it is presented; a token without
the scope, or outside its ``layers``, is 403. Both are problem+json.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import cast

from aiohttp import web

from gateway.config.settings import TokenSettings
from gateway.http.problem import Problem
from gateway.layers import Layer

TOKEN_PREFIX = "ggw_"  # noqa: S105 (a prefix, not a secret)
"""Tokens made by ``geopera-gateway token create`` start with this (easy to spot in a leak)."""

TOKEN_KEY = web.RequestKey("gateway_token", object)
"""Request key holding the authenticated :class:`TokenSettings` (or None)."""

_ANONYMOUS = object()


def new_token() -> tuple[str, str]:
    """A new random token (256 bits) and its SHA-256 hex digest."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return token, token_digest(token)


def token_digest(token: str) -> str:
    """SHA-256 hex digest of a token, as configured in ``[[tokens]] sha256``."""
    return hashlib.sha256(token.encode()).hexdigest()


def presented_token(request: web.BaseRequest) -> str | None:
    """The token a request carries (an ``Authorization: Bearer`` header, or ``?token=``), or
    None when it carries none. An ``Authorization`` header of another scheme is ``""`` (a bad
    token).

    Raises:
        Problem: 400 when the request carries a token twice: both forms, two
            ``Authorization`` header lines (RFC 9110 section 5.3 allows a field to repeat only
            when its value is a list, which ``Authorization`` is not) or two ``token``
            parameters; no one of them is chosen.
    """
    header = request.headers.get("Authorization")
    # without a "?" in the raw target there is no query to parse (a cache hit's usual case)
    in_query = "?" in request.raw_path and "token" in request.query
    if header is not None:
        if in_query:
            raise _twice("in the Authorization header or as ?token=, not both")
        if len(request.headers.getall("Authorization")) > 1:
            raise _twice("in one Authorization header")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return ""  # an Authorization header we cannot use counts as a bad token
    if not in_query:
        return None
    values = request.query.getall("token")
    if len(values) > 1:
        raise _twice("as one ?token= parameter")
    return values[0]


def _twice(how: str) -> Problem:
    return Problem(400, "Bad request", f"Send the token once: {how}.", slug="repeated-parameter")


def _unauthorized(detail: str) -> Problem:
    return Problem(
        401,
        "Unauthorized",
        detail,
        slug="unauthorized",
        headers={"WWW-Authenticate": 'Bearer realm="geopera-gateway"'},
    )


class Authenticator:
    """Checks tokens against the configured ``[[tokens]]``.

    Args:
        tokens: the configured tokens.
    """

    def __init__(self, tokens: tuple[TokenSettings, ...]) -> None:
        self.tokens = tokens

    def identify(self, request: web.BaseRequest) -> TokenSettings | None:
        """The token the request presents, None when it presents none; cached on the request.

        Raises:
            Problem: 401 for a presented token that matches no configured one.
        """
        cached = request.get(TOKEN_KEY, _ANONYMOUS)
        if cached is not _ANONYMOUS:
            return cast("TokenSettings | None", cached)
        value = presented_token(request)
        token = None
        if value is not None:
            digest = token_digest(value)
            for candidate in self.tokens:  # every comparison runs: constant time overall
                if hmac.compare_digest(candidate.sha256, digest):
                    token = candidate
            if token is None:
                raise _unauthorized("The token is not valid for this gateway.")
        request[TOKEN_KEY] = token
        return token

    def authorize(
        self, request: web.BaseRequest, scope: str, layer: Layer | None = None
    ) -> TokenSettings | None:
        """Let the request through for ``scope`` (and ``layer``), or raise.

        Public layers need no token for ``tiles``. Returns the token, if any.

        Raises:
            Problem: 401 without a (valid) token where one is needed, 403 when the token
                lacks ``scope`` or may not read ``layer``.
        """
        token = self.identify(request)
        if scope == "tiles" and layer is not None and layer.public:
            return token
        if token is None:
            raise _unauthorized(
                f"This needs a token with the {scope!r} scope: send "
                "'Authorization: Bearer <token>' or '?token=<token>'."
            )
        if scope not in token.scopes:
            raise Problem(
                403, "Forbidden", f"This token does not have the {scope!r} scope.", slug="forbidden"
            )
        if layer is not None and token.layers is not None and layer.name not in token.layers:
            raise Problem(
                403, "Forbidden", f"This token may not read layer {layer.name!r}.", slug="forbidden"
            )
        return token
