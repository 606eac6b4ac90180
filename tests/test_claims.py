"""The one cross-process claim that both stores use: real diskcache, real processes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import diskcache

from gateway.storage.claims import Claims, owner_alive, process_tag

HOLD = """
import sys, time, diskcache
from gateway.storage.claims import Claims
claims = Claims(diskcache.Cache(sys.argv[1]))
assert claims.claim("tile/a", 600)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def holder(directory: Path, seconds: float) -> subprocess.Popen[str]:
    """Another process that claims ``tile/a`` and keeps running for ``seconds``."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(directory), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline() == "held\n"
    return process


def test_a_live_holder_keeps_its_claim_and_a_dead_ones_is_taken_over(tmp_path):
    cache = diskcache.Cache(str(tmp_path))
    claims = Claims(cache)
    other = holder(tmp_path, 60)
    try:
        assert not claims.claim("tile/a", 600)
        assert claims.held("tile/a")
        claims.release("tile/a")  # not ours: left alone
        assert claims.held("tile/a")
    finally:
        other.kill()
        other.wait()
    assert not claims.held("tile/a")
    assert claims.claim("tile/a", 600)  # taken over at once, not after 600 s
    claims.release("tile/a")
    assert cache.get("claim/tile/a") is None


def test_process_tags_tell_a_restarted_process_from_its_predecessor():
    tag = process_tag()
    assert tag is not None
    assert owner_alive(tag)
    pid, started = tag.split("-")
    assert not owner_alive(f"{pid}-{int(started) - 100}")  # same pid, another start
    assert not owner_alive("not-a-tag")


async def test_a_waiter_gets_the_result_or_learns_the_holder_died(tmp_path):
    cache = diskcache.Cache(str(tmp_path))
    claims = Claims(cache)
    other = holder(tmp_path, 60)
    try:
        waiting = asyncio.ensure_future(
            claims.wait("tile/a", lambda: cache.get("result"), timeout_s=30, poll_s=0.01)
        )
        await asyncio.sleep(0.1)
        assert not waiting.done()
        cache.set("result", b"tile bytes")
        assert await waiting == b"tile bytes"
        cache.delete("result")
        waiting = asyncio.ensure_future(
            claims.wait("tile/a", lambda: cache.get("result"), timeout_s=30, poll_s=0.01)
        )
        await asyncio.sleep(0.1)
        other.kill()
        other.wait()
        assert await asyncio.wait_for(waiting, 5) is None  # died without a result
    finally:
        other.kill()
        other.wait()


async def test_a_wait_has_a_deadline(tmp_path):
    cache = diskcache.Cache(str(tmp_path))
    other = holder(tmp_path, 60)
    try:
        result = await Claims(cache).wait("tile/a", lambda: None, timeout_s=0.2, poll_s=0.01)
        assert result is None
    finally:
        other.kill()
        other.wait()
