"""The worker's core stage: jobs in, replies and cache entries out.

No Redis here: `iter_steps` takes decoded jobs and yields what to write after
each forward pass, so the loop in worker.py stays about I/O. Texts are
deduplicated across all jobs of a read, tokenized once, grouped into
token-budget batches of similar length, first arrivals first (batching.plan_batches),
and encoded; deadlines, and callers that left (as the worker's reader learns
while the read runs), are checked before every batch, not once per read.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from embedq.internal.v1 import queue_pb2
from embedq.keys import ErrorKind, Keys, text_sha256, variant_fingerprint

from .backends import PooledEncoder, TokenizedText
from .batching import SPAN_BATCHES, plan_batches

log = logging.getLogger(__name__)

DEADLINE_MESSAGE = "deadline passed while queued"

# Items whose callers left, as (reply_to, ticket): filled by the worker's reader while a
# read runs (another thread: a set's add and `in` are atomic), read before each batch.
Gone = set[tuple[str, int]]


@dataclass
class Outcome:
    """What one read of jobs produced."""

    replies: dict[str, queue_pb2.Reply] = field(default_factory=dict)
    # Cache key -> raw little-endian float32 vector bytes.
    cache: dict[str, bytes] = field(default_factory=dict)
    texts_encoded: int = 0

    def reply(self, reply_to: str) -> queue_pb2.Reply:
        if reply_to not in self.replies:
            self.replies[reply_to] = queue_pb2.Reply()
        return self.replies[reply_to]

    def fail(self, job: queue_pb2.Job, ticket: int, kind: ErrorKind, message: str) -> None:
        self.reply(job.reply_to).failures.add(ticket=ticket, kind=kind, message=message)

    @classmethod
    def combined(cls, outcomes: Sequence[Outcome]) -> Outcome:
        """One outcome holding several (same encoder, so the same dimension). Each reply's
        vectors are joined once: adding them outcome by outcome copied the growing bytes
        every time, and a writer behind a fast model combines dozens of steps (profiled:
        4 % of a bench-zero worker's interpreter time)."""
        if len(outcomes) == 1:
            return outcomes[0]
        out = cls()
        vectors: dict[str, list[bytes]] = defaultdict(list)
        for outcome in outcomes:
            for reply_to, reply in outcome.replies.items():
                mine = out.reply(reply_to)
                mine.tickets.extend(reply.tickets)
                mine.dimension = reply.dimension or mine.dimension
                mine.failures.extend(reply.failures)
                mine.tokens.extend(reply.tokens)
                vectors[reply_to].append(reply.vectors)
            out.cache.update(outcome.cache)
            out.texts_encoded += outcome.texts_encoded
        for reply_to, parts in vectors.items():
            out.replies[reply_to].vectors = b"".join(parts)
        return out

    @property
    def empty(self) -> bool:
        return not (self.replies or self.cache)


@dataclass(frozen=True)
class BatchLimits:
    max_batch_tokens: int = 16384
    max_batch_size: int = 256


@dataclass
class Step:
    """What one forward pass (or one cheap pass over other work) finished:
    results to write now, and the jobs (indices into the read) all of whose
    items are answered, so they can be acknowledged with these results."""

    outcome: Outcome
    finished_jobs: list[int]
    # Items answered (encoded or failed) since the previous step, all jobs together.
    answered_items: int = 0


# Who waits for a text: (job index in the read, ticket, the caller's deadline in Unix ms).
Wait = tuple[int, int, int]


@dataclass
class _Work:
    """The unique texts of one normalisation setting, and who waits for them."""

    texts: list[str] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)
    # Per unique text: who waits for it, as (job index, ticket, deadline in Unix ms; 0: none).
    waiting: list[list[Wait]] = field(default_factory=list)

    def add(self, job_index: int, ticket: int, text: str, deadline_ms: int) -> None:
        if text not in self.index:
            self.index[text] = len(self.texts)
            self.texts.append(text)
            self.waiting.append([])
        self.waiting[self.index[text]].append((job_index, ticket, deadline_ms))


class _Tracker:
    """Counts the unanswered items of each job of a read."""

    def __init__(self, jobs: Sequence[queue_pb2.Job]) -> None:
        self.jobs = jobs
        self.remaining = [len(job.items) for job in jobs]
        self.outcome = Outcome()
        self.answered_items = 0
        # Jobs left with no item (every caller cancelled) are done at once.
        self.finished = [index for index, count in enumerate(self.remaining) if count == 0]

    def answered(self, job_index: int) -> None:
        self.answered_items += 1
        self.remaining[job_index] -= 1
        if self.remaining[job_index] == 0:
            self.finished.append(job_index)

    def fail(self, job_index: int, ticket: int, kind: ErrorKind, message: str) -> None:
        self.outcome.fail(self.jobs[job_index], ticket, kind, message)
        self.answered(job_index)

    def step(self) -> Step:
        """Hand over what was finished since the last step."""
        step = Step(self.outcome, self.finished, self.answered_items)
        self.outcome, self.finished, self.answered_items = Outcome(), [], 0
        return step


def run_jobs(
    jobs: Sequence[queue_pb2.Job],
    encoder: PooledEncoder,
    keys: Keys,
    limits: BatchLimits = BatchLimits(),
    now_ms: int | None = None,
) -> Outcome:
    """Every result of a read at once (see iter_steps for the incremental form)."""
    clock = (lambda: now_ms) if now_ms is not None else None
    steps = iter_steps(jobs, encoder, keys, limits, clock=clock)
    return Outcome.combined([step.outcome for step in steps])


@dataclass
class _Group:
    """The unique texts of one (normalize, prompt) setting, tokenized."""

    normalize: bool
    prompt: str
    work: _Work
    tokenized: list[TokenizedText]


@dataclass
class Prepared:
    """A read made ready for the model: deduplicated and tokenized (no model needed: the
    worker's reader thread does this at hand-over, with the texts it tokenized ahead while
    the model ran the previous read)."""

    tracker: _Tracker
    groups: list[_Group]

    def several_passes(self, limits: BatchLimits) -> bool:
        """Whether the model needs more than one forward pass for this read (as planned by
        plan_batches: one group that fits max_batch_size and max_batch_tokens is one)."""
        if len(self.groups) != 1:
            return len(self.groups) > 1
        lengths = [len(tokens.ids) for tokens in self.groups[0].tokenized]
        padded = len(lengths) * max(lengths, default=0)
        return len(lengths) > limits.max_batch_size or padded > limits.max_batch_tokens


# Token ids of texts as the model reads them (prompt included), tokenized ahead.
Pretokenized = dict[str, TokenizedText]


def pretokenize(jobs: Sequence[queue_pb2.Job], encoder: PooledEncoder, known: Pretokenized) -> None:
    """Tokenize the encode jobs' texts not in `known` yet, into it: the worker's reader does
    this as jobs arrive, while the model runs, so a hand-over to the idle model does not
    wait for the tokenizer (measured: with a fast model it was the worker's serial stage)."""
    new: dict[str, None] = {}
    for job in jobs:
        if job.kind == queue_pb2.JOB_KIND_TOKENIZE:
            continue
        for item in job.items:
            text = job.prompt + item.text
            if text not in known:
                new[text] = None
    if new:
        known.update(zip(new, encoder.tokenize(list(new)), strict=True))


def prepare(
    jobs: Sequence[queue_pb2.Job],
    encoder: PooledEncoder,
    clock: Callable[[], int] | None = None,
    known: Pretokenized | None = None,
) -> Prepared:
    """Fail what expired while queued, answer tokenize jobs, dedupe and tokenize the rest
    (texts in `known`, from pretokenize(), are not tokenized again; new ones are added)."""
    known = {} if known is None else known
    tracker = _Tracker(jobs)
    # Texts are shared across jobs only when they become the same vectors.
    work: dict[tuple[bool, str], _Work] = defaultdict(_Work)
    now = (clock or _now_ms)()
    for job_index, job in enumerate(jobs):
        if _expired(job, now):
            for item in job.items:
                tracker.fail(job_index, item.ticket, ErrorKind.DEADLINE, DEADLINE_MESSAGE)
        elif job.kind == queue_pb2.JOB_KIND_TOKENIZE:
            _tokenize_job(job_index, job, encoder, tracker)
        else:
            add, job_deadline = work[job.normalize, job.prompt].add, job.deadline_unix_ms
            for item in job.items:  # every text of a read: kept lean (_past inlined)
                deadline = item.deadline_unix_ms or job_deadline
                if deadline and deadline < now:
                    tracker.fail(job_index, item.ticket, ErrorKind.DEADLINE, DEADLINE_MESSAGE)
                else:
                    add(job_index, item.ticket, item.text, deadline)
    groups = []
    for (normalize, prompt), texts in work.items():
        # The prompt is part of the text the model reads (and counts toward
        # max_seq_length), as in sentence-transformers.
        tokenized = _tokenized([prompt + text for text in texts.texts], encoder, known)
        _reject_over_length(texts, tokenized, encoder.spec.max_seq_length, tracker)
        groups.append(_Group(normalize, prompt, texts, tokenized))
    return Prepared(tracker, groups)


def _tokenized(
    texts: list[str], encoder: PooledEncoder, known: Pretokenized
) -> list[TokenizedText]:
    missing = [text for text in texts if text not in known]
    if missing:
        known.update(zip(missing, encoder.tokenize(missing), strict=True))
    return [known[text] for text in texts]


def iter_steps(
    jobs: Sequence[queue_pb2.Job],
    encoder: PooledEncoder,
    keys: Keys,
    limits: BatchLimits = BatchLimits(),
    clock: Callable[[], int] | None = None,
    prepared: Prepared | None = None,
    gone: Gone | None = None,
) -> Iterator[Step]:
    """Run a read of jobs one forward pass at a time, yielding after each.

    The caller writes each step's results at once, so the callers whose texts
    ran in an early batch are not held until the whole read is done, and the
    clock is checked before every batch: an item whose caller's deadline has
    passed is failed (DEADLINE_EXCEEDED), not encoded; one in `gone` (its caller
    left; the set may grow meanwhile) is dropped unanswered. `prepared`: the read
    already prepared (prepare()), else it is prepared here.
    """
    clock = clock or _now_ms
    prepared = prepared or prepare(jobs, encoder, clock)
    tracker = prepared.tracker
    if tracker.outcome.replies or tracker.finished:
        yield tracker.step()
    gone = set() if gone is None else gone
    for group in prepared.groups:
        yield from _encode_group(group, encoder, keys, limits, tracker, clock, gone)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _expired(job: queue_pb2.Job, now_ms: int) -> bool:
    """Every item of the job expired (its deadline is the latest of theirs)."""
    return _past(job.deadline_unix_ms, now_ms)


def _past(deadline_ms: int, now_ms: int) -> bool:
    return bool(deadline_ms) and deadline_ms < now_ms


def _over_length_message(tokens: TokenizedText, max_len: int) -> str:
    return (
        f"text is {tokens.full_length} tokens, over the model's max_seq_length of {max_len} "
        "(truncation is REJECT)"
    )


def _encode_group(
    group: _Group,
    encoder: PooledEncoder,
    keys: Keys,
    limits: BatchLimits,
    tracker: _Tracker,
    clock: Callable[[], int],
    gone: Gone,
) -> Iterator[Step]:
    work, tokenized = group.work, group.tokenized
    batches = plan_batches(
        [len(t.ids) for t in tokenized],
        max_batch_tokens=limits.max_batch_tokens,
        max_batch_size=limits.max_batch_size,
        span_tokens=SPAN_BATCHES * limits.max_batch_tokens,
    )
    for batch in batches:
        live = _drop_expired(work, batch, tracker, clock(), gone)
        for part, vectors, error in _embed_isolating(live, tokenized, group.normalize, encoder):
            tracker.outcome.texts_encoded += len(part)
            _answer_batch(work, part, vectors, error, encoder, keys, tracker)
        if tracker.outcome.replies or tracker.finished:
            yield tracker.step()


def _reject_over_length(
    group: _Work, tokenized: list[TokenizedText], max_len: int, tracker: _Tracker
) -> None:
    """Under TRUNCATION_REJECT an over-long text fails its job's items at once."""
    for index, tokens in enumerate(tokenized):
        if not tokens.truncated:
            continue
        kept = []
        for wait in group.waiting[index]:
            job_index, ticket, _deadline = wait
            if tracker.jobs[job_index].truncate:
                kept.append(wait)
            else:
                message = _over_length_message(tokens, max_len)
                tracker.fail(job_index, ticket, ErrorKind.TOO_LONG, message)
        group.waiting[index] = kept


def _drop_expired(
    group: _Work, batch: list[int], tracker: _Tracker, now_ms: int, gone: Gone
) -> list[int]:
    """The texts of `batch` someone still waits for (in time); fail the expired waits
    (each caller's own deadline: one job holds the items of many callers), and drop those
    whose callers left (`gone`): nobody reads their answer, so they count as done (their
    job can be acknowledged) without one."""
    live = []
    for index in batch:
        kept = []
        for wait in group.waiting[index]:
            job_index, ticket, deadline = wait
            if gone and (tracker.jobs[job_index].reply_to, ticket) in gone:
                tracker.answered(job_index)
            elif _past(deadline, now_ms):
                tracker.fail(job_index, ticket, ErrorKind.DEADLINE, DEADLINE_MESSAGE)
            else:
                kept.append(wait)
        group.waiting[index] = kept
        if kept:
            live.append(index)
    return live


def _embed_isolating(
    batch: list[int],
    tokenized: list[TokenizedText],
    normalize: bool,
    encoder: PooledEncoder,
    logged: bool = False,
) -> Iterator[tuple[list[int], np.ndarray | None, str]]:
    """(texts, their rows or None, why) for the parts of `batch`. A batch the encoder
    raises on is split in halves, each tried again: a text it cannot take fails alone, not
    the other callers' texts that shared its batch (and a batch too big for the device's
    memory is answered in smaller ones). Only the first failure is logged in full."""
    if not batch:
        return
    vectors, error = _embed_batch(batch, tokenized, normalize, encoder, logged)
    if vectors is not None or len(batch) == 1:
        yield batch, vectors, error
        return
    middle = len(batch) // 2
    for half in (batch[:middle], batch[middle:]):
        yield from _embed_isolating(half, tokenized, normalize, encoder, logged=True)


def _embed_batch(
    batch: list[int],
    tokenized: list[TokenizedText],
    normalize: bool,
    encoder: PooledEncoder,
    logged: bool = False,
) -> tuple[np.ndarray | None, str]:
    """The batch's rows, or None and why."""
    try:
        return encoder.embed([tokenized[i].ids for i in batch], normalize=normalize), ""
    except Exception as exc:  # noqa: BLE001 - reported to the callers, worker goes on
        if logged:
            log.debug("encoder failed on a part of %d texts", len(batch), exc_info=True)
        else:
            parts = "; trying it in parts" if len(batch) > 1 else ""
            log.exception("encoder failed on a batch of %d texts%s", len(batch), parts)
        return None, f"encoder failed: {type(exc).__name__}: {str(exc)[:200]}"


def _answer_batch(
    group: _Work,
    batch: list[int],
    vectors: np.ndarray | None,
    error: str,
    encoder: PooledEncoder,
    keys: Keys,
    tracker: _Tracker,
) -> None:
    if vectors is None:
        for index in batch:
            for job_index, ticket, _deadline in group.waiting[index]:
                tracker.fail(job_index, ticket, ErrorKind.INTERNAL, error)
        return
    # One conversion per batch, each row's bytes a slice of it (profiled: per-text numpy
    # calls were a visible part of a worker's time when the model is fast).
    blob = vectors.astype("<f4", copy=False).tobytes()
    size = vectors.shape[1] * 4
    row_bytes = [blob[position * size : (position + 1) * size] for position in range(len(batch))]
    rows: dict[str, list[tuple[int, int]]] = defaultdict(list)
    prefixes: dict[int, str] = {}  # job index -> its cache key prefix (one per job, not text)
    cache = tracker.outcome.cache
    for position, index in enumerate(batch):
        text_hash = text_sha256(group.texts[index])
        for job_index, ticket, _deadline in group.waiting[index]:
            job = tracker.jobs[job_index]
            rows[job.reply_to].append((ticket, position))
            tracker.answered(job_index)
            prefix = prefixes.get(job_index)
            if prefix is None:
                prefix = prefixes[job_index] = _cache_prefix(job, encoder, keys)
            cache[prefix + text_hash] = row_bytes[position]
    for reply_to, pairs in rows.items():
        reply = tracker.outcome.reply(reply_to)
        reply.tickets.extend(ticket for ticket, _ in pairs)
        reply.dimension = encoder.spec.dimension
        reply.vectors += b"".join(row_bytes[position] for _, position in pairs)


def _cache_prefix(job: queue_pb2.Job, encoder: PooledEncoder, keys: Keys) -> str:
    # Keyed by this worker's own fingerprint: if a server's view of the model
    # is stale, it misses the cache rather than read another model's vectors.
    variant = variant_fingerprint(
        encoder.spec.fingerprint, normalize=job.normalize, truncate=job.truncate, prompt=job.prompt
    )
    return keys.cache_prefix(variant)


def _tokenize_job(
    job_index: int, job: queue_pb2.Job, encoder: PooledEncoder, tracker: _Tracker
) -> None:
    texts = [job.prompt + item.text for item in job.items]
    max_len = encoder.spec.max_seq_length
    for item, tokens in zip(job.items, encoder.tokenize(texts), strict=True):
        if not job.truncate and tokens.truncated:
            message = _over_length_message(tokens, max_len)
            tracker.fail(job_index, item.ticket, ErrorKind.TOO_LONG, message)
            continue
        tracker.outcome.reply(job.reply_to).tokens.add(
            ticket=item.ticket,
            ids=tokens.ids,
            tokens=encoder.token_strings(tokens.ids),
            truncated=tokens.truncated,
            full_length=tokens.full_length,
        )
        tracker.answered(job_index)
