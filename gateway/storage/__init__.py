"""Storage on this host: the tile cache, the download store, the one cross-process claim
both use, and in-process single-flight.

May import: the leaves only. Knows nothing of HTTP, the upstream or the config file.
"""
