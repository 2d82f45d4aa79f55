"""Python client for embedq, the Sentence-BERT embedding service.

    from embedq.client import Client

    with Client("127.0.0.1:50051") as client:
        vectors = client.encode(["a sentence", "another one"])   # float32 (2, dim)
        bits = client.encode(["a sentence"], precision="ubinary")  # uint8 (1, dim / 8)

:class:`AsyncClient` offers the same methods as coroutines. Every failure is
an :class:`EmbedqError` (a :class:`grpc.RpcError`) carrying the gRPC
``code()`` and ``details()``. Calls refused with UNAVAILABLE or
RESOURCE_EXHAUSTED are retried with backoff within their deadline
(:class:`RetryPolicy`; ``retry=False`` turns that off).
"""

from ._common import DEFAULT_TARGET
from ._convert import (
    METRICS,
    PRECISIONS,
    Info,
    Limits,
    LookupResult,
    ModelInfo,
    TokenizedText,
    text_sha256,
)
from ._errors import EmbedqError
from ._retry import RetryPolicy
from .aio import AsyncClient
from .sync import Client

__all__ = [
    "DEFAULT_TARGET",
    "METRICS",
    "PRECISIONS",
    "AsyncClient",
    "Client",
    "EmbedqError",
    "Info",
    "Limits",
    "LookupResult",
    "ModelInfo",
    "RetryPolicy",
    "TokenizedText",
    "text_sha256",
]
