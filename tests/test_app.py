"""The app factory: every route declares its policy, and a failed start closes exactly what
had started."""

from __future__ import annotations

import pytest
from aiohttp import web

from gateway.app import create_app
from gateway.http.keys import DOWNLOAD_SERVICE, DOWNLOAD_STORE, SHARED_STATE, TILE_CACHE
from gateway.http.policy import ROUTE_POLICIES
from tests.conftest import config_with


def test_every_route_declares_its_policy(settings_for, tmp_path):
    app = create_app(settings_for("http://127.0.0.1:9"))
    table = app[ROUTE_POLICIES]
    resources = list(app.router.resources())
    assert resources
    missing = [r.canonical for r in resources if r not in table]
    assert not missing, f"routes registered without gateway.http.policy.add_get/add_post: {missing}"
    by_name = {route.name: table[route.resource] for route in app.router.routes() if route.name}
    assert by_name["tile"].cors
    assert by_name["tile"].caller_limit
    assert by_name["tile"].query == {"token"}
    assert by_name["download_list"].query == {"token", "status", "limit", "offset"}
    assert not by_name["download"].cors
    assert by_name["download"].caller_limit
    assert not by_name["healthz"].caller_limit
    assert by_name["healthz"].query is None


async def test_a_failed_start_closes_what_started_and_nothing_else(settings_for, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the download store's directory should be")
    config = config_with(tmp_path, ("[downloads]\n", f'[downloads]\ndirectory = "{blocker}/d"\n'))
    app = create_app(settings_for("http://127.0.0.1:9", config=config))
    runner = web.AppRunner(app)
    # the download store cannot create its directory: its start-up fails
    with pytest.raises(NotADirectoryError):
        await runner.setup()
    # the contexts after it never ran, and its own cleanup is not called
    assert DOWNLOAD_STORE not in app
    assert DOWNLOAD_SERVICE not in app
    await runner.cleanup()  # no error: nothing half-built is closed
    # the tile stack had started, so it is closed: its stores' I/O threads take no more work
    cache, state = app[TILE_CACHE], app[SHARED_STATE]
    with pytest.raises(RuntimeError):
        await cache.run(cache.probe)
    with pytest.raises(RuntimeError):
        await state.run(state.probe)
