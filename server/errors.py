"""The one exception type that carries a gRPC status through the server."""

from __future__ import annotations

import grpc


class RequestError(Exception):
    """A request failed with a specific status; `message` is safe to show."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def code_number(self) -> int:
        """google.rpc.Code value, as carried in stream responses."""
        return self.code.value[0]


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def unavailable(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.UNAVAILABLE, message)


# google.rpc.Code number -> grpc.StatusCode, for codes that workers send.
CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
