"""Clip operations of the Geopera emulator (Geopera "Clipping" guide).

Lifecycle: ``clip.create_from_item`` (Idempotency-Key required) answers a ``running`` job;
``clip.job.get`` is polled until ``completed``; ``clip.job.downloads`` lists descriptors and
``clip.job.download`` streams real GeoTIFFs clipped from the sample COGs (egress-limited by
job id). ``synthetic-<N>`` items stream N deterministic bytes; a ``truncate`` fault cuts a
download short.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import time
from typing import Any

import aiohttp
import pytest
from rasterio.io import MemoryFile

import gateway.emulator.__main__ as emulator_main
from gateway.emulator import (
    CLIPS_KEY,
    DEFAULT_CLIP_DELAY_S,
    FAULTS_KEY,
    LIMITS_KEY,
    SAMPLE_COGS,
    STATS_KEY,
    Fault,
    create_emulator_app,
    synthetic_bytes,
    synthetic_range,
    synthetic_sha256,
)
from gateway.emulator import clips as clips_module

AUTH = {"Authorization": "Bearer gpra_test_key_123456"}
ERRORS = "https://docs.geopera.com/errors/"
CREATE = "/v1/op/clip.create_from_item"
GET = "/v1/op/clip.job.get"
DOWNLOADS = "/v1/op/clip.job.downloads"
DOWNLOAD = "/v1/op/clip.job.download"
LIST = "/v1/op/clip.jobs.list"
TILE_INFO = "/v1/op/clip.job.tile_info"


def box(west: float, south: float, east: float, north: float) -> dict[str, Any]:
    ring = [[west, south], [east, south], [east, north], [west, north], [west, south]]
    return {"type": "Polygon", "coordinates": [ring]}


BAHAMAS_AOI = box(-77.9, 24.3, -77.5, 24.7)
OLINDA_AOI = box(-34.89, -8.02, -34.85, -7.98)
ST_HELENS_AOI = box(-122.22, 46.16, -122.16, 46.22)
BAHAMAS_BODY = {
    "source_item_id": "bahamas",
    "project_id": "demo",
    "aoi_geometry": BAHAMAS_AOI,
    "output_name": "andros",
}
COG = {name.rsplit("/", 1)[1]: path for name, path in SAMPLE_COGS.items()}
_keys = itertools.count()


@pytest.fixture
async def client(aiohttp_client: Any) -> Any:
    return await aiohttp_client(create_emulator_app(clip_delay_s=0.2))


def new_key() -> str:
    return f"test-key-{next(_keys)}-{time.monotonic_ns()}"


async def read_into(resp: Any, received: bytearray) -> None:
    """Append ``resp``'s body to ``received`` chunk by chunk (what arrived stays there when
    the body breaks off)."""
    async for chunk in resp.content.iter_chunked(64 * 1024):
        received += chunk


async def post(client: Any, path: str, body: Any, headers: Any = None) -> Any:
    resp = await client.post(path, json=body, headers={**AUTH, **(headers or {})})
    await resp.read()
    return resp


async def problem(resp: Any, status: int, slug: str) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/problem+json"
    data = await resp.json(content_type=None)
    assert data["type"] == ERRORS + slug
    return data


async def create(client: Any, body: Any, key: str | None = None) -> dict[str, Any]:
    resp = await post(client, CREATE, body, {"Idempotency-Key": key or new_key()})
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def wait_completed(client: Any, job_id: str, timeout_s: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        resp = await post(client, GET, {"job_id": job_id})
        assert resp.status == 200
        job = await resp.json()
        if job["status"] != "running" or time.monotonic() > deadline:
            return job
        await asyncio.sleep(0.05)


async def completed_job(client: Any, body: Any) -> tuple[str, list[dict[str, Any]]]:
    job_id = (await create(client, body))["job"]["id"]
    job = await wait_completed(client, job_id)
    assert job["status"] == "completed", job
    resp = await post(client, DOWNLOADS, {"job_id": job_id})
    assert resp.status == 200
    return job_id, await resp.json()


async def download(client: Any, job_id: str, mosaic: str, **extra: Any) -> tuple[Any, bytes]:
    resp = await client.post(
        DOWNLOAD, json={"job_id": job_id, "mosaic_type": mosaic, **extra}, headers=AUTH
    )
    return resp, await resp.read()


# --- create: idempotency, validation, authorisation ---------------------------------------


async def test_create_requires_idempotency_key(client: Any) -> None:
    resp = await post(client, CREATE, BAHAMAS_BODY)
    data = await problem(resp, 400, "idempotency-key-required")
    assert "Idempotency-Key" in data["detail"]
    assert not client.app[CLIPS_KEY].jobs


async def test_create_answers_running_job_and_replays_same_key(client: Any) -> None:
    key = new_key()
    first = await create(client, BAHAMAS_BODY, key)
    job = first.pop("job")
    assert first == {"assets_to_clip": 1, "asset_keys": ["data"]}
    assert set(job) == {"id", "status", "job_type", "organization_id"}
    assert (job["status"], job["job_type"], job["organization_id"]) == (
        "running",
        "cog_clip",
        "demo-org",
    )
    reordered = dict(reversed(list(BAHAMAS_BODY.items())))  # same canonical JSON
    again = await create(client, reordered, key)
    assert again["job"]["id"] == job["id"]
    assert len(client.app[CLIPS_KEY].jobs) == 1
    other = await create(client, BAHAMAS_BODY)  # a new key is a new job
    assert other["job"]["id"] != job["id"]

    resp = await post(
        client, CREATE, {**BAHAMAS_BODY, "output_name": "other"}, {"Idempotency-Key": key}
    )
    await problem(resp, 409, "idempotency-conflict")
    assert len(client.app[CLIPS_KEY].jobs) == 2


async def test_create_refuses_other_projects_and_unknown_items(client: Any) -> None:
    key = {"Idempotency-Key": new_key()}
    resp = await post(client, CREATE, {**BAHAMAS_BODY, "project_id": "someone-else"}, key)
    await problem(resp, 403, "forbidden")
    resp = await post(client, CREATE, {**BAHAMAS_BODY, "source_item_id": "nope"}, key)
    await problem(resp, 404, "item-not-found")
    for size in ("0", str(64 * 1024**3 + 1)):
        body = {**BAHAMAS_BODY, "source_item_id": f"synthetic-{size}"}
        await problem(await post(client, CREATE, body, key), 404, "item-not-found")
    resp = await post(client, CREATE, {**BAHAMAS_BODY, "asset_keys": ["visual"]}, key)
    await problem(resp, 400, "no-raster-assets")
    resp = await post(client, CREATE, {**BAHAMAS_BODY, "aoi_geometry": OLINDA_AOI}, key)
    data = await problem(resp, 400, "aoi-outside-item")
    assert data["detail"] == "AOI does not intersect the item."
    assert not client.app[CLIPS_KEY].jobs


@pytest.mark.parametrize(
    "aoi",
    [
        None,
        "POLYGON((0 0, 1 0, 1 1, 0 0))",
        {"type": "Point", "coordinates": [-77.7, 24.5]},
        {"type": "Polygon", "coordinates": []},
        {"type": "Polygon", "coordinates": [[[-77.9, 24.3], [-77.5, 24.3], [-77.9, 24.3]]]},
        box(-77.9, 24.3, -77.5, 24.7) | {"coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1]]]},
        box(-77.9, 24.3, -77.5, 95.0),
        {"type": "MultiPolygon", "coordinates": [[[[0, 0], [1, "a"], [1, 1], [0, 0]]]]},
    ],
)
async def test_create_rejects_invalid_aoi_with_422(client: Any, aoi: Any) -> None:
    body = {**BAHAMAS_BODY, "aoi_geometry": aoi}
    resp = await post(client, CREATE, body, {"Idempotency-Key": new_key()})
    assert resp.status == 422
    detail = (await resp.json())["detail"]
    assert [entry["loc"] for entry in detail] == [["body", "aoi_geometry"]]


async def test_create_validates_other_fields(client: Any) -> None:
    body = {"project_id": 7, "aoi_geometry": BAHAMAS_AOI, "output_name": "../x", "asset_keys": 1}
    resp = await post(client, CREATE, body, {"Idempotency-Key": new_key()})
    assert resp.status == 422
    locs = {entry["loc"][1] for entry in (await resp.json())["detail"]}
    assert locs == {"source_item_id", "project_id", "output_name", "asset_keys"}


# --- lifecycle and real clips ---------------------------------------------------------------


async def test_bahamas_clip_lifecycle(client: Any) -> None:
    created = await create(client, {**BAHAMAS_BODY, "aoi_name": "Andros", "asset_keys": ["data"]})
    job_id = created["job"]["id"]
    resp = await post(client, DOWNLOADS, {"job_id": job_id})
    data = await problem(resp, 400, "job-not-completed")
    assert "'running'" in data["detail"]
    resp = await post(client, DOWNLOAD, {"job_id": job_id, "mosaic_type": "rgb"})
    await problem(resp, 400, "job-not-completed")
    resp = await post(client, GET, {"job_id": job_id})
    running = await resp.json()
    assert running["status"] == "running"
    assert "output_artifacts" not in running

    job = await wait_completed(client, job_id)
    assert job["status"] == "completed"
    assert (job["id"], job["job_type"]) == (job_id, "cog_clip")
    assert job["created_at"].endswith("Z")
    resp = await post(client, DOWNLOADS, {"job_id": job_id})
    descriptors = await resp.json()
    assert job["output_artifacts"] == {"clips": descriptors}
    assert descriptors == [
        {
            "mosaic_type": "rgb",
            "filename": "andros_rgb.tif",
            "size_bytes": descriptors[0]["size_bytes"],
            "gcs_path": f"clips/{job_id}/andros_rgb.tif",
        }
    ]

    extra = {"user_agent": "test-agent/1.0", "requester_ip": "203.0.113.7"}
    resp, data = await download(client, job_id, "rgb", **extra)
    assert resp.status == 200
    assert resp.content_type == "image/tiff"
    assert int(resp.headers["Content-Length"]) == len(data) == descriptors[0]["size_bytes"]
    assert resp.headers["Content-Disposition"] == 'attachment; filename="andros_rgb.tif"'
    with MemoryFile(data) as memfile, memfile.open() as ds:
        assert ds.driver == "GTiff"
        assert ds.crs.to_epsg() == 32618
        assert ds.count == 3
        assert ds.dtypes[0] == "uint8"
        assert 0 < ds.width < 791
        assert 0 < ds.height < 718
        assert ds.block_shapes[0] == (256, 256) or ds.width < 256
        assert ds.compression.name.lower() == "deflate"
        assert ds.read().any()
        assert ds.mask_flag_enums[0][0].name == "per_dataset"
    log = client.app[STATS_KEY].log
    assert ("clip.job.download", {"job_id": job_id, "mosaic_type": "rgb", **extra}, 200) in log

    resp = await post(client, DOWNLOAD, {"job_id": job_id, "mosaic_type": "dem"})
    await problem(resp, 404, "mosaic-not-found")
    resp = await post(client, GET, {"job_id": "no-such-job"})
    await problem(resp, 404, "clip-job-not-found")
    resp = await post(client, DOWNLOAD, {"job_id": job_id})
    assert resp.status == 422


async def test_olinda_mosaics_and_st_helens_dem(client: Any) -> None:
    olinda = {**BAHAMAS_BODY, "source_item_id": "olinda", "aoi_geometry": OLINDA_AOI}
    del olinda["output_name"]
    dem = {**BAHAMAS_BODY, "source_item_id": "st-helens", "aoi_geometry": ST_HELENS_AOI}
    (olinda_id, olinda_files), (dem_id, dem_files) = await asyncio.gather(
        completed_job(client, olinda), completed_job(client, dem)
    )
    assert {d["mosaic_type"]: d["filename"] for d in olinda_files} == {
        "rgb": "clip_rgb.tif",
        "multispectral": "clip_multispectral.tif",
    }
    expected = {
        (olinda_id, "rgb"): (3, 31985, "uint8", COG["landsat7_olinda_6band_cog.tif"]),
        (olinda_id, "multispectral"): (6, 31985, "uint8", COG["landsat7_olinda_6band_cog.tif"]),
        (dem_id, "dem"): (1, 26710, "int16", COG["dem_mount_st_helens_cog.tif"]),
    }
    assert [d["mosaic_type"] for d in dem_files] == ["dem"]
    for (job_id, mosaic), (count, epsg, dtype, source) in expected.items():
        resp, data = await download(client, job_id, mosaic)
        assert resp.status == 200
        assert resp.content_type == "image/tiff"
        with MemoryFile(data) as memfile, memfile.open() as ds:
            assert (ds.count, ds.crs.to_epsg(), ds.dtypes[0]) == (count, epsg, dtype)
            with MemoryFile(source.read_bytes()) as full_file, full_file.open() as full:
                assert ds.width < full.width
                assert ds.height < full.height
                assert ds.res == pytest.approx(full.res)
            if mosaic == "dem":
                assert ds.nodata == -32767
                values = ds.read(1, masked=True)
                assert 682 <= values.min() <= values.max() <= 2543


async def test_failed_clip_reports_failed(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: Any) -> dict[str, bytes]:
        raise RuntimeError("warp exploded")

    monkeypatch.setattr(clips_module, "clip_cog", broken)
    job_id = (await create(client, BAHAMAS_BODY))["job"]["id"]
    job = await wait_completed(client, job_id)
    assert job["status"] == "failed"
    assert "warp exploded" in job["error"]
    data = await problem(
        await post(client, DOWNLOADS, {"job_id": job_id}), 400, "job-not-completed"
    )
    assert "'failed'" in data["detail"]


async def test_corrupt_item_fails_with_a_reason(client: Any) -> None:
    body = {**BAHAMAS_BODY, "source_item_id": "olinda-corrupt", "aoi_geometry": OLINDA_AOI}
    job_id = (await create(client, body))["job"]["id"]
    job = await wait_completed(client, job_id)
    assert job["status"] == "failed"
    assert job["error"] == clips_module.CORRUPT_REASON


async def test_another_organisations_job_is_403(client: Any) -> None:
    foreign = {"job_id": clips_module.FOREIGN_JOB_ID}
    for path in (GET, DOWNLOADS, TILE_INFO):
        await problem(await post(client, path, foreign), 403, "cross-organization")
    await problem(
        await post(client, DOWNLOAD, {**foreign, "mosaic_type": "data"}), 403, "cross-organization"
    )
    other = {"organization_id": clips_module.FOREIGN_ORGANIZATION_ID}
    await problem(await post(client, LIST, other), 403, "cross-organization")


async def test_jobs_list_filters_and_pages(client: Any) -> None:
    store = client.app[CLIPS_KEY]
    store.delay_s = 60.0  # all stay running while listed
    ids = [(await create(client, BAHAMAS_BODY))["job"]["id"] for _ in range(3)]
    org = {"organization_id": "demo-org"}
    everything = await (await post(client, LIST, org)).json()
    assert everything["total"] == 3
    assert everything["limit"] == 50
    assert everything["offset"] == 0
    assert [j["id"] for j in everything["jobs"]] == ids[::-1]  # newest first
    assert {j["organization_id"] for j in everything["jobs"]} == {"demo-org"}
    page = await (await post(client, LIST, {**org, "limit": 1, "offset": 1})).json()
    assert [j["id"] for j in page["jobs"]] == [ids[1]]
    assert page["total"] == 3
    running = await (await post(client, LIST, {**org, "status": "running"})).json()
    assert running["total"] == 3
    store.delay_s = 0.0
    for job_id in ids:
        await wait_completed(client, job_id)
    done = await (await post(client, LIST, {**org, "status": "completed"})).json()
    assert done["total"] == 3
    assert all(j["status"] == "completed" for j in done["jobs"])
    assert (await post(client, LIST, {**org, "limit": 0})).status == 422
    assert (await post(client, LIST, {})).status == 422


async def test_tile_info_renders_the_clip(client: Any) -> None:
    job_id = (await create(client, BAHAMAS_BODY))["job"]["id"]
    await problem(await post(client, TILE_INFO, {"job_id": job_id}), 400, "job-not-completed")
    await wait_completed(client, job_id)
    info = await (await post(client, TILE_INFO, {"job_id": job_id})).json()
    assert info["job_id"] == job_id
    (tiles,) = info["tiles"]
    assert tiles["mosaic_type"] == "rgb"
    assert tiles["operation"] == "cog.tile.render"
    west, south, east, north = tiles["bounds"]
    assert -77.95 < west < east < -77.45
    assert 24.25 < south < north < 24.75
    assert 0 <= tiles["minzoom"] <= tiles["maxzoom"] <= 24
    assert tiles["render"]["bands"] == "1,2,3"
    assert len(tiles["render"]["rescale"].split(";")) == 3
    z = tiles["maxzoom"]
    x, y = _tile_of((west + east) / 2, (south + north) / 2, z)
    body = {"url": tiles["url"], "z": z, "x": x, "y": y, "format": "png", **tiles["render"]}
    rendered = await client.post("/v1/op/cog.tile.render", json=body, headers=AUTH)
    assert rendered.status == 200
    assert rendered.content_type == "image/png"
    synthetic = (await create(client, {**BAHAMAS_BODY, "source_item_id": "synthetic-10"}))["job"]
    await wait_completed(client, synthetic["id"])
    await problem(await post(client, TILE_INFO, {"job_id": synthetic["id"]}), 400, "no-tile-info")


def _tile_of(lon: float, lat: float, z: int) -> tuple[int, int]:
    import mercantile

    tile = mercantile.tile(lon, lat, z)
    return tile.x, tile.y


async def test_download_faults_json_and_no_filename(client: Any) -> None:
    job_id = (await create(client, BAHAMAS_BODY))["job"]["id"]
    await wait_completed(client, job_id)
    client.app[FAULTS_KEY].add(Fault("json", operation="clip.job.download"), Fault("no-filename"))
    resp, data = await download(client, job_id, "rgb")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    assert "url" in json.loads(data)
    resp, data = await download(client, job_id, "rgb")
    assert resp.status == 200
    assert resp.content_type == "image/tiff"
    assert "Content-Disposition" not in resp.headers
    assert len(data) > 1000


async def test_status_faults_carry_a_problem_type(client: Any) -> None:
    client.app[FAULTS_KEY].add(
        Fault("status", status=402),
        Fault("status", status=429, retry_after="3"),
        Fault("status", status=429, type="bandwidth-circuit-open"),
    )
    body = {"job_id": clips_module.FOREIGN_JOB_ID}
    data = await problem(await post(client, GET, body), 402, "subscription-past-due")
    assert "past due" in data["detail"]
    resp = await post(client, GET, body)
    await problem(resp, 429, "injected-fault")
    assert resp.headers["Retry-After"] == "3"
    await problem(await post(client, GET, body), 429, "bandwidth-circuit-open")


# --- synthetic files, truncation, egress ------------------------------------------------------


def test_synthetic_helper_is_deterministic_and_chunk_independent() -> None:
    n = 3 * 1024 * 1024 + 12345
    whole = b"".join(synthetic_bytes(n, 1 << 20))
    assert len(whole) == n
    assert b"".join(synthetic_bytes(n, 100_003)) == whole
    assert synthetic_range(1_000_000, 200_000) == whole[1_000_000:1_200_000]
    assert hashlib.sha256(whole).hexdigest() == synthetic_sha256(n)
    mib = 1 << 20
    assert whole[:mib] != whole[mib : 2 * mib]  # blocks differ: offsets matter
    assert [len(c) for c in synthetic_bytes(10, 4)] == [4, 4, 2]


async def synthetic_job(client: Any, size: int) -> str:
    body = {**BAHAMAS_BODY, "source_item_id": f"synthetic-{size}"}
    del body["output_name"]
    job_id, files = await completed_job(client, body)
    assert files == [
        {
            "mosaic_type": "data",
            "filename": "clip_data.tif",
            "size_bytes": size,
            "gcs_path": f"clips/{job_id}/clip_data.tif",
        }
    ]
    return job_id


async def test_synthetic_download_streams_exact_bytes(client: Any) -> None:
    job_id = await synthetic_job(client, 3_000_000)
    resp = await client.post(DOWNLOAD, json={"job_id": job_id, "mosaic_type": "data"}, headers=AUTH)
    assert resp.status == 200
    assert resp.content_type == "image/tiff"
    assert resp.headers["Content-Length"] == "3000000"
    digest, total = hashlib.sha256(), 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        digest.update(chunk)
        total += len(chunk)
    assert total == 3_000_000
    assert digest.hexdigest() == synthetic_sha256(3_000_000)


async def test_truncate_fault_breaks_the_transfer(client: Any) -> None:
    job_id = await synthetic_job(client, 3_000_000)
    faults = client.app[FAULTS_KEY]
    faults.add(Fault("truncate", operation="*", bytes=300_000))
    await post(client, GET, {"job_id": job_id})  # not a download: fault not consumed
    resp = await client.post(DOWNLOAD, json={"job_id": job_id, "mosaic_type": "data"}, headers=AUTH)
    assert resp.status == 200
    assert resp.headers["Content-Length"] == "3000000"
    received = bytearray()
    with pytest.raises(aiohttp.ClientPayloadError):
        await read_into(resp, received)
    assert len(received) == 300_000
    assert bytes(received) == synthetic_range(0, len(received))
    stats = client.app[STATS_KEY]
    assert stats.statuses[("clip.job.download", 200)] == 1

    _resp, data = await download(client, job_id, "data")  # fault used up: whole file again
    assert len(data) == 3_000_000


async def test_stall_fault_holds_a_download_until_released(client: Any) -> None:
    job_id = await synthetic_job(client, 2_000_000)
    resp = await client.post("/_emulator/faults", json={"kind": "stall", "bytes": 700_000})
    assert resp.status == 200
    resp = await client.post(DOWNLOAD, json={"job_id": job_id, "mosaic_type": "data"}, headers=AUTH)
    assert resp.status == 200
    assert resp.headers["Content-Length"] == "2000000"
    head = await resp.content.readexactly(700_000)  # what arrives before the stall
    assert head == synthetic_range(0, 700_000)
    assert not resp.content.at_eof()
    released = await client.post("/_emulator/faults/release")
    assert (await released.json()) == {"released": 1}
    rest = await resp.read()
    assert head + rest == synthetic_range(0, 2_000_000)


async def test_jobs_carry_their_project_and_output_name(client: Any) -> None:
    job_id = (await create(client, {**BAHAMAS_BODY, "project_id": "survey"}))["job"]["id"]
    job = await (await post(client, GET, {"job_id": job_id})).json()
    assert (job["project_id"], job["output_name"]) == ("survey", "andros")
    listed = await (await post(client, LIST, {"organization_id": "demo-org"})).json()
    assert listed["jobs"][0]["project_id"] == "survey"


async def test_truncate_fault_over_http_endpoint(client: Any) -> None:
    job_id = await synthetic_job(client, 1_000_000)
    resp = await client.post("/_emulator/faults", json={"kind": "truncate", "bytes": 10})
    assert resp.status == 200
    resp = await client.post("/_emulator/faults", json={"kind": "truncate", "bytes": -1})
    assert resp.status == 400
    resp = await client.post(DOWNLOAD, json={"job_id": job_id, "mosaic_type": "data"}, headers=AUTH)
    try:
        data = await resp.read()
    except aiohttp.ClientPayloadError:
        data = b""
    assert len(data) < 1_000_000


async def test_downloads_are_egress_limited_by_job(client: Any) -> None:
    first = await synthetic_job(client, 1000)
    second = await synthetic_job(client, 1000)
    client.app[LIMITS_KEY].asset_rps = 1
    for _ in range(3):  # invalid requests take no token
        resp = await post(client, DOWNLOAD, {"job_id": first, "mosaic_type": "rgb"})
        await problem(resp, 404, "mosaic-not-found")
    resp, data = await download(client, first, "data")
    assert resp.status == 200
    assert len(data) == 1000
    resp, _ = await download(client, first, "data")
    data_429 = await problem(resp, 429, "asset-rate-limited")
    assert "Retry-After" in resp.headers
    assert data_429["status"] == 429
    resp, _ = await download(client, second, "data")  # another job: its own bucket
    assert resp.status == 200
    # job.get / downloads are not egress-limited
    assert (await post(client, GET, {"job_id": first})).status == 200


async def test_download_bytes_are_charged_to_the_bandwidth_breaker(client: Any) -> None:
    job_id = await synthetic_job(client, 3_000_000)
    client.app[LIMITS_KEY].bandwidth = 1_000_000
    resp, data = await download(client, job_id, "data")
    assert resp.status == 200
    assert len(data) == 3_000_000
    resp, _ = await download(client, job_id, "data")
    await problem(resp, 429, "bandwidth-circuit-open")
    assert int(resp.headers["Retry-After"]) >= 1


# --- configuration ----------------------------------------------------------------------------


def test_clip_delay_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    assert create_emulator_app()[CLIPS_KEY].delay_s == DEFAULT_CLIP_DELAY_S == 2.0
    assert create_emulator_app(clip_delay_s=0)[CLIPS_KEY].delay_s == 0
    with pytest.raises(ValueError, match="clip_delay_s must be a finite number >= 0"):
        create_emulator_app(clip_delay_s=-1)
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr("gateway.emulator.run_emulator", lambda *a, **kw: calls.append(kw))
    emulator_main.main(["--clip-delay-s", "0.5"])
    emulator_main.main([])
    assert [c["clip_delay_s"] for c in calls] == [0.5, DEFAULT_CLIP_DELAY_S]
