"""The ``torch-int8`` backend: dynamic int8 quantization of the encoder's Linear layers (CPU).

Weights are int8 per output channel; activations are quantized per batch on the fly, to 8 bits
where the CPU multiplies uint8 x int8 without 16-bit saturation (AVX512-VNNI or AMX on the x86
engine), else to torch's portable 7 bits (``reduce_range``), which halves the precision: per
text, cosine to float32 is ~0.993 (median) with 8 bits and ~0.977 with 7. One layer stays
float32: the first feed-forward down-projection (intermediate -> hidden), whose input carries
the outlier activations BERT-style encoders are known for. Quantizing it too costs
all-MiniLM-L6-v2 0.4 STS-B Spearman points; keeping it costs none (scripts/stsb_eval.py).
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch

_SATURATION_FREE = {"avx512_vnni", "amx_int8"}  # /proc/cpuinfo flags


def first_down_projection(model: torch.nn.Module) -> str | None:
    """Name of the first Linear that narrows (in_features > out_features), in module order: the
    first layer's FFN output projection in BERT, MPNet, RoBERTa, DistilBERT, ..."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module.in_features > module.out_features:
            return name
    return None


@functools.cache
def activation_bits() -> int:
    """8 where full-range uint8 activations are safe on this CPU and engine, else 7."""
    if torch.backends.quantized.engine not in ("x86", "fbgemm"):
        return 7
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return 7
    flags = next((line.split(":", 1)[-1].split() for line in lines if line.startswith("flags")), [])
    return 8 if _SATURATION_FREE & set(flags) else 7


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its Linear layers (but first_down_projection) dynamically quantized to
    int8, in place. Raises RuntimeError when this torch has no dynamic quantization."""
    with warnings.catch_warnings():
        # "torch.ao.quantization is deprecated": still the only int8 path in core torch.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")
        try:
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
        except ImportError as exc:
            raise RuntimeError(
                f"backend 'torch-int8' needs torch.ao.quantization.quantize_dynamic, which "
                f"torch {torch.__version__} lacks; use --backend onnx-int8 instead"
            ) from exc
        keep = first_down_projection(model)
        spec = {
            name: per_channel_dynamic_qconfig
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name != keep
        }
        mapping = None
        if activation_bits() == 8:
            from torch.ao.quantization.quantization_mappings import (
                get_default_dynamic_quant_module_mappings,
            )

            mapping = {**get_default_dynamic_quant_module_mappings()}
            mapping[torch.nn.Linear] = _full_range_linear()
        return quantize_dynamic(model, spec, mapping=mapping, inplace=True)


@functools.cache
def _full_range_linear() -> type:
    """torch's dynamic int8 Linear, but with 8-bit activations (its forward hard-codes
    reduce_range=True, the safe choice for CPUs without VNNI)."""
    from torch.ao.nn.quantized.dynamic import Linear

    class FullRangeLinear(Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            packed = self._packed_params._packed_params
            return torch.ops.quantized.linear_dynamic(x, packed, reduce_range=False).to(x.dtype)

    return FullRangeLinear
