"""PooledEncoder: Transformer -> Pooling -> (Normalize), composed from the model folder's config.

The worker tokenizes first (to report truncation and plan batches by token count), then embeds
batches of token ids. Vectors match sentence-transformers' ``encode`` to float rounding.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .fingerprint import model_fingerprint
from .layout import read_layout
from .normalize import l2_normalize
from .pooling import Pooling, load_pooling
from .runtime import BENCH_BACKENDS, apply_backend, backend_settings, check_backend
from .source import resolve_model_source
from .transformer import TokenizedText, Transformer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """What a loaded model serves; fingerprint identifies its vectors."""

    name: str  # short served name, e.g. "all-MiniLM-L6-v2"
    source: str  # folder the model was loaded from
    dimension: int  # output vector size
    pooling: str  # "mean", "cls", "max", "mean_sqrt_len", ... joined with "+"
    max_seq_length: int  # tokens incl. special tokens
    normalize: bool  # modules.json has a Normalize module
    fingerprint: str  # sha256 hex of files + settings that change a vector
    backend: str = "torch"  # what runs the Transformer forward (runtime.BACKENDS)


class PooledEncoder:
    """A loaded model. Build with PooledEncoder.load; not safe for concurrent embed calls."""

    def __init__(self, spec: ModelSpec, transformer: Transformer, pooling: Pooling) -> None:
        self.spec = spec
        self.device = transformer.device
        self._transformer = transformer
        self._pooling = pooling

    @classmethod
    def load(
        cls,
        spec: str | None = None,
        *,
        device: str = "cpu",
        fp16: bool = False,
        backend: str = "torch",
        allow_bench: bool | None = None,
    ) -> PooledEncoder:
        """Load by model spec (see resolve_model_source). fp16 applies on CUDA only: CPU half
        precision is slow and partly unsupported, so CPU stays float32 (with a warning).
        backend: "torch" (exact), or an opt-in faster CPU runtime (see runtime.py); raises
        BackendUnavailableError before loading anything when it cannot run here.
        bench-zero / bench-sim (benchmark-only, see simulated.py) need ``allow_bench``."""
        if backend in BENCH_BACKENDS:
            check_backend(backend, device, allow_bench)
            from .simulated import load_bench_encoder

            return load_bench_encoder(spec, backend, device)
        name, folder = resolve_model_source(spec)
        target = _device(device)
        check_backend(backend, target)
        half = fp16 and target.type == "cuda"
        if fp16 and not half:
            logger.warning("fp16 ignored on %s: running float32", target)
        layout = read_layout(folder)
        transformer = Transformer.load(layout.transformer_dir, target, half)
        config, hidden = transformer.model.config, transformer.hidden_size
        pooling = load_pooling(layout.pooling_dir, config, hidden)
        spec = _spec(name, folder, transformer, pooling, layout.normalize, half, backend)
        apply_backend(backend, transformer, spec.fingerprint)

        def pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return pooling(hidden.float(), mask)

        transformer.check_packing(pooled)
        transformer.check_lean(pooled)
        return cls(spec, transformer, pooling)

    @property
    def tokenizer(self) -> object:
        """The Hugging Face tokenizer (read-only use: tokenize() is the supported path)."""
        return self._transformer.tokenizer

    def tokenize(self, texts: Sequence[str]) -> list[TokenizedText]:
        """Token ids the encoder will see (truncated, special tokens included) + full lengths."""
        return self._transformer.tokenize(texts)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return self._transformer.token_strings(ids)

    def embed(self, batch: Sequence[Sequence[int]], normalize: bool | None = None) -> np.ndarray:
        """Vectors for token id lists from tokenize(): float32, C-contiguous, shape (n, dim).
        normalize None follows the model (spec.normalize); True/False forces L2 normalisation."""
        if not batch:
            return np.zeros((0, self.spec.dimension), dtype=np.float32)
        unit = self.spec.normalize if normalize is None else normalize
        with torch.inference_mode():
            token_embeddings, mask = self._transformer.forward(batch)
            # Pool in float32 even under fp16: sums over 512 tokens lose precision in half.
            vectors = self._pooling(token_embeddings.float(), mask)
            if unit:
                vectors = l2_normalize(vectors)
            return np.ascontiguousarray(vectors.cpu().numpy(), dtype=np.float32)

    def encode(self, texts: Sequence[str], normalize: bool | None = None) -> np.ndarray:
        """tokenize + embed in one batch (padded, or packed: see packing.py): convenience for
        small inputs and tests."""
        return self.embed([item.ids for item in self.tokenize(texts)], normalize=normalize)


def _device(device: str) -> torch.device:
    target = torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return target


def _spec(
    name: str,
    folder: Path,
    transformer: Transformer,
    pooling: Pooling,
    normalize: bool,
    half: bool,
    backend: str,
) -> ModelSpec:
    settings = transformer.settings
    hashed = {
        "pooling": list(pooling.modes),
        "normalize": normalize,
        "max_seq_length": settings.max_seq_length,
        "do_lower_case": settings.do_lower_case,
        # fp16 vectors differ from fp32 ones in the 3rd-4th digit: never mix them in a cache.
        "dtype": "float16" if half else "float32",
    }
    # int8 (and ONNX's float rounding) change vectors: never mix them in a cache.
    hashed.update(backend_settings(backend))
    fingerprint = model_fingerprint(folder, hashed)
    return ModelSpec(
        name=name,
        source=str(folder),
        dimension=pooling.output_dimension(transformer.hidden_size),
        pooling=pooling.name,
        max_seq_length=settings.max_seq_length,
        normalize=normalize,
        fingerprint=fingerprint,
        backend=backend,
    )
