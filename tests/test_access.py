"""Access control: every route x (no token, bad token, each scope) -> the expected status."""

from __future__ import annotations

import pytest

from tests.conftest import PRIVATE_LAYER, TOKENS, config_with
from tests.test_downloads import completed, create_job

WHO = ["none", "bad", "tiles", "downloads", "admin", "all", "survey"]
"""``survey`` has the downloads scope for project ``survey`` only; the job is in ``demo``."""

_DOWNLOADS = [401, 401, 403, 200, 403, 200, 403]

# route -> expected status for each of WHO
MATRIX = {
    ("GET", "/tiles/olinda/13/3302/4278.png"): [200, 401, 200, 200, 200, 200, 200],
    ("GET", "/tiles/olinda-private/13/3302/4278.png"): [401, 401, 200, 403, 403, 200, 403],
    ("GET", "/downloads"): [401, 401, 403, 200, 403, 200, 200],
    ("GET", "/downloads/{job}"): _DOWNLOADS,
    ("GET", "/downloads/{job}/rgb"): _DOWNLOADS,
    ("GET", "/downloads/{job}/rgb.sha256"): _DOWNLOADS,
    ("GET", "/tiles/clips/{job}/rgb/tilejson.json"): _DOWNLOADS,
    ("GET", "/tiles/clips/{job}/rgb/9/145/220.png"): _DOWNLOADS,
    ("POST", "/admin/purge?layer=bahamas"): [401, 401, 403, 403, 200, 200, 403],
    ("GET", "/healthz"): [200] * 7,
}


def headers_for(who: str) -> dict[str, str]:
    if who == "none":
        return {}
    token = "ggw_not-a-configured-token" if who == "bad" else TOKENS[who]
    return {"Authorization": f"Bearer {token}"}


async def test_access_control_matrix(gateway_for, start_upstream, tmp_path, capsys):
    upstream = await start_upstream(clip_delay_s=0)
    client = await gateway_for(upstream, config=config_with(tmp_path, append=PRIVATE_LAYER))
    downloader = await gateway_for(
        upstream, token="downloads", config=config_with(tmp_path, append=PRIVATE_LAYER)
    )
    job = await create_job(upstream)
    await completed(downloader, job)
    checked = 0
    for (method, template), expected in MATRIX.items():
        path = template.format(job=job)
        for who, status in zip(WHO, expected, strict=True):
            response = await client.request(method, path, headers=headers_for(who))
            await response.read()
            assert response.status == status, (method, path, who, response.status)
            if status in (401, 403):
                assert response.headers["Content-Type"] == "application/problem+json"
            if status == 401:
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
            checked += 1
    with capsys.disabled():
        print(f"\naccess-control matrix: {checked} route x credential cases")


@pytest.mark.parametrize("who", ["bad", "tiles"])
async def test_token_as_query_parameter(gateway_for, emulator, tmp_path, who):
    client = await gateway_for(emulator, config=config_with(tmp_path, append=PRIVATE_LAYER))
    token = "ggw_nope" if who == "bad" else TOKENS[who]
    response = await client.get(f"/tiles/olinda-private/13/3302/4278.png?token={token}")
    assert response.status == (401 if who == "bad" else 200)


async def test_two_authorization_headers_are_refused(gateway_for, emulator, tmp_path):
    client = await gateway_for(emulator, config=config_with(tmp_path, append=PRIVATE_LAYER))
    good, bad = f"Bearer {TOKENS['all']}", "Bearer ggw_not-a-configured-token"
    for pair in ([good, bad], [bad, good], [good, good]):
        for path in [
            "/tiles/olinda-private/13/3302/4278.png",
            "/tiles/olinda/13/3302/4278.png",
            "/admin/purge?layer=olinda",
        ]:
            method = "POST" if path.startswith("/admin") else "GET"
            response = await client.request(
                method, path, headers=[("Authorization", value) for value in pair]
            )
            assert response.status == 400, (path, pair)
            assert response.headers["Content-Type"] == "application/problem+json"
            assert (await response.json())["type"].endswith("/repeated-parameter")


async def test_refused_tokens_count_against_the_client_limit(gateway_for, emulator, tmp_path):
    config = config_with(tmp_path, ('rate_limit = "200/second"', 'rate_limit = "3/minute"'))
    client = await gateway_for(emulator, config=config)
    tile = "/tiles/olinda/13/3302/4278.png"
    for header in ["Bearer ggw_not-a-configured-token", "Basic Zm9vOmJhcg==", "Bearer ggw_x"]:
        response = await client.get(tile, headers={"Authorization": header})
        assert response.status == 401
        assert "RateLimit-Remaining" in response.headers
    response = await client.get(tile)  # the same client, now without a token
    assert response.status == 429
    assert response.headers["Content-Type"] == "application/problem+json"
    assert emulator.renders() == 0
