"""Which runtime runs the Transformer forward: exact float32 torch (the default) or an opt-in
faster CPU one. Tokenisation, pooling and normalisation never change.

| backend      | forward                                            | STS-B dev (MiniLM-L6) |
| ------------ | -------------------------------------------------- | --------------------- |
| torch        | torch, float32 (float16 with --fp16 on CUDA)       | exact                 |
| torch-int8   | torch dynamic int8 Linear layers (quantized.py)    | not exact, see README |
| onnx         | ONNX Runtime, float32 export (onnxrt.py)           | ~1e-6 from torch      |
| onnx-int8    | ONNX Runtime, dynamic int8 weight MatMuls          | not exact             |

Every backend but torch goes into the model fingerprint: their vectors never share cache keys.
"""

from __future__ import annotations

import importlib.util

import torch

from .transformer import Transformer

BACKENDS = ("torch", "torch-int8", "onnx", "onnx-int8")
RECIPE = 1
_PACKAGES = {"onnx": ("onnxruntime", "onnx"), "onnx-int8": ("onnxruntime", "onnx")}


class BackendUnavailableError(ValueError):
    """An unknown backend, one whose package is missing, or one that cannot run on the device."""


def check_backend(backend: str, device: str | torch.device = "cpu") -> None:
    """Raise BackendUnavailableError unless ``backend`` can run on ``device`` here: cheap, so
    a worker fails at start, before loading any weights."""
    if backend not in BACKENDS:
        raise BackendUnavailableError(
            f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}"
        )
    missing = [name for name in _PACKAGES.get(backend, ()) if not importlib.util.find_spec(name)]
    if missing:
        raise BackendUnavailableError(
            f"backend {backend!r} needs the Python package(s) {' and '.join(missing)}: "
            f"pip install {' '.join(missing)}  (or: pip install 'embedq[fast]')"
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
    # Bump the recipe when an export or quantization choice changes: the vectors change too.
    settings: dict[str, object] = {"backend": backend, "recipe": RECIPE}
    if backend == "torch-int8":
        from .quantized import activation_bits

        settings["activation_bits"] = activation_bits()
    return settings


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
