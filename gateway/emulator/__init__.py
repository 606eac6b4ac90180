"""Geopera API emulator for tile operations (``cog.tile.render``, ``cog.tile.terrain``).

An aiohttp app serving the packaged sample COGs (``data/``, see ``data/ATTRIBUTION.md``) over
the Geopera wire protocol, for tests, demos and benchmarks of the gateway.
"""

from .app import create_emulator_app
from .catalog import SAMPLE_COGS
from .faults import FAULTS_KEY, Fault, FaultPlan
from .server import run_emulator, start_emulator
from .stats import STATS_KEY, EmulatorStats

__all__ = [
    "FAULTS_KEY",
    "SAMPLE_COGS",
    "STATS_KEY",
    "EmulatorStats",
    "Fault",
    "FaultPlan",
    "create_emulator_app",
    "run_emulator",
    "start_emulator",
]
