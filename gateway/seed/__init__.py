"""Bulk cache operations: seeding a layer's tiles ahead of map users, exporting them to an
MBTiles file for offline use, and purging them.

- :mod:`gateway.seed.area`: ``W,S,E,N`` boxes and ``A-B`` zoom ranges, parsed and validated;
- :mod:`gateway.seed.plan`: the tiles one seed walks, in a fixed order (resumable by index);
- :mod:`gateway.seed.purge`: removing a layer's cached tiles, all or by box and zoom;
- :mod:`gateway.seed.runner`: fetching a plan through the gateway's own tile path at seeding
  priority, with retries, interruption and a resume state file;
- :mod:`gateway.seed.estimate`: the dry run (tile count, egress estimate);
- :mod:`gateway.seed.export`: writing a plan's tiles into an MBTiles 1.3 file;
- :mod:`gateway.cli.seed`: the ``seed``, ``export`` and ``purge`` subcommands.

Nothing here imports :mod:`gateway.app` at import time except the runner and the commands,
so the admin routes can use :mod:`area` and :mod:`purge` without an import cycle.
"""
