"""The one exception type the client raises for anything the service refuses."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc

# google.rpc.Code number -> grpc.StatusCode, for the `Error` of streamed messages.
_CODES = {status.value[0]: status for status in grpc.StatusCode}


class EmbedqError(Exception):
    """A gRPC status other than OK, from a whole call or from one streamed message.

    ``code`` is a :class:`grpc.StatusCode`, ``details`` the server's message and
    ``id`` the message id when the failure belongs to one streamed message.
    """

    def __init__(self, code: grpc.StatusCode, details: str, id: str | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.id = id

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> EmbedqError:
        # Every RpcError grpc raises is also a Call with code()/details(); the
        # getattr guards against a bare RpcError raised by user interceptors.
        code = getattr(error, "code", lambda: grpc.StatusCode.UNKNOWN)()
        details = getattr(error, "details", lambda: str(error))()
        return cls(code or grpc.StatusCode.UNKNOWN, details or "")

    @classmethod
    def from_status(cls, code: int, message: str, id: str | None = None) -> EmbedqError:
        return cls(_CODES.get(code, grpc.StatusCode.UNKNOWN), message, id)


@contextmanager
def rpc_errors() -> Iterator[None]:
    """Turn grpc.RpcError (sync or aio) raised inside the block into EmbedqError."""
    try:
        yield
    except grpc.RpcError as error:
        raise EmbedqError.from_rpc_error(error) from error
