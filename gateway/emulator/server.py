"""Running the emulator: blocking (:func:`run_emulator`) or inside a running loop
(:func:`start_emulator`)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path

from aiohttp import web

from .app import create_emulator_app
from .defaults import (
    DEFAULT_ASSET_RPS,
    DEFAULT_BANDWIDTH,
    DEFAULT_CLIP_DELAY_S,
    DEFAULT_DELAY_MS,
    DEFAULT_EMPTY_STATUS,
    DEFAULT_HOST,
    DEFAULT_PORT,
)


def _base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def start_emulator(
    host: str = DEFAULT_HOST,
    port: int = 0,
    *,
    api_keys: Collection[str] | None = None,
    delay_ms: float = DEFAULT_DELAY_MS,
    cogs: Mapping[str, Path] | None = None,
    asset_rps: float | None = DEFAULT_ASSET_RPS,
    bandwidth: float | None = DEFAULT_BANDWIDTH,
    clip_delay_s: float = DEFAULT_CLIP_DELAY_S,
    empty_tiles: int = DEFAULT_EMPTY_STATUS,
) -> tuple[web.AppRunner, str]:
    """Start the emulator on ``host:port`` in the current event loop.

    ``port=0`` picks a free port. Returns ``(runner, base_url)`` where ``base_url`` is like
    ``http://127.0.0.1:54321`` (the real port); stop it with ``await runner.cleanup()``.
    Other arguments as for :func:`~gateway.emulator.app.create_emulator_app`.
    """
    app = create_emulator_app(
        cogs=cogs,
        api_keys=api_keys,
        delay_ms=delay_ms,
        asset_rps=asset_rps,
        bandwidth=bandwidth,
        clip_delay_s=clip_delay_s,
        empty_tiles=empty_tiles,
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    actual_port = runner.addresses[0][1]
    return runner, _base_url(host, actual_port)


def run_emulator(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    api_keys: Collection[str] | None = None,
    delay_ms: float = DEFAULT_DELAY_MS,
    asset_rps: float | None = DEFAULT_ASSET_RPS,
    bandwidth: float | None = DEFAULT_BANDWIDTH,
    clip_delay_s: float = DEFAULT_CLIP_DELAY_S,
    empty_tiles: int = DEFAULT_EMPTY_STATUS,
) -> None:
    """Serve the emulator until interrupted (blocking; no access log).

    Arguments as for :func:`~gateway.emulator.app.create_emulator_app`.
    """
    app = create_emulator_app(
        api_keys=api_keys,
        delay_ms=delay_ms,
        asset_rps=asset_rps,
        bandwidth=bandwidth,
        clip_delay_s=clip_delay_s,
        empty_tiles=empty_tiles,
    )
    line = f"Geopera emulator listening on {_base_url(host, port)} (Ctrl+C to stop)"
    web.run_app(app, host=host, port=port, access_log=None, print=lambda _msg: print(line))
