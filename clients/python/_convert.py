"""Conversions between the embedq.v1 messages and numpy / plain Python values."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any

import grpc
import numpy as np

from embedq.v1 import embedq_pb2 as pb

from ._errors import EmbedqError

METRICS: dict[str, int] = {
    "cosine": pb.METRIC_COSINE,
    "dot": pb.METRIC_DOT,
    "euclidean": pb.METRIC_EUCLIDEAN,
    "manhattan": pb.METRIC_MANHATTAN,
}

# Wire dtypes this client can unpack. UNSPECIFIED is read as float32, the only
# dtype the v1 API defines, so an older server that leaves it unset still works.
_DTYPES = {pb.DTYPE_UNSPECIFIED: "<f4", pb.DTYPE_FLOAT32: "<f4"}


def metric_value(name: str) -> int:
    """The Metric enum value for a metric name ("cosine", "dot", ...)."""
    value = METRICS.get(name.lower()) if isinstance(name, str) else None
    if value is None:
        raise ValueError(f"unknown metric {name!r}; expected one of {', '.join(METRICS)}")
    return value


def text_sha256(text: str) -> bytes:
    """Raw 32-byte SHA-256 of the text's UTF-8 bytes, exactly as sent (the cache hash rule)."""
    return hashlib.sha256(text.encode("utf-8")).digest()


def encode_options(*, model: str, normalize: bool | None, truncate: bool) -> pb.EncodeOptions:
    options = pb.EncodeOptions(
        model=model,
        truncation=pb.TRUNCATION_END if truncate else pb.TRUNCATION_REJECT,
    )
    # `normalize` is proto3 optional: leaving it unset means "as the model says".
    if normalize is not None:
        options.normalize = normalize
    return options


def unpack(data: bytes, count: int, dimension: int, dtype: int) -> np.ndarray:
    """A packed row-major little-endian matrix as a writable float32 (count, dimension) array."""
    wire = _DTYPES.get(dtype)
    if wire is None:
        raise EmbedqError(grpc.StatusCode.INTERNAL, f"unsupported vector dtype {dtype}")
    if len(data) != count * dimension * 4:
        raise EmbedqError(
            grpc.StatusCode.INTERNAL,
            f"got {len(data)} vector bytes for {count} x {dimension} float32",
        )
    # astype copies: frombuffer over `bytes` is read-only, callers expect to own the array.
    return np.frombuffer(data, dtype=wire).reshape(count, dimension).astype(np.float32)


def hash_bytes(value: bytes | str) -> bytes:
    """A digest given as raw bytes or as a 64-digit hex string, as raw bytes."""
    if isinstance(value, str):
        return bytes.fromhex(value)
    return bytes(value)


@dataclass(frozen=True)
class TokenizedText:
    """One text as the model's tokenizer sees it."""

    ids: list[int]
    tokens: list[str]
    truncated: bool
    full_length: int

    @classmethod
    def from_proto(cls, message: pb.TokenizedText) -> TokenizedText:
        return cls(list(message.ids), list(message.tokens), message.truncated, message.full_length)


@dataclass(frozen=True, eq=False)
class LookupResult:
    """Cache look-up outcome, one entry per item: texts first, then hashes.

    ``found`` is a bool array (n,); ``vectors`` is float32 (n, dimension) with
    all-NaN rows for misses, so ``vectors[found]`` are the hits in order.
    """

    model: str
    found: np.ndarray
    vectors: np.ndarray

    @property
    def hits(self) -> np.ndarray:
        return self.vectors[self.found]

    def __len__(self) -> int:
        return len(self.found)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    fingerprint: str
    dimension: int
    pooling: str
    max_seq_length: int
    normalize: bool
    workers_alive: int
    source: str

    @classmethod
    def from_proto(cls, m: pb.ModelInfo) -> ModelInfo:
        return cls(
            m.name,
            m.fingerprint,
            m.dimension,
            m.pooling,
            m.max_seq_length,
            m.normalize,
            m.workers_alive,
            m.source,
        )


@dataclass(frozen=True)
class Limits:
    max_batch_texts: int
    max_text_bytes: int
    max_message_bytes: int


@dataclass(frozen=True)
class Info:
    """What a deployment serves (InfoResponse as plain values)."""

    models: tuple[ModelInfo, ...]
    default_model: str
    limits: Limits
    version: str

    @classmethod
    def from_proto(cls, r: pb.InfoResponse) -> Info:
        limits = Limits(
            r.limits.max_batch_texts, r.limits.max_text_bytes, r.limits.max_message_bytes
        )
        models = tuple(ModelInfo.from_proto(m) for m in r.models)
        return cls(models, r.default_model, limits, r.version)

    def model(self, name: str = "") -> ModelInfo:
        """The named model, or the default one for an empty name; KeyError if not served."""
        wanted = name or self.default_model
        for model in self.models:
            if model.name == wanted:
                return model
        raise KeyError(wanted)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
