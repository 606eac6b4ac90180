"""Pulling a clip file from another replica of the fleet (cross-replica single-flight of
downloads, :class:`~gateway.storage.coalesce.FleetFiles`).

Each replica serves its own stored files, and the transfers it is running, to the others on
``GET /fleet/downloads/{job_id}/{mosaic_type}`` (:mod:`gateway.routes.downloads`). A replica
that needs a file another one has opens that route with :meth:`PeerClient.stream`, which
has the shape of an upstream download (headers, then body chunks), so the file goes through
the very same transfer protocol as one from the upstream
(:meth:`~gateway.services.transfers.Transfer.receive`: checked, hashed, size verified,
committed; the last byte held back from readers until then).

The replicas authenticate each other with a token derived from the Geopera key they share
(:func:`gateway.secrets.derived`), so there is no second secret to hand out; the peer route
never calls the upstream, and sends nothing to a request without that token.
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import AsyncIterator, Mapping
from urllib.parse import quote, urlsplit

import aiohttp

from gateway import metrics
from gateway.errors import TransferBroken
from gateway.secrets import Secret, derived

PEER_PATH = "/fleet/downloads"
"""Where a replica serves its files to the others: ``PEER_PATH/{job_id}/{mosaic_type}``."""

PEER_PURPOSE = "geopera-gateway fleet peer v1"
"""What the peer token is derived for (:func:`peer_token`)."""

CONNECT_TIMEOUT_S = 2.0
"""How long connecting to another replica may take, seconds."""

CHUNK_BYTES = 1 << 20
"""Largest body chunk read from another replica at once, bytes."""


def peer_token(api_key: Secret) -> Secret:
    """The token replicas present to each other: derived from the Geopera key, so every
    replica with the same key has it and nobody without the key can compute it."""
    return derived(api_key, PEER_PURPOSE)


class PeerUnavailable(Exception):
    """Another replica did not start sending a file: it does not have it (``gone``: 404),
    refused this replica's token (``refused``: replicas with different Geopera keys), or
    could not be reached (``unreachable``). Nothing was received, so the transfer may try
    another source.

    Attributes:
        reason: ``gone``, ``refused``, ``unreachable`` or ``failed`` (another status).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"the other replica did not send the file ({reason})")
        self.reason = reason


class PeerClient:
    """The HTTP client one replica uses to pull clip files from the others.

    Args:
        token: the peer token (:func:`peer_token`).
        read_timeout_s: longest silence while a file streams in, seconds (longer than the
            upstream's read timeout: the sending replica may itself be waiting on the
            upstream).
    """

    def __init__(self, token: Secret, read_timeout_s: float) -> None:
        self._token = token
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=CONNECT_TIMEOUT_S, sock_read=read_timeout_s
        )
        self._session: aiohttp.ClientSession | None = None

    def accepts(self, presented: str | None) -> bool:
        """Whether ``presented`` (a request's bearer token) is the fleet's peer token
        (compared in constant time)."""
        if not presented:
            return False
        return hmac.compare_digest(presented.encode(), self._token.reveal().encode())

    async def aclose(self) -> None:
        """Close the connection pool."""
        if self._session is not None:
            await self._session.close()

    @contextlib.asynccontextmanager
    async def stream(
        self, peer_url: str, job_id: str, mosaic_type: str
    ) -> AsyncIterator[tuple[Mapping[str, str], AsyncIterator[bytes]]]:
        """The file ``job_id``/``mosaic_type`` from the replica at ``peer_url``: its response
        headers and an iterator over its body, like an upstream download
        (:data:`~gateway.services.transfers.Stream`).

        Raises:
            PeerUnavailable: before any byte: the replica has no such file, refused the token,
                or cannot be reached (or ``peer_url`` is not an http(s) URL).
            TransferBroken: while iterating: the replica stopped sending before the end.
        """
        if urlsplit(peer_url).scheme not in ("http", "https"):
            raise PeerUnavailable("unreachable")
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, auto_decompress=False)
        url = f"{peer_url}{PEER_PATH}/{quote(job_id, safe='')}/{quote(mosaic_type, safe='')}"
        headers = {"Authorization": f"Bearer {self._token.reveal()}"}
        try:
            response = await self._session.get(url, headers=headers, allow_redirects=False)
        except (aiohttp.ClientError, OSError, TimeoutError):
            metrics.PEER_PULLS.labels("unreachable").inc()
            raise PeerUnavailable("unreachable") from None
        try:
            if response.status != 200:
                reason = {404: "gone", 401: "refused", 403: "refused"}.get(response.status)
                metrics.PEER_PULLS.labels(reason or "failed").inc()
                raise PeerUnavailable(reason or "failed")
            yield response.headers, _body(response)
        finally:
            response.close()


async def _body(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The body's chunks; a cut or silent connection as :class:`TransferBroken`."""
    try:
        async for chunk in response.content.iter_chunked(CHUNK_BYTES):
            yield chunk
    except (aiohttp.ClientError, OSError, TimeoutError):
        metrics.PEER_PULLS.labels("broken").inc()
        raise TransferBroken("the replica sending this file stopped before its end") from None
    metrics.PEER_PULLS.labels("ok").inc()
