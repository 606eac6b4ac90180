"""The gateway against the answers the Geopera docs allow, not only the ones our emulator
used to give: 404 empty tiles, typed 429s, 402, cross-organisation 403s, missing scopes,
failed jobs, downloads that are not files, refused keys and unknown sources (issue 11).

Everything goes through the emulator as a real HTTP server.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import aiohttp
import pytest

from gateway.emulator import CLIPS_KEY, FAULTS_KEY, Fault
from gateway.emulator.clips import CORRUPT_REASON, FOREIGN_JOB_ID
from gateway.errors import UpstreamBadResponse
from gateway.http.keys import DOWNLOAD_SERVICE
from gateway.services.transfers import checked_download
from gateway.upstream.alerts import KEY_REFUSED, PAYMENT_REQUIRED, SCOPE_MISSING
from tests.conftest import PLANTED_KEY, TOKENS, config_with
from tests.test_downloads import create_job, upstream_bytes

OLINDA = "/tiles/olinda/13/3302/4278.png"  # fully covered
OLINDA_OTHER = "/tiles/olinda/13/3303/4278.png"
BAHAMAS = "/tiles/bahamas/9/145/220.png"  # another asset of cog.tile.render
BAHAMAS_EMPTY = "/tiles/bahamas/8/71/109.png"  # inside the bounds box, no data: upstream 404
TERRAIN = "/tiles/st-helens/13/1315/2907.png"  # another operation
DOWNLOADER = {"Authorization": f"Bearer {TOKENS['downloads']}"}


async def problem(response: aiohttp.ClientResponse, status: int, slug: str) -> dict:
    assert response.status == status, await response.text()
    assert response.headers["Content-Type"] == "application/problem+json"
    body = await response.json(content_type=None)
    assert body["type"].endswith("/" + slug), body
    return body


def criticals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]


def metric(text: str, line_start: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return None


async def readyz(client) -> dict:
    return (await (await client.get("/readyz")).json())["checks"]


# --- empty tiles ----------------------------------------------------------------------------


async def test_a_404_empty_storm_costs_one_upstream_call(gateway_for, start_upstream):
    slow = await start_upstream(delay_ms=200)  # the 20 requests arrive while the call runs
    client = await gateway_for(slow)
    storm = await asyncio.gather(*(client.get(BAHAMAS_EMPTY) for _ in range(20)))
    repeats = [await client.get(BAHAMAS_EMPTY) for _ in range(5)]
    for response in [*storm, *repeats]:
        assert response.status == 200
        assert response.headers["X-Cache"] == "EMPTY"
        assert response.headers["Content-Type"] == "image/png"
    assert slow.stats.statuses[("cog.tile.render", 404)] == 1
    assert slow.renders() == 1
    max_age = int(repeats[-1].headers["Cache-Control"].rsplit("=", 1)[1])
    assert 0 < max_age <= 300  # negatively cached for empty_ttl_s, not the layer's day


async def test_204_empty_tiles_still_work(gateway_for, start_upstream):
    old_style = await start_upstream(empty_tiles=204)
    client = await gateway_for(old_style)
    assert (await client.get(BAHAMAS_EMPTY)).headers["X-Cache"] == "EMPTY"
    assert (await client.get(BAHAMAS_EMPTY)).headers["X-Cache"] == "EMPTY"
    assert old_style.stats.statuses[("cog.tile.render", 204)] == 1


UNKNOWN_LAYER = """
[[layers]]
name = "nowhere"
url = "https://demo.geopera.invalid/cogs/no-such-scene.tif"
minzoom = 9
maxzoom = 16
bounds = [-34.916589, -8.040927, -34.825966, -7.949822]
"""


async def test_an_unknown_source_is_reported_once_not_per_tile(
    gateway_for, emulator, tmp_path, caplog
):
    config = config_with(
        tmp_path, ("check_sources = false", "check_sources = true"), append=UNKNOWN_LAYER
    )
    client = await gateway_for(emulator, config=config)
    for _ in range(100):  # the start-up check runs in the background
        checks = await readyz(client)
        if checks["unknown_sources"]:
            break
        await asyncio.sleep(0.05)
    assert checks["unknown_sources"] == ["nowhere"]
    assert [a["kind"] for a in checks["alerts"]] == ["source-unknown"]
    tiles = [await client.get(f"/tiles/nowhere/13/{x}/4278.png") for x in (3302, 3303, 3304)]
    assert {r.status for r in tiles} == {200}
    assert {r.headers["X-Cache"] for r in tiles} == {"EMPTY"}
    warnings = [r for r in caplog.records if "'nowhere'" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    text = await (await client.get("/metrics")).text()
    assert metric(text, 'gateway_upstream_alert{kind="source-unknown",subject="nowhere"}') == 1
    assert emulator.stats.calls["cog.thumbnail"] == 4  # one per distinct COG URL
    assert (await client.get(OLINDA)).headers["X-Cache"] == "MISS"  # the others are fine


# --- 429 by problem type --------------------------------------------------------------------


async def test_an_unattributed_429_pauses_the_whole_operation_for_retry_after(
    gateway_for, emulator, clock
):
    gateway = await gateway_for(emulator, clock=clock)
    emulator.app[FAULTS_KEY].add(Fault("status", status=429, retry_after="2"))  # unknown type
    throttled = await gateway.get(OLINDA)  # asset A
    assert await problem(throttled, 503, "upstream-throttled")
    assert throttled.headers["Retry-After"] == "2"
    cold = await gateway.get(BAHAMAS)  # asset B, never asked before
    await problem(cold, 503, "upstream-circuit-open")
    assert 1 <= int(cold.headers["Retry-After"]) <= 2
    assert emulator.stats.calls["cog.tile.render"] == 1  # B made no upstream call
    assert (await gateway.get(TERRAIN)).status == 200  # another operation goes on
    clock.advance(2.2)
    after = await gateway.get(BAHAMAS)
    assert after.status == 200
    assert after.headers["X-Cache"] == "MISS"
    assert emulator.stats.calls["cog.tile.render"] == 2


async def test_a_per_asset_429_pauses_only_that_asset(gateway, emulator):
    emulator.app[FAULTS_KEY].add(
        Fault("status", status=429, retry_after="30", type="asset-rate-limited")
    )
    await problem(await gateway.get(OLINDA), 503, "upstream-throttled")
    await problem(await gateway.get(OLINDA_OTHER), 503, "upstream-circuit-open")  # same asset
    assert (await gateway.get(BAHAMAS)).status == 200
    assert emulator.stats.calls["cog.tile.render"] == 2


async def test_an_organisation_wide_429_pauses_every_operation(gateway, emulator):
    emulator.app[FAULTS_KEY].add(
        Fault("status", status=429, retry_after="30", type="bandwidth-circuit-open")
    )
    await problem(await gateway.get(OLINDA), 503, "upstream-throttled")
    await problem(await gateway.get(TERRAIN), 503, "upstream-paused")
    await problem(await gateway.get(BAHAMAS), 503, "upstream-paused")
    assert emulator.renders() == 1
    assert "all operations (organisation, open)" in (await readyz(gateway))["open_breakers"]


async def test_words_in_the_detail_do_not_classify_a_429(gateway, emulator):
    """The type decides, not the text: the old guard paused the operation when the detail
    said "bandwidth" or "circuit"."""
    emulator.app[FAULTS_KEY].add(
        Fault(
            "status",
            status=429,
            retry_after="30",
            type="asset-rate-limited",
            detail="Too many requests; the bandwidth circuit breaker may trip.",
        )
    )
    await problem(await gateway.get(OLINDA), 503, "upstream-throttled")
    assert (await gateway.get(BAHAMAS)).status == 200


# --- 402 ------------------------------------------------------------------------------------


async def test_402_pauses_the_organisation_serves_stale_and_alerts_once(
    gateway_for, emulator, tmp_path, caplog, clock
):
    config = config_with(
        tmp_path,
        ("ttl_s = 86400", "ttl_s = 1"),
        ("stale_while_revalidate_s = 3600", "stale_while_revalidate_s = 0"),
        ("breaker_open_s = 30.0", "breaker_open_s = 2.0"),
    )
    client = await gateway_for(emulator, config=config, clock=clock)
    assert (await client.get(OLINDA)).status == 200
    clock.advance(1.1)  # the tile expires; a stale copy stays
    emulator.app[FAULTS_KEY].add(Fault("status", status=402))
    refused = await client.get(OLINDA_OTHER)
    body = await problem(refused, 503, "upstream-payment-required")
    assert refused.headers["Retry-After"] == "2"
    assert "402" in body["detail"]
    assert (await client.get(OLINDA)).headers["X-Cache"] == "STALE"
    await problem(await client.get(TERRAIN), 503, "upstream-paused")  # another operation
    job = await client.get(f"/downloads/{uuid.uuid4()}", headers=DOWNLOADER)
    await problem(job, 503, "upstream-paused")  # the clip operations too
    assert emulator.renders() == 2
    assert emulator.stats.calls["clip.job.get"] == 0
    checks = await readyz(client)
    assert checks["open_breakers"] == ["all operations (organisation, open)"]
    assert [a["kind"] for a in checks["alerts"]] == [PAYMENT_REQUIRED]
    text = await (await client.get("/metrics")).text()
    assert (
        metric(text, 'gateway_breaker_open{operation="*",scope="organisation",state="open"}') == 1
    )
    assert metric(text, 'gateway_upstream_alert{kind="payment-required",subject=""}') == 1
    assert len(criticals(caplog)) == 1
    assert "402" in criticals(caplog)[0]

    clock.advance(2.1)  # paid up: the pause ends, one call probes, the alert resolves
    assert (await client.get(OLINDA_OTHER)).status == 200
    assert (await readyz(client))["alerts"] == []
    assert len(criticals(caplog)) == 1


# --- 401 / 403 ------------------------------------------------------------------------------


async def test_twenty_coalesced_requests_on_a_refused_key_log_one_critical_line(
    gateway_for, start_upstream, caplog
):
    slow = await start_upstream(delay_ms=200)
    client = await gateway_for(slow, api_key="gpra_WRONG-but-also-secret-123")
    responses = await asyncio.gather(*(client.get(OLINDA) for _ in range(20)))
    for response in responses:
        await problem(response, 502, "upstream-auth")
    assert slow.renders() == 1
    later = [await client.get(p) for p in (OLINDA, BAHAMAS, TERRAIN)]  # new calls, same state
    assert {r.status for r in later} == {502}
    lines = criticals(caplog)
    assert len(lines) == 1
    assert "GEOPERA_API_KEY" in lines[0]
    assert [a["kind"] for a in (await readyz(client))["alerts"]] == [KEY_REFUSED]


async def test_a_403_on_a_tile_operation_is_the_keys_scope(gateway_for, start_upstream, caplog):
    clip_only = await start_upstream(api_keys=[f"{PLANTED_KEY}=clip:read"])
    client = await gateway_for(clip_only)
    for path in (OLINDA, OLINDA_OTHER):
        await problem(await client.get(path), 502, "upstream-auth")
    lines = criticals(caplog)
    assert len(lines) == 1
    assert "tiles:read" in lines[0]
    assert "GEOPERA_API_KEY" in lines[0]
    alerts = (await readyz(client))["alerts"]
    assert [(a["kind"], a["subject"]) for a in alerts] == [(SCOPE_MISSING, "tiles:read")]


async def test_a_key_without_clip_read_is_alerted_not_blamed_on_the_job(
    gateway_for, start_upstream, caplog
):
    tiles_only = await start_upstream(api_keys=[f"{PLANTED_KEY}=tiles:read"])
    client = await gateway_for(tiles_only, token="downloads")
    await problem(await client.get(f"/downloads/{uuid.uuid4()}"), 502, "upstream-auth")
    lines = criticals(caplog)
    assert len(lines) == 1
    assert "clip:read" in lines[0]


async def test_another_organisations_job_is_403_without_a_key_alert(gateway_for, emulator, caplog):
    client = await gateway_for(emulator, token="downloads")
    status = await problem(await client.get(f"/downloads/{FOREIGN_JOB_ID}"), 403, "job-forbidden")
    assert "another organisation" in status["detail"]
    await problem(await client.get(f"/downloads/{FOREIGN_JOB_ID}/data"), 403, "job-forbidden")
    assert criticals(caplog) == []
    assert (await readyz(client))["alerts"] == []
    assert emulator.stats.calls["clip.job.download"] == 0


# --- job states -----------------------------------------------------------------------------


async def test_a_failed_job_is_final_with_the_upstreams_reason(gateway_for, start_upstream):
    upstream = await start_upstream(clip_delay_s=0.1)
    client = await gateway_for(upstream, token="downloads")
    job_id = await create_job(
        upstream,
        "olinda-corrupt",
        aoi_geometry={
            "type": "Polygon",
            "coordinates": [
                [[-34.9, -8.03], [-34.84, -8.03], [-34.84, -7.96], [-34.9, -7.96], [-34.9, -8.03]]
            ],
        },
    )
    for _ in range(100):
        job = await (await client.get(f"/downloads/{job_id}")).json()
        if job["status"] != "running":
            break
        await asyncio.sleep(0.05)
    assert job == {"job_id": job_id, "status": "failed", "reason": CORRUPT_REASON, "files": []}
    for _ in range(2):
        file = await client.get(f"/downloads/{job_id}/rgb")
        body = await problem(file, 410, "job-failed")
        assert "Retry-After" not in file.headers
        assert body["job_status"] == "failed"
        assert CORRUPT_REASON in body["detail"]
    assert upstream.stats.calls["clip.job.download"] == 0


async def test_not_completed_comes_from_clip_job_get_not_from_a_400(gateway_for, start_upstream):
    upstream = await start_upstream(clip_delay_s=60)
    client = await gateway_for(upstream, token="downloads")
    job_id = await create_job(upstream)
    early = await client.get(f"/downloads/{job_id}/rgb")
    assert (await problem(early, 409, "job-not-completed"))["job_status"] == "running"
    assert early.headers["Retry-After"] == "5"
    assert upstream.stats.calls["clip.job.download"] == 0  # never asked before completion
    upstream.app[CLIPS_KEY].delay_s = 0
    upstream.app[FAULTS_KEY].add(Fault("status", status=400, operation="clip.job.download"))
    await completed_at_emulator(upstream, job_id)
    broken = await client.get(f"/downloads/{job_id}/rgb")  # completed, yet the upstream says 400
    await problem(broken, 502, "upstream-error")


# --- downloads checked before they are stored -----------------------------------------------


async def completed_at_emulator(upstream, job_id: str) -> None:
    """Wait until the job is completed, asking the emulator (not through the gateway)."""
    auth = {"Authorization": f"Bearer {PLANTED_KEY}"}
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            async with session.post(
                f"{upstream.url}/v1/op/clip.job.get", json={"job_id": job_id}, headers=auth
            ) as response:
                if (await response.json())["status"] == "completed":
                    return
            await asyncio.sleep(0.05)
    raise AssertionError("job never completed")


async def test_a_json_download_answer_is_refused_and_the_next_request_stores_the_file(
    gateway_for, start_upstream
):
    upstream = await start_upstream(clip_delay_s=0.1)
    client = await gateway_for(upstream, token="downloads")
    job_id = await create_job(upstream)
    await completed_at_emulator(upstream, job_id)  # no listing through the gateway first
    upstream.app[FAULTS_KEY].add(Fault("json", operation="clip.job.download"))
    url = f"/downloads/{job_id}/rgb"
    refused = await client.get(url)
    await problem(refused, 502, "upstream-bad-response")
    assert client.app[DOWNLOAD_SERVICE].store.lookup(job_id, "rgb") is None
    real = await client.get(url)
    body = await real.read()
    assert real.status == 200
    assert real.headers["X-Cache"] == "MISS"
    assert real.headers["Content-Type"] == "image/tiff"
    assert body == await upstream_bytes(upstream, job_id)
    hit = await client.get(url)
    assert hit.headers["X-Cache"] == "HIT"
    assert await hit.read() == body
    assert upstream.stats.calls["clip.job.download"] == 3  # json, real, and the check above


async def test_without_content_disposition_the_descriptors_filename_is_used(
    gateway_for, start_upstream
):
    upstream = await start_upstream(clip_delay_s=0.1)
    client = await gateway_for(upstream, token="downloads")
    job_id = await create_job(upstream, output_name="andros")
    await completed_at_emulator(upstream, job_id)
    upstream.app[FAULTS_KEY].add(Fault("no-filename"))
    response = await client.get(f"/downloads/{job_id}/rgb")
    await response.read()
    assert response.headers["Content-Disposition"] == 'attachment; filename="andros_rgb.tif"'


def test_download_headers_are_checked_against_type_and_sizes():
    tiff = frozenset({"image/tiff"})
    geotiff = {"content-type": "image/tiff; application=geotiff", "content-length": "10"}
    assert checked_download(geotiff, 10, tiff) == ("image/tiff", 10)
    assert checked_download({"content-type": "image/tiff"}, 10, tiff) == ("image/tiff", None)
    for headers, expected in (
        ({"content-type": "application/json", "content-length": "10"}, 10),
        ({"content-length": "10"}, 10),
        ({"content-type": "image/tiff", "content-length": "11"}, 10),
    ):
        with pytest.raises(UpstreamBadResponse):
            checked_download(headers, expected, tiff)


def test_the_seeder_decides_from_domain_errors():
    from gateway.errors import BreakerOpen, LimitExceeded, UpstreamAuthError
    from gateway.errors import UpstreamPaymentRequired as PaymentRequired
    from gateway.seed.runner import classify, describe
    from gateway.upstream.breakers import ORGANISATION

    paid = PaymentRequired("cog.tile.render", "HTTP 402", 402)
    paid.retry_after_s = 30.0
    assert classify(paid).action == "retry"
    assert classify(paid).wait_s == 30.0
    assert classify(BreakerOpen(ORGANISATION, 4.0)).action == "retry"
    assert classify(LimitExceeded("budget", 60.0, "spent")).action == "stop"
    assert classify(LimitExceeded("asset", 0.5, "wait")).action == "pace"
    assert classify(UpstreamAuthError("cog.tile.render", "HTTP 401", 401)).action == "fail"
    assert describe(BreakerOpen(ORGANISATION, 4.0)).startswith("BreakerOpen")
