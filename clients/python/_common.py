"""Settings and deadline arithmetic shared by Client and AsyncClient."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import grpc

from ._retry import RetryPolicy, resolve

DEFAULT_TARGET = "127.0.0.1:50051"
# Chunks of one call in flight at once: enough to keep a few workers busy,
# few enough not to flood the queue on behalf of a single caller.
DEFAULT_MAX_IN_FLIGHT = 4

# Responses of big chunks outgrow grpc's 4 MiB receive default; match the
# server's own default message bound instead.
DEFAULT_CHANNEL_OPTIONS: dict[str, object] = {"grpc.max_receive_message_length": 64 * 1024 * 1024}

Metadata = Sequence[tuple[str, "str | bytes"]]
ChannelOptions = Sequence[tuple[str, object]]
# A PEM file: its path, or its contents as bytes.
Pem = str | os.PathLike[str] | bytes


def deadline(timeout: float | None) -> float | None:
    """Monotonic time by which a whole (possibly chunked) call must be done."""
    return None if timeout is None else time.monotonic() + timeout


def remaining(deadline_at: float | None) -> float | None:
    """Per-RPC timeout left until the call's deadline (0 makes grpc fail at once)."""
    return None if deadline_at is None else max(0.0, deadline_at - time.monotonic())


def read_pem(value: Pem | None) -> bytes | None:
    """PEM bytes as given, or read from a path; None stays None."""
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as handle:
        return handle.read()


def check_token(token: str) -> str:
    """A bearer token fit for gRPC metadata (errors never echo it)."""
    token = token.strip()
    if not token:
        raise ValueError("token is empty")
    if any(ch.isspace() for ch in token) or not token.isascii() or not token.isprintable():
        raise ValueError("token must be printable ASCII without whitespace")
    return token


def channel_credentials(
    *,
    tls: bool,
    tls_ca: Pem | None,
    tls_cert: Pem | None,
    tls_key: Pem | None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials when TLS is asked for (tls=True or any PEM given), else None."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key go together: pass both for a client certificate")
    if not (tls or tls_ca is not None or tls_cert is not None):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(tls_ca),  # None: grpc's default roots
        private_key=read_pem(tls_key),
        certificate_chain=read_pem(tls_cert),
    )


class ClientSettings:
    """Constructor arguments common to both clients."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = 60.0,
        chunk_size: int = 256,
        metadata: Metadata | None = None,
        options: ChannelOptions | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        tls: bool = False,
        tls_ca: Pem | None = None,
        tls_cert: Pem | None = None,
        tls_key: Pem | None = None,
        token: str | None = None,
        max_candidates: int | None = None,
        retry: RetryPolicy | bool = True,
    ) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        if max_candidates is not None and max_candidates < 1:
            raise ValueError("max_candidates must be at least 1 (None: the server's limit)")
        self.target = target
        self.timeout = timeout
        # UNAVAILABLE / RESOURCE_EXHAUSTED are sent again (see RetryPolicy);
        # False: never, the first refusal raises.
        self.retry = resolve(retry)
        self.chunk_size = chunk_size
        self.max_in_flight = max(1, max_in_flight)
        # Candidates per ranking request: the caller's cap, else the server's
        # Limits.max_candidates, asked once (see candidates_per_request).
        self.max_candidates = max_candidates
        self._server_max_candidates: int | None = None
        metadata = list(metadata or ())
        if token is not None:
            if any(key.lower() == "authorization" for key, _ in metadata):
                raise ValueError("pass token or an authorization metadata entry, not both")
            # Plain metadata rather than call credentials: it works on an
            # insecure channel too (a server on loopback, or behind a TLS proxy).
            metadata.insert(0, ("authorization", f"Bearer {check_token(token)}"))
        self._metadata = tuple(metadata) if metadata else None
        self._credentials = channel_credentials(
            tls=tls, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key
        )
        # Caller options override the defaults key by key.
        self._channel_options = list({**DEFAULT_CHANNEL_OPTIONS, **dict(options or ())}.items())

    def _known_candidate_limit(self, count: int) -> int | None:
        """Candidates per ranking request when known without asking the server.

        A ranking of up to chunk_size - 1 candidates goes out as one request
        without asking (it fits any limit chunk_size was chosen to respect);
        bigger ones need the server's Limits.max_candidates (None here).
        """
        if self.max_candidates is not None:
            return self.max_candidates
        if self._server_max_candidates is not None:
            return self._server_max_candidates
        if count <= self.chunk_size - 1:
            return max(1, count)
        return None

    def _remember_candidate_limit(self, max_candidates: int) -> int:
        # 0: a server that predates the field ranks at most max_batch_texts - 1.
        self._server_max_candidates = max_candidates or max(1, self.chunk_size - 1)
        return self._server_max_candidates

    @property
    def secure(self) -> bool:
        """Whether the channel uses TLS."""
        return self._credentials is not None

    def __repr__(self) -> str:
        # Never shows the token (or any metadata).
        return f"{type(self).__name__}({self.target!r}, tls={self.secure})"
