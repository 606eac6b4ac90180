"""A shared cache in front of the gateway: a real nginx ``proxy_cache`` (tests/clients.py)."""

from __future__ import annotations

import aiohttp

from gateway.app import create_app
from gateway.logs import access_log_options
from tests.clients import needs_nginx, nginx_in_front
from tests.conftest import PRIVATE_LAYER, TOKENS, config_with

pytestmark = needs_nginx

PUBLIC_TILE = "/tiles/olinda/13/3302/4278.png"
PRIVATE_TILE = "/tiles/olinda-private/13/3302/4278.png"


async def test_nginx_never_serves_a_private_tile_to_a_client_without_a_token(
    aiohttp_server, settings_for, emulator, tmp_path
):
    settings = settings_for(emulator, config=config_with(tmp_path, append=PRIVATE_LAYER))
    server = await aiohttp_server(create_app(settings), **access_log_options(True))
    bearer = {"Authorization": f"Bearer {TOKENS['tiles']}"}
    async with (
        nginx_in_front(f"http://127.0.0.1:{server.port}", tmp_path / "nginx") as cdn,
        aiohttp.ClientSession() as session,
    ):
        # the cache works: a public tile is stored and served again by nginx
        for expected in ("MISS", "HIT"):
            async with session.get(cdn + PUBLIC_TILE) as response:
                assert response.status == 200
                assert response.headers["X-Nginx-Cache"] == expected
        # a token holder reads the private tile through nginx...
        async with session.get(cdn + PRIVATE_TILE, headers=bearer) as response:
            assert response.status == 200
            assert response.headers["X-Nginx-Cache"] == "MISS"
            cache_control = response.headers["Cache-Control"]
        # ...and a client without one is refused by the gateway, not served from the cache
        async with session.get(cdn + PRIVATE_TILE) as response:
            assert response.status == 401, response.headers.get("X-Nginx-Cache")
            assert response.headers["Content-Type"] == "application/problem+json"
            assert response.headers["X-Nginx-Cache"] != "HIT"
        assert cache_control.startswith("private, max-age=")
        async with session.get(cdn + PRIVATE_TILE, headers=bearer) as response:
            assert response.status == 200
            assert response.headers["X-Nginx-Cache"] == "MISS"  # never stored
