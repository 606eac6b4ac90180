"""Clip downloads through the gateway: streamed once, stored whole, served with Range.

Real clients throughout: aiohttp, curl and GDAL against the gateway in front of the bundled
emulator, which clips real COGs with rasterio.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import uuid

import aiohttp
import pytest

from gateway.app import create_app
from gateway.emulator import FAULTS_KEY, Fault
from gateway.services.downloads import content_disposition
from gateway.services.transfers import clean_filename, safe_filename
from gateway.storage.downloads import DownloadStore
from tests.conftest import PLANTED_KEY, TOKENS

AUTH = {"Authorization": f"Bearer {PLANTED_KEY}"}  # at the emulator
BEARER = {"Authorization": f"Bearer {TOKENS['downloads']}"}  # at the gateway
BAHAMAS_AOI = {
    "type": "Polygon",
    "coordinates": [[[-77.9, 24.3], [-77.5, 24.3], [-77.5, 24.7], [-77.9, 24.7], [-77.9, 24.3]]],
}


async def create_job(emulator, item: str = "bahamas", **extra) -> str:
    """Create a clip job directly at the emulator (as the internal team's tooling would)."""
    body = {
        "source_item_id": item,
        "project_id": "demo",
        "aoi_geometry": BAHAMAS_AOI,
        "output_name": "harbour",
        **extra,
    }
    headers = {**AUTH, "Idempotency-Key": str(uuid.uuid4())}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{emulator.url}/v1/op/clip.create_from_item", json=body, headers=headers
        ) as response,
    ):
        assert response.status == 200, await response.text()
        return (await response.json())["job"]["id"]


async def upstream_bytes(emulator, job_id: str, mosaic: str = "rgb") -> bytes:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{emulator.url}/v1/op/clip.job.download",
            json={"job_id": job_id, "mosaic_type": mosaic},
            headers=AUTH,
        ) as response,
    ):
        assert response.status == 200
        return await response.read()


async def completed(client, job_id: str) -> dict:
    for _ in range(100):
        response = await client.get(f"/downloads/{job_id}")
        assert response.status == 200, await response.text()
        job = await response.json()
        if job["status"] == "completed":
            return job
        await asyncio.sleep(0.05)
    raise AssertionError("job never completed")


def downloads(emulator) -> int:
    return emulator.stats.calls["clip.job.download"]


@pytest.fixture
async def clip_emulator(start_upstream):
    return await start_upstream(clip_delay_s=0.2)


@pytest.fixture
async def client(gateway_for, clip_emulator):
    return await gateway_for(clip_emulator, token="downloads")


async def test_job_status_lists_files_with_gateway_urls(client, clip_emulator):
    job_id = await create_job(
        clip_emulator,
        "olinda",
        aoi_geometry={
            "type": "Polygon",
            "coordinates": [
                [[-34.9, -8.03], [-34.84, -8.03], [-34.84, -7.96], [-34.9, -7.96], [-34.9, -8.03]]
            ],
        },
    )
    running = await (await client.get(f"/downloads/{job_id}")).json()
    assert running["status"] == "running"
    assert running["files"] == []
    job = await completed(client, job_id)
    mosaics = {f["mosaic_type"]: f for f in job["files"]}
    assert set(mosaics) == {"rgb", "multispectral"}
    assert mosaics["rgb"]["url"].endswith(f"/downloads/{job_id}/rgb")
    assert mosaics["rgb"]["filename"] == "harbour_rgb.tif"
    assert mosaics["rgb"]["size_bytes"] > 0
    assert "gcs_path" not in mosaics["rgb"]


async def test_download_is_the_upstream_bytes_then_a_hit(client, clip_emulator):
    job_id = await create_job(clip_emulator)
    job = await completed(client, job_id)
    expected = await upstream_bytes(clip_emulator, job_id)
    before = downloads(clip_emulator)
    first = await client.get(f"/downloads/{job_id}/rgb", headers={"User-Agent": "qgis/3.40"})
    body = await first.read()
    assert first.status == 200
    assert first.headers["X-Cache"] == "MISS"
    assert hashlib.sha256(body).digest() == hashlib.sha256(expected).digest()
    assert len(body) == job["files"][0]["size_bytes"]
    assert first.headers["Content-Type"] == "image/tiff"
    assert first.headers["Content-Length"] == str(len(expected))
    assert first.headers["Content-Disposition"] == 'attachment; filename="harbour_rgb.tif"'
    assert first.headers["Accept-Ranges"] == "bytes"
    etag = first.headers["ETag"]
    assert etag.startswith('"')
    assert "Last-Modified" in first.headers
    op, sent, _ = clip_emulator.stats.log[-1]
    assert op == "clip.job.download"
    assert sent["user_agent"] == "qgis/3.40"
    assert sent["requester_ip"] == "127.0.0.1"

    second = await client.get(f"/downloads/{job_id}/rgb")
    assert second.headers["X-Cache"] == "HIT"
    assert await second.read() == body
    assert second.headers["ETag"] == etag  # the same validator streamed and stored
    assert second.headers["Last-Modified"] == first.headers["Last-Modified"]
    assert downloads(clip_emulator) == before + 1


async def test_ranges_conditionals_and_head(client, clip_emulator):
    job_id = await create_job(clip_emulator)
    await completed(client, job_id)
    url = f"/downloads/{job_id}/rgb"
    whole = await (await client.get(url)).read()
    etag = (await client.head(url)).headers["ETag"]

    part = await client.get(url, headers={"Range": "bytes=100-199"})
    assert part.status == 206
    assert part.headers["Content-Range"] == f"bytes 100-199/{len(whole)}"
    assert await part.read() == whole[100:200]
    tail = await client.get(url, headers={"Range": "bytes=-50"})
    assert await tail.read() == whole[-50:]

    multi = await client.get(url, headers={"Range": "bytes=0-9,1000-1019"})
    assert multi.status == 206
    assert multi.headers["Content-Type"].startswith("multipart/byteranges; boundary=")
    raw = await multi.read()
    assert whole[0:10] in raw
    assert whole[1000:1020] in raw
    assert f"Content-Range: bytes 1000-1019/{len(whole)}".encode() in raw

    unsatisfiable = await client.get(url, headers={"Range": f"bytes={len(whole) + 10}-"})
    assert unsatisfiable.status == 416
    assert unsatisfiable.headers["Content-Range"] == f"bytes */{len(whole)}"

    assert (await client.get(url, headers={"If-None-Match": etag})).status == 304
    stale_validator = await client.get(
        url, headers={"Range": "bytes=0-9", "If-Range": '"not-this-one"'}
    )
    assert stale_validator.status == 200
    assert await stale_validator.read() == whole
    fresh_validator = await client.get(url, headers={"Range": "bytes=0-9", "If-Range": etag})
    assert fresh_validator.status == 206

    head = await client.head(url)
    assert head.status == 200
    assert head.headers["Content-Length"] == str(len(whole))
    assert downloads(clip_emulator) == 1


async def test_twenty_concurrent_first_requests_share_one_transfer(gateway_for, start_upstream):
    upstream = await start_upstream(clip_delay_s=0.1, bandwidth=20_000_000)
    client = await gateway_for(upstream, token="downloads")
    job_id = await create_job(upstream, "synthetic-30000000")  # 1.5 s at 20 MB/s
    await completed(client, job_id)
    responses = await asyncio.gather(*(client.get(f"/downloads/{job_id}/data") for _ in range(20)))
    caches = sorted(r.headers["X-Cache"] for r in responses)
    sizes = {len(await r.read()) for r in responses}
    assert sizes == {30_000_000}
    assert caches.count("MISS") == 1  # one started the transfer
    assert caches.count("COALESCED") == 19  # the others read it as it arrived
    assert downloads(upstream) == 1


async def test_a_broken_transfer_is_never_stored(client, clip_emulator, tmp_path):
    job_id = await create_job(clip_emulator, "synthetic-3000000")
    await completed(client, job_id)
    clip_emulator.app[FAULTS_KEY].add(
        Fault("truncate", operation="clip.job.download", bytes=1_000_000)
    )
    response = await client.get(f"/downloads/{job_id}/data")
    assert response.status == 200  # headers went out before the upstream broke off
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    store = tmp_path / "cache-downloads"
    assert (store / "files").is_dir()
    assert (store / "tmp").is_dir()
    await asyncio.sleep(0.1)  # the transfer task notices the break and cleans up
    assert list((store / "files").glob("*")) == []
    assert list((store / "tmp").glob("*")) == []
    again = await client.get(f"/downloads/{job_id}/data")
    assert again.headers["X-Cache"] == "MISS"
    assert len(await again.read()) == 3_000_000
    assert downloads(clip_emulator) == 2


@pytest.mark.skipif(
    shutil.which("gdalinfo") is None and not os.environ.get("CI"),
    reason="GDAL command-line tools not installed (CI installs gdal-bin)",
)
async def test_gdalinfo_reads_the_cog_through_the_gateway(
    aiohttp_server, settings_for, clip_emulator
):
    server = await aiohttp_server(create_app(settings_for(clip_emulator)))
    base = f"http://127.0.0.1:{server.port}"
    async with aiohttp.ClientSession() as session:
        job_id = await create_job(clip_emulator)
        for _ in range(100):
            async with session.get(f"{base}/downloads/{job_id}", headers=BEARER) as response:
                if (await response.json())["status"] == "completed":
                    break
            await asyncio.sleep(0.05)
    process = await asyncio.create_subprocess_exec(
        "gdalinfo",
        f"/vsicurl/{base}/downloads/{job_id}/rgb?token={TOKENS['downloads']}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"},
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    text = out.decode()
    assert "Driver: GTiff" in text
    assert "Band 3" in text
    assert "32618" in text


async def test_restart_keeps_completed_files(gateway_for, clip_emulator, tmp_path):
    cache = tmp_path / "shared" / "tiles"
    first = await gateway_for(clip_emulator, token="downloads", cache_dir=cache)
    job_id = await create_job(clip_emulator)
    await completed(first, job_id)
    body = await (await first.get(f"/downloads/{job_id}/rgb")).read()
    await first.close()
    leftover = tmp_path / "shared" / "tiles-downloads" / "tmp" / "999999999-dead.part"
    leftover.write_bytes(b"half a file")
    second = await gateway_for(clip_emulator, token="downloads", cache_dir=cache)
    again = await second.get(f"/downloads/{job_id}/rgb")
    assert again.headers["X-Cache"] == "HIT"
    assert await again.read() == body
    assert not leftover.exists()  # an interrupted transfer's leftovers are cleaned at start
    assert downloads(clip_emulator) == 1


async def test_job_not_completed_unknown_and_malformed(gateway_for, start_upstream):
    slow = await start_upstream(clip_delay_s=60)
    client = await gateway_for(slow, token="downloads")
    job_id = await create_job(slow)
    early = await client.get(f"/downloads/{job_id}/rgb")
    assert early.status == 409
    assert early.headers["Retry-After"] == "5"
    problem = await early.json(content_type=None)
    assert problem["job_status"] == "running"
    assert problem["type"].endswith("job-not-completed")
    unknown = await client.get(f"/downloads/{uuid.uuid4()}/rgb")
    assert unknown.status == 404
    assert (await client.get(f"/downloads/{uuid.uuid4()}")).status == 404
    for path in (
        "/downloads/..%2f..%2fetc/rgb",
        "/downloads/job/rgb%0d%0aX-Evil:1",
        "/downloads/" + "a" * 200,
    ):
        response = await client.get(path)
        assert response.status in (400, 404), path
        assert response.headers["Content-Type"] == "application/problem+json"


def test_filenames_are_sanitised():
    assert safe_filename('attachment; filename="../../etc/passwd"', "x") == "passwd"
    assert safe_filename('attachment; filename="a\\\\b.tif"', "x") == "b.tif"
    assert safe_filename(None, "fallback.tif") == "fallback.tif"
    assert clean_filename("evil\r\nSet-Cookie: a.tif", "x") == "evilSet-Cookie: a.tif"
    assert (
        safe_filename("attachment; filename*=UTF-8''S%C3%A3o%20Paulo.tif", "x") == "São Paulo.tif"
    )
    header = content_disposition("São Paulo.tif")
    assert header == (
        "attachment; filename=\"S_o Paulo.tif\"; filename*=UTF-8''S%C3%A3o%20Paulo.tif"
    )
    assert "\r" not in content_disposition(clean_filename("a\r\nb", "x"))


def test_store_eviction_is_least_recently_used(tmp_path):
    store = DownloadStore(tmp_path / "store", size_limit_bytes=250)
    for name in ("a", "b", "c"):
        tmp = store.temp_path()
        tmp.write_bytes(b"x" * 100)
        store.commit(
            tmp, name, "rgb", filename=f"{name}.tif", content_type="image/tiff", mtime_ns=1
        )
        if name == "b":
            assert store.lookup("a", "rgb") is not None  # a is now more recent than b
    assert store.lookup("b", "rgb") is None  # evicted
    assert store.lookup("a", "rgb") is not None
    assert store.lookup("c", "rgb") is not None
    assert store.total_bytes() == 200
