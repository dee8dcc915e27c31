"""The one place where exceptions become gRPC status codes. No traceback reaches a client."""

from __future__ import annotations

import logging
import uuid

import grpc

from pema.errors import DataError, ModelError, PemaError

log = logging.getLogger(__name__)

# Caller-supplied text in a status message or log line: at most a short prefix (a 20,000-character
# session id once pushed a reply past gRPC's metadata limit, turning NOT_FOUND into
# RESOURCE_EXHAUSTED). A whole status message is capped too, whatever went into it.
MAX_ECHO_CHARS = 64
MAX_STATUS_CHARS = 512


def clip(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """`text`, or its first `limit` characters and how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


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
        return exc.code, clip(str(exc), MAX_STATUS_CHARS)
    if isinstance(exc, DataError):
        return grpc.StatusCode.INVALID_ARGUMENT, clip(str(exc), MAX_STATUS_CHARS)
    if isinstance(exc, ModelError):
        return grpc.StatusCode.FAILED_PRECONDITION, clip(str(exc), MAX_STATUS_CHARS)
    if isinstance(exc, PemaError):
        return grpc.StatusCode.INVALID_ARGUMENT, clip(str(exc), MAX_STATUS_CHARS)
    incident = uuid.uuid4().hex[:12]
    log.error("internal error %s", incident, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (incident {incident} in the coordinator log)"
