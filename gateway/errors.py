"""The gateway's domain errors: every failure a service raises, in one tree.

Services (tiles, downloads, seeding) and the upstream layer raise only these; they never
build an HTTP answer. The HTTP edge maps each class to its problem+json in one table,
:data:`gateway.http.problem.ERROR_TABLE`, and the seeder decides what to retry from the classes
alone. The tree::

    GatewayError                    base; ``subject`` names what was asked for, for messages
    ├── UpstreamError               an upstream call failed (``operation``, ``status``,
    │   │                           ``problem_type``: the RFC 9457 ``type`` of its answer)
    │   ├── UpstreamUnavailable     no answer: refused, reset, DNS, protocol error
    │   ├── UpstreamTimeout         the connect or read timeout expired
    │   ├── UpstreamAuthError       401, or 403 for the key's scope: the operator must act
    │   ├── UpstreamForbidden       403 on a thing the key's organisation does not own (a job)
    │   ├── UpstreamPaymentRequired 402: subscription past due or quota spent (organisation-wide)
    │   ├── UpstreamNotFound        404 (``source_unknown``: the type says the COG is unknown)
    │   ├── UpstreamRateLimited     429 (``retry_after_s``, ``scope``: asset, operation,
    │   │                           organisation)
    │   ├── UpstreamRejected        any other 4xx: the request as sent was refused
    │   ├── UpstreamServerError     5xx
    │   └── UpstreamBadResponse     a 2xx that is not what the operation promises (type, size,
    │                               content: an undecodable tile, a JSON "download")
    ├── HeldBack                    the gateway made no call: it is holding its own traffic back
    │   ├── LimitExceeded           a token bucket, the concurrency cap or the budget (``scope``)
    │   └── BreakerOpen             a circuit breaker is open (``scope``: asset, operation or
    │                               the whole organisation)
    ├── JobError                    a clip job cannot serve the request (``job_id``)
    │   ├── JobNotFound             no such job, or no such mosaic type in it
    │   ├── JobForbidden            the job belongs to another organisation
    │   ├── ProjectForbidden        the job's project is not one the client's token may reach
    │   ├── NoTileLayer             the job's file has no tile rendering parameters
    │   ├── JobNotCompleted         not completed yet (``job_status``): ask again later
    │   └── JobFailed               ended ``failed`` (``reason``): final, never completes
    └── TransferFailed              a download could not be completed here (the store)
        ├── StoreUnavailable        the download store has no room or cannot write its index
        │                           (``retry_after_s``)
        └── TransferBroken          a transfer broke off before its file was stored (its
                                    readers' connections are cut)

Status meanings follow the Geopera docs (seeds ``004`` "Python recipes", error handling: 401
token missing or expired, 403 missing scope, 409 idempotency conflict, 422 validation, 429
back off; seeds ``002`` "Managing data": 402 subscription past due; seeds ``001`` "Clipping":
403 cross-organisation access, 400 before a job is completed, 402 quota).

No message holds the API key: :class:`UpstreamError` passes its text through
:func:`gateway.secrets.redact`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.secrets import redact

if TYPE_CHECKING:
    from gateway.upstream.breakers import Scope


class GatewayError(Exception):
    """Base of every domain error.

    Attributes:
        subject: what the failed request was for, for the client's ``detail`` (e.g. "tiles
            of layer 'olinda'"); set by the service that knows it, None until then.
    """

    subject: str | None = None

    def about(self, subject: str) -> GatewayError:
        """Set :attr:`subject` and return ``self`` (for ``raise exc.about(...)``)."""
        self.subject = subject
        return self


class UpstreamError(GatewayError):
    """An upstream call failed.

    Attributes:
        operation: the Geopera operation id.
        status: the upstream HTTP status, or None when no answer arrived.
        problem_type: the ``type`` member of the upstream's problem+json answer, or None.
    """

    def __init__(
        self,
        operation: str,
        message: str,
        status: int | None = None,
        problem_type: str | None = None,
    ) -> None:
        super().__init__(redact(f"{operation}: {message}"))
        self.operation, self.status, self.problem_type = operation, status, problem_type


class UpstreamUnavailable(UpstreamError):
    """No answer: connection refused, reset, DNS failure, protocol error."""


class UpstreamTimeout(UpstreamError):
    """The connect or read timeout expired."""


class UpstreamAuthError(UpstreamError):
    """401 (key missing, malformed or expired) or 403 (the key lacks the operation's scope):
    the gateway's credentials are at fault, and the operator is alerted."""


class UpstreamForbidden(UpstreamError):
    """403 for a thing the key's organisation may not reach (a clip job of another
    organisation: seeds ``001``, "Cross-org access → 403"); the credentials are fine."""


class UpstreamPaymentRequired(UpstreamError):
    """402: the organisation's subscription is past due or its quota is spent (seeds ``002``,
    ``001``). Every operation is paused; ``retry_after_s`` is how long, seconds."""

    retry_after_s: float = 0.0


UpstreamQuotaExceeded = UpstreamPaymentRequired
"""The former name of :class:`UpstreamPaymentRequired`."""


class UpstreamNotFound(UpstreamError):
    """404: the operation or the thing it names does not exist.

    Attributes:
        source_unknown: the problem ``type`` is one configured as "this COG is unknown"
            (``upstream.source_unknown_types``), not merely "no data here".
    """

    def __init__(
        self,
        operation: str,
        message: str,
        status: int | None = 404,
        problem_type: str | None = None,
        source_unknown: bool = False,
    ) -> None:
        super().__init__(operation, message, status, problem_type)
        self.source_unknown = source_unknown


class UpstreamRateLimited(UpstreamError):
    """429: throttled.

    Attributes:
        retry_after_s: how long to hold off, seconds (the ``Retry-After`` header).
        scope: what the throttle covers, from the problem ``type`` through
            ``upstream.throttle_scopes``: ``asset``, ``operation`` or ``organisation``; a type
            the gateway does not know is ``operation``.
    """

    def __init__(
        self,
        operation: str,
        message: str,
        retry_after_s: float,
        problem_type: str | None = None,
        scope: str = "operation",
    ) -> None:
        super().__init__(operation, message, 429, problem_type)
        self.retry_after_s, self.scope = retry_after_s, scope


class UpstreamRejected(UpstreamError):
    """Another 4xx (400, 409, 422...): the upstream refused the request as sent."""


class UpstreamServerError(UpstreamError):
    """5xx from the upstream."""


class UpstreamBadResponse(UpstreamError):
    """A 2xx answer that is not what the operation promises (type, size, content)."""


class HeldBack(GatewayError):
    """The gateway did not call the upstream: one of its own protections held the call.

    Attributes:
        retry_after_s: seconds after which trying again may succeed.
    """

    retry_after_s: float


class LimitExceeded(HeldBack):
    """The upstream limiter refused a call: waiting would take longer than allowed.

    Attributes:
        scope: which limit (``operation``, ``asset``, ``bytes``, ``concurrency``, ``budget``).
        retry_after_s: seconds after which trying again may succeed.
    """

    def __init__(self, scope: str, retry_after_s: float, message: str) -> None:
        super().__init__(message)
        self.scope, self.retry_after_s = scope, retry_after_s


class BreakerOpen(HeldBack):
    """No call may go upstream for ``scope`` (a :class:`gateway.upstream.breakers.Scope`) now; try
    again after ``retry_after_s`` seconds."""

    def __init__(self, scope: Scope, retry_after_s: float) -> None:
        super().__init__(f"circuit open for {scope.kind} of {scope.operation}")
        self.scope, self.retry_after_s = scope, retry_after_s


class JobError(GatewayError):
    """A clip job cannot serve this request. ``job_id`` is the job's UUID."""

    def __init__(self, job_id: str, message: str) -> None:
        super().__init__(message)
        self.job_id = job_id


class JobNotFound(JobError):
    """The upstream knows no such job, or the job has no file of that mosaic type."""


class JobForbidden(JobError):
    """The job belongs to another organisation (upstream 403 on a clip operation)."""


class ProjectForbidden(JobError):
    """The job belongs to a project outside the client token's ``projects`` (or to none
    the upstream names)."""


class NoTileLayer(JobError):
    """The job (completed) has no tile rendering parameters for that mosaic type: the
    upstream's ``clip.job.tile_info`` lists none for it (a file that is not imagery)."""


class JobNotCompleted(JobError):
    """The job is not completed yet. ``job_status`` is what ``clip.job.get`` said
    (``running``, ``queued``...); asking again later may succeed."""

    def __init__(self, job_id: str, job_status: str) -> None:
        super().__init__(job_id, f"the clip job is {job_status}")
        self.job_status = job_status


class JobFailed(JobError):
    """The job ended ``failed`` (or ``cancelled``): final, its files will never exist.

    Attributes:
        job_status: the final status.
        reason: the upstream's reason, cleaned for a client (redacted, printable, at most
            :data:`gateway.services.downloads.MAX_REASON_CHARS` characters).
    """

    def __init__(self, job_id: str, job_status: str, reason: str) -> None:
        super().__init__(job_id, f"the clip job {job_status}: {reason}")
        self.job_status, self.reason = job_status, reason


class TransferFailed(GatewayError):
    """A download could not be completed on this side (the store failed, or the gateway is
    shutting down); nothing was stored."""


class StoreUnavailable(TransferFailed):
    """The download store cannot take a file: its disk is full (or has no room for the
    file's size), or its index cannot be written. Nothing was stored; the text names no
    path or secret.

    Attributes:
        retry_after_s: when to ask again, seconds.
    """

    retry_after_s: float = 60.0


class TransferBroken(TransferFailed):
    """The transfer of a file broke off or failed before the file was stored.

    Raised by :class:`~gateway.services.transfers.TransferReader` after it has yielded
    every byte it may (never the file's last one); the HTTP edge then cuts the connection,
    so the client sees a short body it can resume (``curl -C -``), never a whole-looking
    file. Raised by :meth:`~gateway.services.transfers.Transfer.stored_file` (and when a
    reader joins a transfer whose file is gone) before anything was sent: answered as a
    :class:`TransferFailed`, 502 ``upstream-error``.
    """
