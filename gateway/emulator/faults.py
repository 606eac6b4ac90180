"""Scripted faults: make the next N calls of an operation fail in a chosen way.

For tests and failure drills of the gateway against a real HTTP upstream. Queue faults with
``app[FAULTS_KEY].add(Fault(...))`` in-process, or ``POST /_emulator/faults`` with a JSON
object or list of objects (fields as :class:`Fault`); ``DELETE /_emulator/faults`` clears
them. Like the stats endpoints these need no auth: the emulator is a loopback test tool.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .protocol import problem_response

KINDS = ("status", "garbage", "wrong-type", "hang", "echo-key")


@dataclass
class Fault:
    """One scripted misbehaviour.

    Attributes:
        kind: ``status`` (answer ``status`` as problem+json, with ``Retry-After`` if
            ``retry_after`` is set), ``garbage`` (200 ``image/png`` that is not an image),
            ``wrong-type`` (200 ``text/html``), ``hang`` (sleep ``seconds``, then answer
            normally), ``echo-key`` (500 whose detail repeats the Authorization header, as a
            careless upstream might).
        operation: operation id it applies to, or ``*`` for any.
        count: how many calls it affects.
    """

    kind: str = "status"
    operation: str = "*"
    status: int = 500
    retry_after: str | None = None
    seconds: float = 0.0
    count: int = 1

    @classmethod
    def from_json(cls, data: Any) -> Fault:
        """Build from a JSON object; raises ValueError on unknown kinds or fields."""
        if not isinstance(data, dict):
            raise ValueError("a fault is a JSON object")
        fault = cls(**data)
        if fault.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}")
        return fault


class FaultPlan:
    """The queue of pending faults, consumed in order by matching operations."""

    def __init__(self) -> None:
        self._queue: deque[Fault] = deque()

    def add(self, *faults: Fault) -> None:
        """Queue ``faults`` after any already pending."""
        self._queue.extend(faults)

    def clear(self) -> None:
        """Drop every pending fault."""
        self._queue.clear()

    def take(self, operation: str) -> Fault | None:
        """The first pending fault for ``operation`` (counting one use of it), or None."""
        for fault in self._queue:
            if fault.operation in ("*", operation):
                fault.count -= 1
                if fault.count <= 0:
                    self._queue.remove(fault)
                return fault
        return None


FAULTS_KEY: web.AppKey[FaultPlan] = web.AppKey("geopera_emulator_faults", FaultPlan)


async def apply(fault: Fault, request: web.Request) -> web.StreamResponse | None:
    """The response ``fault`` replaces the operation's with, or None to answer normally."""
    if fault.kind == "hang":
        await asyncio.sleep(fault.seconds)
        return None
    if fault.kind == "garbage":
        return web.Response(body=b"this is not a PNG", content_type="image/png")
    if fault.kind == "wrong-type":
        return web.Response(text="<html>maintenance</html>", content_type="text/html")
    if fault.kind == "echo-key":
        detail = f"backend failed for {request.headers.get('Authorization', '')}"
        return problem_response(500, "internal-error", "Internal Server Error", detail)
    headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
    return problem_response(
        fault.status,
        "injected-fault",
        "Injected fault",
        f"Scripted fault with status {fault.status}.",
        headers,
    )


async def post_faults(request: web.Request) -> web.Response:
    """``POST /_emulator/faults``: queue one fault object or a list of them."""
    try:
        data = json.loads(await request.read())
        items = data if isinstance(data, list) else [data]
        faults = [Fault.from_json(item) for item in items]
    except (ValueError, TypeError) as exc:
        return problem_response(400, "invalid-fault", "Bad Request", str(exc))
    request.app[FAULTS_KEY].add(*faults)
    return web.json_response({"queued": len(faults)})


async def delete_faults(request: web.Request) -> web.Response:
    """``DELETE /_emulator/faults``: drop every pending fault."""
    request.app[FAULTS_KEY].clear()
    return web.json_response({"queued": 0})
