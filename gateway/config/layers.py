"""The ``[[layers]]`` tables of the config file: one model per layer ``kind`` (a discriminated
union, :data:`LayerTable`), turned into :class:`~gateway.layers.Layer` objects by
:func:`layer_map`.

A table without ``kind`` is a ``raster`` layer. Every mistake is reported as
``layers[i].<key>`` with the fix (see :func:`gateway.config.tables.config_error`).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType
from typing import Annotated, Any, Literal

import annotated_types
from pydantic import AfterValidator, BeforeValidator, Discriminator, Field, Tag, field_validator
from pydantic_core.core_schema import ValidationInfo

from gateway.config.tables import (
    Bool,
    Float,
    Int,
    NonNegativeInt,
    PositiveInt,
    Str,
    Table,
    invalid,
)
from gateway.layers import (
    LAYER_NAME,
    MAX_ZOOM,
    MEDIA_TYPES,
    RENDER_PARAMS,
    RESERVED_NAMES,
    TERRAIN_RGB_MAX_M,
    TERRAIN_RGB_MIN_M,
    WEB_MERCATOR_MAX_LAT,
    Bounds,
    Kind,
    Layer,
    layer_fingerprint,
)

_NAME_RULE = "1-64 characters of a-z, 0-9, '-' or '_', starting with a letter or digit"


def _layer_name(value: str) -> str:
    if not LAYER_NAME.fullmatch(value):
        raise invalid(f"{_NAME_RULE}, got {value!r}")
    return value


def _cog_url(value: str) -> str:
    if not value:
        raise invalid("required: the COG URL the upstream renders from")
    return value


def _bounds(value: object) -> Bounds:
    """``[west, south, east, north]`` in degrees (EPSG:4326), as floats."""
    if (
        not isinstance(value, list | tuple)
        or len(value) != 4
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ):
        raise invalid(f"must be [west, south, east, north] in degrees, got {value!r}")
    west, south, east, north = (float(v) for v in value)
    if not (-180 <= west < east <= 180 and -90 <= south < north <= 90):
        raise invalid(
            f"need -180 <= west < east <= 180 and -90 <= south < north <= 90, got {value!r}"
        )
    return west, south, east, north


def _formats(value: object) -> tuple[str, ...]:
    """A non-empty list of :data:`~gateway.layers.MEDIA_TYPES` extensions, deduplicated."""
    if not isinstance(value, list | tuple) or not value or any(f not in MEDIA_TYPES for f in value):
        raise invalid(f"must be a non-empty list of {', '.join(MEDIA_TYPES)}, got {value!r}")
    return tuple(dict.fromkeys(value))


def _terrain_formats(value: tuple[str, ...]) -> tuple[str, ...]:
    if value != ("png",):
        raise invalid('terrain layers serve Terrain-RGB as PNG only: formats = ["png"]')
    return value


def _terrain_height(value: float) -> float:
    if not TERRAIN_RGB_MIN_M <= value <= TERRAIN_RGB_MAX_M:
        raise invalid(
            f"must be {TERRAIN_RGB_MIN_M:g} to {TERRAIN_RGB_MAX_M:g} metres (what Terrain-RGB "
            f"encodes), got {value}"
        )
    return value


Formats = Annotated[tuple[str, ...], BeforeValidator(_formats)]


class _LayerTable(Table):
    """The keys every layer kind has (README: configuration reference, ``[[layers]]``).

    Seconds for the TTL and stale windows (RFC 5861 sections 3 and 4); zooms are XYZ levels;
    ``bounds`` degrees (EPSG:4326).
    """

    kind: Kind
    """``raster`` (the default) or ``terrain``: which model, and which upstream operation."""
    formats: tuple[str, ...]
    """Extensions served, a subset of :data:`~gateway.layers.MEDIA_TYPES`."""
    name: Annotated[Str, AfterValidator(_layer_name)] = Field(description=_NAME_RULE)
    title: Str | None = None
    """Shown in TileJSON, WMTS and the viewer; default: the name."""
    default: Bool = False
    """The layer ``/tiles/{z}/{x}/{y}`` and the viewer show first (at most one)."""
    url: Annotated[Str, AfterValidator(_cog_url)] = Field(
        description="the COG URL the upstream renders from"
    )
    minzoom: Int = 0
    maxzoom: Int = Field(18, validate_default=True)
    bounds: Annotated[Bounds, BeforeValidator(_bounds)] = (
        -180.0,
        -WEB_MERCATOR_MAX_LAT,
        180.0,
        WEB_MERCATOR_MAX_LAT,
    )
    ttl_s: PositiveInt = 86400
    stale_while_revalidate_s: NonNegativeInt = 3600
    stale_if_error_s: NonNegativeInt = 86400
    attribution: Str = ""
    public: Bool = True
    """False: only callers with a ``tiles`` token may read it."""

    @field_validator("maxzoom")
    @classmethod
    def _zoom_range(cls, maxzoom: int, info: ValidationInfo) -> int:
        minzoom = info.data.get("minzoom")
        if minzoom is not None and not 0 <= minzoom <= maxzoom <= MAX_ZOOM:
            raise invalid(
                f"need 0 <= minzoom <= maxzoom <= {MAX_ZOOM}, got minzoom={minzoom}, "
                f"maxzoom={maxzoom}"
            )
        return maxzoom

    def render(self) -> dict[str, Any]:
        """The upstream fields this layer adds to every tile request, as set in the file."""
        values = {key: getattr(self, key) for key in RENDER_PARAMS[self.kind]}
        return {key: value for key, value in values.items() if value is not None}

    def to_layer(self) -> Layer:
        """The validated :class:`~gateway.layers.Layer` (with its cache-key fingerprint)."""
        kind = self.kind
        render = self.render()
        height = getattr(self, "nodata_height_m", None)
        return Layer(
            name=self.name,
            title=self.name if self.title is None else self.title,
            kind=kind,
            url=self.url,
            render=MappingProxyType(render),
            minzoom=self.minzoom,
            maxzoom=self.maxzoom,
            bounds=self.bounds,
            formats=self.formats,
            ttl_s=self.ttl_s,
            stale_while_revalidate_s=self.stale_while_revalidate_s,
            stale_if_error_s=self.stale_if_error_s,
            attribution=self.attribution,
            public=self.public,
            # the gateway writes the no-data height into terrain tiles: part of what is cached
            fingerprint=layer_fingerprint(kind, self.url, render, height),
            nodata_height_m=height or 0.0,
        )


class RasterLayerTable(_LayerTable):
    """``kind = "raster"`` (the default): ``cog.tile.render`` with the render parameters of
    the COG & tiles operations (seeds ``003``)."""

    kind: Literal["raster"] = "raster"
    formats: Formats = ("png", "jpg", "webp")
    bands: Str | None = None
    expression: Str | None = None
    rescale: Str | None = None
    colormap: Str | None = None
    quality: Annotated[Int, annotated_types.Ge(1), annotated_types.Le(100)] | None = None

    @field_validator("expression")
    @classmethod
    def _bands_or_expression(cls, expression: str | None, info: ValidationInfo) -> str | None:
        if expression is not None and info.data.get("bands") is not None:
            raise invalid("set either bands or expression, not both")
        return expression


class TerrainLayerTable(_LayerTable):
    """``kind = "terrain"``: ``cog.tile.terrain`` (Terrain-RGB PNG tiles, seeds ``003``)."""

    kind: Literal["terrain"]
    formats: Annotated[Formats, AfterValidator(_terrain_formats)] = ("png",)
    invert: Bool | None = None
    nodata_height_m: Annotated[Float, AfterValidator(_terrain_height)] = 0.0
    """The height, metres, the gateway gives pixels without data (never sent upstream)."""


def _kind(table: object) -> object:
    """The discriminator: a table's ``kind`` (``raster`` when absent)."""
    return table.get("kind", "raster") if isinstance(table, dict) else None


LayerTable = Annotated[
    Annotated[RasterLayerTable, Tag("raster")] | Annotated[TerrainLayerTable, Tag("terrain")],
    Discriminator(_kind),
]
"""One ``[[layers]]`` table, validated by the model of its ``kind``."""


def layer_map(
    tables: Sequence[RasterLayerTable | TerrainLayerTable],
) -> tuple[dict[str, Layer], str | None]:
    """The layers by name, and the default layer's name (the one with ``default = true``, or
    the only layer, or None).

    Raises:
        PydanticCustomError: (from :func:`~gateway.config.tables.invalid`) no layers, a
            reserved or duplicate name, or more than one default.
    """
    layers: dict[str, Layer] = {}
    defaults: list[str] = []
    for index, table in enumerate(tables):
        key = f"layers[{index}].name"
        if table.name in RESERVED_NAMES:
            raise invalid(
                f"{table.name!r} is reserved (/tiles/{table.name}/ serves clip layers)", key
            )
        if table.name in layers:
            raise invalid(f"duplicate layer name {table.name!r}", key)
        layers[table.name] = table.to_layer()
        if table.default:
            defaults.append(table.name)
    if not layers:
        raise invalid(
            "no layers; add at least one [[layers]] table with name, kind and url", "layers"
        )
    if len(defaults) > 1:
        raise invalid(
            f"more than one layer has default = true ({', '.join(defaults)}); keep one", "layers"
        )
    default = defaults[0] if defaults else (next(iter(layers)) if len(layers) == 1 else None)
    return layers, default
