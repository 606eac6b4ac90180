"""Cross-process claims: one worker process fetches a key, the others wait for its result.

The single-flight of :mod:`gateway.storage.coalesce` works inside one process; a claim extends it to
every worker process on the host. Both stores use this one implementation (the tile cache
for tiles, the download store for clip files), the way MapProxy injects one locker into its
tile manager.

A claim is a diskcache entry ``"claim/<key>"`` (a string key: diskcache stores those as they
are, and pickles any other) whose value names its holder by
:func:`process_tag` (pid and process start time) and which expires after ``ttl_s`` seconds.
A claim held by a process that no longer runs, or whose time ran out, is taken over by the
next caller; a holder releases only its own claim, checked inside the same transaction.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

import diskcache
import psutil

T = TypeVar("T")

POLL_S = 0.05
"""How often a waiter looks for the holder's result, seconds."""


def process_tag(pid: int | None = None) -> str | None:
    """``"<pid>-<start time, centiseconds since the epoch>"`` of a live process (this one by
    default), or None when no such process runs. Two processes never share a tag, even in
    a container that restarts with the same pid."""
    try:
        process = psutil.Process(pid)
        return f"{process.pid}-{round(process.create_time() * 100)}"
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:  # alive, owned by another user: never ours to take over
        return f"{pid}-?"


def owner_alive(tag: str) -> bool:
    """Whether the process named by a :func:`process_tag` still runs."""
    pid = tag.partition("-")[0]
    if not pid.isdigit():
        return False
    live = process_tag(int(pid))
    return live is not None and (live == tag or live.endswith("-?"))


class Claims:
    """Claims on keys, shared by every process that opens the same diskcache.

    Args:
        cache: the diskcache holding the claims (the store's own index or cache).
        owner: this process's tag (default :func:`process_tag`).
    """

    def __init__(self, cache: diskcache.Cache, owner: str | None = None) -> None:
        self._cache = cache
        self.owner = owner or process_tag() or "unknown"

    def claim(self, key: str, ttl_s: float) -> bool:
        """Claim ``key`` for this process for up to ``ttl_s`` seconds, atomically.

        Returns True when this process now holds it (newly, again, or taken over from a
        holder that died); False while another live process holds it.
        """
        entry = "claim/" + key
        if self._cache.add(entry, self.owner, expire=ttl_s):
            return True
        with self._cache.transact(retry=True):
            holder = self._cache.get(entry)
            if holder is None or holder == self.owner or not owner_alive(str(holder)):
                self._cache.set(entry, self.owner, expire=ttl_s)
                return True
        return False

    def held(self, key: str) -> bool:
        """Whether a live process holds the claim on ``key`` now."""
        holder = self._cache.get("claim/" + key)
        return holder is not None and owner_alive(str(holder))

    def release(self, key: str) -> None:
        """Drop this process's claim on ``key``; another process's claim is left alone."""
        entry = "claim/" + key
        with self._cache.transact(retry=True):
            if self._cache.get(entry) == self.owner:
                self._cache.delete(entry)

    async def wait(
        self,
        key: str,
        result: Callable[[], T | None],
        timeout_s: float,
        poll_s: float = POLL_S,
    ) -> T | None:
        """Wait while another process holds ``key``, for ``result()`` to give something.

        Returns:
            ``result()``'s value once it is not None; None when the claim ended without a
            result (the holder failed or died: the caller should claim and fetch) or after
            ``timeout_s`` seconds. ``poll_s`` is how often it looks, seconds.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            await asyncio.sleep(poll_s)
            found = result()
            if found is not None:
                return found
            if not self.held(key):
                return result()
        return None
