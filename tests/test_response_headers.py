"""Headers every answer carries, streamed ones included, and problem+json for every error of
the download routes."""

from __future__ import annotations

import asyncio

from tests.conftest import TOKENS
from tests.test_downloads import completed, create_job

RATE_LIMIT_HEADERS = ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset")


def assert_common_headers(response, limited: bool = True) -> None:
    headers = response.headers
    assert headers["X-Content-Type-Options"] == "nosniff", response.url
    assert headers["Server"].startswith("geopera-gateway/"), headers["Server"]
    if limited:
        for name in RATE_LIMIT_HEADERS:
            assert name in headers, (name, response.url, headers.get("X-Cache"))


async def test_streamed_downloads_carry_the_common_headers(gateway_for, start_upstream):
    upstream = await start_upstream(clip_delay_s=0.1, bandwidth=20_000_000)
    client = await gateway_for(upstream, token="downloads")
    job_id = await create_job(upstream, "synthetic-6000000")  # 0.3 s at 20 MB/s
    await completed(client, job_id)
    url = f"/downloads/{job_id}/data"
    streamed = await asyncio.gather(client.get(url), client.get(url))
    assert sorted(r.headers["X-Cache"] for r in streamed) == ["COALESCED", "MISS"]
    for response in streamed:
        assert len(await response.read()) == 6_000_000
        assert_common_headers(response)
    hit = await client.get(url)
    assert hit.headers["X-Cache"] == "HIT"
    assert_common_headers(hit)
    multipart = await client.get(url, headers={"Range": "bytes=0-9,100-109"})
    assert multipart.status == 206
    assert multipart.headers["Content-Type"].startswith("multipart/byteranges")
    assert_common_headers(multipart)


async def test_every_answer_carries_nosniff_and_the_gateway_server_name(gateway):
    for path in ("/healthz", "/metrics", "/layers", "/", "/nowhere", "/tiles/olinda/9/0/0.png"):
        assert_common_headers(await gateway.get(path), limited=False)
    tile = await gateway.get("/tiles/olinda/13/3302/4278.png")
    assert_common_headers(tile)


async def test_an_unsatisfiable_range_is_problem_json(gateway_for, start_upstream):
    upstream = await start_upstream(clip_delay_s=0.1)
    client = await gateway_for(upstream, token="downloads")
    job_id = await create_job(upstream, "synthetic-1000")
    await completed(client, job_id)
    url = f"/downloads/{job_id}/data"
    assert len(await (await client.get(url)).read()) == 1000  # stored
    for header in ("bytes=1000-", "bytes=5000-6000", "bytes=1000-1010,2000-"):
        response = await client.get(url, headers={"Range": header})
        assert response.status == 416, header
        assert response.headers["Content-Type"] == "application/problem+json", header
        assert response.headers["Content-Range"] == "bytes */1000"
        problem = await response.json()
        assert problem["status"] == 416
        assert problem["type"].endswith("/range-not-satisfiable")
        assert_common_headers(response)
    # a Range aiohttp cannot parse is 416 as well, with the same body
    response = await client.get(url, headers={"Range": "bytes=9-2"})
    assert response.status == 416
    assert response.headers["Content-Type"] == "application/problem+json"
    assert TOKENS["downloads"] not in await response.text()
