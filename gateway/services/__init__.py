"""Services: what a request means, decided without HTTP. Tiles (cache policy, coalescing,
stale serving), downloads (one streamed transfer per file, shared by its readers), the start-up
source check, and the wiring of the tile path (:mod:`.stack`). Services raise domain errors
(:mod:`gateway.errors`); only the HTTP edge turns them into answers.

May import: the leaves, ``config``, ``storage``, ``upstream``.
"""
