"""Pooling: token embeddings -> one sentence vector, as configured by the model folder.

Each mode mirrors sentence-transformers 6.2 ``Pooling._forward_padded`` (no prompt exclusion:
we never prepend prompts), so vectors match it to float rounding.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .source import UnsupportedModelError

# Legacy boolean keys, in the order sentence-transformers concatenates the modes they enable.
_LEGACY_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# Served names (ModelSpec.pooling); only mean_sqrt_len_tokens is shortened.
_SHORT_NAMES = {"mean_sqrt_len_tokens": "mean_sqrt_len"}


def _cls(emb: Tensor, mask: Tensor) -> Tensor:
    """First attended token (position 0 with right padding)."""
    first = mask.to(torch.int).argmax(dim=1)
    index = first.view(-1, 1, 1).expand(-1, 1, emb.shape[-1])
    return torch.gather(emb, 1, index).squeeze(1)


def _max(emb: Tensor, mask: Tensor) -> Tensor:
    """Element-wise max over attended tokens; padding is -inf so it never wins."""
    keep = mask.unsqueeze(-1).expand_as(emb).to(emb.dtype)
    return emb.masked_fill(keep == 0, float("-inf")).max(dim=1).values


def _masked_sum_and_count(emb: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    weights = mask.unsqueeze(-1).to(emb.dtype)
    count = torch.clamp(weights.sum(dim=1), min=1e-9)
    return (emb * weights).sum(dim=1), count


def _mean(emb: Tensor, mask: Tensor) -> Tensor:
    total, count = _masked_sum_and_count(emb, mask)
    return total / count


def _mean_sqrt_len(emb: Tensor, mask: Tensor) -> Tensor:
    """Sum divided by sqrt(token count): keeps some length information."""
    total, count = _masked_sum_and_count(emb, mask)
    return total / torch.sqrt(count)


def _weighted_mean(emb: Tensor, mask: Tensor) -> Tensor:
    """Later tokens weigh more (weight = position + 1, counted from the first real token)."""
    positions = torch.arange(1, emb.shape[1] + 1, device=emb.device, dtype=emb.dtype).view(1, -1, 1)
    left_pad = mask.to(torch.int32).argmax(dim=1).view(-1, 1, 1)
    weights = mask.unsqueeze(-1).to(emb.dtype) * (positions - left_pad)
    return (emb * weights).sum(dim=1) / torch.clamp(weights.sum(dim=1), min=1e-9)


def _last_token(emb: Tensor, mask: Tensor) -> Tensor:
    """Last attended token, whichever side the padding is on."""
    seq_len = emb.shape[1]
    values, from_end = mask.flip(1).max(1)
    from_end = torch.where(values == 0, seq_len - 1, from_end)
    index = (seq_len - from_end - 1).view(-1, 1, 1).expand(-1, 1, emb.shape[-1])
    masked = emb * mask.unsqueeze(-1).to(emb.dtype)
    return torch.gather(masked, 1, index).squeeze(1)


_MODES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "cls": _cls,
    "max": _max,
    "mean": _mean,
    "mean_sqrt_len_tokens": _mean_sqrt_len,
    "weightedmean": _weighted_mean,
    "lasttoken": _last_token,
}


@dataclass(frozen=True)
class Pooling:
    """One or more pooling modes, concatenated in the order the folder's config gives."""

    modes: tuple[str, ...]

    def __post_init__(self) -> None:
        unknown = [mode for mode in self.modes if mode not in _MODES]
        if unknown or not self.modes:
            raise UnsupportedModelError(
                f"pooling modes {unknown or '[]'} not supported; supported: {list(_MODES)}"
            )

    @property
    def name(self) -> str:
        """Served name, e.g. "mean" or "cls+mean_sqrt_len"."""
        return "+".join(_SHORT_NAMES.get(mode, mode) for mode in self.modes)

    def output_dimension(self, hidden_size: int) -> int:
        return len(self.modes) * hidden_size

    def __call__(self, token_embeddings: Tensor, attention_mask: Tensor) -> Tensor:
        """(batch, seq, hidden) + (batch, seq) mask -> (batch, len(modes) * hidden)."""
        parts = [_MODES[mode](token_embeddings, attention_mask) for mode in self.modes]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def load_pooling(pooling_dir: Path | None, model_config: Any, hidden_size: int) -> Pooling:
    """The Pooling a folder asks for; see default_modes when it has no Pooling module."""
    if pooling_dir is None:
        return Pooling(default_modes(model_config))
    config = json.loads((pooling_dir / "config.json").read_text(encoding="utf-8"))
    pooling = Pooling(modes_from_config(config))
    declared = config.get("embedding_dimension", config.get("word_embedding_dimension"))
    if declared is not None and int(declared) != hidden_size:
        raise UnsupportedModelError(
            f"{pooling_dir}/config.json: embedding dimension {declared} "
            f"!= encoder hidden size {hidden_size}"
        )
    return pooling


def modes_from_config(config: dict[str, Any]) -> tuple[str, ...]:
    """Both config formats: 6.x ``pooling_mode`` (str or list, order kept) wins over the
    legacy ``pooling_mode_*`` booleans (fixed order; none enabled means mean)."""
    mode = config.get("pooling_mode")
    if mode is not None:
        return (mode,) if isinstance(mode, str) else tuple(mode)
    enabled = tuple(name for key, name in _LEGACY_KEYS.items() if config.get(key, False))
    return enabled or ("mean",)


def default_modes(model_config: Any) -> tuple[str, ...]:
    """sentence-transformers' pooling for a folder without modules.json: mean, except
    lasttoken for causal language models that attend causally."""
    architectures = getattr(model_config, "architectures", None) or [""]
    causal = architectures[0].endswith("ForCausalLM") and getattr(model_config, "is_causal", True)
    return ("lasttoken",) if causal else ("mean",)
