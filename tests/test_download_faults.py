"""Downloads under faults: broken transfers among healthy ones, a full disk, a client that
leaves, a redirecting upstream, SIGTERM during a transfer.

Every test runs the real gateway in front of the bundled emulator (or, for answers the
emulator never gives, a small hostile upstream in the test) and checks what a client and
the store on disk end up with.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import signal
import socket
import sqlite3
import struct
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from PIL import Image

from gateway.emulator import FAULTS_KEY, Fault
from gateway.errors import TransferBroken, UpstreamBadResponse
from gateway.services.transfers import Transfer
from gateway.storage.downloads import DownloadStore
from tests.conftest import TOKENS, config_with, fill_disk
from tests.test_cli import serving_workers
from tests.test_downloads import completed, create_job, downloads, upstream_bytes

BEARER = {"Authorization": f"Bearer {TOKENS['downloads']}"}
TILE_BEARER = {"Authorization": f"Bearer {TOKENS['all']}"}


async def read_until_cut(response: aiohttp.ClientResponse) -> tuple[bytes, bool]:
    """The body bytes a client received, and whether the connection was cut short."""
    received = bytearray()
    try:
        async for chunk in response.content.iter_chunked(1 << 16):
            received += chunk
    except aiohttp.ClientPayloadError:
        return bytes(received), True
    return bytes(received), False


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_twenty_truncations_among_healthy_transfers_touch_nothing_else(
    gateway_for, start_upstream, tmp_path
):
    upstream = await start_upstream(clip_delay_s=0.05)
    client = await gateway_for(upstream, token="all")
    store_dir = tmp_path / "cache-downloads"

    # Three files stored before the storm, to check that nothing writes into them.
    kept = [await create_job(upstream, f"synthetic-{n}") for n in (1_500_000, 2_500_000, 700_000)]
    for job_id in kept:
        await completed(client, job_id)
        body = await (await client.get(f"/downloads/{job_id}/data")).read()
        assert len(body) > 0
    before = {p.name: sha256(p) for p in (store_dir / "files").glob("*.tif")}
    assert len(before) == 3

    broken = [await create_job(upstream, "synthetic-6000000") for _ in range(20)]
    healthy = [await create_job(upstream, "synthetic-2000000") for _ in range(4)]
    for job_id in broken + healthy:
        await completed(client, job_id)
    # Every download below consumes one fault: the 6 MB files are cut after 3 MB, the 2 MB
    # ones are smaller than the cut and arrive whole.
    upstream.app[FAULTS_KEY].add(
        Fault("truncate", operation="clip.job.download", bytes=3_000_000, count=24)
    )

    async def fetch(job_id: str) -> tuple[int, bytes, bool]:
        response = await client.get(f"/downloads/{job_id}/data")
        body, cut = await read_until_cut(response)
        return response.status, body, cut

    async def tiles() -> list[int]:
        statuses = []
        for x in range(3300, 3306):
            response = await client.get(f"/tiles/olinda/13/{x}/4278.png")
            Image.open(io.BytesIO(await response.read())).load()
            statuses.append(response.status)
        return statuses

    async def hits() -> list[bytes]:
        return [await (await client.get(f"/downloads/{j}/data")).read() for j in kept]

    results, tile_statuses, hit_bodies = await asyncio.gather(
        asyncio.gather(*(fetch(j) for j in broken + healthy)), tiles(), hits()
    )
    assert downloads(upstream) == 3 + 24  # one upstream call per file, every fault used
    assert tile_statuses == [200] * 6
    assert [len(b) for b in hit_bodies] == [1_500_000, 2_500_000, 700_000]

    full = await upstream_bytes(upstream, broken[0], "data")
    for status, body, cut in results[:20]:
        # every byte that reached the gateway, then a cut connection: resumable, never whole
        assert (status, cut, len(body)) == (200, True, 3_000_000)
        assert body == full[:3_000_000]
    small = await upstream_bytes(upstream, healthy[0], "data")
    for status, body, cut in results[20:]:
        assert (status, cut, body) == (200, False, small)

    after = {p.name: sha256(p) for p in (store_dir / "files").glob("*.tif")}
    assert {name: after[name] for name in before} == before  # the stored files are untouched
    assert len(after) == 3 + 4  # the healthy transfers were stored; no broken one was
    assert list((store_dir / "tmp").iterdir()) == []
    with sqlite3.connect(store_dir / "index" / "cache.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    index = DownloadStore(store_dir, 1 << 40)
    try:
        for job_id in kept + healthy:
            stored = index.lookup(job_id, "data")
            assert stored is not None
            assert sha256(stored.path) == after[stored.path.name]
        assert all(index.lookup(job_id, "data") is None for job_id in broken)
    finally:
        index.close()


async def test_curl_resumes_every_byte_a_broken_transfer_delivered(client_and_upstream, tmp_path):
    client, upstream = client_and_upstream
    job_id = await create_job(upstream, "synthetic-5000000")
    await completed(client, job_id)
    upstream.app[FAULTS_KEY].add(Fault("truncate", operation="clip.job.download", bytes=1_234_567))
    url = str(client.make_url(f"/downloads/{job_id}/data"))
    out = tmp_path / "clip.tif"
    auth = f"Authorization: Bearer {TOKENS['downloads']}"
    first = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-H", auth, "-o", str(out), url, stderr=asyncio.subprocess.PIPE
    )
    await first.communicate()
    assert first.returncode == 18  # curl: "partial file"
    assert out.stat().st_size == 1_234_567  # less than a 4 MiB write batch: sent all the same
    resumed = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-H", auth, "-C", "-", "-o", str(out), url, stderr=asyncio.subprocess.PIPE
    )
    _, err = await resumed.communicate()
    assert resumed.returncode == 0, err.decode()
    assert out.read_bytes() == await upstream_bytes(upstream, job_id, "data")


@pytest.fixture
async def client_and_upstream(gateway_for, start_upstream):
    upstream = await start_upstream(clip_delay_s=0.05)
    return await gateway_for(upstream, token="downloads"), upstream


async def test_a_full_download_disk_is_a_clean_503_and_leaves_nothing(
    gateway_for, start_upstream, small_disk
):
    disk = small_disk(16 << 20)
    upstream = await start_upstream(clip_delay_s=0.05)
    client = await gateway_for(upstream, token="downloads", cache_dir=disk / "cache")
    store = disk / "cache-downloads"
    big = await create_job(upstream, "synthetic-6000000")
    await completed(client, big)
    filler = fill_disk(disk, 3 << 20)

    async with asyncio.timeout(30):  # never a client left waiting
        response = await client.get(f"/downloads/{big}/data")
        problem = await response.json()
    assert response.status == 503
    assert response.headers["Retry-After"] == "60"
    assert response.content_type == "application/problem+json"
    assert problem["type"].endswith("download-store-unavailable")
    assert list((store / "tmp").iterdir()) == []
    assert list((store / "files").iterdir()) == []

    filler.unlink()  # room again: the claim was released, the next request transfers
    async with asyncio.timeout(30):
        again = await client.get(f"/downloads/{big}/data")
        body = await again.read()
    assert again.status == 200
    assert body == await upstream_bytes(upstream, big, "data")
    assert downloads(upstream) == 2 + 1  # two through the gateway, one for the comparison


async def test_a_disk_that_fills_during_transfers_cuts_them_and_keeps_only_whole_files(
    gateway_for, start_upstream, small_disk
):
    disk = small_disk(24 << 20)
    upstream = await start_upstream(clip_delay_s=0.05, bandwidth=30_000_000)
    client = await gateway_for(upstream, token="downloads", cache_dir=disk / "cache")
    store = disk / "cache-downloads"
    jobs = [await create_job(upstream, "synthetic-9000000") for _ in range(3)]
    for job_id in jobs:
        await completed(client, job_id)
    fill_disk(disk, 14 << 20)  # room for one file and a half: each alone would fit

    async def fetch(job_id: str) -> tuple[int, bytes, bool]:
        response = await client.get(f"/downloads/{job_id}/data")
        body, cut = await read_until_cut(response)
        return response.status, body, cut

    async with asyncio.timeout(60):
        results = await asyncio.gather(*(fetch(j) for j in jobs))
    full = await upstream_bytes(upstream, jobs[0], "data")
    assert any(cut for _, _, cut in results)
    for status, body, cut in results:
        assert status in (200, 503)
        if status == 200:
            assert body == full if not cut else full.startswith(body) and len(body) < len(full)
    assert list((store / "tmp").iterdir()) == []
    for path in (store / "files").glob("*.tif"):
        assert path.read_bytes() == full


async def test_restart_on_a_disk_full_of_abandoned_transfers(
    gateway_for, start_upstream, small_disk
):
    disk = small_disk(8 << 20)
    dead = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    assert await dead.wait() == 0
    tmp = disk / "cache-downloads" / "tmp"
    tmp.mkdir(parents=True)
    abandoned = tmp / f"{dead.pid}-{round(time.time() * 100)}-0123abcd.part"
    fill_disk(disk, 0).rename(abandoned)  # a crashed transfer took the whole disk
    upstream = await start_upstream()
    client = await gateway_for(upstream, token="all", cache_dir=disk / "cache")
    response = await client.get("/tiles/olinda/13/3302/4278.png")
    assert response.status == 200
    assert not abandoned.exists()
    assert (await client.get("/readyz")).status == 200


async def reset_mid_body(base: str, path: str) -> None:
    """GET ``path``, read its head and 1 MiB of its body, stop reading until the gateway
    waits for the connection to drain, then reset it (RST: ``SO_LINGER`` 0), as a client
    killed mid-download does."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 12)  # fills at once
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 12)
    head = (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {BEARER['Authorization']}\r\n\r\n"
    )
    writer.write(head.encode())
    assert b"X-Cache: MISS" in await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(1 << 20)
    writer.transport.pause_reading()
    # the gateway fills the buffers and waits in its drain (not yet after 0.3 s on a busy
    # machine: the reset then meets a write instead, which must end the same way)
    await asyncio.sleep(0.3)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@pytest.mark.parametrize("leaving", ["close", "reset"])
async def test_a_client_that_leaves_mid_download_is_no_error(start_upstream, tmp_path, leaving):
    """Closed (with unread data: a FIN or a reset, by timing) or reset for sure, the
    client's leaving is counted 499 and logged as no error; the transfer is stored whole."""
    upstream = await start_upstream(clip_delay_s=0.05)
    config = config_with(tmp_path)
    async with (
        serving_workers(upstream, config, tmp_path / "cache", workers=1) as (base, process),
        aiohttp.ClientSession(headers=BEARER) as session,
    ):
        job_id = await create_job(upstream, "synthetic-40000000")
        await wait_completed(session, f"{base}/downloads/{job_id}")
        if leaving == "reset":
            await reset_mid_body(base, f"/downloads/{job_id}/data")
        else:
            response = await session.get(f"{base}/downloads/{job_id}/data")
            assert response.headers["X-Cache"] == "MISS"
            await response.content.readexactly(1 << 20)
            response.close()  # the client goes away with 39 MB to go
        cache = None
        async with asyncio.timeout(30):  # the transfer still runs to the end and is stored
            while cache != "HIT":
                await asyncio.sleep(0.05)
                async with session.head(f"{base}/downloads/{job_id}/data") as head:
                    cache = head.headers.get("X-Cache")
        async with session.get(f"{base}/downloads/{job_id}/data") as whole:
            assert len(await whole.read()) == 40_000_000
        assert downloads(upstream) == 1
        async with session.get(f"{base}/metrics") as answer:
            metrics = await answer.text()
        assert 'route="download",status="499"' in metrics
        assert 'status="500"' not in metrics
        process.send_signal(signal.SIGTERM)
        output = (await asyncio.wait_for(process.stdout.read(), 20)).decode()
    assert " ERROR " not in output, output
    assert "Traceback" not in output, output


async def wait_completed(session: aiohttp.ClientSession, url: str) -> None:
    async with asyncio.timeout(30):
        while True:
            async with session.get(url) as response:
                if (await response.json())["status"] == "completed":
                    return
            await asyncio.sleep(0.05)


async def test_the_download_client_follows_no_redirect(aiohttp_server, gateway_for, tmp_path):
    """A hostile or misconfigured upstream redirects the download elsewhere: the gateway
    neither re-posts the body (nor the key) there nor stores what that origin says."""
    elsewhere_hits: list[str] = []

    async def elsewhere(request: web.Request) -> web.Response:
        elsewhere_hits.append(request.path)
        return web.Response(body=b"II*\0not the clip", content_type="image/tiff")

    other = await aiohttp_server(_app({"*": elsewhere}))
    job_id = "0f8fad5b-d9cb-469f-a165-70867728950e"

    async def op(request: web.Request) -> web.StreamResponse:
        operation = request.match_info["op"]
        if operation == "clip.job.get":
            return web.json_response({"id": job_id, "status": "completed"})
        if operation == "clip.job.downloads":
            return web.json_response([{"mosaic_type": "rgb", "filename": "a.tif"}])
        target = other.make_url("/steal") if request.query.get("x") is None else "/v1/op/x"
        raise web.HTTPTemporaryRedirect(str(target))

    upstream = await aiohttp_server(_app({"/v1/op/{op}": op}))
    client = await gateway_for(str(upstream.make_url("")).rstrip("/"), token="downloads")
    assert (await client.get(f"/downloads/{job_id}")).status == 200
    response = await client.get(f"/downloads/{job_id}/rgb")
    assert response.status == 502
    assert response.content_type == "application/problem+json"
    assert elsewhere_hits == []
    assert list((tmp_path / "cache-downloads" / "files").iterdir()) == []


def _app(routes: dict) -> web.Application:
    app = web.Application()
    for path, handler in routes.items():
        if path == "*":
            app.router.add_route("*", "/{tail:.*}", handler)
        else:
            app.router.add_post(path, handler)
    return app


async def test_no_reader_gets_the_last_byte_of_a_transfer_that_was_not_stored(tmp_path):
    """The transfer protocol alone, on a real store: an upstream that sends more than its
    Content-Length is never stored, and its readers (the whole file, and a range ending at
    the last byte) get every byte but the file's last one, then TransferBroken: a short
    body, never a whole-looking one."""
    store = DownloadStore(tmp_path / "downloads", 1 << 30)
    transfer = Transfer("job", "rgb", store.temp_path())
    announced_all = asyncio.Event()

    @asynccontextmanager
    async def overlong():
        async def chunks():
            yield b"0123456789"
            await announced_all.wait()
            yield b"AB"  # past the announced Content-Length

        yield {"content-type": "image/tiff", "content-length": "10"}, chunks()

    async def write() -> None:
        try:
            await transfer.receive(
                overlong(), store, expected=None, content_types=frozenset({"image/tiff"})
            )
        except UpstreamBadResponse as exc:
            transfer.finish(exc)

    async def read(start: int, end: int | None) -> tuple[bytes, bool]:
        received = bytearray()
        async with transfer.reader(start, end) as chunks:
            try:
                async for chunk in chunks:
                    received += chunk
                    if start + len(received) == 9:  # all but the last byte is sendable
                        announced_all.set()
            except TransferBroken:
                return bytes(received), True
        return bytes(received), False

    writing = asyncio.ensure_future(write())
    await transfer.ready.wait()
    whole, tail = await asyncio.gather(read(0, None), read(5, 10))
    await writing
    assert whole == (b"012345678", True)
    assert tail == (b"5678", True)
    assert transfer.stored is None
    assert store.lookup("job", "rgb") is None
    assert not transfer.tmp.exists()
    store.close()
