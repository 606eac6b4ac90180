"""OGC WMTS 1.0.0 RESTful capabilities (OGC 07-057r7) for the layers, with the
``WebMercatorQuad`` tile matrix set (OGC 17-083r4: the XYZ grid), built from layers (no HTTP).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable

import mercantile

from gateway.layers import MEDIA_TYPES, WEB_MERCATOR_MAX_LAT, Layer

WMTS_NS = "http://www.opengis.net/wmts/1.0"
OWS_NS = "http://www.opengis.net/ows/1.1"
XLINK_NS = "http://www.w3.org/1999/xlink"
ET.register_namespace("", WMTS_NS)  # WMTS elements unprefixed (ET's default_namespace
ET.register_namespace("ows", OWS_NS)  # option refuses the unqualified attributes WMTS uses)
ET.register_namespace("xlink", XLINK_NS)

TILE_MATRIX_SET = "WebMercatorQuad"
"""OGC Two Dimensional Tile Matrix Set and Tile Set Metadata standard (OGC 17-083r4),
Annex D.1 "Web Mercator Quad" (``http://www.opengis.net/def/tilematrixset/OGC/1.0/
WebMercatorQuad``; JSON in opengeospatial/2D-Tile-Matrix-Set registry/json/WebMercatorQuad.json).
The numbers below are that table's: EPSG:3857, 256 x 256 px tiles, 2^z x 2^z tiles at level
z, point of origin (top left) at (-20037508.3427892, 20037508.3427892) m, scale denominator
559082264.0287178 at level 0 (cell size 156543.0339280410 m / the standard 0.28 mm pixel),
halved at each level. The same grid as XYZ tiles, rows counted from the north."""
WEB_MERCATOR_CRS = "urn:ogc:def:crs:EPSG::3857"
GOOGLE_MAPS_COMPATIBLE = "urn:ogc:def:wkss:OGC:1.0:GoogleMapsCompatible"
TOP_LEFT_CORNER = "-20037508.3427892 20037508.3427892"
SCALE_DENOMINATOR_Z0 = 559082264.0287178
TILE_SIZE = 256

CAPABILITIES_PATH = "/wmts/1.0.0/WMTSCapabilities.xml"


def _el(
    parent: ET.Element, ns: str, tag: str, text: str | None = None, **attrib: str
) -> ET.Element:
    element = ET.SubElement(parent, f"{{{ns}}}{tag}", attrib)
    if text is not None:
        element.text = text
    return element


def _tile_limits(layer: Layer, z: int) -> tuple[int, int, int, int]:
    """``(min_row, max_row, min_col, max_col)`` of the tiles at ``z`` covering the bounds."""
    west, south, east, north = layer.bounds
    south = max(south, -WEB_MERCATOR_MAX_LAT)
    north = min(north, WEB_MERCATOR_MAX_LAT)
    last = (1 << z) - 1
    top_left = mercantile.tile(west, north, z)
    # nudge inwards so an east/south edge on a tile boundary does not add a tile row/column
    bottom_right = mercantile.tile(max(west, east - 1e-9), min(north, south + 1e-9), z)

    def clamp(v: int) -> int:
        return min(max(v, 0), last)

    return clamp(top_left.y), clamp(bottom_right.y), clamp(top_left.x), clamp(bottom_right.x)


def _wmts_layer(contents: ET.Element, base: str, layer: Layer, query: str) -> None:
    node = _el(contents, WMTS_NS, "Layer")
    _el(node, OWS_NS, "Title", layer.title)
    if layer.attribution:
        _el(node, OWS_NS, "Abstract", layer.attribution)
    west, south, east, north = layer.bounds
    box = _el(node, OWS_NS, "WGS84BoundingBox", crs="urn:ogc:def:crs:OGC:2:84")
    _el(box, OWS_NS, "LowerCorner", f"{west!r} {south!r}")
    _el(box, OWS_NS, "UpperCorner", f"{east!r} {north!r}")
    _el(node, OWS_NS, "Identifier", layer.name)
    style = _el(node, WMTS_NS, "Style", isDefault="true")
    _el(style, OWS_NS, "Identifier", "default")
    for fmt in layer.formats:
        _el(node, WMTS_NS, "Format", MEDIA_TYPES[fmt])
    link = _el(node, WMTS_NS, "TileMatrixSetLink")
    _el(link, WMTS_NS, "TileMatrixSet", TILE_MATRIX_SET)
    limits = _el(link, WMTS_NS, "TileMatrixSetLimits")
    for z in range(layer.minzoom, layer.maxzoom + 1):
        min_row, max_row, min_col, max_col = _tile_limits(layer, z)
        tml = _el(limits, WMTS_NS, "TileMatrixLimits")
        _el(tml, WMTS_NS, "TileMatrix", str(z))
        _el(tml, WMTS_NS, "MinTileRow", str(min_row))
        _el(tml, WMTS_NS, "MaxTileRow", str(max_row))
        _el(tml, WMTS_NS, "MinTileCol", str(min_col))
        _el(tml, WMTS_NS, "MaxTileCol", str(max_col))
    for fmt in layer.formats:
        template = f"{base}/tiles/{layer.name}/{{TileMatrix}}/{{TileCol}}/{{TileRow}}.{fmt}"
        _el(
            node,
            WMTS_NS,
            "ResourceURL",
            format=MEDIA_TYPES[fmt],
            resourceType="tile",
            template=template + query,
        )


def _tile_matrix_set(contents: ET.Element, maxzoom: int) -> None:
    tms = _el(contents, WMTS_NS, "TileMatrixSet")
    _el(tms, OWS_NS, "Title", "Google Maps Compatible for the World")
    _el(tms, OWS_NS, "Identifier", TILE_MATRIX_SET)
    _el(tms, OWS_NS, "SupportedCRS", WEB_MERCATOR_CRS)
    _el(tms, WMTS_NS, "WellKnownScaleSet", GOOGLE_MAPS_COMPATIBLE)
    for z in range(maxzoom + 1):
        matrix = _el(tms, WMTS_NS, "TileMatrix")
        _el(matrix, OWS_NS, "Identifier", str(z))
        _el(matrix, WMTS_NS, "ScaleDenominator", repr(SCALE_DENOMINATOR_Z0 / (1 << z)))
        _el(matrix, WMTS_NS, "TopLeftCorner", TOP_LEFT_CORNER)
        _el(matrix, WMTS_NS, "TileWidth", str(TILE_SIZE))
        _el(matrix, WMTS_NS, "TileHeight", str(TILE_SIZE))
        _el(matrix, WMTS_NS, "MatrixWidth", str(1 << z))
        _el(matrix, WMTS_NS, "MatrixHeight", str(1 << z))


def wmts_document(base: str, layers: Iterable[Layer], query: str = "") -> bytes:
    """OGC WMTS 1.0.0 (OGC 07-057r7) capabilities, RESTful encoding only, as UTF-8 XML.

    One ``Layer`` per layer (``ows:Identifier`` = its name; one ``Format`` and one tile
    ``ResourceURL`` template ``{base}/tiles/{name}/{TileMatrix}/{TileCol}/{TileRow}.{ext}``
    per format; ``TileMatrixSetLimits`` over the layer's zoom range and bounds), and one
    ``TileMatrixSet`` :data:`TILE_MATRIX_SET` with levels 0 to the largest ``maxzoom``.
    ``query`` (``?token=...``) is appended to every template.
    """
    layers = list(layers)
    root = ET.Element(f"{{{WMTS_NS}}}Capabilities", {"version": "1.0.0"})
    ident = _el(root, OWS_NS, "ServiceIdentification")
    _el(ident, OWS_NS, "Title", "geopera-gateway")
    _el(ident, OWS_NS, "Abstract", "Geopera imagery as cached Web Mercator tiles.")
    _el(ident, OWS_NS, "ServiceType", "OGC WMTS")
    _el(ident, OWS_NS, "ServiceTypeVersion", "1.0.0")
    contents = _el(root, WMTS_NS, "Contents")
    for layer in layers:
        _wmts_layer(contents, base, layer, query)
    _tile_matrix_set(contents, max((layer.maxzoom for layer in layers), default=0))
    _el(root, WMTS_NS, "ServiceMetadataURL", **{f"{{{XLINK_NS}}}href": base + CAPABILITIES_PATH})
    ET.indent(root)
    document: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return document


# --- HTTP ---------------------------------------------------------------------------------
