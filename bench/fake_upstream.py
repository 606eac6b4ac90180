"""A stand-in upstream that answers every tile render with one pre-made PNG, for load tests.

``bench/miss_flood.py`` floods the gateway with hundreds of distinct cold tiles per second.
The bundled emulator really renders each one (rio-tiler, tens of milliseconds of CPU), which
on a small machine would measure the emulator's CPU use rather than the gateway. This server
costs almost nothing per call: after ``--delay-ms`` it answers any ``POST /v1/op/{op}`` with
the same 256 x 256 RGBA PNG (about 30 kB, made with Pillow at start: a gradient with
posterised noise, so it compresses like imagery rather than like a flat fill). The gateway
still receives, checks, decodes and stores every tile as it would a real one.

It speaks just enough of the emulator's test interface for the benchmark helpers:
``GET /_emulator/stats`` (``{"calls": {operation: count}}``) and ``POST /_emulator/reset``.
It checks no key and enforces no limit. Run it as
``python bench/fake_upstream.py --port P --delay-ms D`` (127.0.0.1 only).
"""

from __future__ import annotations

import argparse
import asyncio
import io
from collections import Counter
from collections.abc import Sequence

from aiohttp import web
from PIL import Image, ImageOps

HOST = "127.0.0.1"


def make_tile() -> bytes:
    """The PNG every render gets: 256 x 256 RGBA, about 30 kB."""
    gradient = Image.linear_gradient("L").resize((256, 256))
    noise = ImageOps.posterize(Image.effect_noise((256, 256), 40), 2)
    opaque = Image.new("L", (256, 256), 255)
    image = Image.merge("RGBA", (gradient, noise, gradient.rotate(90), opaque))
    out = io.BytesIO()
    image.save(out, "PNG", compress_level=6)
    return out.getvalue()


def build_app(delay_s: float) -> web.Application:
    """The fake upstream's app: renders after ``delay_s`` seconds, stats and reset."""
    tile = make_tile()
    calls: Counter[str] = Counter()

    async def operation(request: web.Request) -> web.Response:
        await request.read()
        calls[request.match_info["operation_id"]] += 1
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        return web.Response(body=tile, content_type="image/png")

    async def stats(_request: web.Request) -> web.Response:
        return web.json_response({"calls": dict(calls)})

    async def reset(_request: web.Request) -> web.Response:
        calls.clear()
        return web.json_response({"calls": {}})

    app = web.Application()
    app.router.add_post("/v1/op/{operation_id}", operation)
    app.router.add_get("/_emulator/stats", stats)
    app.router.add_post("/_emulator/reset", reset)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    """Serve until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=50.0)
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        loop = asyncio.new_event_loop()
    else:
        loop = uvloop.new_event_loop()
    web.run_app(
        build_app(args.delay_ms / 1000),
        host=HOST,
        port=args.port,
        access_log=None,
        print=None,
        loop=loop,
    )


if __name__ == "__main__":
    main()
