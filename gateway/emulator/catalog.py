"""The COGs the emulator can serve: a fixed map from COG URL to a local file.

Requests name a COG by URL only; a URL that is not a key of the configured map is refused
with 404, so no path or URL taken from a request ever reaches the filesystem or network.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from aiohttp import web

from .protocol import ProblemError

DATA_DIR = Path(__file__).resolve().parent / "data"
DEMO_COG_BASE_URL = "https://demo.geopera.invalid/cogs/"

SAMPLE_COGS: dict[str, Path] = {
    DEMO_COG_BASE_URL + name: DATA_DIR / name
    for name in (
        "landsat7_olinda_6band_cog.tif",
        "landsat7_bahamas_rgb_cog.tif",
        "dem_mount_st_helens_cog.tif",
    )
}
"""The three packaged sample COGs (see ``data/ATTRIBUTION.md``), keyed by their demo URL."""

CATALOG_KEY: web.AppKey[Mapping[str, Path]] = web.AppKey("geopera_emulator_cogs", Mapping)


def resolve_cog(cogs: Mapping[str, Path], url: str) -> Path:
    """Return the local file for COG ``url``; raise :class:`ProblemError` 404 if unknown."""
    path = cogs.get(url)
    if path is None:
        raise ProblemError(
            404,
            "cog-not-found",
            "COG not found",
            "The requested url is not a COG known to this server.",
        )
    return path
