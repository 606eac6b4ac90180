"""``GET /downloads``: the organisation's clip jobs through ``clip.jobs.list`` (pagination,
status filter, caching and coalescing, project-scoped tokens, bad parameters) and the HTML
page in the real headless Chromium the viewer test uses.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid

import aiohttp
import numpy as np
import pytest

from gateway.app import create_app
from gateway.http.keys import JOB_LISTING
from tests.conftest import PLANTED_KEY, TOKENS, config_with
from tests.test_downloads import create_job
from tests.test_viewer import (
    MAPLIBRE_DIST,
    _chromium,
    _map_area,
    _settle,
    require_browser,
    viewer_config,
)

EMULATOR_AUTH = {"Authorization": f"Bearer {PLANTED_KEY}"}
OLINDA_AOI = {
    "type": "Polygon",
    "coordinates": [
        [[-34.9, -8.03], [-34.84, -8.03], [-34.84, -7.96], [-34.9, -7.96], [-34.9, -8.03]]
    ],
}
PROBLEM = "application/problem+json"


async def settled(emulator, job_id: str) -> str:
    """Poll the emulator until the job is no longer running; its final status."""
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            async with session.post(
                f"{emulator.url}/v1/op/clip.job.get", json={"job_id": job_id}, headers=EMULATOR_AUTH
            ) as response:
                status = (await response.json())["status"]
            if status != "running":
                return status
            await asyncio.sleep(0.05)
    raise AssertionError("the job never settled")


def relative(client, url: str | None) -> str | None:
    """A URL the gateway gave, as a path for the test client (None stays None)."""
    base = str(client.make_url("")).rstrip("/")
    assert url is None or url.startswith(base + "/"), url
    return None if url is None else url.removeprefix(base)


def list_calls(emulator) -> int:
    return emulator.stats.calls["clip.jobs.list"]


@pytest.fixture
async def clip_emulator(start_upstream):
    return await start_upstream(clip_delay_s=0.05)


async def test_listing_pages_newest_first_and_filters_by_status(gateway_for, clip_emulator):
    client = await gateway_for(clip_emulator, token="downloads")
    created = [await create_job(clip_emulator, f"synthetic-{1000 + n}") for n in range(4)]
    failed = await create_job(clip_emulator, "olinda-corrupt", aoi_geometry=OLINDA_AOI)
    created.append(failed)
    for job_id in created:
        await settled(clip_emulator, job_id)

    seen, url, pages = [], "/downloads?limit=2", 0
    while url is not None:
        response = await client.get(url)
        assert response.status == 200
        assert response.content_type == "application/json"
        page = await response.json()
        assert set(page) == {"jobs", "next"}
        seen += page["jobs"]
        url, pages = relative(client, page["next"]), pages + 1
        assert len(page["jobs"]) == (2 if url else 1)
    assert pages == 3
    assert [job["job_id"] for job in seen] == created[::-1]  # newest first
    base = str(client.make_url("")).rstrip("/")
    first = seen[0]
    assert first == {
        "job_id": failed,
        "status": "failed",
        "name": "harbour",
        "created_at": first["created_at"],
        "files": f"{base}/downloads/{failed}",
    }
    assert first["created_at"].endswith("Z")
    assert {job["status"] for job in seen[1:]} == {"completed"}
    assert list_calls(clip_emulator) == 1  # one upstream page served every client page

    only_failed = await (await client.get("/downloads?status=failed")).json()
    assert [job["job_id"] for job in only_failed["jobs"]] == [failed]
    assert only_failed["next"] is None
    _, body, _ = clip_emulator.stats.log[-1]
    assert body == {"organization_id": "demo-org", "limit": 200, "offset": 0, "status": "failed"}
    window = await (await client.get("/downloads?status=completed&limit=2&offset=3")).json()
    assert [job["job_id"] for job in window["jobs"]] == [created[0]]
    assert window["next"] is None
    files = await (await client.get(relative(client, first["files"]))).json()
    assert files["status"] == "failed"
    assert "reason" in files


async def test_listing_is_cached_for_its_ttl_and_coalesced(gateway_for, clip_emulator):
    client = await gateway_for(clip_emulator, token="downloads")
    await create_job(clip_emulator, "synthetic-100")
    now = [1000.0]
    client.app[JOB_LISTING].clock = lambda: now[0]
    answers = await asyncio.gather(*(client.get("/downloads") for _ in range(10)))
    assert {a.status for a in answers} == {200}
    assert list_calls(clip_emulator) == 1  # ten at once, one upstream call
    now[0] += 9.9  # list_ttl_s = 10 in the demo config
    await client.get("/downloads")
    assert list_calls(clip_emulator) == 1
    now[0] += 0.2
    second = await create_job(clip_emulator, "synthetic-200")
    fresh = await (await client.get("/downloads")).json()
    assert fresh["jobs"][0]["job_id"] == second
    assert list_calls(clip_emulator) == 2


@pytest.mark.parametrize(
    ("query", "slug"),
    [
        ("limit=0", "bad-limit"),
        ("limit=201", "bad-limit"),
        ("limit=ten", "bad-limit"),
        ("limit=-1", "bad-limit"),
        ("limit=07", "bad-limit"),
        ("offset=-5", "bad-offset"),
        ("offset=1000001", "bad-offset"),
        ("status=Completed", "bad-status"),
        ("status=", "bad-status"),
        ("status=a%20b", "bad-status"),
        ("status=" + "a" * 33, "bad-status"),
        ("limit=1&limit=2", "repeated-parameter"),
        ("page=2", "unknown-query-parameter"),
    ],
)
async def test_listing_refuses_bad_parameters(gateway_for, clip_emulator, query, slug):
    client = await gateway_for(clip_emulator, token="downloads")
    response = await client.get(f"/downloads?{query}")
    assert response.status == 400
    assert response.content_type == PROBLEM
    assert (await response.json())["type"].endswith("/" + slug)
    assert list_calls(clip_emulator) == 0


async def test_listing_needs_a_downloads_token_and_a_configured_organisation(
    gateway_for, clip_emulator, tmp_path
):
    anonymous = await gateway_for(clip_emulator)
    assert (await anonymous.get("/downloads")).status == 401
    tiles_only = await gateway_for(clip_emulator, token="tiles")
    assert (await tiles_only.get("/downloads")).status == 403
    config = config_with(tmp_path, ('organization_id = "demo-org"', "# no organisation"))
    unconfigured = await gateway_for(clip_emulator, token="downloads", config=config)
    response = await unconfigured.get("/downloads")
    assert response.status == 404
    assert response.content_type == PROBLEM
    assert (await response.json())["type"].endswith("/listing-not-configured")
    assert list_calls(clip_emulator) == 0


async def test_a_project_token_lists_and_fetches_only_its_projects_jobs(gateway_for, clip_emulator):
    survey = [await create_job(clip_emulator, "synthetic-1000", project_id="survey")]
    demo = [await create_job(clip_emulator, "synthetic-2000")]
    survey += [
        await create_job(clip_emulator, f"synthetic-{n}", project_id="survey") for n in (3, 4)
    ]
    demo += [await create_job(clip_emulator, "synthetic-5000")]
    for job_id in survey + demo:
        await settled(clip_emulator, job_id)
    team = await gateway_for(clip_emulator, token="survey")
    everyone = await gateway_for(clip_emulator, token="downloads")

    seen, url = [], "/downloads?limit=2"
    while url is not None:
        page = await (await team.get(url)).json()
        seen += [job["job_id"] for job in page["jobs"]]
        url = relative(team, page["next"])
    assert seen == survey[::-1]  # its projects only, newest first, paged over them
    second = await (await team.get("/downloads?limit=1&offset=1")).json()
    assert [job["job_id"] for job in second["jobs"]] == [survey[1]]
    all_jobs = await (await everyone.get("/downloads")).json()
    assert len(all_jobs["jobs"]) == 5

    calls = clip_emulator.stats.calls["clip.job.get"]
    for path in (f"/downloads/{demo[0]}", f"/downloads/{demo[0]}/data",
                 f"/downloads/{demo[0]}/data.sha256"):  # fmt: skip
        response = await team.get(path)
        assert response.status == 403, path
        assert response.content_type == PROBLEM, path
        assert (await response.json())["type"].endswith("/project-forbidden")
    assert clip_emulator.stats.calls["clip.job.get"] == calls  # projects known from the list
    assert (await team.get(f"/downloads/{survey[0]}/data")).status == 200
    assert (await everyone.get(f"/downloads/{demo[0]}/data")).status == 200

    # a job the listing never showed: its project comes from one clip.job.get
    unlisted = await create_job(clip_emulator, "synthetic-6000")
    await settled(clip_emulator, unlisted)  # (polls clip.job.get itself)
    calls = clip_emulator.stats.calls["clip.job.get"]
    response = await team.get(f"/downloads/{unlisted}")
    assert response.status == 403
    assert clip_emulator.stats.calls["clip.job.get"] == calls + 1
    assert (await team.get(f"/downloads/{uuid.uuid4()}")).status == 404


# --- the HTML page in a real browser --------------------------------------------------------


def _read_page(driver) -> list[dict]:
    return driver.execute_script(
        """
        return Array.from(document.querySelectorAll('#jobs tbody tr[data-job]')).map(row => ({
          job: row.dataset.job,
          status: row.querySelector('.status').textContent,
          name: row.querySelector('.name').textContent,
          files: Array.from(row.querySelectorAll('li[data-mosaic]')).map(li => ({
            mosaic: li.dataset.mosaic,
            filename: li.querySelector('a.download').textContent,
            href: li.querySelector('a.download').href,
            size: (li.querySelector('.size') || {}).textContent,
            sha256: li.querySelector('.sha256').textContent,
            checksum: li.querySelector('a.checksum').href,
            map: (li.querySelector('a.map') || {}).href || null,
          })),
        }));
        """
    )


def _browse_downloads(base: str, job_id: str, profile) -> dict:
    from selenium.webdriver.common.by import By

    driver = _chromium(profile)
    try:
        driver.set_page_load_timeout(30)
        driver.get(f"{base}/downloads?token={TOKENS['downloads']}")
        seen = {
            "title": driver.title,
            "rows": _read_page(driver),
            "links": driver.execute_script("return document.body.dataset.tokenLinks"),
        }
        row = driver.find_element(By.CSS_SELECTOR, f"tr[data-job='{job_id}']")
        row.find_element(By.CSS_SELECTOR, "a.map").click()
        seen["map"] = _settle(driver, f"clips/{job_id}/rgb")
        seen["map_url"] = driver.current_url
        seen["log"] = [entry["message"] for entry in driver.get_log("browser")]
        return seen
    finally:
        driver.quit()


async def test_chromium_shows_the_jobs_page_and_opens_a_clip_on_the_map(
    aiohttp_server, settings_for, clip_emulator, tmp_path, caplog
):
    require_browser(caplog)
    config = viewer_config(tmp_path, MAPLIBRE_DIST)
    server = await aiohttp_server(
        create_app(settings_for(clip_emulator, config=config)), access_log=None
    )
    base = f"http://127.0.0.1:{server.port}"
    harbour = await create_job(clip_emulator)
    synthetic = await create_job(clip_emulator, "synthetic-5000", output_name="bench")
    broken = await create_job(clip_emulator, "olinda-corrupt", aoi_geometry=OLINDA_AOI)
    for job_id in (harbour, synthetic, broken):
        await settled(clip_emulator, job_id)
    bearer = {"Authorization": f"Bearer {TOKENS['downloads']}"}
    async with (
        aiohttp.ClientSession(headers=bearer) as session,
        session.get(f"{base}/downloads/{harbour}/rgb") as response,
    ):
        harbour_bytes = await response.read()

    started = time.monotonic()
    seen = await asyncio.wait_for(
        asyncio.to_thread(_browse_downloads, base, harbour, tmp_path / "chromium-profile"), 55
    )
    (tmp_path / "clip-on-map.png").write_bytes(seen["map"]["png"])
    print(f"\ndownloads page and clip map in {time.monotonic() - started:.1f} s ({tmp_path})")
    assert not [line for line in seen["log"] if "Content Security Policy" in line], seen["log"]
    assert seen["title"].startswith("Clip downloads")
    assert seen["links"] == "set"
    rows = {row["job"]: row for row in seen["rows"]}
    assert list(rows) == [broken, synthetic, harbour]  # newest first
    assert (rows[broken]["status"], rows[broken]["files"]) == ("failed", [])
    (file,) = rows[harbour]["files"]
    assert (rows[harbour]["status"], file["filename"]) == ("completed", "harbour_rgb.tif")
    assert file["sha256"] == hashlib.sha256(harbour_bytes).hexdigest()  # stored: known
    assert file["size"].endswith(("KiB", "MiB"))
    assert file["href"] == f"{base}/downloads/{harbour}/rgb?token={TOKENS['downloads']}"
    assert file["checksum"].startswith(f"{base}/downloads/{harbour}/rgb.sha256?token=")
    assert file["map"].startswith(f"{base}/?clip={harbour}%2Frgb")
    (data,) = rows[synthetic]["files"]
    assert data["map"] is None
    assert "once stored" in data["sha256"]
    async with aiohttp.ClientSession() as session, session.get(file["href"]) as response:
        assert response.status == 200
        assert await response.read() == harbour_bytes

    shown = seen["map"]
    assert (shown["state"], shown["layer"], shown["status"]) == ("idle", f"clips/{harbour}/rgb", "")
    assert shown["tiles"] > 0
    from PIL import ImageStat

    area = _map_area(shown["png"])
    colours = np.unique(np.asarray(area).reshape(-1, 3), axis=0)
    assert len(colours) > 500  # imagery of the clip, not the background
    assert min(ImageStat.Stat(area).stddev) > 5
    assert clip_emulator.stats.calls["cog.tile.render"] > 0
