"""Typed errors with Function Compute error codes.

Every error the system raises on purpose derives from `TaskmodeError` and carries the FC `Code`
and HTTP status it maps to, so the gateway can translate it at the edge without a lookup table
and consumers can decide ack/nak/term from its type.
"""

from __future__ import annotations


class TaskmodeError(Exception):
    """Root of every deliberate error; `code` and `http_status` follow FC 3.0.

    Each subclass sets both as class attributes; they are not ClassVars only so that an error
    reported by code from another service (the gateway's `ReportedError`) can set them per instance.
    """

    code: str = "InternalServerError"
    http_status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(TaskmodeError):
    code = "InvalidArgument"
    http_status = 400


class MissingRequiredHeader(InvalidArgument):
    code = "MissingRequiredHeader"


class EntityTooLarge(TaskmodeError):
    code = "EntityTooLarge"
    http_status = 400


class InvalidNextToken(InvalidArgument):
    code = "InvalidNextToken"


class PathNotSupported(TaskmodeError):
    code = "PathNotSupported"
    http_status = 404


class AccessDenied(TaskmodeError):
    code = "AccessDenied"
    http_status = 403


class InvalidAccessKeyID(AccessDenied):
    code = "InvalidAccessKeyID"


class SignatureNotMatch(AccessDenied):
    code = "SignatureNotMatch"


class RequestTimeTooSkewed(AccessDenied):
    code = "RequestTimeTooSkewed"


class SignatureNonceUsed(AccessDenied):
    """A signed request arrived again (a replay): each nonce is accepted once."""

    code = "SignatureNonceUsed"


class FunctionNotFound(TaskmodeError):
    code = "FunctionNotFound"
    http_status = 404


class AsyncConfigNotFound(TaskmodeError):
    code = "AsyncConfigNotFound"
    http_status = 404


class VersionNotFound(TaskmodeError):
    code = "VersionNotFound"
    http_status = 404


class AliasNotFound(TaskmodeError):
    code = "AliasNotFound"
    http_status = 404


class AliasAlreadyExists(TaskmodeError):
    code = "AliasAlreadyExists"
    http_status = 409


class VersionInUse(TaskmodeError):
    """A version an alias routes to cannot be deleted."""

    code = "VersionInUse"
    http_status = 409


class AsyncTaskNotFound(TaskmodeError):
    code = "AsyncTaskNotFound"
    http_status = 404


class ConcurrencyConfigNotFound(TaskmodeError):
    code = "ConcurrencyConfigNotFound"
    http_status = 404


class ScalingConfigNotFound(TaskmodeError):
    code = "ScalingConfigNotFound"
    http_status = 404


class FunctionDisabled(TaskmodeError):
    """A synchronous call of a function whose invocations are disabled (DisableFunctionInvocation)."""

    code = "FunctionDisabled"
    http_status = 403


class ResourceExhausted(TaskmodeError):
    """A synchronous call of a function whose reservedConcurrency is 0 (FC: throttled, 429)."""

    code = "ResourceExhausted"
    http_status = 429


class FunctionAlreadyExists(TaskmodeError):
    code = "FunctionAlreadyExists"
    http_status = 409


class TaskAlreadyExists(TaskmodeError):
    """A task id was reused for the same function within the retention period."""

    code = "TaskAlreadyExists"
    http_status = 409

    def __init__(self, message: str, *, existing_task_id: str) -> None:
        super().__init__(message)
        self.existing_task_id = existing_task_id


class TaskAlreadyFinished(TaskmodeError):
    """A stop was asked of a task that already reached a terminal status."""

    code = "TaskAlreadyFinished"
    http_status = 409


class ConcurrentUpdateError(TaskmodeError):
    """Another writer appended to the task's stream first (optimistic concurrency lost)."""

    code = "ConcurrentUpdateError"
    http_status = 409


class TransitionNotAllowed(TaskmodeError):
    """An event would move a task along an edge the transition table does not have."""

    code = "TransitionNotAllowed"
    http_status = 409


class VersionGap(TaskmodeError):
    """An event's version is not the next one for its task."""

    code = "VersionGap"
    http_status = 500


class ServiceUnavailable(TaskmodeError):
    code = "ServiceUnavailable"
    http_status = 503


class TriggerNotFound(TaskmodeError):
    code = "TriggerNotFound"
    http_status = 404


class TriggerAlreadyExists(TaskmodeError):
    code = "TriggerAlreadyExists"
    http_status = 409
