"""The ``torch-int8`` backend: dynamic int8 quantization of the encoder's Linear layers (CPU).

Weights are int8 per output channel; activations are quantized to uint8 per batch on the fly,
over their full 8-bit range. That needs a CPU that multiplies uint8 x int8 without 16-bit
saturation (AVX512-VNNI or AMX, x86 quantized engine); elsewhere torch falls back to 7-bit
activations (``reduce_range``), which we measured too lossy (all-MiniLM-L6-v2 STS-B test
Spearman -0.9 points; per text, cosine to float32 ~0.977 instead of ~0.993), so there the
backend is refused. One layer stays float32: the first feed-forward down-projection
(intermediate -> hidden), whose input carries the outlier activations BERT-style encoders are
known for; quantizing it too costs 0.4 STS-B dev points (scripts/stsb_eval.py).

Activation scales are per batch, so a text's vector depends slightly on its batch-mates
(cosine ~0.99 between the same text alone and in a batch of 64).
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


def unsupported_reason() -> str | None:
    """Why torch-int8 cannot run here (see the module docstring), or None."""
    engine = torch.backends.quantized.engine
    if engine not in ("x86", "fbgemm"):
        return f"torch's quantized engine here is {engine!r}, not x86/fbgemm"
    if not _SATURATION_FREE & cpu_flags():
        return "this CPU has neither AVX512-VNNI nor AMX (8-bit activations would saturate)"
    return None


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU flags of /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


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
        from torch.ao.quantization.quantization_mappings import (
            get_default_dynamic_quant_module_mappings,
        )

        mapping = {**get_default_dynamic_quant_module_mappings()}
        mapping[torch.nn.Linear] = _full_range_linear()
        return quantize_dynamic(model, spec, mapping=mapping, inplace=True)


@functools.cache
def _full_range_linear() -> type:
    """torch's dynamic int8 Linear with 8-bit activations (its own forward hard-codes
    reduce_range=True: 7 bits, the safe choice for CPUs without VNNI)."""
    from torch.ao.nn.quantized.dynamic import Linear

    class FullRangeLinear(Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            packed = self._packed_params._packed_params
            return torch.ops.quantized.linear_dynamic(x, packed, reduce_range=False).to(x.dtype)

    return FullRangeLinear
