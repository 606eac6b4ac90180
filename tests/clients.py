"""Helpers for tests that drive real non-Python clients (GDAL's command-line tools)."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio

needs_gdal = pytest.mark.skipif(
    shutil.which("gdal_translate") is None and not os.environ.get("CI"),
    reason="GDAL command-line tools not installed (CI installs gdal-bin)",
)

OLINDA_WINDOW = ("-34.91", "-7.955", "-34.83", "-8.035")
"""A window over Olinda (lon/lat: west north east south); 512 px wide, GDAL reads z13."""


async def read_olinda_window(source: str, out: Path) -> np.ndarray:
    """``gdal_translate`` the Olinda window of ``source`` into ``out`` (GeoTIFF, 512 px wide)
    and check it holds real imagery; returns the pixels (bands, rows, columns)."""
    process = await asyncio.create_subprocess_exec(
        "gdal_translate",
        "-q",
        "-of",
        "GTiff",
        "-projwin_srs",
        "EPSG:4326",
        "-projwin",
        *OLINDA_WINDOW,
        "-outsize",
        "512",
        "0",
        source,
        str(out),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=out.parent,  # GDAL's WMS/WMTS tile cache (./gdalwmscache) stays in tmp
        env={
            **os.environ,
            "GDAL_HTTP_TIMEOUT": "30",
            "CPL_VSIL_CURL_USE_HEAD": "NO",
            "GDAL_DEFAULT_WMS_CACHE_PATH": str(out.parent / "wms-cache"),
        },
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, stderr.decode()
    with rasterio.open(out) as dataset:
        assert dataset.count == 4
        assert dataset.crs.to_epsg() == 3857
        data = dataset.read()
    alpha = data[3]
    assert (alpha > 0).mean() > 0.5  # most of the window holds imagery
    rgb = data[:3][:, alpha > 0]
    assert rgb.std() > 5  # real texture, not a flat fill
    assert np.unique(rgb.reshape(3, -1), axis=1).shape[1] > 100
    return data
