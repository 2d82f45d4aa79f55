"""Benchmark-only backends: the model's real tokenizer and shape, no model.

  bench-zero  no forward pass at all: a text's vector is derived from a hash of its token ids
  bench-sim   a simulated accelerator: per forward pass it *sleeps* ``forward_ms`` plus
              ``token_us`` per padded token (batch size x longest text), then returns
              bench-zero's vectors. Sleeping releases the GIL, so several such workers on a
              2-core machine behave like several GPUs.

They exist to measure the queue path (server, Redis, the worker's own plumbing) without the
model's cost, and how throughput scales with the number of accelerators. Their vectors mean
nothing, so:

- they are refused unless asked for (``embedq worker --allow-bench-backend`` or
  ``EMBEDQ_ALLOW_BENCH_BACKEND=1``) and are never a default;
- each has its own model fingerprint (``backend_settings`` adds the backend's name), so their
  vectors never share cache keys with a real backend's; the registration's ``source`` (what
  ``Info.models[].source`` shows) is prefixed with the backend's name, e.g.
  ``bench-zero:/path/to/model``; the served model name is unchanged.

The worker still tokenizes every text (real work on the path being measured); no weights are
loaded (the fingerprint still hashes the folder's files, as for every backend).

Default simulated cost, an H100 running all-MiniLM-L6-v2 (6 layers, hidden 384, FFN 1536):
per token ~= 6 x 2 x (4 x 384^2 + 2 x 384 x 1536) ~= 21 MFLOP. At 1.0 us per padded token a
full GPU batch (16384 padded tokens, the worker's GPU budget) takes 4 + 16.4 ms: ~800k
tokens/s, ~17 TFLOP/s, a few % of the H100's dense fp16 peak, which is what a 384-wide model
in eager PyTorch reaches (small GEMMs, launch- and memory-bound), i.e. tens of thousands of
short (~20-token) texts per second. The 4 ms fixed cost per pass stands for ~100 kernel
launches of the eager forward, host<->device copies, pooling and the synchronising copy back.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer

from .layout import read_layout
from .model import ModelSpec, PooledEncoder, _spec
from .pooling import Pooling, load_pooling
from .runtime import BENCH_BACKENDS
from .source import resolve_model_source
from .transformer import (
    SBERT_CONFIG,
    TextSettings,
    Transformer,
    _add_lowercasing,
    _loader_kwargs,
    _max_seq_length,
    _read_json,
)

SIM_FORWARD_MS = 4.0
SIM_TOKEN_US = 1.0
# Rows of the fixed random table that hashed vectors are mixed from (3 rows per text).
_TABLE_ROWS = 1024
_SEED = 0x5EED_E4BE_DD00


@dataclass(frozen=True)
class SimCost:
    """bench-sim's cost of one forward pass: fixed latency plus a per-padded-token cost."""

    forward_ms: float = SIM_FORWARD_MS
    token_us: float = SIM_TOKEN_US

    def seconds(self, batch: Sequence[Sequence[int]]) -> float:
        padded = len(batch) * max(len(ids) for ids in batch)
        return self.forward_ms / 1e3 + self.token_us * padded / 1e6


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed, platform-independent 64-bit hash of each element (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def vector_table(dimension: int, rows: int = _TABLE_ROWS) -> np.ndarray:
    """Fixed pseudo-random rows in [-1, 1), the same on every machine and numpy version."""
    bits = _splitmix64(np.arange(rows * dimension, dtype=np.uint64) + np.uint64(_SEED))
    uniform = (bits >> np.uint64(40)).astype(np.float32) / np.float32(1 << 23) - np.float32(1)
    return uniform.reshape(rows, dimension)


def hashed_vectors(batch: Sequence[Sequence[int]], table: np.ndarray, unit: bool) -> np.ndarray:
    """One vector per token id list: three table rows picked by a hash of the ids, mixed.
    Deterministic (same ids, same vector, in any process: a tuple of ints hashes the same in
    every 64-bit CPython, unlike str); equal ids give equal vectors. Cheap on purpose: this
    stands in for a model that costs nothing (a blake2b per text was 1.2 us, 6 % of a
    bench-zero worker's interpreter time, against 0.2 us)."""
    hashes = _splitmix64(
        np.array([hash(tuple(ids)) for ids in batch], dtype=np.int64).view(np.uint64)
    )
    rows = np.uint64(table.shape[0])
    picks = [(hashes >> np.uint64(shift)) % rows for shift in (0, 20, 40)]
    vectors = (
        table[picks[0]] + np.float32(0.5) * table[picks[1]] - np.float32(0.25) * table[picks[2]]
    )
    if unit:
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), np.float32(1e-12))
    return np.ascontiguousarray(vectors, dtype=np.float32)


class _NoWeights(torch.nn.Module):
    """Stands in for the Hugging Face model: its config and a device, no weights."""

    def __init__(self, config: object) -> None:
        super().__init__()
        self.config = config
        self.anchor = torch.nn.Parameter(torch.zeros(0), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        raise RuntimeError("benchmark backends run no model")


def tokenizer_only(folder: Path) -> Transformer:
    """Transformer.load without the weights: the same tokenizer, settings and self-check."""
    config = _read_json(folder / SBERT_CONFIG)
    tokenizer_kwargs = _loader_kwargs(config, "processor_kwargs", "tokenizer_args")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **tokenizer_kwargs)
    model_config = AutoConfig.from_pretrained(folder, local_files_only=True)
    settings = TextSettings(
        max_seq_length=_max_seq_length(config, tokenizer_kwargs, tokenizer, model_config),
        do_lower_case=bool(config.get("do_lower_case", False)),
    )
    tokenizer.model_max_length = settings.max_seq_length
    if settings.do_lower_case:
        _add_lowercasing(tokenizer)
    transformer = Transformer(tokenizer, _NoWeights(model_config), settings)
    transformer._check_against_tokenizer()
    return transformer


class BenchEncoder(PooledEncoder):
    """A PooledEncoder that runs no model: vectors from a hash of the token ids."""

    def __init__(
        self,
        spec: ModelSpec,
        transformer: Transformer,
        pooling: Pooling,
        cost: SimCost | None,
        device: str = "cpu",
    ) -> None:
        super().__init__(spec, transformer, pooling)
        self.device = torch.device(device)  # for the logs: nothing runs there
        self.cost = cost
        self._table = vector_table(spec.dimension)

    def embed(self, batch: Sequence[Sequence[int]], normalize: bool | None = None) -> np.ndarray:
        if not batch:
            return np.zeros((0, self.spec.dimension), dtype=np.float32)
        if self.cost is not None:
            time.sleep(self.cost.seconds(batch))  # releases the GIL, like waiting on a GPU
        unit = self.spec.normalize if normalize is None else normalize
        return hashed_vectors(batch, self._table, unit)


def load_bench_encoder(
    spec: str | None, backend: str, device: str = "cpu", cost: SimCost | None = None
) -> BenchEncoder:
    """The encoder of a benchmark backend (bench-sim: ``cost``, default SimCost()). The caller
    has checked that the backend is allowed (runtime.check_backend)."""
    if backend not in BENCH_BACKENDS:
        raise ValueError(f"not a benchmark backend: {backend!r}")
    name, folder = resolve_model_source(spec)
    layout = read_layout(folder)
    transformer = tokenizer_only(layout.transformer_dir)
    pooling = load_pooling(layout.pooling_dir, transformer.model.config, transformer.hidden_size)
    model_spec = _spec(name, folder, transformer, pooling, layout.normalize, False, backend)
    # Info.models[].source says which backend made these vectors.
    model_spec = dataclasses.replace(model_spec, source=f"{backend}:{folder}")
    sleep = (cost or SimCost()) if backend == "bench-sim" else None
    return BenchEncoder(model_spec, transformer, pooling, sleep, device)
