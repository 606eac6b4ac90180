"""aiohttp application emulating the Geopera API's tile and clip operations.

Routes (Geopera COG & tiles operations, Clipping operations; errors per the Geopera errors
guide):

- ``POST /v1/op/{operation_id}`` and the alias ``POST /v1/{resource}/{action...}``
  (``/v1/cog/tile/render`` is ``cog.tile.render``). Requires ``Authorization: Bearer
  <token>``, a ``gpra_`` API key or a session token (seeds ``004`` "Python recipes": "Both
  are sent verbatim as ``Authorization: Bearer <token>``"), and the operation's scope
  (:data:`OPERATION_SCOPES`, from the operations reference, seeds ``000`` and ``003``): a
  token without it is answered 403 ``insufficient-scope`` (seeds ``004``: "403 Forbidden —
  the token is valid but lacks the scope the operation requires").
- ``GET /_emulator/stats`` and ``POST /_emulator/reset``: call counters for benchmarks in other
  processes; ``POST``/``DELETE /_emulator/faults`` and ``POST /_emulator/faults/release``:
  scripted failures and stalls (:mod:`.faults`);
  ``GET``/``POST /_emulator/limits``: the egress limits (:mod:`.egress`). These need
  **no auth**: the emulator is a loopback test tool, not a real service.

Egress limits (:mod:`.egress`), as on the real Geopera: a per-asset request rate limit and a
bandwidth circuit breaker answer ``429`` with ``Retry-After`` (``asset-rate-limited``,
``bandwidth-circuit-open``). They apply to authorised, valid calls only, before rendering
(tiles) or streaming (``clip.job.download``).

Tiles (:mod:`.tiles`): ``cog.tile.render``, ``cog.tile.terrain``, ``cog.thumbnail``; empty
tiles are 404 ``empty-tile`` (or 204 with ``empty_tiles=204``). Clip jobs (:mod:`.clips`):
``clip.create_from_item`` (``Idempotency-Key`` required), ``clip.jobs.list``,
``clip.job.get``, ``clip.job.downloads``, ``clip.job.download``, ``clip.job.tile_info``; jobs
stay ``running`` for at least ``clip_delay_s`` seconds.

Every error is ``application/problem+json`` except 422 validation errors
(``HTTPValidationError``). The presented token is never echoed.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from .catalog import CATALOG_KEY, SAMPLE_COGS
from .clips import CLIP_OPERATIONS, setup_clips
from .defaults import (
    DEFAULT_ASSET_RPS,
    DEFAULT_BANDWIDTH,
    DEFAULT_CLIP_DELAY_S,
    DEFAULT_DELAY_MS,
    DEFAULT_EMPTY_STATUS,
    EMPTY_STATUSES,
)
from .egress import LIMITS_KEY, EgressLimits, get_limits, post_limits
from .faults import FAULTS_KEY, FaultPlan, delete_faults, post_faults, release_stalls
from .faults import apply as apply_fault
from .protocol import (
    OperationHandler,
    ProblemError,
    RequestValidationError,
    field_error,
    problem_response,
)
from .stats import STATS_KEY, EmulatorStats
from .tiles import EMPTY_STATUS_KEY, TILE_OPERATIONS

log = logging.getLogger(__name__)

DEFAULT_KEY_PREFIX = "gpra_"
DEFAULT_KEY_MIN_SUFFIX = 8

SESSION_TOKEN = re.compile(r"[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")
"""What the default mode accepts as a session token (our choice: a JWT's three base64url
parts; the docs name session tokens but not their format)."""

ALL_SCOPES = frozenset({"*"})
"""The grant of a token configured without scopes: every operation."""

OPERATION_SCOPES = {
    "cog.tile.render": "tiles:read",
    "cog.tile.terrain": "tiles:read",
    "cog.thumbnail": "tiles:read",
    "clip.create_from_item": "processing:process",
    "clip.jobs.list": "clip:read",
    "clip.job.get": "clip:read",
    "clip.job.downloads": "clip:read",
    "clip.job.download": "clip:read",
    "clip.job.tile_info": "clip:read",
}
"""The scope each implemented operation needs (operations reference, seeds ``000``, ``003``;
Clipping guide, seeds ``001``: ``clip.create_from_item`` needs ``processing:process``)."""


def parse_api_key(text: str) -> tuple[str, frozenset[str]]:
    """``"KEY"`` or ``"KEY=scope,scope"`` -> ``(KEY, scopes)``; no scopes means every one.

    Raises:
        ValueError: an empty key, or ``=`` with no scope after it.
    """
    key, sep, scopes = text.partition("=")
    key = key.strip()
    if not key:
        raise ValueError("an API key is KEY or KEY=scope,scope")
    if not sep:
        return key, ALL_SCOPES
    granted = frozenset(s.strip() for s in scopes.split(",") if s.strip())
    if not granted:
        raise ValueError(f"no scopes after '=' in the --api-key of {key[:5]}...")
    return key, granted


@dataclass(frozen=True, slots=True)
class _Settings:
    api_keys: Mapping[str, frozenset[str]] | None
    delay_s: float
    operations: Mapping[str, OperationHandler]


_SETTINGS_KEY: web.AppKey[_Settings] = web.AppKey("geopera_emulator_settings", _Settings)

_UNAUTHORIZED = ProblemError(
    401,
    "unauthorized",
    "Unauthorized",
    "A valid bearer token is required: send 'Authorization: Bearer <gpra_ API key>'.",
    headers={"WWW-Authenticate": "Bearer"},
)


def default_operations() -> dict[str, OperationHandler]:
    """Operation id -> handler for every implemented operation (merge new modules here)."""
    return {**TILE_OPERATIONS, **CLIP_OPERATIONS}


def _token_scopes(token: str, api_keys: Mapping[str, frozenset[str]] | None) -> frozenset[str]:
    """The scopes ``token`` grants, or an empty set when it is refused."""
    if api_keys is None:
        is_key = (
            token.startswith(DEFAULT_KEY_PREFIX)
            and len(token) >= len(DEFAULT_KEY_PREFIX) + DEFAULT_KEY_MIN_SUFFIX
        )
        return ALL_SCOPES if is_key or SESSION_TOKEN.fullmatch(token) else frozenset()
    presented = token.encode()
    granted: frozenset[str] = frozenset()
    for key, scopes in api_keys.items():
        if hmac.compare_digest(presented, key.encode()):
            granted = scopes
    return granted


def _authenticate(
    request: web.Request, api_keys: Mapping[str, frozenset[str]] | None
) -> frozenset[str]:
    """The presented token's scopes; 401 problem when there is no acceptable token."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    scopes = _token_scopes(token.strip(), api_keys) if scheme.lower() == "bearer" else None
    if not scopes:
        raise _UNAUTHORIZED
    return scopes


def _authorize(operation_id: str, scopes: frozenset[str]) -> None:
    """403 ``insufficient-scope`` unless ``scopes`` grant ``operation_id``."""
    needed = OPERATION_SCOPES.get(operation_id)
    if needed is not None and "*" not in scopes and needed not in scopes:
        raise ProblemError(
            403,
            "insufficient-scope",
            "Forbidden",
            f"The token lacks the {needed} scope that {operation_id} requires.",
        )


async def _read_json_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        raise RequestValidationError([field_error(None, "Field required", "missing")])
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ProblemError(
            400, "invalid-json", "Bad Request", "The request body is not valid JSON."
        ) from None
    if not isinstance(body, dict):
        msg = "Input should be a valid dictionary or object to extract fields from"
        raise RequestValidationError([field_error(None, msg, "model_attributes_type")])
    return body


async def _dispatch(request: web.Request, operation_id: str) -> web.StreamResponse:
    settings = request.app[_SETTINGS_KEY]
    handler = settings.operations.get(operation_id)
    body: dict[str, Any] | None = None
    try:
        if settings.delay_s > 0:
            await asyncio.sleep(settings.delay_s)
        scopes = _authenticate(request, settings.api_keys)
        if handler is None:
            raise ProblemError(
                404, "operation-not-found", "Not Found", "This operation is not available."
            )
        _authorize(operation_id, scopes)
        body = await _read_json_object(request)
        fault = request.app[FAULTS_KEY].take(operation_id)
        response = await apply_fault(fault, request) if fault is not None else None
        if response is None:
            response = await handler(request, body)
    except (ProblemError, RequestValidationError) as exc:
        response = exc.to_response()
    except Exception:
        log.exception("operation %s failed", operation_id)
        response = problem_response(
            500, "internal-error", "Internal Server Error", "The operation failed unexpectedly."
        )
    if handler is not None:
        request.app[STATS_KEY].record(operation_id, body, response.status)
    return response


async def _operation_by_id(request: web.Request) -> web.StreamResponse:
    return await _dispatch(request, request.match_info["operation_id"])


async def _operation_by_path(request: web.Request) -> web.StreamResponse:
    return await _dispatch(request, request.match_info["path"].strip("/").replace("/", "."))


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATS_KEY].as_json())


async def _reset(request: web.Request) -> web.Response:
    request.app[STATS_KEY].reset()
    return web.json_response(request.app[STATS_KEY].as_json())


@web.middleware
async def _problem_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Turn aiohttp's own HTTP errors (unknown route 404, wrong method 405, ...) into problems."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        slug = exc.reason.lower().replace(" ", "-")
        detail = f"{request.method} {request.path} is not available: {exc.reason}."
        return problem_response(exc.status, slug, exc.reason, detail, headers)


def create_emulator_app(
    *,
    cogs: Mapping[str, Path] | None = None,
    api_keys: Collection[str] | None = None,
    delay_ms: float = DEFAULT_DELAY_MS,
    asset_rps: float | None = DEFAULT_ASSET_RPS,
    bandwidth: float | None = DEFAULT_BANDWIDTH,
    clip_delay_s: float = DEFAULT_CLIP_DELAY_S,
    empty_tiles: int = DEFAULT_EMPTY_STATUS,
) -> web.Application:
    """Build the emulator application.

    Args:
        cogs: COG URL -> local COG file that operations may read; ``None`` = :data:`SAMPLE_COGS`.
        api_keys: accepted bearer tokens (API keys or session tokens), each ``"TOKEN"``
            (every scope) or ``"TOKEN=scope,scope"`` (:func:`parse_api_key`); ``None``
            accepts, with every scope, any token starting with ``gpra_`` followed by at
            least 8 more characters, and any JWT-shaped session token
            (:data:`SESSION_TOKEN`).
        empty_tiles: the status of an empty tile: 404 (problem ``empty-tile``, the default,
            as a TiTiler-style API answers) or 204 (No Content).
        delay_ms: simulated upstream latency in milliseconds, slept once per operation call.
        asset_rps: per-asset limit in requests per second (asset = the body's ``url`` or
            ``job_id``); ``0``/``None`` disables it. Default :data:`DEFAULT_ASSET_RPS` (50).
        bandwidth: limit on response bodies in bytes per second, across all operations;
            ``0``/``None`` disables it. Default :data:`DEFAULT_BANDWIDTH` (50,000,000).
        clip_delay_s: minimum time in seconds a clip job stays ``running`` after
            ``clip.create_from_item`` (it also waits for the clip itself). Default 2.0.

    Raises:
        FileNotFoundError: a configured COG file does not exist.
        ValueError: ``delay_ms`` or ``clip_delay_s`` is negative, a limit is negative or
            not finite, ``empty_tiles`` is not 204 or 404, or an API key is malformed.

    The app's :class:`EmulatorStats` is ``app[STATS_KEY]``; its
    :class:`~gateway.emulator.egress.EgressLimits` (settable at run time) is
    ``app[LIMITS_KEY]``; its :class:`~gateway.emulator.clips.ClipStore` (jobs, idempotency
    keys, ``delay_s``) is ``app[CLIPS_KEY]``.
    """
    catalog = dict(SAMPLE_COGS if cogs is None else cogs)
    missing = [str(path) for path in catalog.values() if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f"COG file(s) not found: {', '.join(missing)}")
    if delay_ms < 0:
        raise ValueError("delay_ms must be >= 0")
    if empty_tiles not in EMPTY_STATUSES:
        raise ValueError("empty_tiles must be 204 or 404")
    keys = None if api_keys is None else dict(parse_api_key(k) for k in api_keys)
    limits = EgressLimits(asset_rps, bandwidth)

    app = web.Application(middlewares=[_problem_middleware])
    app[CATALOG_KEY] = {url: Path(path) for url, path in catalog.items()}
    app[STATS_KEY] = EmulatorStats()
    app[FAULTS_KEY] = FaultPlan()
    app[LIMITS_KEY] = limits
    app[EMPTY_STATUS_KEY] = empty_tiles
    setup_clips(app, clip_delay_s)
    app[_SETTINGS_KEY] = _Settings(
        api_keys=keys,
        delay_s=delay_ms / 1000.0,
        operations=default_operations(),
    )
    app.router.add_post("/v1/op/{operation_id}", _operation_by_id)
    app.router.add_post("/v1/{path:.+}", _operation_by_path)
    app.router.add_get("/_emulator/stats", _stats)
    app.router.add_post("/_emulator/reset", _reset)
    app.router.add_post("/_emulator/faults", post_faults)
    app.router.add_delete("/_emulator/faults", delete_faults)
    app.router.add_post("/_emulator/faults/release", release_stalls)
    app.router.add_get("/_emulator/limits", get_limits)
    app.router.add_post("/_emulator/limits", post_limits)
    return app
