"""Conversions between the embedq.v1 messages and numpy / plain Python values."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

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

# Output precisions by name, as sentence-transformers' quantize_embeddings names them.
PRECISIONS: dict[str, int] = {
    "float32": pb.PRECISION_FLOAT32,
    "float16": pb.PRECISION_FLOAT16,
    "int8": pb.PRECISION_INT8,
    "uint8": pb.PRECISION_UINT8,
    "binary": pb.PRECISION_BINARY,
    "ubinary": pb.PRECISION_UBINARY,
}
Precision = Literal["float32", "float16", "int8", "uint8", "binary", "ubinary"]
# INT8/UINT8 calibration: (2, dimension) minimums and maximums, or flattened.
Ranges = np.ndarray | Sequence[float] | Sequence[Sequence[float]]
# Calibrated precisions: per-dimension ranges, given or taken from the vectors.
CALIBRATED = frozenset({pb.PRECISION_INT8, pb.PRECISION_UINT8})

# Wire dtype -> (numpy dtype of one element, whether a row is packed bits).
# UNSPECIFIED is read as float32, so an older server that leaves it unset works.
_DTYPES: dict[int, tuple[str, bool]] = {
    pb.DTYPE_UNSPECIFIED: ("<f4", False),
    pb.DTYPE_FLOAT32: ("<f4", False),
    pb.DTYPE_FLOAT16: ("<f2", False),
    pb.DTYPE_INT8: ("i1", False),
    pb.DTYPE_UINT8: ("u1", False),
    pb.DTYPE_BINARY: ("i1", True),
    pb.DTYPE_UBINARY: ("u1", True),
}
# The dtype a precision's answer carries (numpy dtype, packed bits).
_PRECISION_DTYPE = {
    pb.PRECISION_FLOAT32: pb.DTYPE_FLOAT32,
    pb.PRECISION_FLOAT16: pb.DTYPE_FLOAT16,
    pb.PRECISION_INT8: pb.DTYPE_INT8,
    pb.PRECISION_UINT8: pb.DTYPE_UINT8,
    pb.PRECISION_BINARY: pb.DTYPE_BINARY,
    pb.PRECISION_UBINARY: pb.DTYPE_UBINARY,
}


def metric_value(name: str) -> int:
    """The Metric enum value for a metric name ("cosine", "dot", ...)."""
    value = METRICS.get(name.lower()) if isinstance(name, str) else None
    if value is None:
        raise ValueError(f"unknown metric {name!r}; expected one of {', '.join(METRICS)}")
    return value


def text_sha256(text: str) -> bytes:
    """Raw 32-byte SHA-256 of the text's UTF-8 bytes, exactly as sent (the cache hash rule)."""
    return hashlib.sha256(text.encode("utf-8")).digest()


def precision_value(name: str | None) -> int:
    """The Precision enum value for a name ("float32", "int8", "ubinary", ...); None: float32."""
    if name is None:
        return pb.PRECISION_FLOAT32
    value = PRECISIONS.get(name.lower()) if isinstance(name, str) else None
    if value is None:
        raise ValueError(f"unknown precision {name!r}; expected one of {', '.join(PRECISIONS)}")
    return value


def numpy_dtype(precision: int) -> np.dtype:
    """The (native byte order) numpy dtype of a precision's rows."""
    return np.dtype(_DTYPES[_PRECISION_DTYPE[precision]][0]).newbyteorder("=")


def row_width(precision: int, dimension: int) -> int:
    """Elements per row: `dimension`, or ceil(dimension / 8) bytes for packed bits."""
    packed = _DTYPES[_PRECISION_DTYPE[precision]][1]
    return (dimension + 7) // 8 if packed else dimension


@dataclass(frozen=True)
class OutputOptions:
    """The per-request options beyond model/normalize/truncate, checked client-side."""

    dimension: int = 0
    precision: int = pb.PRECISION_FLOAT32
    prompt: str | None = None
    prompt_name: str = ""
    ranges: tuple[float, ...] = ()

    @property
    def self_calibrated(self) -> bool:
        """INT8/UINT8 without ranges: each request calibrates on its own vectors."""
        return self.precision in CALIBRATED and not self.ranges


def output_options(
    *,
    dimension: int | None = None,
    precision: str | None = None,
    prompt: str | None = None,
    prompt_name: str | None = None,
    ranges: Ranges | None = None,
) -> OutputOptions:
    """Validated output/prompt options (ValueError for what the client can tell is wrong)."""
    if dimension is None:
        dimension = 0
    if isinstance(dimension, bool) or not isinstance(dimension, int | np.integer) or dimension < 0:
        raise ValueError(f"dimension must be an int >= 0 (0: the model's), not {dimension!r}")
    precision_id = precision_value(precision)
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, not {type(prompt).__name__}")
    if prompt_name is not None and not isinstance(prompt_name, str):
        raise ValueError(f"prompt_name must be a str, not {type(prompt_name).__name__}")
    if prompt is not None and prompt_name:
        raise ValueError("pass prompt or prompt_name, not both")
    flat: tuple[float, ...] = ()
    if ranges is not None:
        if precision_id not in CALIBRATED:
            raise ValueError("ranges applies only to precision 'int8' or 'uint8'")
        values = np.asarray(ranges, dtype=np.float32)
        if values.ndim not in (1, 2) or values.size == 0 or values.size % 2:
            raise ValueError(
                "ranges must be (2, dimension): per-dimension minimums, then maximums "
                f"(or those 2 * dimension values flattened); got shape {values.shape}"
            )
        if values.ndim == 2 and values.shape[0] != 2:
            raise ValueError(f"ranges must have 2 rows (minimums, maximums), got {values.shape}")
        flat = tuple(values.ravel().tolist())
    return OutputOptions(int(dimension), precision_id, prompt, prompt_name or "", flat)


PLAIN = OutputOptions()


def encode_options(
    *, model: str, normalize: bool | None, truncate: bool, output: OutputOptions = PLAIN
) -> pb.EncodeOptions:
    options = pb.EncodeOptions(
        model=model,
        truncation=pb.TRUNCATION_END if truncate else pb.TRUNCATION_REJECT,
        dimension=output.dimension,
        precision=output.precision,
        prompt_name=output.prompt_name,
        ranges=output.ranges,
    )
    # `normalize` is proto3 optional: leaving it unset means "as the model says".
    if normalize is not None:
        options.normalize = normalize
    # So is `prompt`: unset is the model's default prompt, "" is no prompt at all.
    if output.prompt is not None:
        options.prompt = output.prompt
    return options


def unpack(data: bytes, count: int, dimension: int, dtype: int) -> np.ndarray:
    """A packed row-major little-endian matrix as a writable (count, width) array.

    The array's dtype follows the wire dtype: float32, float16, int8, uint8, or
    int8/uint8 rows of ceil(dimension / 8) packed bits for BINARY/UBINARY.
    """
    wire = _DTYPES.get(dtype)
    if wire is None:
        raise EmbedqError(grpc.StatusCode.INTERNAL, f"unsupported vector dtype {dtype}")
    element, packed = wire
    width = (dimension + 7) // 8 if packed else dimension
    itemsize = np.dtype(element).itemsize
    if len(data) != count * width * itemsize:
        raise EmbedqError(
            grpc.StatusCode.INTERNAL,
            f"got {len(data)} vector bytes for {count} x {width} {np.dtype(element).name}",
        )
    # astype copies: frombuffer over `bytes` is read-only, callers expect to own the array.
    values = np.frombuffer(data, dtype=element).reshape(count, width)
    return values.astype(np.dtype(element).newbyteorder("="))


def quantize_int8(
    vectors: np.ndarray, minimums: np.ndarray, maximums: np.ndarray, precision: int
) -> np.ndarray:
    """INT8/UINT8 codes of float32 rows for per-dimension ranges, with
    sentence-transformers' quantize_embeddings formula (float32 arithmetic),
    byte for byte what the server sends."""
    vectors = vectors.astype(np.float32, copy=False)
    starts = minimums.astype(np.float32, copy=False)
    steps = (maximums.astype(np.float32, copy=False) - starts) / np.float32(255)
    steps = np.where(steps == 0, np.float32(1), steps)
    codes = np.clip(np.floor((vectors - starts) / steps), 0, 255)
    if precision == pb.PRECISION_UINT8:
        return codes.astype(np.uint8)
    return (codes - 128).astype(np.int8)


def quantize_calibrated(vectors: np.ndarray, precision: int) -> np.ndarray:
    """INT8/UINT8 codes calibrated on the rows themselves (per-dimension min and
    max), as the server (and quantize_embeddings without ranges) does for the
    rows of one request."""
    if len(vectors) < 2:
        raise EmbedqError(grpc.StatusCode.INVALID_ARGUMENT, CALIBRATION_NEEDS_TWO)
    return quantize_int8(vectors, vectors.min(axis=0), vectors.max(axis=0), precision)


CALIBRATION_NEEDS_TWO = (
    "INT8/UINT8 without ranges calibrates on the vectors themselves and needs at least 2: "
    "pass ranges"
)


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

    ``found`` is a bool array (n,); ``vectors`` is (n, width) in the requested
    precision, with all-NaN rows for misses (all-zero rows for the integer
    precisions, which have no NaN), so ``vectors[found]`` are the hits in order.
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
    # Named prompts (config_sentence_transformers.json) and the one applied by default.
    prompts: dict[str, str] = field(default_factory=dict, hash=False)
    default_prompt_name: str = ""

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
            dict(sorted(m.prompts.items())),
            m.default_prompt_name,
        )


@dataclass(frozen=True)
class Limits:
    max_batch_texts: int
    max_text_bytes: int
    max_message_bytes: int
    # Most candidates in one ranking (0 from a server that predates the field).
    max_candidates: int = 0


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
            r.limits.max_batch_texts,
            r.limits.max_text_bytes,
            r.limits.max_message_bytes,
            r.limits.max_candidates,
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
