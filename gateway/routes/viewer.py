"""The map viewer: ``GET /`` and ``GET /map``, one HTML page with MapLibre GL JS v5.

The page (template ``gateway/viewer/index.html``) gets a JSON config of the layers (absolute
XYZ templates from :func:`gateway.http.urls.public_base`, zoom range, bounds, HTML-escaped
attribution) and shows every layer in a switcher: raster layers as ``raster`` sources,
terrain layers as ``raster-dem`` (``encoding: "mapbox"``) with a ``hillshade`` layer and a 3D
terrain toggle. The base style has no external source (a background colour only), so the page
works without internet access when MapLibre is served locally.

MapLibre comes from ``viewer.maplibre_js`` / ``viewer.maplibre_css`` (a CDN) with
``integrity`` (Subresource Integrity) and ``crossorigin`` attributes when hashes are known:
configured ones, or the built-in hashes of the default URLs. With ``viewer.assets_dir`` set,
``GET /viewer/assets/{name}`` serves ``maplibre-gl.js``, ``maplibre-gl.css`` and their
``.map`` files from that directory (nothing else, no listing) and the page uses those.

Private layers: open the page with ``?token=<token>``; the page's script sends it to this
gateway's tile URLs as ``Authorization: Bearer``. A clip layer:
``?clip=<job_id>/<mosaic_type>`` (the downloads page links there); the server checks both
parts and gives the page the clip's TileJSON URL, which the script reads (with the token)
and shows as the first layer. The server never writes the token (or any secret) into the
page. Every value put into the page is escaped for its context (attribute
values with :func:`html.escape`, the JSON config with ``<``, ``>``, ``&`` and U+2028/9 as
``\\uXXXX``), and the answer carries a ``Content-Security-Policy`` with a per-response nonce.
"""

from __future__ import annotations

import html
import json
import re
import secrets
from functools import cache
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from gateway.config.settings import MAPLIBRE_VERSION, ViewerSettings
from gateway.discovery.tilejson import tile_template
from gateway.http.keys import LAYERS, SETTINGS
from gateway.http.pages import fill
from gateway.http.policy import add_get
from gateway.http.problem import not_found
from gateway.http.urls import public_base
from gateway.services.clips import layer_name
from gateway.services.downloads import JOB_ID, MOSAIC_TYPE

ASSETS_PATH = "/viewer/assets/"
ASSET_TYPES = {
    "maplibre-gl.js": "text/javascript; charset=utf-8",
    "maplibre-gl.css": "text/css; charset=utf-8",
    "maplibre-gl.js.map": "application/json",
    "maplibre-gl.css.map": "application/json",
}
"""The only files served from ``viewer.assets_dir``, with their media types."""

BACKGROUND = "#dfe6ea"
"""The base style's only layer: a plain background colour (no external sources)."""

_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028"}
_JSON_ESCAPES["\u2029"] = "\\u2029"


@cache
def template() -> str:
    """The page template (package data ``gateway/viewer/index.html``), read once."""
    return (resources.files("gateway") / "viewer" / "index.html").read_text(encoding="utf-8")


def script_json(value: Any) -> str:
    """``value`` as JSON safe inside an HTML ``<script>`` element (no ``</script>``, no
    ``<!--``, no JS line terminators)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return re.sub("[<>&\u2028\u2029]", lambda m: _JSON_ESCAPES[m[0]], text)


def integrity(url: str, configured: str | None, default_url: str, default: str | None) -> str:
    """The SRI hash for ``url``: the configured one, or the built-in one when ``url`` is the
    default URL (whose file it hashes), else ``""`` (no ``integrity`` attribute)."""
    if configured:
        return configured
    return (default or "") if url == default_url else ""


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _tag_attrs(sri: str, cross_origin: bool) -> str:
    attrs = f' integrity="{html.escape(sri)}"' if sri else ""
    if cross_origin or sri:
        attrs += ' crossorigin="anonymous"'
    return attrs


def load_failure_help(assets_dir_set: bool) -> str:
    """What the page tells when MapLibre GL JS did not load: how to serve it from the
    gateway itself (``viewer.assets_dir``), or, when that is already set, what to check."""
    if assets_dir_set:
        return (
            "Check that the gateway's viewer.assets_dir holds maplibre-gl.js and "
            "maplibre-gl.css (node_modules/maplibre-gl/dist of an npm install)."
        )
    return (
        "Without internet access, serve it from this gateway: run "
        f"'npm install --prefix /opt/maplibre maplibre-gl@{MAPLIBRE_VERSION}', then set "
        'assets_dir = "/opt/maplibre/node_modules/maplibre-gl/dist" in the [viewer] table '
        "of the gateway's config and restart it (README: The viewer)."
    )


def page_values(request: web.Request, nonce: str) -> tuple[dict[str, str], str]:
    """The template values for ``request`` and the Content-Security-Policy to send."""
    settings = request.app[SETTINGS]
    viewer, defaults = settings.viewer, ViewerSettings()
    base = public_base(request)
    if viewer.assets_dir is not None:
        js, css = base + ASSETS_PATH + "maplibre-gl.js", base + ASSETS_PATH + "maplibre-gl.css"
        js_sri = css_sri = ""
    else:
        js, css = viewer.maplibre_js, viewer.maplibre_css
        js_sri = integrity(
            js, viewer.maplibre_js_integrity, defaults.maplibre_js, defaults.maplibre_js_integrity
        )
        css_sri = integrity(
            css,
            viewer.maplibre_css_integrity,
            defaults.maplibre_css,
            defaults.maplibre_css_integrity,
        )
    layers = [
        {
            "name": layer.name,
            "title": layer.title,
            "kind": layer.kind,
            "public": layer.public,
            "tiles": tile_template(base, layer),
            "minzoom": layer.minzoom,
            "maxzoom": layer.maxzoom,
            "bounds": list(layer.bounds),
            "attribution_html": html.escape(layer.attribution),
        }
        for layer in request.app[LAYERS].values()
    ]
    config = {
        "base": base,
        "background": BACKGROUND,
        "default": settings.default_layer,
        "maplibre_js": js,
        "load_failure_help": load_failure_help(viewer.assets_dir is not None),
        "layers": layers,
        "clip": clip_config(base, request.query.get("clip")),
    }
    values = {
        "css_href": html.escape(css),
        "css_attrs": _tag_attrs(css_sri, _origin(css) != _origin(base)),
        "js_src": html.escape(js),
        "js_attrs": _tag_attrs(js_sri, _origin(js) != _origin(base)),
        "nonce": nonce,
        "config": script_json(config),
    }
    here = _origin(base)
    csp = "; ".join(
        [
            "default-src 'none'",
            f"script-src 'nonce-{nonce}' {_origin(js)}",
            f"style-src 'nonce-{nonce}' {_origin(css)}",
            f"img-src 'self' {here} data: blob:",
            f"connect-src 'self' {here}",
            "worker-src blob:",
            "child-src blob:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    return values, csp


def clip_config(base: str, value: str | None) -> dict[str, str] | None:
    """The page's clip layer for ``?clip=<job_id>/<mosaic_type>``: its layer name and
    TileJSON URL, or None when absent or malformed (both parts are checked, so nothing a
    client writes reaches the page but a UUID and a mosaic type)."""
    job_id, _, mosaic_type = (value or "").partition("/")
    if not JOB_ID.fullmatch(job_id) or not MOSAIC_TYPE.fullmatch(mosaic_type):
        return None
    name = layer_name(job_id, mosaic_type)
    return {"name": name, "tilejson": f"{base}/tiles/{name}/tilejson.json"}


async def page(request: web.Request) -> web.Response:
    """``GET /`` and ``GET /map``: the viewer page (``text/html``)."""
    nonce = secrets.token_urlsafe(18)
    values, csp = page_values(request, nonce)
    return web.Response(
        text=fill(template(), values),
        content_type="text/html",
        headers={
            "Content-Security-Policy": csp,
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store",
        },
    )


async def asset(request: web.Request) -> web.StreamResponse:
    """``GET /viewer/assets/{name}``: one MapLibre file from ``viewer.assets_dir``.

    Raises:
        Problem: 404 when no ``assets_dir`` is configured, for any other name, or when the
            file is not there.
    """
    assets_dir = request.app[SETTINGS].viewer.assets_dir
    name = request.match_info["name"]
    media_type = ASSET_TYPES.get(name)
    path = assets_dir / name if assets_dir is not None else None
    if path is None or media_type is None or not path.is_file():
        raise not_found(
            "The viewer serves only maplibre-gl.js, maplibre-gl.css and their source maps, "
            "and only when viewer.assets_dir is configured.",
            "unknown-asset",
        )
    return web.FileResponse(
        path, headers={"Content-Type": media_type, "Cache-Control": "public, max-age=86400"}
    )


def add_routes(app: web.Application) -> None:
    """Register the viewer routes on ``app``."""
    add_get(app, "/", page, name="viewer")
    add_get(app, "/map", page, name="viewer_map")
    add_get(app, ASSETS_PATH + "{name}", asset, name="viewer_asset")
