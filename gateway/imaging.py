"""Pillow work: checking upstream images, blank tiles, terrain nodata, and 512 px retina
(``@2x``) tiles.

The upstream renders 256 px tiles only, so an ``@2x`` tile at z/x/y is the four z+1 children
pasted into a 512 px canvas and encoded in the asked format.

Terrain tiles are Mapbox Terrain-RGB: height = -10000 + (R·65536 + G·256 + B)·0.1 m. Readers
of it (MapLibre's ``raster-dem``) ignore alpha, so a pixel without data must carry a height:
:func:`fill_terrain_nodata` gives those pixels the layer's ``nodata_height_m``, and blank and
``@2x`` terrain tiles are filled with it too.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from functools import lru_cache

from PIL import Image, ImageChops, UnidentifiedImageError

TILE_SIZE = 256
"""Edge of one upstream tile, pixels."""

PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}

MAX_TILE_PIXELS = 512 * 512
"""Largest image the gateway decodes, pixels (a retina tile); upstream tiles must be exactly
:data:`TILE_SIZE` square, so anything larger is refused from its header alone."""

Image.init()  # load every format plugin now, not on the first tile of a cold-miss burst


def terrain_rgb(height_m: float) -> tuple[int, int, int]:
    """The Terrain-RGB pixel ``(R, G, B)`` for ``height_m`` metres, rounded to 0.1 m
    (Mapbox: v = (height + 10000) * 10, R = v // 65536, G = v // 256 % 256, B = v % 256).

    Raises:
        ValueError: ``height_m`` outside -10,000 to 1,667,721.5 m (24 bits at 0.1 m).
    """
    value = round((height_m + 10000) * 10)
    if not 0 <= value < 1 << 24:
        raise ValueError(f"{height_m} m cannot be encoded in Terrain-RGB")
    return value >> 16, (value >> 8) & 0xFF, value & 0xFF


def fill_terrain_nodata(body: bytes, height_m: float) -> bytes:
    """A Terrain-RGB PNG ``body`` with every pixel without data set to ``height_m`` metres.

    Pixels without data are the transparent ones (alpha 0: how the upstream marks masked
    pixels, as the emulator does) and those encoding RGB 0,0,0, -10,000 m, the value an
    encoder leaves in masked pixels, which no real terrain has. Returns ``body`` itself when
    no pixel lacks data, else an opaque RGB PNG of the same size.

    Raises:
        ImageCheckError: ``body`` cannot be decoded.
    """
    try:
        with Image.open(io.BytesIO(body)) as image:
            rgba = image.convert("RGBA")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageCheckError(f"terrain tile not decodable ({type(exc).__name__})") from None
    red, green, blue, alpha = rgba.split()
    transparent = alpha.point(lambda a: 255 if a == 0 else 0)
    brightest = ImageChops.lighter(ImageChops.lighter(red, green), blue)
    black = brightest.point(lambda v: 255 if v == 0 else 0)
    nodata = ImageChops.lighter(transparent, black)
    if nodata.getbbox() is None:
        return body
    rgb = rgba.convert("RGB")
    rgb.paste(terrain_rgb(height_m), mask=nodata)
    return encode(rgb, "png")


class ImageCheckError(ValueError):
    """Bytes that are not a decodable image of the expected format and size."""


def check_tile(body: bytes, fmt: str, size: int = TILE_SIZE) -> None:
    """Verify that ``body`` is a ``size`` x ``size`` image in ``fmt`` (png, jpg, webp) whose
    pixels decode completely.

    The header is read first: another format, or any size but ``size`` x ``size`` (never
    more than :data:`MAX_TILE_PIXELS`), is refused before a pixel is decoded, so a header
    claiming a huge image costs nothing. Then PNG chunk CRCs are checked (``verify``) and
    every pixel is decoded (``load``), so a tile whose compressed data is damaged is refused
    even when its CRCs are valid.

    Raises:
        ImageCheckError: undecodable bytes, another format, another size, or pixel data that
            does not decode.
    """
    if size * size > MAX_TILE_PIXELS:
        raise ImageCheckError(f"a {size} px tile is larger than this gateway decodes")
    try:
        with Image.open(io.BytesIO(body)) as image:
            found, dims = image.format, image.size
            if found != PIL_FORMATS[fmt]:
                raise ImageCheckError(f"expected {PIL_FORMATS[fmt]}, got {found}")
            if dims != (size, size):
                raise ImageCheckError(f"expected {size}x{size} pixels, got {dims[0]}x{dims[1]}")
            if found == "PNG":
                image.verify()  # chunk CRCs; leaves the image unusable, so reopen to decode
        with Image.open(io.BytesIO(body)) as image:
            image.load()
    except ImageCheckError:
        raise
    except (
        UnidentifiedImageError,
        Image.DecompressionBombError,
        OSError,
        SyntaxError,
        ValueError,
        EOFError,
        struct.error,
    ) as exc:
        raise ImageCheckError(f"not a decodable image ({type(exc).__name__})") from None


def encode(image: Image.Image, fmt: str, quality: int | None = None) -> bytes:
    """Encode ``image`` as ``fmt``; JPEG drops alpha (transparent areas become black)."""
    out = io.BytesIO()
    if fmt == "jpg":
        if image.mode != "RGB":
            background = Image.new("RGB", image.size, (0, 0, 0))
            if image.mode in ("RGBA", "LA"):
                background.paste(image, mask=image.getchannel("A"))
            else:
                background.paste(image.convert("RGB"))
            image = background
        image.save(out, "JPEG", quality=quality or 85)
    elif fmt == "webp":
        image.save(out, "WEBP", quality=quality or 85)
    else:
        image.save(out, "PNG", optimize=False, compress_level=6)
    return out.getvalue()


@lru_cache(maxsize=16)
def blank_tile(
    fmt: str, size: int = TILE_SIZE, terrain: bool = False, nodata_height_m: float = 0.0
) -> bytes:
    """The tile served where a layer has no data, ``size`` px square, encoded as ``fmt``.

    Raster PNG and WEBP are fully transparent; JPEG has no alpha channel, so it is black,
    the colour the upstream gives masked pixels in JPEG. Terrain tiles are opaque
    ``nodata_height_m`` metres (default 0 m, sea level), so terrain renderers draw flat
    ground rather than a -10 km pit.
    """
    if terrain:
        image = Image.new("RGB", (size, size), terrain_rgb(nodata_height_m))
    elif fmt == "jpg":
        image = Image.new("RGB", (size, size), (0, 0, 0))
    else:
        image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    return encode(image, fmt)


def compose_2x(
    children: Sequence[bytes | None],
    fmt: str,
    terrain: bool = False,
    quality: int | None = None,
    nodata_height_m: float = 0.0,
) -> bytes:
    """Paste four 256 px child tiles into one 512 px tile encoded as ``fmt``.

    Args:
        children: encoded child images in order top-left, top-right, bottom-left,
            bottom-right (x, y), (x+1, y), (x, y+1), (x+1, y+1) at z+1; None for an empty
            child, which is left blank (transparent, or ``nodata_height_m`` for terrain).
        fmt: output format (png, jpg, webp).
        terrain: children are Terrain-RGB; pixels are copied exactly, never resampled.
        nodata_height_m: terrain: the height of empty children, metres.

    Raises:
        ImageCheckError: a child cannot be decoded.
    """
    size = TILE_SIZE * 2
    if terrain:
        canvas = Image.new("RGBA", (size, size), (*terrain_rgb(nodata_height_m), 255))
    else:
        canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    offsets = ((0, 0), (TILE_SIZE, 0), (0, TILE_SIZE), (TILE_SIZE, TILE_SIZE))
    for body, offset in zip(children, offsets, strict=True):
        if body is None:
            continue
        try:
            with Image.open(io.BytesIO(body)) as child:
                canvas.paste(child.convert("RGBA"), offset)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise ImageCheckError(f"child tile not decodable ({type(exc).__name__})") from None
    return encode(canvas, fmt, quality)
