"""Verifying and resuming clip downloads: SHA-256 checksums (``sha256sum -c``, RFC 9530
``Repr-Digest``), Range answered while the file is still being transferred, aria2c with four
connections and ``wget -c`` after a cut.

Real clients against the gateway in front of the bundled emulator. A transfer is known to
be still running because the emulator's ``stall`` fault holds the upstream body until the
test releases it, never by timing.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import shutil
import time

import pytest

from gateway.emulator import FAULTS_KEY, Fault, synthetic_range, synthetic_sha256
from gateway.http.keys import DOWNLOAD_SERVICE
from tests.conftest import TOKENS, config_with
from tests.test_downloads import client, clip_emulator, completed, create_job, downloads

__all__ = ["client", "clip_emulator"]  # the fixtures of tests/test_downloads.py, used here

AUTH_HEADER = f"Authorization: Bearer {TOKENS['downloads']}"


def _require(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is missing; .ci/run installs Debian {package}")
        pytest.skip(f"{tool} is not installed (Debian {package})")


RUN_TIMEOUT_S = 120.0
"""Longest a download client may run, seconds."""


async def run(*args: str, cwd=None) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *args, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    async with asyncio.timeout(RUN_TIMEOUT_S):
        out, _ = await process.communicate()
    return process.returncode, out.decode(errors="replace")


async def test_sha256sum_checks_the_file_against_the_sha256_url(client, clip_emulator, tmp_path):
    _require("sha256sum", "coreutils")
    job_id = await create_job(clip_emulator)
    job = await completed(client, job_id)
    assert [f["sha256"] for f in job["files"]] == [None]  # nothing stored yet
    url = str(client.make_url(f"/downloads/{job_id}/rgb"))
    code, out = await run("curl", "-sS", "-OJ", "-H", AUTH_HEADER, url, cwd=tmp_path)
    assert code == 0, out
    code, out = await run(
        "curl", "-sS", "-o", "harbour_rgb.tif.sha256", "-H", AUTH_HEADER, url + ".sha256",
        cwd=tmp_path,
    )  # fmt: skip
    assert code == 0, out
    code, out = await run("sha256sum", "-c", "harbour_rgb.tif.sha256", cwd=tmp_path)
    assert code == 0, out
    assert out.strip() == "harbour_rgb.tif: OK", out

    body = (tmp_path / "harbour_rgb.tif").read_bytes()
    digest = hashlib.sha256(body).digest()
    line = (tmp_path / "harbour_rgb.tif.sha256").read_text()
    assert line == f"{digest.hex()}  harbour_rgb.tif\n"
    stored = await client.get(f"/downloads/{job_id}/rgb")
    assert stored.headers["X-Cache"] == "HIT"
    assert stored.headers["Repr-Digest"] == f"sha-256=:{base64.b64encode(digest).decode()}:"
    part = await client.get(f"/downloads/{job_id}/rgb", headers={"Range": "bytes=0-99"})
    assert part.status == 206
    assert part.headers["Repr-Digest"] == stored.headers["Repr-Digest"]
    job = await (await client.get(f"/downloads/{job_id}")).json()
    assert job["files"][0]["sha256"] == digest.hex()
    (tmp_path / "harbour_rgb.tif").write_bytes(body[:-1] + bytes([body[-1] ^ 1]))
    code, out = await run("sha256sum", "-c", "harbour_rgb.tif.sha256", cwd=tmp_path)
    assert code != 0
    assert "FAILED" in out
    assert downloads(clip_emulator) == 1


async def test_checksum_of_a_file_not_stored_yet_waits_for_its_transfer(client, clip_emulator):
    job_id = await create_job(clip_emulator, "synthetic-3000000")
    await completed(client, job_id)
    response = await client.get(f"/downloads/{job_id}/data.sha256")
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert await response.text() == f"{synthetic_sha256(3_000_000)}  harbour_data.tif\n"
    hit = await client.get(f"/downloads/{job_id}/data")
    assert hit.headers["X-Cache"] == "HIT"
    assert len(await hit.read()) == 3_000_000
    assert downloads(clip_emulator) == 1
    for path in (f"/downloads/{job_id}/Data.sha256", f"/downloads/{job_id}/data.sha256x"):
        assert (await client.get(path)).status in (400, 404)


async def test_a_cold_range_is_answered_while_the_transfer_runs(client, clip_emulator):
    size, held_at = 24_000_000, 8_000_000
    job_id = await create_job(clip_emulator, f"synthetic-{size}")
    await completed(client, job_id)
    clip_emulator.app[FAULTS_KEY].add(Fault("stall", operation="clip.job.download", bytes=held_at))
    url = f"/downloads/{job_id}/data"
    started = time.perf_counter()
    first = await client.get(url, headers={"Range": "bytes=0-1023"})
    body = await first.read()
    ttfb = time.perf_counter() - started
    # the upstream still holds back everything after held_at: the transfer has not ended
    store = client.app[DOWNLOAD_SERVICE].store
    assert store.lookup(job_id, "data") is None
    assert (first.status, first.headers["X-Cache"]) == (206, "MISS")
    assert first.headers["Content-Range"] == f"bytes 0-1023/{size}"
    assert body == synthetic_range(0, 1024)
    assert "Repr-Digest" not in first.headers  # not known before the last byte
    middle = await client.get(url, headers={"Range": "bytes=5000000-5099999"})
    assert (middle.status, middle.headers["X-Cache"]) == (206, "COALESCED")
    assert await middle.read() == synthetic_range(5_000_000, 100_000)
    print(f"\ncold Range bytes=0-1023 of a {size:,}-byte file: first byte after {ttfb:.3f} s")

    tail = asyncio.ensure_future(client.get(url, headers={"Range": "bytes=-1000"}))
    assert clip_emulator.app[FAULTS_KEY].release() == 1
    last = await tail
    assert last.status == 206
    assert await last.read() == synthetic_range(size - 1000, 1000)
    whole = await client.get(url)
    assert whole.headers["X-Cache"] == "HIT"
    assert hashlib.sha256(await whole.read()).hexdigest() == synthetic_sha256(size)
    assert downloads(clip_emulator) == 1


async def test_a_range_of_a_transfer_honours_if_range_and_416(client, clip_emulator):
    size = 6_000_000
    job_id = await create_job(clip_emulator, f"synthetic-{size}")
    await completed(client, job_id)
    clip_emulator.app[FAULTS_KEY].add(Fault("stall", operation="clip.job.download", bytes=10))
    url = f"/downloads/{job_id}/data"
    beyond = await client.get(url, headers={"Range": f"bytes={size}-"})
    assert beyond.status == 416
    assert beyond.headers["Content-Range"] == f"bytes */{size}"
    other = await client.get(url, headers={"Range": "bytes=0-4", "If-Range": '"another"'})
    etag = other.headers["ETag"]
    assert other.status == 200
    assert other.headers["Content-Length"] == str(size)
    other.close()  # the whole file would wait for the stall
    same = await client.get(url, headers={"Range": "bytes=2-5", "If-Range": etag})
    assert same.status == 206
    assert await same.read() == synthetic_range(2, 4)
    clip_emulator.app[FAULTS_KEY].release()
    assert len(await (await client.get(url)).read()) == size
    assert downloads(clip_emulator) == 1


async def test_if_none_match_lists_and_weak_tags_are_304_streamed_and_stored(client, clip_emulator):
    """If-None-Match is read one way (aiohttp's parse, weak comparison) on both paths: a
    list holding the ETag, or the ETag as a weak tag, is 304 while the file streams and once
    it is stored, before any Range applies (RFC 9110 section 13.2.2)."""
    size = 6_000_000
    job_id = await create_job(clip_emulator, f"synthetic-{size}")
    await completed(client, job_id)
    clip_emulator.app[FAULTS_KEY].add(Fault("stall", operation="clip.job.download", bytes=10))
    url = f"/downloads/{job_id}/data"
    first = await client.get(url, headers={"Range": "bytes=0-4"})
    assert (first.status, first.headers["X-Cache"]) == (206, "MISS")
    assert await first.read() == synthetic_range(0, 5)
    etag = first.headers["ETag"]
    matching = {"list": f'"another", {etag}', "weak": f"W/{etag}", "any": "*"}
    other = '"another", W/"yet-another"'
    for name, value in matching.items():
        streamed = await client.get(url, headers={"If-None-Match": value, "Range": "bytes=0-4"})
        assert (streamed.status, streamed.headers["X-Cache"]) == (304, "COALESCED"), name
        assert streamed.headers["ETag"] == etag
    unmatched = await client.get(url, headers={"If-None-Match": other, "Range": "bytes=0-4"})
    assert unmatched.status == 206
    assert await unmatched.read() == synthetic_range(0, 5)
    assert client.app[DOWNLOAD_SERVICE].store.lookup(job_id, "data") is None  # still streaming

    clip_emulator.app[FAULTS_KEY].release()
    assert len(await (await client.get(url)).read()) == size
    for name, value in matching.items():
        for ranges in ("bytes=0-4", "bytes=0-4,10-19"):  # FileResponse, multipart/byteranges
            stored = await client.get(url, headers={"If-None-Match": value, "Range": ranges})
            assert (stored.status, stored.headers["X-Cache"]) == (304, "HIT"), (name, ranges)
            assert stored.headers["ETag"] == etag
    unmatched = await client.get(url, headers={"If-None-Match": other, "Range": "bytes=0-4"})
    assert unmatched.status == 206
    assert await unmatched.read() == synthetic_range(0, 5)
    assert downloads(clip_emulator) == 1


async def test_aria2c_with_four_connections_gets_the_exact_file_once(
    gateway_for, clip_emulator, tmp_path
):
    _require("aria2c", "aria2")
    size = 16_000_000
    # the gateway paces the upstream to 8 MB/s, so aria2c's ranges meet the transfer
    config = config_with(tmp_path, ("bytes_per_s = 25_000_000", "bytes_per_s = 8_000_000"))
    client = await gateway_for(clip_emulator, token="downloads", config=config)
    job_id = await create_job(clip_emulator, f"synthetic-{size}")
    await completed(client, job_id)
    code, out = await run(
        "aria2c", "-x4", "-s4", "-k1M", "--file-allocation=none", "--allow-overwrite=true",
        "--auto-file-renaming=false", "--console-log-level=warn", "--summary-interval=0",
        "--max-tries=1", "--header", AUTH_HEADER, "-d", str(tmp_path), "-o", "clip.tif",
        str(client.make_url(f"/downloads/{job_id}/data")),
    )  # fmt: skip
    assert code == 0, out
    received = (tmp_path / "clip.tif").read_bytes()
    assert len(received) == size
    assert hashlib.sha256(received).hexdigest() == synthetic_sha256(size)
    assert downloads(clip_emulator) == 1  # four connections, one upstream transfer


async def test_wget_c_resumes_a_cut_download(client, clip_emulator, tmp_path):
    _require("wget", "wget")
    size = 12_000_000
    job_id = await create_job(clip_emulator, f"synthetic-{size}")
    await completed(client, job_id)
    clip_emulator.app[FAULTS_KEY].add(
        Fault("truncate", operation="clip.job.download", bytes=5_000_000)
    )
    url = str(client.make_url(f"/downloads/{job_id}/data"))
    wget = ("wget", "--tries=1", "--server-response", f"--header={AUTH_HEADER}")
    code, out = await run(*wget, url, cwd=tmp_path)
    partial = tmp_path / "data"
    assert code != 0, out
    assert 0 < partial.stat().st_size < size, out
    kept = partial.stat().st_size
    code, out = await run(*wget, "--continue", url, cwd=tmp_path)
    assert code == 0, out
    assert "206 Partial Content" in out
    assert f"bytes {kept}-{size - 1}/{size}" in out
    assert hashlib.sha256(partial.read_bytes()).hexdigest() == synthetic_sha256(size)
    assert downloads(clip_emulator) == 2  # the cut transfer, then the resumed one
