"""The map viewer: the page itself (escaping, CSP, SRI, local assets) and a real browser.

The browser test drives Debian's headless Chromium with Selenium and chromedriver against a
gateway on a real port, with MapLibre GL JS served from a local npm install
(``$MAPLIBRE_DIST``, which ``.ci/run`` exports; default ``.ci/node/node_modules/maplibre-gl/
dist``). It waits for tiles, takes a screenshot and checks that it shows imagery. Outside
CI it is skipped when Chromium, chromedriver, Selenium or MapLibre are missing; in CI it
fails instead.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path

import pytest

from gateway.app import create_app
from gateway.config.settings import ViewerSettings
from gateway.routes.viewer import script_json
from tests.conftest import PRIVATE_LAYER, TOKENS, config_with

ROOT = Path(__file__).resolve().parent.parent
MAPLIBRE_DIST = Path(
    os.environ.get("MAPLIBRE_DIST") or ROOT / ".ci/node/node_modules/maplibre-gl/dist"
)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
IN_CI = bool(os.environ.get("CI"))


def viewer_config(tmp_path: Path, assets: Path | None = None, extra: str = "") -> Path:
    """The test config with a ``[viewer]`` table (``assets_dir`` when given)."""
    table = f"\n[viewer]\nassets_dir = {json.dumps(str(assets))}\n" if assets else ""
    return config_with(tmp_path, append=extra + table)


def page_config(text: str) -> dict:
    match = re.search(r'<script type="application/json" id="viewer-config">(.*?)</script>', text)
    assert match
    return json.loads(match[1])


async def test_page_embeds_the_layers_and_the_cdn_with_sri(gateway):
    for path in ["/", "/map"]:
        response = await gateway.get(path)
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    text = await response.text()
    defaults = ViewerSettings()
    assert (
        f'<script src="{defaults.maplibre_js}" integrity="{defaults.maplibre_js_integrity}" '
        'crossorigin="anonymous"></script>'
    ) in text
    assert f'href="{defaults.maplibre_css}" integrity="{defaults.maplibre_css_integrity}"' in text
    assert "maplibre-gl@5." in defaults.maplibre_js
    config = page_config(text)
    base = f"http://127.0.0.1:{gateway.server.port}"
    assert config["base"] == base
    assert config["default"] == "olinda"
    assert [layer["name"] for layer in config["layers"]] == [
        "olinda",
        "olinda-ndvi",
        "bahamas",
        "st-helens",
    ]
    assert config["layers"][0]["tiles"] == f"{base}/tiles/olinda/{{z}}/{{x}}/{{y}}.png"
    assert config["layers"][3]["kind"] == "terrain"
    csp = response.headers["Content-Security-Policy"]
    nonce = re.search(r"'nonce-([^']+)'", csp)[1]
    assert text.count(f'nonce="{nonce}"') == 2
    assert "default-src 'none'" in csp
    assert "https://unpkg.com" in csp
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert "gpra_" not in text
    assert "ggw_" not in text
    # a fresh nonce per answer
    again = (await gateway.get("/")).headers["Content-Security-Policy"]
    assert again != csp


def test_default_sri_hashes_are_those_of_the_npm_package():
    """The built-in integrity hashes match the files of the version the default URLs name
    (npm's tarball is checked by npm against the registry's own sha512 on install)."""
    package = MAPLIBRE_DIST.parent / "package.json"
    _require(package.is_file(), f"MapLibre GL JS in {MAPLIBRE_DIST}")
    version = json.loads(package.read_text())["version"]
    defaults = ViewerSettings()
    if f"maplibre-gl@{version}/" not in defaults.maplibre_js:
        pytest.skip(f"installed maplibre-gl {version} is not the default URLs' version")
    for name, url, sri in [
        ("maplibre-gl.js", defaults.maplibre_js, defaults.maplibre_js_integrity),
        ("maplibre-gl.css", defaults.maplibre_css, defaults.maplibre_css_integrity),
    ]:
        assert url.endswith(f"@{version}/dist/{name}")
        digest = hashlib.sha384((MAPLIBRE_DIST / name).read_bytes()).digest()
        assert sri == "sha384-" + base64.b64encode(digest).decode()


async def test_page_escapes_what_it_embeds(gateway_for, emulator, tmp_path):
    hostile = """
[[layers]]
name = "hostile"
title = "</script><script>alert(1)</script>"
url = "https://demo.geopera.invalid/cogs/landsat7_olinda_6band_cog.tif"
attribution = "<img src=x onerror=alert(2)> \u2028 & co"
"""
    client = await gateway_for(emulator, config=config_with(tmp_path, append=hostile))
    text = await (await client.get("/")).text()
    assert "<script>alert(1)" not in text
    assert "<img src=x" not in text
    layer = page_config(text)["layers"][-1]
    assert layer["title"] == "</script><script>alert(1)</script>"
    assert layer["attribution_html"] == "&lt;img src=x onerror=alert(2)&gt; \u2028 &amp; co"
    assert script_json({"a": "</script>\u2029"}) == '{"a":"\\u003c/script\\u003e\\u2029"}'


async def test_page_takes_a_clip_only_as_a_job_id_and_a_mosaic_type(gateway):
    job = "0b7c6a52-1111-4222-8333-444455556666"
    base = f"http://127.0.0.1:{gateway.server.port}"
    config = page_config(await (await gateway.get("/", params={"clip": f"{job}/rgb"})).text())
    assert config["clip"] == {
        "name": f"clips/{job}/rgb",
        "tilejson": f"{base}/tiles/clips/{job}/rgb/tilejson.json",
    }
    for bad in (f"{job}/../x", f"{job}/RGB", "not-a-job/rgb", f"{job}", "</script>/rgb"):
        text = await (await gateway.get("/", params={"clip": bad})).text()
        assert page_config(text)["clip"] is None, bad
        assert "</script>/rgb" not in text


async def test_page_does_not_reflect_the_token(gateway):
    token = TOKENS["tiles"]
    text = await (await gateway.get("/", params={"token": token})).text()
    assert token not in text


async def test_local_assets_are_served_and_nothing_else(gateway_for, emulator, tmp_path):
    assets = tmp_path / "dist"
    assets.mkdir()
    (assets / "maplibre-gl.js").write_text("/* js */")
    (assets / "maplibre-gl.css").write_text("/* css */")
    (assets / "package.json").write_text("{}")
    client = await gateway_for(emulator, config=viewer_config(tmp_path, assets))
    text = await (await client.get("/")).text()
    base = f"http://127.0.0.1:{client.server.port}"
    assert f'<script src="{base}/viewer/assets/maplibre-gl.js"></script>' in text
    assert f'<link rel="stylesheet" href="{base}/viewer/assets/maplibre-gl.css">' in text
    js = await client.get("/viewer/assets/maplibre-gl.js")
    assert js.status == 200
    assert js.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert await js.text() == "/* js */"
    css = await client.get("/viewer/assets/maplibre-gl.css")
    assert css.headers["Content-Type"] == "text/css; charset=utf-8"
    for path in [
        "/viewer/assets/package.json",
        "/viewer/assets/maplibre-gl.js.map",  # allowed name, but not there
        "/viewer/assets/",
        "/viewer/assets/..%2Fgateway.toml",
    ]:
        response = await client.get(path)
        assert response.status == 404, path
        assert response.headers["Content-Type"] == "application/problem+json"


async def test_no_assets_route_without_assets_dir(gateway):
    response = await gateway.get("/viewer/assets/maplibre-gl.js")
    assert response.status == 404
    assert response.headers["Content-Type"] == "application/problem+json"


# --- the real browser -----------------------------------------------------------------------


def _require(condition: bool, what: str) -> None:
    if not condition:
        if IN_CI:
            pytest.fail(f"{what} is missing; .ci/run installs it")
        pytest.skip(f"{what} is missing (.ci/run installs it)")


def _chromium(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=1000,700",
        # WebGL without a GPU: ANGLE on SwiftShader (software), which MapLibre needs
        "--use-angle=swiftshader",
        "--enable-unsafe-swiftshader",
    ]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


def _tiles_loaded(driver, layer: str) -> int:
    """How many tiles of ``layer`` the page has received with status 200."""
    return driver.execute_script(
        "return performance.getEntriesByType('resource').filter(e => "
        "e.name.includes('/tiles/' + arguments[0] + '/') && e.responseStatus === 200).length;",
        layer,
    )


def _settle(driver, layer: str, timeout_s: float = 20, refused: bool = False) -> dict:
    """Wait until the map is idle with tiles of ``layer`` loaded (``refused``: with an error
    shown instead); what the page shows then."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = driver.execute_script("return document.body.dataset.mapState")
        tiles = _tiles_loaded(driver, layer)
        status = driver.execute_script("return document.getElementById('status').textContent")
        done = bool(status) if refused else tiles > 0
        if (state == "idle" and done) or state == "error" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return {
        "state": state,
        "tiles": tiles,
        "status": status,
        "zoom": driver.execute_script("return window.gatewayMap.getZoom()"),
        "pitch": driver.execute_script("return window.gatewayMap.getPitch()"),
        "terrain": driver.execute_script("return !!window.gatewayMap.getTerrain()"),
        "layer": driver.execute_script(
            "return document.querySelector('input[name=layer]:checked').value"
        ),
        "png": base64.b64decode(driver.get_screenshot_as_base64()),
    }


def _browse(url: str, profile: Path) -> dict:
    """Open the viewer; screenshot the default layer, then St. Helens, then it in 3D, then a
    private layer without and with a token."""
    from selenium.webdriver.common.by import By

    driver = _chromium(profile)
    try:
        driver.set_page_load_timeout(30)
        driver.get(url)
        seen = {"olinda": _settle(driver, "olinda")}
        driver.find_element(By.CSS_SELECTOR, "input[value='st-helens']").click()
        seen["st-helens"] = _settle(driver, "st-helens")
        driver.find_element(By.ID, "terrain3d").click()
        time.sleep(0.8)  # the 600 ms pitch animation
        seen["3d"] = _settle(driver, "st-helens")
        driver.get(url + "?layer=olinda-private")
        seen["no-token"] = _settle(driver, "olinda-private", refused=True)
        driver.get(url + "?layer=olinda-private&token=" + TOKENS["tiles"])
        seen["private"] = _settle(driver, "olinda-private")
        seen["log"] = [entry["message"] for entry in driver.get_log("browser")]
        return seen
    finally:
        driver.quit()


def _map_area(png: bytes):
    """The screenshot's map area right of the layer panel, above the attribution line."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    width, height = image.size
    return image.crop((width // 3, height // 10, width - 60, height - 60))


def require_browser(caplog: pytest.LogCaptureFixture) -> None:
    """Skip (fail in CI) without Chromium, chromedriver, MapLibre's files or Selenium; keep
    Selenium's DEBUG log of every WebDriver exchange (screenshots included) out of the
    captured log."""
    _require(CHROMIUM is not None, "chromium (Debian package chromium)")
    _require(CHROMEDRIVER is not None, "chromedriver (Debian package chromium-driver)")
    _require((MAPLIBRE_DIST / "maplibre-gl.js").is_file(), f"MapLibre GL JS in {MAPLIBRE_DIST}")
    try:
        import selenium  # noqa: F401
    except ImportError:
        _require(False, "selenium (pip, in the dev extras)")
    caplog.set_level(logging.INFO, logger="selenium")
    caplog.set_level(logging.INFO, logger="urllib3")


async def test_chromium_shows_imagery(aiohttp_server, settings_for, emulator, tmp_path, caplog):
    require_browser(caplog)
    from PIL import ImageStat

    config = viewer_config(tmp_path, MAPLIBRE_DIST, extra=PRIVATE_LAYER)
    # no aiohttp access log: it would record the page URL with its ?token=
    server = await aiohttp_server(
        create_app(settings_for(emulator, config=config)), access_log=None
    )
    url = f"http://127.0.0.1:{server.port}/"
    started = time.monotonic()
    seen = await asyncio.wait_for(
        asyncio.to_thread(_browse, url, tmp_path / "chromium-profile"), 55
    )
    for name in ["olinda", "st-helens", "3d", "no-token", "private"]:
        (tmp_path / f"viewer-{name}.png").write_bytes(seen[name]["png"])
    print(f"\nviewer screenshots in {tmp_path} ({time.monotonic() - started:.1f} s)")
    problems = [line for line in seen["log"] if "Content Security Policy" in line]
    assert not problems, problems

    olinda = seen["olinda"]
    assert (olinda["state"], olinda["layer"], olinda["status"]) == ("idle", "olinda", "")
    assert olinda["tiles"] > 0
    assert emulator.renders() > 0
    assert 9 <= olinda["zoom"] <= 16
    area = _map_area(olinda["png"])
    colours = len(set(area.getdata()))
    spread = ImageStat.Stat(area).stddev
    assert colours > 2000, colours  # imagery, not a flat background
    assert min(spread) > 8, spread

    helens = seen["st-helens"]
    assert (helens["state"], helens["layer"], helens["status"]) == ("idle", "st-helens", "")
    assert helens["tiles"] > 0
    assert not helens["terrain"]
    hillshade = _map_area(helens["png"]).convert("L")
    assert ImageStat.Stat(hillshade).stddev[0] > 8  # relief, not a flat fill
    assert len(set(hillshade.getdata())) > 50

    relief = seen["3d"]
    assert relief["terrain"]
    assert relief["pitch"] > 45
    assert relief["state"] == "idle"
    assert relief["status"] == ""
    assert ImageStat.Stat(_map_area(relief["png"]).convert("L")).stddev[0] > 8

    refused = seen["no-token"]
    assert refused["layer"] == "olinda-private"
    assert refused["tiles"] == 0
    assert "needs a valid token" in refused["status"]
    private = seen["private"]
    assert (private["state"], private["layer"], private["status"]) == ("idle", "olinda-private", "")
    assert private["tiles"] > 0
    assert len(set(_map_area(private["png"]).getdata())) > 2000


def _open_and_read_status(url: str, profile: Path) -> tuple[str, str]:
    driver = _chromium(profile)
    try:
        driver.set_page_load_timeout(30)
        driver.get(url)
        deadline = time.monotonic() + 20
        state = ""
        while state != "error" and time.monotonic() < deadline:
            state = driver.execute_script("return document.body.dataset.mapState")
            time.sleep(0.1)
        return state, driver.execute_script("return document.getElementById('status').textContent")
    finally:
        driver.quit()


async def test_without_maplibre_the_page_says_how_to_serve_it_locally(
    aiohttp_server, settings_for, emulator, tmp_path, caplog
):
    _require(CHROMIUM is not None, "chromium (Debian package chromium)")
    _require(CHROMEDRIVER is not None, "chromedriver (Debian package chromium-driver)")
    caplog.set_level(logging.INFO, logger="selenium")
    caplog.set_level(logging.INFO, logger="urllib3")
    with socket.socket() as hole:  # bound, never listening: connections to it are refused
        hole.bind(("127.0.0.1", 0))
        cdn = f"http://127.0.0.1:{hole.getsockname()[1]}"
        viewer = (
            f'\n[viewer]\nmaplibre_js = "{cdn}/maplibre-gl.js"\n'
            f'maplibre_css = "{cdn}/maplibre-gl.css"\n'
        )
        config = config_with(tmp_path, append=viewer)
        server = await aiohttp_server(create_app(settings_for(emulator, config=config)))
        url = f"http://127.0.0.1:{server.port}/"
        state, status = await asyncio.wait_for(
            asyncio.to_thread(_open_and_read_status, url, tmp_path / "chromium-profile"), 55
        )
    assert state == "error"
    assert f"did not load from {cdn}/maplibre-gl.js" in status
    assert "npm install --prefix /opt/maplibre maplibre-gl@5.6.0" in status
    assert 'assets_dir = "/opt/maplibre/node_modules/maplibre-gl/dist"' in status
    assert "[viewer]" in status
