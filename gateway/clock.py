"""The gateway's one clock: Unix time in seconds, read through a callable that can be replaced.

Tile freshness (TTLs, stale-while-revalidate and stale-if-error windows, purge times) reads
the time from the :data:`Clock` the app was built with (``create_app(settings, clock=...)``,
:func:`gateway.services.stack.open_tile_stack`), never from :func:`time.time` directly, so a
test moves time forward instead of sleeping. Durations that only measure how long something
took (timeouts, deadlines, latencies) use :func:`time.monotonic` and are not part of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]
"""A clock: called with no arguments, returns the current Unix time in seconds."""

system_clock: Clock = time.time
"""The real clock, the default everywhere."""
