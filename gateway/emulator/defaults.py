"""The emulator's defaults, in a module that imports nothing: the CLI reads them for its
``emulator`` options without loading aiohttp's server or rio-tiler."""

from __future__ import annotations

DEFAULT_HOST = "127.0.0.1"
"""Where ``geopera-gateway emulator`` listens by default (loopback only)."""

DEFAULT_PORT = 8081
"""The TCP port of ``geopera-gateway emulator`` (the demo config's ``upstream.base_url``)."""

DEFAULT_DELAY_MS = 0.0
"""Added latency per upstream call, milliseconds."""

DEFAULT_ASSET_RPS = 50.0
"""Default per-asset limit: 50 requests per second per asset."""

DEFAULT_BANDWIDTH = 50_000_000
"""Default bandwidth limit: 50,000,000 bytes (50 MB) of response bodies per second."""

DEFAULT_CLIP_DELAY_S = 2.0
"""Default minimum time, in seconds, a clip job stays ``running`` after creation."""

EMPTY_STATUSES = (204, 404)
"""How an empty tile may be answered: 204 No Content, or 404 problem+json."""

DEFAULT_EMPTY_STATUS = 404
"""The default answer to a tile with no data: 404 problem+json."""
