"""Errors a caller can act on, and the one place that maps them to gRPC status codes.

Core code (tokenizer, engine, gateway logic) raises these plain exceptions; the server interceptor
turns them into statuses. Anything else becomes INTERNAL with a short message; the traceback goes to
the log, never to the client.
"""

from __future__ import annotations

import grpc

from .context import current_request_id


class ServiceError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError, ValueError):
    """Malformed request. The message starts with the field name and says the limit."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class OutOfRange(ServiceError):
    code = grpc.StatusCode.OUT_OF_RANGE


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


# A message may quote what the caller sent (a role, a stop sequence, an upstream's words): never more
# than this many characters of it goes back.
MAX_MESSAGE_CHARS = 512


def short(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return message if len(message) <= limit else message[:limit] + f"... ({len(message) - limit} more characters)"


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for an exception raised while serving."""
    if isinstance(error, ServiceError):
        return error.code, short(error.message)
    if isinstance(error, grpc.aio.AioRpcError):  # an upstream call failed: pass its status on
        return error.code(), short(error.details() or error.code().name)
    return grpc.StatusCode.INTERNAL, f"internal error (request id {current_request_id()}); details are in the server log"
