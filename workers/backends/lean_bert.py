"""A lean forward pass for BERT encoders: the linear layers see the batch's real tokens only.

Hugging Face's `BertModel.forward` pays, on every call, for mask preparation, argument
checks and per-module wrappers (about 0.8 ms a pass on a 2-core CPU with
all-MiniLM-L6-v2: a single text took 5.2 ms through it, 4.3 ms here), and a padded or packed
batch computes its padding like real tokens. Here the same modules' weights run on one flat
list of the batch's tokens: embeddings, the fused query/key/value projection, the output
projections, the feed-forward layers and layer norms see each real token once. Only
attention needs a text's tokens side by side: it runs per group of up to ATTENTION_GROUP
texts of similar length (sorted longest first), each padded to its group's longest, under a
mask, as the padded batch does.

Used only where `LeanBert.build` recognises a plain BERT encoder (absolute positions, plain
`nn.Linear` layers, no decoder or chunking; attention always runs through SDPA, whatever the
model's own setting) and `Transformer.check_lean` proves the vectors equal to the padded
batch's on probe texts; anything else keeps the Hugging Face forward. On the bundled model
the probes and sentence-transformers' own vectors agree to the last bit or within 2e-7.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Texts per attention group. One group for the small batches of waiting consumers; larger
# batches are sorted by length first, so a group's padding stays small.
ATTENTION_GROUP = 16
# The lean forward saves Hugging Face's fixed cost a pass (~0.8 ms) and every padded token,
# and pays for its index copies: 4-5 % of a pass of 16 or 48 texts of 256 tokens each, which
# have no padding to save (measured). So it runs a small batch (up to this many tokens padded:
# passes of ~15 ms, where the fixed cost is the larger), or one at least MIN_PADDING_SHARE of
# whose padded layout would be padding (arrival-order batches of short texts: 10-60 %).
SMALL_BATCH_TOKENS = 256
MIN_PADDING_SHARE = 0.05


def pays_off(lengths: Sequence[int]) -> bool:
    """Whether a batch of texts of these token counts should run the lean forward."""
    padded = len(lengths) * max(lengths, default=0)
    if padded == 0:
        return False
    return padded <= SMALL_BATCH_TOKENS or padded - sum(lengths) >= MIN_PADDING_SHARE * padded


@dataclass(frozen=True)
class _Layer:
    qkv_weight: Tensor  # query, key and value projections stacked: one matmul for all three
    qkv_bias: Tensor
    heads: int
    head_size: int
    scale: float
    attention_out: nn.Linear
    attention_norm: nn.LayerNorm
    intermediate: nn.Module  # dense + activation, the model's own module
    out: nn.Linear
    out_norm: nn.LayerNorm


@dataclass(frozen=True)
class _Group:
    """Texts whose attention runs together: the flat index of every (text, position) slot
    of the group's padded layout (0 for padding), the real slots, and their mask."""

    gather: Tensor  # (texts * width,) int64
    real: Tensor  # (real tokens,) int64: slots of the padded layout holding a real token
    mask: Tensor  # (texts, 1, 1, width) bool
    texts: int
    width: int


@dataclass(frozen=True)
class _Layout:
    groups: list[_Group]
    back: Tensor | None  # flat token -> row of the groups' joined outputs (None: same order)
    padded: Tensor  # (n * longest,) flat index of each (text, position), 0 for padding
    mask: Tensor  # (n, longest) int64: 1 for real tokens


class LeanBert:
    """The forward pass of a Hugging Face `BertModel` (eval mode, float32 or half) on flat
    tokens. Build with `LeanBert.build`."""

    def __init__(self, model: nn.Module, layers: list[_Layer]) -> None:
        self._embeddings = model.embeddings
        self._layers = layers
        self.device = next(model.parameters()).device

    @classmethod
    def build(cls, model: nn.Module) -> LeanBert | None:
        """The lean forward of `model`, or None where it is not a plain BERT encoder whose
        modules this file reproduces exactly (the caller still proves it on probes)."""
        config = getattr(model, "config", None)
        if (
            config is None
            or type(model).__name__ != "BertModel"
            or getattr(config, "position_embedding_type", "absolute") != "absolute"
            or getattr(config, "is_decoder", False)
            or getattr(config, "add_cross_attention", False)
            or getattr(config, "chunk_size_feed_forward", 0)
            or model.training
        ):
            return None
        try:
            layers = [_layer(layer) for layer in model.encoder.layer]
        except (AttributeError, TypeError):
            return None
        return cls(model, layers)

    def forward(self, batch: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        """Token embeddings (n, longest, hidden), one padded row per text, and the mask (n,
        longest) int64, as the padded batch gives them. The caller holds inference_mode."""
        lengths = np.fromiter((len(ids) for ids in batch), dtype=np.int64, count=len(batch))
        layout = _layout(lengths, self.device)
        ids = torch.from_numpy(np.fromiter((i for ids in batch for i in ids), dtype=np.int64))
        positions = np.arange(int(lengths.max()))
        position_ids = torch.from_numpy(np.concatenate([positions[:size] for size in lengths]))
        hidden = self._embed(ids.to(self.device), position_ids.to(self.device))
        for layer in self._layers:
            hidden = _run_layer(layer, hidden, layout)
        n, longest = layout.mask.shape
        padded = hidden.index_select(0, layout.padded).view(n, longest, hidden.shape[1])
        return padded, layout.mask

    def _embed(self, ids: Tensor, position_ids: Tensor) -> Tensor:
        embeddings = self._embeddings
        # The order of Hugging Face's BertEmbeddings: (words + token type 0) + positions.
        token_types = torch.zeros_like(ids)
        hidden = embeddings.word_embeddings(ids) + embeddings.token_type_embeddings(token_types)
        hidden = hidden + embeddings.position_embeddings(position_ids)
        return embeddings.LayerNorm(hidden)


def _layer(layer: nn.Module) -> _Layer:
    attention = layer.attention.self
    projections = (attention.query, attention.key, attention.value)
    linears = (*projections, layer.attention.output.dense, layer.output.dense)
    if not all(type(linear) is nn.Linear for linear in linears):
        raise TypeError("not plain nn.Linear layers (quantized?)")
    with torch.no_grad():  # a plain copy: no autograd history kept with it
        qkv_weight = torch.cat([p.weight for p in projections])
        qkv_bias = torch.cat([p.bias for p in projections])
    _share(projections, qkv_weight, qkv_bias)
    return _Layer(
        qkv_weight=qkv_weight,
        qkv_bias=qkv_bias,
        heads=attention.num_attention_heads,
        head_size=attention.attention_head_size,
        scale=attention.scaling,
        attention_out=layer.attention.output.dense,
        attention_norm=layer.attention.output.LayerNorm,
        intermediate=layer.intermediate,
        out=layer.output.dense,
        out_norm=layer.output.LayerNorm,
    )


def _share(projections: Sequence[nn.Linear], weight: Tensor, bias: Tensor) -> None:
    """Point the projections' own weights at their rows of the stacked copy: the model keeps
    one copy of them, not two (a quarter of an encoder layer's weights: 10 MB for MiniLM-L6,
    ~300 MB for a BERT-large), and both forwards read the same numbers."""
    rows = 0
    for projection in projections:
        size = projection.weight.shape[0]
        projection.weight.data = weight[rows : rows + size]
        projection.bias.data = bias[rows : rows + size]
        rows += size


def _run_layer(layer: _Layer, hidden: Tensor, layout: _Layout) -> Tensor:
    """One BertLayer on flat tokens (tokens, hidden): BertSelfAttention, BertSelfOutput,
    BertIntermediate and BertOutput in their order of operations, dropout being off."""
    qkv = F.linear(hidden, layer.qkv_weight, layer.qkv_bias)
    context = _attention(layer, qkv, layout)
    hidden = layer.attention_norm(layer.attention_out(context) + hidden)
    return layer.out_norm(layer.out(layer.intermediate(hidden)) + hidden)


def _attention(layer: _Layer, qkv: Tensor, layout: _Layout) -> Tensor:
    outputs = []
    for group in layout.groups:
        shape = (group.texts, group.width, 3, layer.heads, layer.head_size)
        q, k, v = qkv.index_select(0, group.gather).view(shape).permute(2, 0, 3, 1, 4)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=group.mask, scale=layer.scale)
        context = context.transpose(1, 2).reshape(group.texts * group.width, -1)
        outputs.append(context.index_select(0, group.real))
    joined = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return joined if layout.back is None else joined.index_select(0, layout.back)


def _layout(lengths: np.ndarray, device: torch.device) -> _Layout:
    """Where each token goes: the attention groups and the final padded rows."""
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    several = len(lengths) > ATTENTION_GROUP
    order = np.argsort(-lengths, kind="stable") if several else np.arange(len(lengths))
    groups, sources = [], []
    for first in range(0, len(order), ATTENTION_GROUP):
        members = order[first : first + ATTENTION_GROUP]
        gather, real = _padded_index(starts[members], lengths[members])
        sources.append(gather[real])
        mask = torch.from_numpy(np.ascontiguousarray(real.reshape(len(members), 1, 1, -1)))
        groups.append(
            _Group(
                gather=_on(np.where(real, gather, 0), device),
                real=_on(np.flatnonzero(real), device),
                mask=mask.to(device),
                texts=len(members),
                width=int(lengths[members].max()),
            )
        )
    back = _on(np.argsort(np.concatenate(sources)), device) if several else None
    gather, real = _padded_index(starts, lengths)
    mask = torch.from_numpy(real.reshape(len(lengths), -1).astype(np.int64)).to(device)
    return _Layout(groups, back, _on(np.where(real, gather, 0), device), mask)


def _padded_index(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For texts starting at `starts` in the flat token list, padded to their longest: the flat
    index of every slot (row-major) and whether the slot holds a real token."""
    columns = np.arange(int(lengths.max()))
    real = columns[None, :] < lengths[:, None]
    gather = starts[:, None] + columns[None, :]
    return gather.reshape(-1), real.reshape(-1)


def _on(array: np.ndarray, device: torch.device) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).to(device)
