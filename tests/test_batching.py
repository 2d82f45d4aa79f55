"""plan_batches: a pure policy, tested without Redis or a model."""

from __future__ import annotations

import random

import numpy as np
import pytest
from embedq.workers.backends.packing import pack, pack_rows
from embedq.workers.batching import (
    FRESH_JOB_MS,
    LINGER_CAP_S,
    ReaderWait,
    RecentPeak,
    linger_s,
    needs_cancel_check,
    padded_tokens,
    plan_batches,
    reader_wait,
)


def check_plan(lengths: list[int], plan: list[list[int]], max_tokens: int, max_size: int) -> None:
    """Every index once; each batch within both budgets, or a lone oversized item."""
    assert sorted(i for batch in plan for i in batch) == list(range(len(lengths)))
    for batch in plan:
        assert 1 <= len(batch) <= max_size
        cost = len(batch) * max(lengths[i] for i in batch)
        assert cost <= max_tokens or (len(batch) == 1 and lengths[batch[0]] > max_tokens)


@pytest.mark.parametrize("seed", range(20))
def test_random_inputs_respect_budgets(seed: int) -> None:
    rng = random.Random(seed)
    lengths = [
        rng.choice([rng.randint(0, 16), rng.randint(2, 256), rng.randint(200, 600)])
        for _ in range(rng.randint(1, 400))
    ]
    max_tokens, max_size = rng.choice([256, 1024, 8192]), rng.choice([1, 4, 32, 128])
    plan = plan_batches(lengths, max_batch_tokens=max_tokens, max_batch_size=max_size)
    check_plan(lengths, plan, max_tokens, max_size)


def test_empty_input() -> None:
    assert plan_batches([], max_batch_tokens=100, max_batch_size=8) == []


def test_single_oversized_item_is_alone() -> None:
    assert plan_batches([5000], max_batch_tokens=1000, max_batch_size=8) == [[0]]
    lengths = [10, 5000, 10, 3000, 10]
    plan = plan_batches(lengths, max_batch_tokens=1000, max_batch_size=8)
    assert plan == [[1], [3], [0, 2, 4]]
    check_plan(lengths, plan, 1000, 8)


def test_max_batch_size_caps_batches() -> None:
    plan = plan_batches([3] * 10, max_batch_tokens=10_000, max_batch_size=4)
    assert plan == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_token_budget_is_padded_cost() -> None:
    # Three 100-token items cost 300; a fourth would make 400 > 350.
    plan = plan_batches([100, 100, 100, 100, 1], max_batch_tokens=350, max_batch_size=64)
    assert plan == [[0, 1, 2], [3, 4]]


def test_sorting_reduces_padding_vs_arrival_order() -> None:
    rng = random.Random(7)
    lengths = [rng.choice([8, 256]) + rng.randint(0, 8) for _ in range(256)]
    plan = plan_batches(lengths, max_batch_tokens=8192, max_batch_size=32)
    arrival = [list(range(i, min(i + 32, len(lengths)))) for i in range(0, len(lengths), 32)]
    assert padded_tokens(lengths, plan) < 0.75 * padded_tokens(lengths, arrival)
    assert padded_tokens(lengths, plan) < 1.1 * sum(lengths)


def spans_of(lengths: list[int], span_tokens: int) -> list[set[int]]:
    """Consecutive items, cut where the next would pass span_tokens (each span >= 1 item)."""
    spans: list[set[int]] = []
    total = 0
    for index, length in enumerate(lengths):
        if not spans or total + length > span_tokens:
            spans.append(set())
            total = 0
        spans[-1].add(index)
        total += length
    return spans


@pytest.mark.parametrize("seed", range(10))
def test_spans_keep_budgets_and_arrival_order(seed: int) -> None:
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 16), rng.randint(100, 600)]) for _ in range(300)]
    span = rng.choice([50, 700, 4096])
    plan = plan_batches(lengths, max_batch_tokens=1024, max_batch_size=32, span_tokens=span)
    check_plan(lengths, plan, 1024, 32)
    # Each batch lies within one span, and the spans' batches come in arrival order: the
    # first arrivals are answered first.
    spans = spans_of(lengths, span)
    owner = [next(n for n, members in enumerate(spans) if set(batch) <= members) for batch in plan]
    assert owner == sorted(owner) and set(owner) == set(range(len(spans)))


def test_spans_answer_first_arrivals_first() -> None:
    # Two calls, each a long text and two short ones, two texts a batch: one length order
    # over both calls puts call 2's long text in the first batch and its short ones in the
    # last, so both calls end with the last batch; spans of 12 tokens keep the calls apart.
    lengths = [10, 1, 1, 10, 1, 1]
    whole = plan_batches(lengths, max_batch_tokens=100, max_batch_size=2)
    assert whole == [[0, 3], [1, 2], [4, 5]]
    spans = plan_batches(lengths, max_batch_tokens=100, max_batch_size=2, span_tokens=12)
    assert spans == [[0, 1], [2], [3, 4], [5]]
    # An item longer than a span is a span of its own.
    lone = plan_batches([50, 2, 2], max_batch_tokens=100, max_batch_size=8, span_tokens=10)
    assert lone == [[0], [1, 2]]


def test_deterministic_and_stable_for_ties() -> None:
    lengths = [4, 9, 4, 9, 4]
    first = plan_batches(lengths, max_batch_tokens=18, max_batch_size=8)
    assert first == plan_batches(list(lengths), max_batch_tokens=18, max_batch_size=8)
    assert first == [[1, 3], [0, 2, 4]]  # longest first, equal lengths in arrival order


def test_zero_length_items_fill_up_to_size() -> None:
    plan = plan_batches([0, 0, 0], max_batch_tokens=1, max_batch_size=2)
    assert plan == [[0, 1], [2]]


@pytest.mark.parametrize(("lengths", "tokens", "size"), [([1], 0, 1), ([1], 1, 0), ([-1], 10, 10)])
def test_invalid_arguments(lengths: list[int], tokens: int, size: int) -> None:
    with pytest.raises(ValueError):
        plan_batches(lengths, max_batch_tokens=tokens, max_batch_size=size)


# -- linger: waiting consumers fill one batch -------------------------------------------


def test_a_lone_caller_never_waits() -> None:
    assert linger_s(1, recent_texts=1, busy_s=0.04, waited_s=0.0) == 0.0
    assert linger_s(1, recent_texts=0, busy_s=0.04, waited_s=0.0) == 0.0
    assert linger_s(0, recent_texts=16, busy_s=0.04, waited_s=0.0) == 0.0


def test_fewer_texts_than_recent_hand_overs_wait_a_share_of_the_busy_time() -> None:
    # CPU-like pass of 20 ms: up to 5 ms; what was waited counts.
    assert linger_s(3, recent_texts=16, busy_s=0.020, waited_s=0.0) == pytest.approx(0.005)
    assert linger_s(3, recent_texts=16, busy_s=0.020, waited_s=0.004) == pytest.approx(0.001)
    assert linger_s(3, recent_texts=16, busy_s=0.020, waited_s=0.006) == 0.0
    # All the recent callers are back: hand over at once.
    assert linger_s(16, recent_texts=16, busy_s=0.020, waited_s=0.0) == 0.0


def test_the_wait_is_capped_whatever_a_pass_costs() -> None:
    assert linger_s(1, recent_texts=256, busy_s=2.0, waited_s=0.0) == LINGER_CAP_S
    assert linger_s(1, recent_texts=256, busy_s=2.0, waited_s=0.0, cap_s=0.002) == 0.002


def test_recent_peak_forgets_after_its_window() -> None:
    peak = RecentPeak(window_s=1.0)
    assert peak.peak(0.0) == 0
    peak.record(16, now=10.0)
    peak.record(4, now=10.5)
    assert peak.peak(10.9) == 16
    assert peak.peak(11.2) == 4
    assert peak.peak(12.0) == 0


# -- packed batches (workers/backends/packing.py) -------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_packed_rows_hold_every_text_once_within_the_width(seed: int) -> None:
    rng = random.Random(seed)
    lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 70))]
    width = max(lengths)
    rows = pack_rows(lengths, width)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= width for row in rows)
    assert pack_rows(lengths, width) == rows  # deterministic


def test_a_text_longer_than_the_width_gets_its_own_row() -> None:
    assert pack_rows([5, 30, 4, 3], 10) == [[1], [0, 2], [3]]


def test_packed_inputs_give_each_text_its_own_positions_and_attention() -> None:
    batch = [[101, 7, 102], [101, 8, 9, 10, 102], [101, 102]]
    packed = pack(batch, pad_id=0, max_width=16)
    # Rows of up to 1.5 x 5 tokens: the 5- and 3-token texts share one, the 2-token one waits.
    assert packed is not None and packed.input_ids.shape == (2, 8)
    width = packed.input_ids.shape[1]
    for index, ids in enumerate(batch):
        rows = packed.gather_rows[index, : len(ids)]
        cols = packed.gather_cols[index, : len(ids)]
        assert packed.input_ids[rows, cols].tolist() == ids
        assert packed.position_ids[rows, cols].tolist() == list(range(len(ids)))
        assert packed.mask[index].tolist() == [1] * len(ids) + [0] * (5 - len(ids))
        row = rows[0]
        seen = packed.attention[row, 0][np.ix_(cols, range(width))]
        # Each token sees exactly its own text's tokens.
        assert (seen.sum(axis=1) == len(ids)).all() and seen[:, cols].all()
    # Every slot sees something (padding sees itself): no all-masked softmax row.
    assert packed.attention.any(axis=-1).all()


def test_packing_is_skipped_when_it_saves_no_row_or_a_text_is_empty() -> None:
    assert pack([[1, 2, 3], [4, 5, 6]], pad_id=0, max_width=4) is None  # rows capped at 4
    assert pack([[1, 2], [], [3]], pad_id=0, max_width=16) is None
    assert pack([[1, 2]], pad_id=0, max_width=16) is None
    packed = pack([[1, 2], [3]], pad_id=0, max_width=16)
    assert packed is not None and packed.input_ids.shape == (1, 3)


def test_the_reader_blocks_only_with_nothing_pending_and_polls_a_slow_linger_often() -> None:
    def wait(pending: bool, idle: bool, linger: float) -> ReaderWait:
        return reader_wait(
            pending, idle, linger, poll_s=0.002, linger_poll_s=0.0005, idle_block_ms=1000
        )

    # Nothing pending: block on Redis until a job comes, whatever the model does.
    assert wait(False, idle=True, linger=0.0) == ReaderWait(1000)
    assert wait(False, idle=False, linger=0.0) == ReaderWait(1000)
    # Texts pending, the model busy: poll every period (its end, not a job, ends the wait).
    assert wait(True, idle=False, linger=0.0) == ReaderWait(None, 0.002)
    # Lingering for a slow pass: poll often, never a blocking read (an idle Redis would
    # time it out only at its next cron tick), never past the linger.
    assert wait(True, idle=True, linger=0.0075) == ReaderWait(None, 0.0005)
    assert wait(True, idle=True, linger=0.002) == ReaderWait(None, 0.0005)
    # A fast model's short linger: sleep the rest of it, taking several jobs per read.
    assert wait(True, idle=True, linger=0.0015) == ReaderWait(None, 0.0015)


def test_a_fresh_read_for_an_idle_model_skips_the_cancel_check():
    """Jobs queued a moment ago (the entry id's ms) and run at once: no round trip to ask
    whether their callers left. Jobs that waited, or that wait behind a busy model: asked."""
    now = 1_733_500_000_000.0
    fresh = [f"{int(now) - 3}-0".encode(), f"{int(now) - 1}-5".encode()]
    assert not needs_cancel_check(fresh, now, model_idle=True)
    assert needs_cancel_check(fresh, now, model_idle=False)
    waited = [*fresh, f"{int(now) - FRESH_JOB_MS}-0".encode()]
    assert needs_cancel_check(waited, now, model_idle=True)
    assert needs_cancel_check(["not-an-id"], now, model_idle=True)
    assert not needs_cancel_check([f"{int(now)}-0"], now, model_idle=True)  # str ids too
