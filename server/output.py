"""Output shaping: Matryoshka dimension and precision, applied to cached
full-dimension float32 vectors when answering.

Pure numpy, no Redis. The quantisation follows
sentence_transformers.quantization.quantize_embeddings byte for byte, so a
client can switch between the two without re-indexing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embedq.v1 import embedq_pb2 as pb

from .errors import invalid

KNOWN_PRECISIONS = set(pb.Precision.values())
DTYPE_OF = {
    pb.PRECISION_UNSPECIFIED: pb.DTYPE_FLOAT32,
    pb.PRECISION_FLOAT32: pb.DTYPE_FLOAT32,
    pb.PRECISION_FLOAT16: pb.DTYPE_FLOAT16,
    pb.PRECISION_INT8: pb.DTYPE_INT8,
    pb.PRECISION_UINT8: pb.DTYPE_UINT8,
    pb.PRECISION_BINARY: pb.DTYPE_BINARY,
    pb.PRECISION_UBINARY: pb.DTYPE_UBINARY,
}
CALIBRATED = {pb.PRECISION_INT8, pb.PRECISION_UINT8}


@dataclass(frozen=True)
class OutputSpec:
    """What the caller wants the vectors to look like."""

    dimension: int
    normalize: bool
    precision: int = pb.PRECISION_FLOAT32
    ranges: np.ndarray | None = None  # (2, dimension) float32, for INT8/UINT8

    @property
    def dtype(self) -> int:
        return DTYPE_OF[self.precision]


def output_spec(options: pb.EncodeOptions, model_dimension: int, normalize: bool) -> OutputSpec:
    """Validated output options of a request."""
    if options.precision not in KNOWN_PRECISIONS:
        raise invalid(f"options.precision: unknown value {options.precision}")
    dimension = options.dimension or model_dimension
    if dimension > model_dimension:
        raise invalid(
            f"options.dimension {dimension} is above the model's dimension {model_dimension}"
        )
    ranges = None
    if options.ranges:
        if options.precision not in CALIBRATED:
            raise invalid("options.ranges applies only to INT8 and UINT8 precision")
        if len(options.ranges) != 2 * dimension:
            raise invalid(
                f"options.ranges has {len(options.ranges)} values; INT8/UINT8 calibration "
                f"needs {2 * dimension} (minimums then maximums, one per output dimension)"
            )
        ranges = np.asarray(options.ranges, dtype=np.float32).reshape(2, dimension)
    return OutputSpec(dimension, normalize, options.precision or pb.PRECISION_FLOAT32, ranges)


def truncate(vectors: np.ndarray, spec: OutputSpec) -> np.ndarray:
    """First `dimension` values, re-normalised when normalisation is on.

    Normalising the truncated prefix of a unit vector equals normalising the
    prefix of the raw vector, so cached normalised vectors serve any dimension.
    """
    if spec.dimension >= vectors.shape[1]:
        return vectors
    prefix = vectors[:, : spec.dimension]
    if not spec.normalize:
        return np.ascontiguousarray(prefix)
    norms = np.linalg.norm(prefix, axis=1, keepdims=True)
    return (prefix / np.maximum(norms, 1e-12)).astype(np.float32)


def quantize(vectors: np.ndarray, spec: OutputSpec) -> np.ndarray:
    """quantize_embeddings semantics; float16 added."""
    precision = spec.precision
    if precision == pb.PRECISION_FLOAT32:
        return vectors.astype("<f4", copy=False)
    if precision == pb.PRECISION_FLOAT16:
        return vectors.astype("<f2")
    if precision in CALIBRATED:
        return _quantize_int8(vectors, spec)
    bits = np.packbits(vectors > 0, axis=-1)
    if precision == pb.PRECISION_BINARY:
        return (bits.astype(np.int16) - 128).astype(np.int8)
    return bits


def _quantize_int8(vectors: np.ndarray, spec: OutputSpec) -> np.ndarray:
    ranges = spec.ranges
    if ranges is None:
        if len(vectors) < 2:
            raise invalid(
                "INT8/UINT8 without options.ranges calibrates on the request's own vectors "
                "and needs at least 2 texts: send ranges for single texts"
            )
        ranges = np.vstack([vectors.min(axis=0), vectors.max(axis=0)]).astype(np.float32)
    starts = ranges[0, :]
    steps = (ranges[1, :] - starts) / 255
    steps = np.where(steps == 0, 1, steps)
    codes = np.clip(np.floor((vectors - starts) / steps), 0, 255)
    if spec.precision == pb.PRECISION_UINT8:
        return codes.astype(np.uint8)
    return (codes - 128).astype(np.int8)


def shape(vectors: np.ndarray, spec: OutputSpec) -> bytes:
    """Packed bytes of the vectors as the caller asked for them."""
    return np.ascontiguousarray(quantize(truncate(vectors, spec), spec)).tobytes()


def ranking_vectors(vectors: np.ndarray, spec: OutputSpec) -> np.ndarray:
    """Similarity scores float32 vectors at the requested dimension."""
    return truncate(vectors, spec)
