"""The one exception type the client raises for anything the service refuses,
and the one place that turns grpc's errors into it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from ._retry import RETRY_AFTER_KEY, metadata_pairs, retry_after, retryable

# google.rpc.Code number -> grpc.StatusCode, for the `Error` of streamed messages.
_CODES = {status.value[0]: status for status in grpc.StatusCode}

Metadata = tuple[tuple[str, "str | bytes"], ...]


class _Code:
    """A grpc.StatusCode that is also callable, so both ``error.code()`` (grpc's
    RpcError/Call style) and the older ``error.code`` (compared with ``==``,
    ``.name``, ``.value``) work."""

    __slots__ = ("_code",)

    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def __call__(self) -> grpc.StatusCode:
        return self._code

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _Code):
            other = other._code
        return self._code == other

    def __hash__(self) -> int:
        return hash(self._code)

    @property
    def name(self) -> str:
        return self._code.name

    @property
    def value(self) -> tuple[int, str]:
        return self._code.value

    def __repr__(self) -> str:
        return repr(self._code)

    def __str__(self) -> str:
        return str(self._code)


class _Details(str):
    """The server's message: a str that is also callable (``error.details()``)."""

    __slots__ = ()

    def __call__(self) -> str:
        return str(self)


class EmbedqError(grpc.RpcError):
    """A gRPC status other than OK, from a whole call or from one streamed message.

    It is a :class:`grpc.RpcError`: ``code()`` is a :class:`grpc.StatusCode`,
    ``details()`` the server's message, ``trailing_metadata()`` the call's
    trailing metadata (for one streamed message's error: only its retry hint). ``code`` and
    ``details`` also work without the call (``error.code ==
    grpc.StatusCode.NOT_FOUND``, ``"limit" in error.details``), as before.
    ``id`` is the message id when the failure belongs to one streamed message,
    ``attempts`` how many times the call was sent (more than 1 after retries),
    ``retry_after`` the server's ``retry-after-ms`` hint in seconds (or None)
    and ``retryable`` whether the status is one a retry can cure.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        id: str | None = None,
        *,
        trailing_metadata: Metadata = (),
        initial_metadata: Metadata = (),
        attempts: int = 1,
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = _Code(code)
        self.details = _Details(details)
        self.id = id
        self.attempts = attempts
        self._trailing_metadata = tuple(trailing_metadata)
        self._initial_metadata = tuple(initial_metadata)

    def trailing_metadata(self) -> Metadata:
        return self._trailing_metadata

    def initial_metadata(self) -> Metadata:
        return self._initial_metadata

    @property
    def retry_after(self) -> float | None:
        return retry_after(self._trailing_metadata)

    @property
    def retryable(self) -> bool:
        """Whether sending the same call again may succeed: what the client's own retries
        go by (RESOURCE_EXHAUSTED for a message over the size limit is not: it never fits)."""
        return retryable(self)

    def __reduce__(self):  # picklable despite the keyword-only arguments
        return (
            _rebuild,
            (
                self.code(),
                str(self.details),
                self.id,
                self._trailing_metadata,
                self._initial_metadata,
                self.attempts,
            ),
        )

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError, *, attempts: int = 1) -> EmbedqError:
        """The one mapping of a grpc error (sync or aio) to EmbedqError."""
        if isinstance(error, EmbedqError):
            return error
        # Every RpcError grpc raises is also a Call with code()/details(); the
        # getattr guards against a bare RpcError raised by user interceptors.
        code = _call(error, "code") or grpc.StatusCode.UNKNOWN
        details = _call(error, "details")
        if details is None:
            details = str(error)
        return cls(
            code,
            details or "",
            trailing_metadata=metadata_pairs(_call(error, "trailing_metadata")),
            initial_metadata=metadata_pairs(_call(error, "initial_metadata")),
            attempts=attempts,
        )

    @classmethod
    def from_status(
        cls, code: int, message: str, id: str | None = None, retry_after_ms: int = 0
    ) -> EmbedqError:
        """One streamed message's error (its `Error` fields); its retry hint is kept where a
        whole call's would be (``retry_after``)."""
        hint = ((RETRY_AFTER_KEY, str(retry_after_ms)),) if retry_after_ms else ()
        return cls(_CODES.get(code, grpc.StatusCode.UNKNOWN), message, id, trailing_metadata=hint)


def _rebuild(code, details, id, trailing, initial, attempts) -> EmbedqError:
    return EmbedqError(
        code, details, id, trailing_metadata=trailing, initial_metadata=initial, attempts=attempts
    )


def _call(error: object, name: str):
    method = getattr(error, name, None)
    if not callable(method):
        return None
    try:
        return method()
    except Exception:  # e.g. a call whose metadata is not there
        return None


@contextmanager
def rpc_errors() -> Iterator[None]:
    """Turn grpc.RpcError (sync or aio) raised inside the block into EmbedqError."""
    try:
        yield
    except EmbedqError:
        raise
    except grpc.RpcError as error:
        raise EmbedqError.from_rpc_error(error, attempts=getattr(error, "attempts", 1)) from error
