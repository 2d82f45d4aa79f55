"""The one exception type that carries a gRPC status through the server."""

from __future__ import annotations

import grpc


class RequestError(Exception):
    """A request failed with a specific status; `message` is safe to show."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_ms: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        # With RESOURCE_EXHAUSTED: when the same work would likely be admitted.
        self.retry_after_ms = retry_after_ms

    @property
    def code_number(self) -> int:
        """google.rpc.Code value, as carried in stream responses."""
        return self.code.value[0]


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def unavailable(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.UNAVAILABLE, message)


def overloaded(message: str, retry_after_ms: int = 0) -> RequestError:
    return RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, retry_after_ms)


# google.rpc.Code number -> grpc.StatusCode, for codes that workers send.
CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
