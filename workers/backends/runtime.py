"""Which runtime runs the Transformer forward: exact float32 torch (the default) or an opt-in
faster CPU one. Tokenisation, pooling and normalisation never change.

Measured on all-MiniLM-L6-v2, 2-core AVX512-VNNI CPU (scripts/stsb_eval.py, `embedq bench`):

| backend    | forward                                     | STS-B dev / test | S1 vs R |
| ---------- | ------------------------------------------- | ---------------- | ------- |
| torch      | torch float32 (float16 with --fp16 on CUDA) | 86.72 / 82.03    | 0.98x   |
| torch-int8 | torch dynamic int8 Linear (quantized.py)    | 86.62 / 81.64    | 1.51x   |
| onnx       | ONNX Runtime, float32 export (onnxrt.py)    | 86.72 / -        | 0.88x   |
| onnx-int8  | ONNX Runtime, dynamic int8 weight MatMuls   | 86.70 / 81.83    | 1.47x   |

(R: in-process sentence-transformers float32. onnx is exact to ~1e-6 but slower than torch
here.) Every backend but torch goes into the model fingerprint: their vectors never share
cache keys, and the torch fingerprint is what it was before backends existed.
"""

from __future__ import annotations

import importlib.util

import torch

from embedq.settings import SETTINGS

from .transformer import Transformer

# bench-zero / bench-sim: benchmark-only, no model (simulated.py); refused unless allowed.
BENCH_BACKENDS = ("bench-zero", "bench-sim")
BACKENDS = ("torch", "torch-int8", "onnx", "onnx-int8", *BENCH_BACKENDS)
ALLOW_ENV = "EMBEDQ_ALLOW_BENCH_BACKEND"
RECIPE = 1
_PACKAGES = {"onnx": ("onnxruntime", "onnx"), "onnx-int8": ("onnxruntime", "onnx")}


class BackendUnavailableError(ValueError):
    """An unknown backend, one whose package is missing, or one that cannot run on the device."""


def bench_allowed(allow: bool | None = None) -> bool:
    """May a benchmark-only backend run? An explicit answer wins; None reads the environment."""
    return allow if allow is not None else bool(SETTINGS["allow_bench_backend"].from_env())


def check_backend(
    backend: str, device: str | torch.device = "cpu", allow_bench: bool | None = None
) -> None:
    """Raise BackendUnavailableError unless ``backend`` can run on ``device`` here: cheap, so
    a worker fails at start, before loading any weights. Benchmark-only backends also need
    ``allow_bench`` (None: EMBEDQ_ALLOW_BENCH_BACKEND=1)."""
    if backend not in BACKENDS:
        raise BackendUnavailableError(
            f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}"
        )
    if backend in BENCH_BACKENDS:
        if not bench_allowed(allow_bench):
            raise BackendUnavailableError(
                f"backend {backend!r} is for benchmarks only (its vectors are not the model's): "
                f"pass --allow-bench-backend or set {ALLOW_ENV}=1"
            )
        return  # runs nothing on the device
    missing = [name for name in _PACKAGES.get(backend, ()) if not importlib.util.find_spec(name)]
    if missing:
        raise BackendUnavailableError(
            f"backend {backend!r} needs the Python package(s) {' and '.join(missing)}: "
            f"pip install {' '.join(missing)}  (or: pip install 'embedq[fast]')"
        )
    if backend == "torch-int8":
        from .quantized import unsupported_reason

        reason = unsupported_reason()
        if reason:
            raise BackendUnavailableError(
                f"backend 'torch-int8' is refused here: {reason}; use onnx-int8 or torch"
            )
    if backend != "torch" and torch.device(device).type != "cpu":
        raise BackendUnavailableError(
            f"backend {backend!r} runs on the CPU only, not {device}: use --devices cpu, "
            "or --backend torch (with --fp16) on a GPU"
        )


def backend_settings(backend: str) -> dict[str, object]:
    """What the backend adds to the model fingerprint: nothing for torch (so its fingerprint,
    and every cache key, stays what it was before backends existed)."""
    if backend == "torch":
        return {}
    # bench-*: vectors from a hash of the token ids, never the model's; own fingerprints too.
    # Bump the recipe when an export or quantization choice changes: the vectors change too.
    return {"backend": backend, "recipe": RECIPE}


def apply_backend(backend: str, transformer: Transformer, fingerprint: str) -> None:
    """Swap ``transformer``'s forward for ``backend``'s (torch: nothing to do)."""
    check_backend(backend, transformer.device)
    if backend == "torch-int8":
        from .quantized import quantize_int8

        transformer.model = quantize_int8(transformer.model)
    elif backend in ("onnx", "onnx-int8"):
        from .onnxrt import load_onnx_model

        transformer.model = load_onnx_model(
            transformer.model, transformer.input_names, fingerprint, int8=backend == "onnx-int8"
        )
