"""Settings and deadline arithmetic shared by Client and AsyncClient."""

from __future__ import annotations

import time
from collections.abc import Sequence

DEFAULT_TARGET = "127.0.0.1:50051"
# Chunks of one call in flight at once: enough to keep a few workers busy,
# few enough not to flood the queue on behalf of a single caller.
DEFAULT_MAX_IN_FLIGHT = 4

# Responses of big chunks outgrow grpc's 4 MiB receive default; match the
# server's own default message bound instead.
DEFAULT_CHANNEL_OPTIONS: dict[str, object] = {"grpc.max_receive_message_length": 64 * 1024 * 1024}

Metadata = Sequence[tuple[str, "str | bytes"]]
ChannelOptions = Sequence[tuple[str, object]]


def deadline(timeout: float | None) -> float | None:
    """Monotonic time by which a whole (possibly chunked) call must be done."""
    return None if timeout is None else time.monotonic() + timeout


def remaining(deadline_at: float | None) -> float | None:
    """Per-RPC timeout left until the call's deadline (0 makes grpc fail at once)."""
    return None if deadline_at is None else max(0.0, deadline_at - time.monotonic())


class ClientSettings:
    """Constructor arguments common to both clients."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None,
        chunk_size: int,
        metadata: Metadata | None,
        options: ChannelOptions | None,
        max_in_flight: int,
    ) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        self.target = target
        self.timeout = timeout
        self.chunk_size = chunk_size
        self.max_in_flight = max(1, max_in_flight)
        self._metadata = tuple(metadata) if metadata else None
        # Caller options override the defaults key by key.
        self._channel_options = list({**DEFAULT_CHANNEL_OPTIONS, **dict(options or ())}.items())
