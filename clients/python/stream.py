"""EncodeStream helpers shared by Client.encode_stream and AsyncClient.encode_stream.

Each text goes out as one EncodeStreamRequest whose id is the caller's id (or
the text's running index as a string); results come back in completion order.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Literal

import grpc
import numpy as np

from embedq.v1 import embedq_pb2 as pb

from ._convert import OutputOptions, unpack
from ._errors import EmbedqError

# "raise": a failed message raises EmbedqError (and ends the stream);
# "yield": it is yielded as (id, EmbedqError) and the stream goes on.
OnError = Literal["raise", "yield"]
StreamItem = tuple[str, np.ndarray | EmbedqError]


def _ids(ids: Iterable[str] | None) -> Iterator[str]:
    return iter(ids) if ids is not None else (str(i) for i in itertools.count())


def _request(
    text: str, ids: Iterator[str], options: pb.EncodeOptions, timeout_ms: int = 0
) -> pb.EncodeStreamRequest:
    if not isinstance(text, str):
        raise TypeError(f"encode_stream expects str texts, got {type(text).__name__}")
    message_id = next(ids, None)
    if message_id is None:
        raise ValueError("encode_stream: fewer ids than texts")
    return pb.EncodeStreamRequest(
        id=str(message_id), texts=[text], options=options, timeout_ms=timeout_ms
    )


class Feed:
    """The request side of one EncodeStream call.

    grpc reads the request iterator itself and reports its exceptions only as
    an opaque UNKNOWN/CANCELLED status; the feed keeps the original exception
    (a bad text type, too few ids, the caller's own source failing) so that
    the caller sees that instead.
    """

    def __init__(
        self,
        texts: AsyncIterable[str] | Iterable[str],
        ids: Iterable[str] | None,
        options: pb.EncodeOptions,
        message_timeout: float | None = None,
    ) -> None:
        self._texts = texts
        self._ids = _ids(ids)
        self._options = options
        # Each message's own limit (EncodeStreamRequest.timeout_ms; 0: none), at least 1 ms.
        self._timeout_ms = max(1, math.ceil(message_timeout * 1000)) if message_timeout else 0
        self.error: Exception | None = None

    def __iter__(self) -> Iterator[pb.EncodeStreamRequest]:
        """One request per text, built lazily as the texts come."""
        try:
            for text in self._texts:  # type: ignore[union-attr]
                yield _request(text, self._ids, self._options, self._timeout_ms)
        except Exception as error:
            self.error = error
            raise

    async def __aiter__(self) -> AsyncIterator[pb.EncodeStreamRequest]:
        """Like __iter__, for an async or a sync iterable of texts."""
        try:
            if isinstance(self._texts, AsyncIterable):
                async for text in self._texts:
                    yield _request(text, self._ids, self._options, self._timeout_ms)
            else:
                for text in self._texts:
                    yield _request(text, self._ids, self._options, self._timeout_ms)
        except Exception as error:
            self.error = error
            raise

    def failure(self, error: grpc.RpcError) -> Exception:
        """What to raise for a failed call: the feed's own error if it caused it."""
        return self.error or EmbedqError.from_rpc_error(error)


def result(response: pb.EncodeStreamResponse, on_error: OnError) -> StreamItem:
    """(id, vector) for a response; its error raised or returned as on_error says."""
    if response.HasField("error") and response.error.code != 0:
        failed = response.error
        error = EmbedqError.from_status(
            failed.code, failed.message, response.id, failed.retry_after_ms
        )
        if on_error == "raise":
            raise error
        return response.id, error
    rows = unpack(response.embeddings, response.count, response.dimension, response.dtype)
    if rows.shape[0] != 1:
        raise EmbedqError(
            grpc.StatusCode.INTERNAL, f"message {response.id!r}: {rows.shape[0]} vectors for 1 text"
        )
    return response.id, rows[0]


def check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "yield"):
        raise ValueError(f"on_error must be 'raise' or 'yield', not {on_error!r}")


def check_output(output: OutputOptions) -> None:
    """One text per message: INT8/UINT8 has nothing to calibrate on without ranges."""
    if output.self_calibrated:
        raise ValueError(
            "encode_stream sends one text per message, and int8/uint8 without ranges "
            "calibrates on a message's own vectors (it needs at least 2): pass ranges, "
            "or use encode() for a batch"
        )
