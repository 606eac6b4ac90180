"""aiohttp application emulating the Geopera API's tile and clip operations.

Routes (Geopera COG & tiles operations, Clipping operations; errors per the Geopera errors
guide):

- ``POST /v1/op/{operation_id}`` and the alias ``POST /v1/{resource}/{action...}``
  (``/v1/cog/tile/render`` is ``cog.tile.render``). Requires ``Authorization: Bearer <key>``.
- ``GET /_emulator/stats`` and ``POST /_emulator/reset``: call counters for benchmarks in other
  processes; ``POST``/``DELETE /_emulator/faults``: scripted failures (:mod:`.faults`);
  ``GET``/``POST /_emulator/limits``: the egress limits (:mod:`.egress`). These need
  **no auth**: the emulator is a loopback test tool, not a real service.

Egress limits (:mod:`.egress`), as on the real Geopera: a per-asset request rate limit and a
bandwidth circuit breaker answer ``429`` with ``Retry-After`` (``asset-rate-limited``,
``bandwidth-circuit-open``). They apply to authorised, valid calls only, before rendering
(tiles) or streaming (``clip.job.download``).

Clip jobs (:mod:`.clips`): ``clip.create_from_item`` (``Idempotency-Key`` required),
``clip.job.get``, ``clip.job.downloads``, ``clip.job.download``; jobs stay ``running`` for at
least ``clip_delay_s`` seconds.

Every error is ``application/problem+json`` except 422 validation errors
(``HTTPValidationError``). The presented token is never echoed.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from .catalog import CATALOG_KEY, SAMPLE_COGS
from .clips import CLIP_OPERATIONS, DEFAULT_CLIP_DELAY_S, setup_clips
from .egress import (
    DEFAULT_ASSET_RPS,
    DEFAULT_BANDWIDTH,
    LIMITS_KEY,
    EgressLimits,
    get_limits,
    post_limits,
)
from .faults import FAULTS_KEY, FaultPlan, delete_faults, post_faults
from .faults import apply as apply_fault
from .protocol import (
    OperationHandler,
    ProblemError,
    RequestValidationError,
    field_error,
    problem_response,
)
from .stats import STATS_KEY, EmulatorStats
from .tiles import TILE_OPERATIONS

log = logging.getLogger(__name__)

DEFAULT_KEY_PREFIX = "gpra_"
DEFAULT_KEY_MIN_SUFFIX = 8


@dataclass(frozen=True, slots=True)
class _Settings:
    api_keys: frozenset[str] | None
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


def _token_accepted(token: str, api_keys: frozenset[str] | None) -> bool:
    if api_keys is None:
        return (
            token.startswith(DEFAULT_KEY_PREFIX)
            and len(token) >= len(DEFAULT_KEY_PREFIX) + DEFAULT_KEY_MIN_SUFFIX
        )
    presented = token.encode()
    return any(hmac.compare_digest(presented, key.encode()) for key in api_keys)


def _authenticate(request: web.Request, api_keys: frozenset[str] | None) -> None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not _token_accepted(token.strip(), api_keys):
        raise _UNAUTHORIZED


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
        _authenticate(request, settings.api_keys)
        if handler is None:
            raise ProblemError(
                404, "operation-not-found", "Not Found", "This operation is not available."
            )
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
async def _problem_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
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
    delay_ms: float = 0.0,
    asset_rps: float | None = DEFAULT_ASSET_RPS,
    bandwidth: float | None = DEFAULT_BANDWIDTH,
    clip_delay_s: float = DEFAULT_CLIP_DELAY_S,
) -> web.Application:
    """Build the emulator application.

    Args:
        cogs: COG URL -> local COG file that operations may read; ``None`` = :data:`SAMPLE_COGS`.
        api_keys: accepted bearer tokens; ``None`` accepts any token starting with ``gpra_``
            followed by at least 8 more characters.
        delay_ms: simulated upstream latency in milliseconds, slept once per operation call.
        asset_rps: per-asset limit in requests per second (asset = the body's ``url`` or
            ``job_id``); ``0``/``None`` disables it. Default :data:`DEFAULT_ASSET_RPS` (50).
        bandwidth: limit on response bodies in bytes per second, across all operations;
            ``0``/``None`` disables it. Default :data:`DEFAULT_BANDWIDTH` (50,000,000).
        clip_delay_s: minimum time in seconds a clip job stays ``running`` after
            ``clip.create_from_item`` (it also waits for the clip itself). Default 2.0.

    Raises:
        FileNotFoundError: a configured COG file does not exist.
        ValueError: ``delay_ms`` or ``clip_delay_s`` is negative, or a limit is negative or
            not finite.

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
    limits = EgressLimits(asset_rps, bandwidth)

    app = web.Application(middlewares=[_problem_middleware])
    app[CATALOG_KEY] = {url: Path(path) for url, path in catalog.items()}
    app[STATS_KEY] = EmulatorStats()
    app[FAULTS_KEY] = FaultPlan()
    app[LIMITS_KEY] = limits
    setup_clips(app, clip_delay_s)
    app[_SETTINGS_KEY] = _Settings(
        api_keys=None if api_keys is None else frozenset(api_keys),
        delay_s=delay_ms / 1000.0,
        operations=default_operations(),
    )
    app.router.add_post("/v1/op/{operation_id}", _operation_by_id)
    app.router.add_post("/v1/{path:.+}", _operation_by_path)
    app.router.add_get("/_emulator/stats", _stats)
    app.router.add_post("/_emulator/reset", _reset)
    app.router.add_post("/_emulator/faults", post_faults)
    app.router.add_delete("/_emulator/faults", delete_faults)
    app.router.add_get("/_emulator/limits", get_limits)
    app.router.add_post("/_emulator/limits", post_limits)
    return app
