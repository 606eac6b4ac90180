"""What map clients read before asking for tiles: TileJSON 3.0.0 and the ``/layers``
summary (:mod:`.tilejson`), OGC WMTS 1.0.0 capabilities (:mod:`.wmts`). Builders from
layers and a base URL; no HTTP.

May import: the leaves and ``config``.
"""
