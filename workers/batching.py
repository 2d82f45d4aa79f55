"""Batching policy: which queued texts run through the encoder together.

A padded batch costs len(batch) * longest item in tokens, so similar lengths go together and a
token budget (TEI's max_batch_tokens) bounds memory and latency per forward pass. Pure
functions: no Redis, no model.
"""

from __future__ import annotations

from collections.abc import Sequence


def plan_batches(
    lengths: Sequence[int], *, max_batch_tokens: int, max_batch_size: int
) -> list[list[int]]:
    """Groups item indices into batches for the encoder.

    Sorts by token length, longest first (so padding is small, and a batch that would not fit
    in memory fails on the first pass rather than the last); each batch's padded cost
    len(batch) * max(length in batch) <= max_batch_tokens, and len(batch) <= max_batch_size.
    An item longer than max_batch_tokens alone forms its own batch. Every index appears exactly
    once. Deterministic: equal lengths keep arrival order.
    """
    if max_batch_tokens < 1 or max_batch_size < 1:
        raise ValueError("max_batch_tokens and max_batch_size must be >= 1")
    if any(length < 0 for length in lengths):
        raise ValueError("token lengths must be >= 0")
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])  # stable
    batches: list[list[int]] = []
    for index in order:
        current = batches[-1] if batches else None
        # Longest first, so the batch's first item sets its padded width.
        fits = (
            current is not None
            and len(current) < max_batch_size
            and (len(current) + 1) * lengths[current[0]] <= max_batch_tokens
        )
        if fits:
            current.append(index)
        else:
            batches.append([index])
    return batches


def padded_tokens(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> int:
    """Tokens the encoder processes for ``batches``, padding included (what plan_batches bounds)."""
    return sum(len(batch) * max(lengths[i] for i in batch) for batch in batches if batch)
