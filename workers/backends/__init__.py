"""Model backends: the pooled Sentence-BERT encoder and where models come from."""

from .model import ModelSpec, PooledEncoder
from .runtime import BACKENDS, BENCH_BACKENDS, BackendUnavailableError, check_backend
from .source import (
    BUNDLED_NAME,
    ModelNotFoundError,
    UnsupportedModelError,
    bundled_model_path,
    resolve_model_source,
)
from .transformer import TokenizedText

__all__ = [
    "BACKENDS",
    "BENCH_BACKENDS",
    "BUNDLED_NAME",
    "BackendUnavailableError",
    "ModelNotFoundError",
    "ModelSpec",
    "PooledEncoder",
    "TokenizedText",
    "UnsupportedModelError",
    "bundled_model_path",
    "check_backend",
    "resolve_model_source",
]
