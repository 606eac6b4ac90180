"""Helpers for tests that drive real non-Python clients: GDAL's command-line tools, and nginx
as a shared cache in front of the gateway."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
from collections.abc import AsyncIterator
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


async def read_olinda_window(source: str, out: Path, width: int = 512) -> np.ndarray:
    """``gdal_translate`` the Olinda window of ``source`` into ``out`` (GeoTIFF, ``width`` px
    wide) and check it holds real imagery; returns the pixels (bands, rows, columns)."""
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
        str(width),
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
    assert np.unique(rgb.reshape(3, -1), axis=1).shape[1] > min(100, width)
    return data


NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)

needs_nginx = pytest.mark.skipif(
    NGINX is None and not os.environ.get("CI"),
    reason="nginx not installed (CI installs the Debian package nginx)",
)

NGINX_CONF = """\
daemon off;
worker_processes 1;
{user}
pid nginx.pid;
error_log error.log notice;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path tmp/body;
  proxy_temp_path tmp/proxy;
  fastcgi_temp_path tmp/fastcgi;
  uwsgi_temp_path tmp/uwsgi;
  scgi_temp_path tmp/scgi;
  proxy_cache_path cache keys_zone=gateway:1m;
  server {{
    listen {listen};
    location / {{
      proxy_pass {upstream};
      proxy_cache gateway;
      proxy_cache_valid 200 10m;
      add_header X-Nginx-Cache $upstream_cache_status always;
    }}
  }}
}}
"""
"""A stock nginx ``proxy_cache`` in front of ``upstream``: cache key ``$scheme$proxy_host
$request_uri`` (the default), 200s kept 10 minutes unless the answer's ``Cache-Control``
forbids it, and the cache status in ``X-Nginx-Cache``."""


@contextlib.asynccontextmanager
async def nginx_in_front(upstream: str, prefix: Path) -> AsyncIterator[str]:
    """Run nginx (``daemon off``, prefix ``prefix``) as a caching proxy for ``upstream``;
    yields its base URL.

    The listening socket is bound here on a free loopback port and handed to nginx through
    its ``NGINX`` environment variable (the sockets it inherits on a binary upgrade), so no
    other process can take the port between choosing and listening, and connections made
    before nginx runs wait in the socket's backlog.
    """
    (prefix / "tmp").mkdir(parents=True)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    host, port = listener.getsockname()
    # as root the master would hand the work to "nobody", who cannot enter pytest's tmp dirs
    user = "user root;" if os.geteuid() == 0 else ""
    conf = NGINX_CONF.format(user=user, listen=f"{host}:{port}", upstream=upstream)
    (prefix / "nginx.conf").write_text(conf)
    process = await asyncio.create_subprocess_exec(
        NGINX,
        "-p",
        f"{prefix}/",
        "-c",
        "nginx.conf",
        "-e",
        "error.log",
        env={**os.environ, "NGINX": f"{listener.fileno()};"},
        pass_fds=[listener.fileno()],
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    listener.close()  # nginx holds its own copy
    try:
        yield f"http://{host}:{port}"
    finally:
        process.terminate()
        _, stderr = await asyncio.wait_for(process.communicate(), 20)
        assert process.returncode == 0, stderr.decode() + (prefix / "error.log").read_text()
