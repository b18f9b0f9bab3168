"""API errors, one class per canonical gRPC status code, and their google.rpc details.

Use cases raise these; `imagetraining.rpc.ErrorInterceptor` turns them into a `google.rpc.Status`
with `BadRequest` / `PreconditionFailure` / `ErrorInfo` / `RetryInfo` details. Nothing else in the code picks a
status code, so the mapping stays consistent across RPCs and services.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

ERROR_DOMAIN = "imagetraining.v1"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


@dataclass(frozen=True)
class PreconditionViolation:
    type: str  # "STATE", "SELECTION", "OWNER", ...
    subject: str  # e.g. "sessions/19"
    description: str


class ApiError(Exception):
    """Base of every error that reaches a client with a chosen status code."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(self, message: str, *, metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = dict(metadata or {})

    def details(self) -> list[any_pb2.Any]:
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata)
        packed = any_pb2.Any()
        packed.Pack(info)
        return [packed]

    def to_status(self) -> status_pb2.Status:
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=self.details())


class InvalidArgument(ApiError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, message: str, violations: Sequence[FieldViolation] = (), **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.violations = list(violations)

    @classmethod
    def field(cls, field: str, description: str) -> InvalidArgument:
        return cls(f"{field}: {description}", [FieldViolation(field, description)])

    def details(self) -> list[any_pb2.Any]:
        out = super().details()
        br = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in self.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(br)
        out.append(packed)
        return out


class NotFound(ApiError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"

    def __init__(self, resource_name: str, message: str | None = None) -> None:
        super().__init__(message or f"{resource_name} not found", metadata={"resource": resource_name})
        self.resource_name = resource_name

    def details(self) -> list[any_pb2.Any]:
        out = super().details()
        info = error_details_pb2.ResourceInfo(
            resource_type="imagetraining.v1.Session", resource_name=self.resource_name
        )
        packed = any_pb2.Any()
        packed.Pack(info)
        out.append(packed)
        return out


class FailedPrecondition(ApiError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"

    def __init__(
        self,
        message: str,
        violations: Sequence[PreconditionViolation] = (),
        *,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, metadata=metadata)
        self.violations = list(violations)

    def details(self) -> list[any_pb2.Any]:
        out = super().details()
        pf = error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type=v.type, subject=v.subject, description=v.description
                )
                for v in self.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(pf)
        out.append(packed)
        return out


class Aborted(ApiError):
    code = grpc.StatusCode.ABORTED
    reason = "ABORTED"


class AlreadyExists(ApiError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


class ResourceExhausted(ApiError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"


# The retry hint of UNAVAILABLE answers: long enough for a restarting database or server to come
# back in the common case, short enough that a client does not wait for nothing.
RETRY_DELAY_SECONDS = 1.0


class Unavailable(ApiError):
    """A plain retry later can succeed: carries a `RetryInfo` saying when (clients and proxies honour it)."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"

    def __init__(
        self, message: str, *, metadata: dict[str, str] | None = None, retry_after: float = RETRY_DELAY_SECONDS
    ) -> None:
        super().__init__(message, metadata=metadata)
        self.retry_after = retry_after

    def details(self) -> list[any_pb2.Any]:
        out = super().details()
        delay = duration_pb2.Duration()
        delay.FromTimedelta(timedelta(seconds=self.retry_after))
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        out.append(packed)
        return out


class Unimplemented(ApiError):
    code = grpc.StatusCode.UNIMPLEMENTED
    reason = "UNIMPLEMENTED"


class Unauthenticated(ApiError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


def internal_status(message: str = "internal error; the server logged the details") -> status_pb2.Status:
    return status_pb2.Status(code=code_pb2.INTERNAL, message=message)
