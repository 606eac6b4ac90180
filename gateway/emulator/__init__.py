"""Geopera API emulator for tile operations (``cog.tile.render``, ``cog.tile.terrain``,
``cog.thumbnail``) and clip jobs (``clip.create_from_item``, ``clip.jobs.list``,
``clip.job.get``, ``clip.job.downloads``, ``clip.job.download``, ``clip.job.tile_info``; see
:mod:`.clips`), with scopes per key (:func:`~gateway.emulator.app.parse_api_key`).

An aiohttp app serving the packaged sample COGs (``data/``, see ``data/ATTRIBUTION.md``) over
the Geopera wire protocol, for tests, demos and benchmarks of the gateway.

Like the real Geopera, the emulator enforces egress limits (:mod:`.egress`), answering ``429``
problem+json with ``Retry-After``. Defaults (``create_emulator_app``, ``start_emulator``,
``run_emulator``, ``python -m gateway.emulator --asset-rps R --bandwidth BYTES_PER_S``):

- :data:`DEFAULT_ASSET_RPS` = 50 requests/s per asset (the body's ``url`` or ``job_id``),
  burst of one second; type ``asset-rate-limited``.
- :data:`DEFAULT_BANDWIDTH` = 50,000,000 bytes/s (50 MB/s) of response bodies, all operations
  together, burst of one second; type ``bandwidth-circuit-open`` (the bandwidth circuit
  breaker).

``0`` or ``None`` disables a limit; change them at run time through ``app[LIMITS_KEY]`` or
``POST /_emulator/limits``.

Clip jobs stay ``running`` for at least ``clip_delay_s`` seconds (default
:data:`DEFAULT_CLIP_DELAY_S` = 2.0; ``--clip-delay-s S``). ``source_item_id="synthetic-<N>"``
makes an N-byte download for benchmarks; :func:`synthetic_bytes` regenerates its content.

Importing the package is light: the names below load their module (aiohttp, rio-tiler) on
first use (PEP 562 ``__getattr__``), and the defaults live in :mod:`.defaults`, which imports
nothing, so the CLI reads them without rio-tiler installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .defaults import DEFAULT_ASSET_RPS, DEFAULT_BANDWIDTH, DEFAULT_CLIP_DELAY_S

if TYPE_CHECKING:
    from .app import create_emulator_app
    from .catalog import SAMPLE_COGS
    from .clips import CLIPS_KEY, ClipStore, synthetic_bytes, synthetic_range, synthetic_sha256
    from .egress import LIMITS_KEY, EgressLimits
    from .faults import FAULTS_KEY, Fault, FaultPlan
    from .server import run_emulator, start_emulator
    from .stats import STATS_KEY, EmulatorStats

_LAZY = {
    "create_emulator_app": "app",
    "SAMPLE_COGS": "catalog",
    "CLIPS_KEY": "clips",
    "ClipStore": "clips",
    "synthetic_bytes": "clips",
    "synthetic_range": "clips",
    "synthetic_sha256": "clips",
    "LIMITS_KEY": "egress",
    "EgressLimits": "egress",
    "FAULTS_KEY": "faults",
    "Fault": "faults",
    "FaultPlan": "faults",
    "run_emulator": "server",
    "start_emulator": "server",
    "STATS_KEY": "stats",
    "EmulatorStats": "stats",
}
"""Public name -> the submodule defining it, imported on first access."""


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


__all__ = [
    "CLIPS_KEY",
    "DEFAULT_ASSET_RPS",
    "DEFAULT_BANDWIDTH",
    "DEFAULT_CLIP_DELAY_S",
    "FAULTS_KEY",
    "LIMITS_KEY",
    "SAMPLE_COGS",
    "STATS_KEY",
    "ClipStore",
    "EgressLimits",
    "EmulatorStats",
    "Fault",
    "FaultPlan",
    "create_emulator_app",
    "run_emulator",
    "start_emulator",
    "synthetic_bytes",
    "synthetic_range",
    "synthetic_sha256",
]
