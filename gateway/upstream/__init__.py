"""The upstream: the Geopera client, the guard every call passes, circuit breakers, token
buckets, the concurrency cap, the egress budget, operator alerts, and the shared state they
keep (one host's diskcache).

May import: the leaves and ``config``. Raises only domain errors (:mod:`gateway.errors`).
"""
