"""The one error type of the server, and the one place that turns it into a status.

Server and workers say *why* something failed with an ErrorKind (embedq.keys,
from queue.proto; workers send it in Failure.kind). Only `grpc_status` turns a
kind into a gRPC status, and only `http_status` into an HTTP one (http.py):
nothing else in server/ or workers/ names a grpc.StatusCode member
(tests/test_error_kinds.py checks that).
"""

from __future__ import annotations

import logging

import grpc
from redis.exceptions import OutOfMemoryError, RedisError

from embedq.internal.v1 import queue_pb2
from embedq.keys import ErrorKind
from embedq.trouble import REDIS_TROUBLE

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error (see the server log)"
# A full Redis frees memory as workers finish jobs and servers trim their reply
# streams, or when an operator acts: a short hint, which clients stagger anyway.
REDIS_FULL_RETRY_AFTER_MS = 1000


class RequestError(Exception):
    """A request failed for `kind`; `message` is safe to show to the caller."""

    def __init__(self, kind: ErrorKind, message: str, retry_after_ms: int = 0) -> None:
        super().__init__(message)
        self.kind = ErrorKind(kind)
        self.message = message
        # With OVERLOADED: when the same work would likely be admitted.
        self.retry_after_ms = retry_after_ms

    @property
    def code(self) -> grpc.StatusCode:
        """The gRPC status callers see."""
        return grpc_status(self.kind)

    @property
    def code_number(self) -> int:
        """google.rpc.Code value, as carried in stream responses (`Error.code`)."""
        return self.code.value[0]


def grpc_status(kind: ErrorKind) -> grpc.StatusCode:
    """The gRPC status of an error kind: the only such mapping."""
    return _GRPC_STATUS[kind]


# Kept beside grpc_status, its only reader.
_GRPC_STATUS: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INVALID_INPUT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.TOO_LONG: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.PERMISSION: grpc.StatusCode.PERMISSION_DENIED,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


def http_status(kind: ErrorKind) -> tuple[int, str]:
    """The HTTP status and OpenAI error type of an error kind (the HTTP front's
    only such mapping)."""
    return _HTTP_STATUS[kind]


_HTTP_STATUS: dict[ErrorKind, tuple[int, str]] = {
    ErrorKind.INVALID_INPUT: (400, "invalid_request_error"),
    ErrorKind.TOO_LONG: (400, "invalid_request_error"),
    ErrorKind.OVERLOADED: (429, "rate_limit_error"),
    ErrorKind.UNAVAILABLE: (503, "server_error"),
    ErrorKind.DEADLINE: (504, "server_error"),
    ErrorKind.UNAUTHENTICATED: (401, "authentication_error"),
    ErrorKind.PERMISSION: (403, "permission_error"),
    ErrorKind.NOT_FOUND: (404, "invalid_request_error"),
    ErrorKind.INTERNAL: (500, "server_error"),
}


def kind_of_status(code: grpc.StatusCode) -> ErrorKind:
    """The kind a gRPC status stands for (the first kind grpc_status maps to it;
    INTERNAL for a status no kind maps to). For code that is handed a status,
    such as a handler's context.abort() under the HTTP front."""
    return next((kind for kind in ErrorKind if grpc_status(kind) == code), ErrorKind.INTERNAL)


_KIND_NUMBERS = frozenset(int(kind) for kind in ErrorKind)


def error_of_failure(failure: queue_pb2.Failure, message: str) -> RequestError:
    """The error a worker's Failure stands for. A Failure from a worker older than
    ErrorKind carries a google.rpc.Code number instead; one that names neither is
    reported as UNAVAILABLE (the work was not done, a retry may succeed)."""
    if failure.kind in _KIND_NUMBERS:
        return RequestError(ErrorKind(failure.kind), message)
    legacy = next((c for c in grpc.StatusCode if c.value[0] == failure.code), None)
    if failure.code and legacy is not None:
        return RequestError(kind_of_status(legacy), message)
    return unavailable(message)


def as_request_error(exc: BaseException, where: str) -> RequestError:
    """What the caller is told about any exception a handler raised: a
    RequestError as is, Redis trouble as UNAVAILABLE, anything else (a bug) as
    INTERNAL with its traceback logged under `where`."""
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, REDIS_TROUBLE):
        return redis_failure(exc)
    log.error("%s failed", where, exc_info=exc)
    return RequestError(ErrorKind.INTERNAL, INTERNAL_MESSAGE)


def redis_failure(exc: Exception) -> RequestError:
    """What a caller is told when Redis failed its call: a full Redis (`maxmemory`
    reached under `noeviction`, refusing every command that adds data) as OVERLOADED,
    since cached texts are still served and the condition passes as memory frees;
    anything else as UNAVAILABLE. Named by class only: a Redis error's text can hold
    addresses."""
    if redis_is_full(exc):
        return overloaded(
            "redis is out of memory: new texts cannot be queued (cached texts are still "
            "served); retry later",
            retry_after_ms=REDIS_FULL_RETRY_AFTER_MS,
        )
    return unavailable(f"redis unavailable: {type(exc).__name__}")


def redis_is_full(exc: BaseException) -> bool:
    """Whether Redis refused for lack of memory: an OOM reply (redis-py's OutOfMemoryError),
    or a script's error that carries one (Redis 6.2 wraps it as `ERR Error running
    script ...`)."""
    return isinstance(exc, OutOfMemoryError) or (
        isinstance(exc, RedisError) and "> 'maxmemory'" in str(exc)
    )


def invalid(message: str) -> RequestError:
    return RequestError(ErrorKind.INVALID_INPUT, message)


def unavailable(message: str) -> RequestError:
    return RequestError(ErrorKind.UNAVAILABLE, message)


def overloaded(message: str, retry_after_ms: int = 0) -> RequestError:
    return RequestError(ErrorKind.OVERLOADED, message, retry_after_ms)


def deadline(message: str) -> RequestError:
    return RequestError(ErrorKind.DEADLINE, message)


def not_found(message: str) -> RequestError:
    return RequestError(ErrorKind.NOT_FOUND, message)
