"""The one exception hierarchy of the memory service.

Every failure a caller can act on is one of these classes. The gRPC layer maps each class to one status
code (wire/convert.py) and the client maps the code back to the same class, so `LocalMemory` and
`MemoryClient` raise identical exceptions. Messages say what was received and what was expected.

Where a caller's control flow depends on which failure it is, within one status code, a subclass names it
with a `reason` (REFINED_ERRORS): it travels beside the status code as the trailing metadata entry
`memflow-error-reason` (convert.ERROR_REASON_KEY), so code branches on a class, never on message text. A
client that does not know the reason still gets the status code and the message.
"""

from __future__ import annotations


class MemFlowError(Exception):
    """Base class; `code` names the gRPC status code the error travels as."""

    code = "UNKNOWN"
    reason = ""  # set by the refinements in REFINED_ERRORS


class InvalidArgument(MemFlowError, ValueError):
    """Bad shapes, dims, dtypes, NaN/inf vectors, k, unknown key space or policy."""

    code = "INVALID_ARGUMENT"


class NotFound(MemFlowError, KeyError):
    """Unknown stream or entry."""

    code = "NOT_FOUND"

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class AlreadyExists(MemFlowError):
    """A stream with that name exists."""

    code = "ALREADY_EXISTS"


class ResourceExhausted(MemFlowError):
    """Budget, disk, map size or message size limits."""

    code = "RESOURCE_EXHAUSTED"


class Unauthenticated(MemFlowError):
    """No token or a wrong token."""

    code = "UNAUTHENTICATED"


class PermissionDenied(MemFlowError):
    """The stream belongs to another tenant."""

    code = "PERMISSION_DENIED"


class Unavailable(MemFlowError):
    """The service is shutting down or cannot be reached."""

    code = "UNAVAILABLE"


class DeadlineExceeded(MemFlowError):
    """The call ran past its deadline."""

    code = "DEADLINE_EXCEEDED"


class FailedPrecondition(MemFlowError):
    """The system is not in a state the call needs (e.g. shared memory the service cannot see)."""

    code = "FAILED_PRECONDITION"


class ArenaNotRegistered(FailedPrecondition):
    """A data-plane call named an arena the service does not hold (released, or the service restarted): the
    client registers the same segment again and retries."""

    reason = "ARENA_NOT_REGISTERED"


class StaleLayout(FailedPrecondition):
    """A shared-memory fetch reserved fewer bytes than the stream's K/V layout needs: the client sized it by a
    layout the stream no longer has (dropped and created anew); it reloads the layout and retries."""

    reason = "STALE_LAYOUT"


class NotOwner(FailedPrecondition):
    """Cluster mode: this node does not own the stream. `owner` is the owning node's address ("host:port"), or
    "" while no node owns it (its owner's lease is expiring): the client sends the call there, or retries."""

    reason = "NOT_OWNER"

    def __init__(self, message: str = "", owner: str = "") -> None:
        super().__init__(message)
        self.owner = owner


class DataLoss(MemFlowError):
    """Stored bytes fail their checksum: the record is corrupt."""

    code = "DATA_LOSS"


ALL_ERRORS: tuple[type[MemFlowError], ...] = (
    InvalidArgument,
    NotFound,
    AlreadyExists,
    ResourceExhausted,
    Unauthenticated,
    PermissionDenied,
    Unavailable,
    DeadlineExceeded,
    FailedPrecondition,
    DataLoss,
)

REFINED_ERRORS: tuple[type[MemFlowError], ...] = (ArenaNotRegistered, StaleLayout, NotOwner)
"""Subclasses that travel as their parent's status code plus a reason (see the module doc)."""
