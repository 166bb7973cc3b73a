"""The one exception hierarchy of the memory service.

Every failure a caller can act on is one of these classes. The gRPC layer maps each class to one status
code (service/convert.py) and the client maps the code back to the same class, so `LocalMemory` and
`MemoryClient` raise identical exceptions. Messages say what was received and what was expected.
"""

from __future__ import annotations


class MemFlowError(Exception):
    """Base class; `code` names the gRPC status code the error travels as."""

    code = "UNKNOWN"


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
