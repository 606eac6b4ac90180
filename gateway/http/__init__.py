"""The HTTP edge: everything that knows an aiohttp request.

Middleware and common headers, client tokens (auth), CORS, request validation, the caller's
address and rate limit, absolute URLs, problem+json and THE table that turns each domain
error into one (:data:`gateway.http.problem.ERROR_TABLE`), the app keys, and the aiohttp
server that answers unparsable requests.

May import: the leaves (``gateway.errors``, ``layers``, ``logs``, ``metrics``, ``secrets``),
``config``, ``storage``, ``upstream``, ``services``, ``discovery``. Never ``routes``, ``app``
or ``cli``.
"""
