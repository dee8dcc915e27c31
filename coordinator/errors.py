"""The one place where exceptions become gRPC status codes. No traceback reaches a client."""

from __future__ import annotations

import logging
import uuid

import grpc

from pema.errors import DataError, ModelError, PemaError

log = logging.getLogger(__name__)


class ServiceError(Exception):
    code = grpc.StatusCode.INTERNAL


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(ServiceError):
    """A tenant's quota: the message names the limit and its value."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    """Overload or shutdown: retryable."""

    code = grpc.StatusCode.UNAVAILABLE


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(code, one-line message) for any exception; unexpected ones are logged with an id."""
    if isinstance(exc, ServiceError):
        return exc.code, str(exc)
    if isinstance(exc, DataError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, ModelError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, PemaError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    incident = uuid.uuid4().hex[:12]
    log.error("internal error %s", incident, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (incident {incident} in the coordinator log)"
