"""Absolute URLs the gateway hands to map clients (TileJSON, WMTS, ``/layers``, the viewer).

The base is ``server.public_url`` when it is configured (the right choice behind any proxy).
Otherwise it is taken from the request: the scheme of the connection and its ``Host`` header,
replaced by ``X-Forwarded-Proto`` / ``X-Forwarded-Host`` only when the socket peer is one of
``server.trusted_proxies`` (the same rule as ``X-Forwarded-For`` in :mod:`gateway.http.callers`).
A forwarded value is believed only when it is well formed (``http``/``https``; a hostname or
bracketed IPv6 address with an optional port); anything else is ignored, so a client can never
inject markup or another URL through these headers. When several proxies appended values,
the last one (written by the proxy the gateway talks to) is used.
"""

from __future__ import annotations

import re
from urllib.parse import quote

from aiohttp import web

from gateway.http.callers import is_trusted
from gateway.http.keys import AUTH, SETTINGS

_HOST = re.compile(
    r"(?:[A-Za-z0-9_-]{1,63}(?:\.[A-Za-z0-9_-]{1,63})*\.?|\[[0-9A-Fa-f:.]{2,45}\])"
    r"(?::(?P<port>[0-9]{1,5}))?"
)
"""``host[:port]``: DNS labels (letters, digits, ``-``, ``_``) or ``[IPv6]``, optional port."""


def valid_host(value: str) -> bool:
    """Whether ``value`` is a plain ``host[:port]`` (at most 255 characters) whose port, when
    given, is one a client can connect to: 1 to 65535 (TCP ports are 16 bits, RFC 9293
    section 3.1, and port 0 is reserved)."""
    match = _HOST.fullmatch(value) if len(value) <= 255 else None
    if match is None:
        return False
    port = match["port"]
    return port is None or 1 <= int(port) <= 65535


def _last(request: web.BaseRequest, header: str) -> str | None:
    """The last comma-separated value of ``header`` (over all its lines), stripped."""
    values = [v.strip() for line in request.headers.getall(header, []) for v in line.split(",")]
    values = [v for v in values if v]
    return values[-1] if values else None


def _socket_host(request: web.BaseRequest) -> str:
    """``host:port`` of the local socket the request came in on (IPv6 in brackets)."""
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if not sockname:
        return "localhost"
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def public_base(request: web.Request) -> str:
    """The gateway's external base URL for ``request``, without a trailing slash.

    Returns ``server.public_url`` when set (it may carry a path prefix, e.g.
    ``https://maps.example.org/gateway``), else ``<scheme>://<host[:port]>`` from the request
    as described in the module docstring. Never raises.
    """
    server = request.app[SETTINGS].server
    if server.public_url:
        return str(server.public_url)
    scheme = request.scheme
    host = request.headers.get("Host", "")
    if server.trusted_proxies and is_trusted(request.remote or "", server.trusted_proxies):
        proto = (_last(request, "X-Forwarded-Proto") or "").lower()
        if proto in ("http", "https"):
            scheme = proto
        forwarded_host = _last(request, "X-Forwarded-Host")
        if forwarded_host and valid_host(forwarded_host):
            host = forwarded_host
    if not valid_host(host):
        host = _socket_host(request)
    return f"{scheme}://{host}"


def depends_on_request(request: web.Request) -> bool:
    """Whether :func:`public_base` reads request headers (no ``public_url`` configured)."""
    return request.app[SETTINGS].server.public_url is None


def token_query(request: web.Request) -> str:
    """``?token=<token>`` when the request carried a valid token as its ``token`` query
    parameter, ``""`` when it carried none or a valid one in ``Authorization``.

    Discovery documents append it to the tile URLs they return, so a client configured with
    only a capabilities or TileJSON URL (QGIS, GDAL) reads private layers with the same
    token. The token is the client's own; responses carrying it must not be stored by shared
    caches (``Cache-Control: private, no-store``).

    Raises:
        Problem: 401 when the presented token (either form) matches no configured token,
            400 when the request carries a token twice (see
            :func:`gateway.http.auth.presented_token`).
    """
    if request.app[AUTH].identify(request) is None or "Authorization" in request.headers:
        return ""
    return "?token=" + quote(request.query["token"], safe="")


def job_url(base: str, job_id: str) -> str:
    """Absolute URL of a job's status and files on this gateway."""
    return f"{base}/downloads/{job_id}"


def file_url(base: str, job_id: str, mosaic_type: str) -> str:
    """Absolute URL of one clip file on this gateway."""
    return f"{job_url(base, job_id)}/{mosaic_type}"
