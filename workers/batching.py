"""Batching policy: which queued texts run through the encoder together.

A padded batch costs len(batch) * longest item in tokens, so similar lengths go together and a
token budget (TEI's max_batch_tokens) bounds memory and latency per forward pass. Pure
functions: no Redis, no model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# A read is batched in arrival order, a span of about this many batches' worth of tokens at a
# time (see plan_batches).
SPAN_BATCHES = 2


def plan_batches(
    lengths: Sequence[int],
    *,
    max_batch_tokens: int,
    max_batch_size: int,
    span_tokens: int | None = None,
) -> list[list[int]]:
    """Groups item indices (in arrival order) into batches for the encoder.

    Items are taken in arrival order, a span at a time: consecutive items of up to
    `span_tokens` tokens in all (at least one item; None: all of them in one span). Within a
    span they are sorted by token length, longest first (so padding is small, and a batch that
    would not fit in memory fails on the span's first pass); each batch's padded cost
    len(batch) * max(length in batch) <= max_batch_tokens, and len(batch) <= max_batch_size.
    An item longer than max_batch_tokens alone forms its own batch. Every index appears exactly
    once. Deterministic: equal lengths keep arrival order.

    Why spans: a request is answered when its last text is, and one length order over a whole
    read spreads every request's texts over every batch of it, so all of them were answered
    together at the read's end (measured: a burst's calls of 128 texts finished 8 and 6 at a
    time, seconds apart, and calls admitted in time missed their deadline in the middle of the
    read that held them). Spans answer the first arrivals first, as admission assumes.
    """
    if max_batch_tokens < 1 or max_batch_size < 1:
        raise ValueError("max_batch_tokens and max_batch_size must be >= 1")
    if any(length < 0 for length in lengths):
        raise ValueError("token lengths must be >= 0")
    batches: list[list[int]] = []
    for span in _spans(lengths, span_tokens):
        batches += _batches_by_length(span, lengths, max_batch_tokens, max_batch_size)
    return batches


def _spans(lengths: Sequence[int], span_tokens: int | None) -> list[list[int]]:
    """Consecutive indices of `lengths`, cut where the next item would pass `span_tokens`."""
    if span_tokens is None:
        return [list(range(len(lengths)))] if lengths else []
    spans: list[list[int]] = []
    tokens = 0
    for index, length in enumerate(lengths):
        if not spans or tokens + length > span_tokens:
            spans.append([])
            tokens = 0
        spans[-1].append(index)
        tokens += length
    return spans


def _batches_by_length(
    items: Sequence[int], lengths: Sequence[int], max_batch_tokens: int, max_batch_size: int
) -> list[list[int]]:
    order = sorted(items, key=lambda index: -lengths[index])  # stable
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


# Linger: the most a reader waits for more texts before handing a read to an idle model, as a
# share of the model's last busy time (a wait is worth it only against a pass it saves) and in
# seconds (so latency stays bounded whatever one pass costs).
LINGER_SHARE = 0.25
LINGER_CAP_S = 0.010


def linger_s(
    pending_texts: int,
    recent_texts: int,
    busy_s: float,
    waited_s: float,
    *,
    share: float = LINGER_SHARE,
    cap_s: float = LINGER_CAP_S,
) -> float:
    """How much longer to wait for more texts before the idle model gets `pending_texts`.

    Callers that each wait for their answer (an event consumer sends one text, waits, sends
    the next) send their next texts within a few ms of each other. Handing the first arrivals
    over alone splits them into groups that alternate (the model runs one group while the
    other's answers travel), and small batches waste the model. So when recent hand-overs
    carried more texts (`recent_texts`) than are pending, wait up to `share` of the model's
    last busy time, at most `cap_s`, for the rest. A lone caller (recent_texts <= pending)
    never waits. Returns 0 to hand over now.
    """
    if pending_texts <= 0 or pending_texts >= recent_texts:
        return 0.0
    return max(0.0, min(cap_s, share * busy_s) - waited_s)


@dataclass(frozen=True)
class ReaderWait:
    """How the reader waits for more jobs: a read that blocks on Redis for `block_ms`
    (None: a read that does not block), then, if it brought nothing, a sleep of `sleep_s`."""

    block_ms: int | None
    sleep_s: float = 0.0


def reader_wait(
    pending: bool,
    model_idle: bool,
    linger_left_s: float,
    *,
    poll_s: float,
    linger_poll_s: float,
    idle_block_ms: int,
) -> ReaderWait:
    """How the reader waits next, given whether texts are pending, whether the model is idle
    and how long the linger has left (s).

    Nothing pending: block on Redis for `idle_block_ms`, busy model or not (polling Redis
    every few ms while the model ran slowed its passes on a shared CPU, measured; the worker
    shortens it to its cancellation check's period while a read of several passes runs). Texts
    pending and the model busy: poll every `poll_s` (the model's end, not a job, ends that
    wait). Lingering with a poll period or more left, which only a slow pass allows: poll
    every `linger_poll_s`, so that the text it waits for is taken soon after it is queued (at
    `poll_s` a waiting consumer's last text waited ~1 ms for the next poll, measured). Not a
    blocking read: an idle Redis checks a blocked read's timeout only at its next cron tick
    (measured: XREADGROUP BLOCK 8 returned after ~100 ms at Redis's default hz 10), so a
    text that never comes would hold the model that long. A shorter linger, a fast model's:
    sleep the rest of it, so that jobs streaming in are taken several per read (a reader that
    woke per job cost a fast model a fifth of its throughput, measured).
    """
    if not pending:
        return ReaderWait(idle_block_ms)
    if not model_idle:
        return ReaderWait(None, poll_s)
    if linger_left_s >= poll_s:
        return ReaderWait(None, min(linger_poll_s, linger_left_s))
    return ReaderWait(None, linger_left_s)


# Jobs queued less than this long ago (ms), read while the model is idle, are encoded without
# asking Redis whether their callers left (see needs_cancel_check).
FRESH_JOB_MS = 50


def needs_cancel_check(
    entry_ids: Sequence[bytes | str],
    now_ms: float,
    model_idle: bool,
    fresh_ms: float = FRESH_JOB_MS,
) -> bool:
    """Whether to ask Redis which items of a read their callers gave up on (a round trip).

    A caller that leaves within a few ms of queueing its job is rare, and an idle model runs a
    fresh read at once: encoding such an item now costs less than the round trip every lone
    request would pay on its path (measured: ~0.2 ms of a single text's ~14 ms on a 2-core
    CPU). Jobs that waited (a backlog, a burst: when callers give up), or that will wait behind
    a busy model's pass, are checked. An entry id carries its queueing time (Redis's clock,
    ms); one that does not parse is checked.
    """
    if not model_idle:
        return True
    try:
        return any(now_ms - _entry_ms(entry_id) >= fresh_ms for entry_id in entry_ids)
    except ValueError:
        return True


def _entry_ms(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return int(text.split("-", 1)[0])


class RecentPeak:
    """The largest value recorded in the last `window_s` seconds (0 when none)."""

    def __init__(self, window_s: float = 1.0) -> None:
        self.window_s = window_s
        self._samples: list[tuple[float, int]] = []

    def record(self, value: int, now: float) -> None:
        self._samples = [s for s in self._samples if now - s[0] < self.window_s]
        self._samples.append((now, value))

    def peak(self, now: float) -> int:
        return max((v for t, v in self._samples if now - t < self.window_s), default=0)
