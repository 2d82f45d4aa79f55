"""The worker's core stage: jobs in, replies and cache entries out.

No Redis here: `run_jobs` takes decoded jobs and returns what to write, so
the loop in worker.py stays about I/O. Texts are deduplicated across all
jobs of a read, tokenized once, grouped into token-budget batches of
similar length (batching.plan_batches) and encoded.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from embedq.internal.v1 import queue_pb2
from embedq.keys import Keys, text_sha256, variant_fingerprint

from . import faults
from .backends import PooledEncoder, TokenizedText
from .batching import plan_batches

log = logging.getLogger(__name__)

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
INTERNAL = grpc.StatusCode.INTERNAL.value[0]


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

    def fail(self, job: queue_pb2.Job, ticket: int, code: int, message: str) -> None:
        self.reply(job.reply_to).failures.add(ticket=ticket, code=code, message=message)


@dataclass(frozen=True)
class BatchLimits:
    max_batch_tokens: int = 16384
    max_batch_size: int = 256


@dataclass
class _Work:
    """The unique texts of one normalisation setting, and who waits for them."""

    texts: list[str] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)
    waiting: list[tuple[queue_pb2.Job, int, int]] = field(default_factory=list)

    def add(self, job: queue_pb2.Job, ticket: int, text: str) -> None:
        if text not in self.index:
            self.index[text] = len(self.texts)
            self.texts.append(text)
        self.waiting.append((job, ticket, self.index[text]))


def run_jobs(
    jobs: Sequence[queue_pb2.Job],
    encoder: PooledEncoder,
    keys: Keys,
    limits: BatchLimits = BatchLimits(),
    now_ms: int | None = None,
) -> Outcome:
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    outcome = Outcome()
    # Texts are shared across jobs only when they become the same vectors.
    work: dict[tuple[bool, str], _Work] = defaultdict(_Work)
    tokenize_jobs = []
    for job in jobs:
        if job.deadline_unix_ms and job.deadline_unix_ms < now_ms:
            for item in job.items:
                outcome.fail(job, item.ticket, DEADLINE_EXCEEDED, "deadline passed while queued")
        elif job.kind == queue_pb2.JOB_KIND_TOKENIZE:
            tokenize_jobs.append(job)
        else:
            for item in job.items:
                work[job.normalize, job.prompt].add(job, item.ticket, item.text)
    for (normalize, prompt), group in work.items():
        _encode_group(group, normalize, prompt, encoder, keys, limits, outcome)
    for job in tokenize_jobs:
        _tokenize_job(job, encoder, outcome)
    return outcome


def _over_length_message(tokens: TokenizedText, max_len: int) -> str:
    return (
        f"text is {tokens.full_length} tokens, over the model's max_seq_length of {max_len} "
        "(truncation is REJECT)"
    )


def _encode_group(
    group: _Work,
    normalize: bool,
    prompt: str,
    encoder: PooledEncoder,
    keys: Keys,
    limits: BatchLimits,
    outcome: Outcome,
) -> None:
    # The prompt is part of the text the model reads (and counts toward
    # max_seq_length), as in sentence-transformers.
    tokenized = encoder.tokenize([prompt + text for text in group.texts])
    vectors, errors = _embed_all(tokenized, group.texts, normalize, encoder, limits)
    outcome.texts_encoded += len(group.texts)
    max_len = encoder.spec.max_seq_length
    rows: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for job, ticket, index in group.waiting:
        if not job.truncate and tokenized[index].truncated:
            outcome.fail(
                job, ticket, INVALID_ARGUMENT, _over_length_message(tokenized[index], max_len)
            )
        elif index in errors:
            outcome.fail(job, ticket, INTERNAL, errors[index])
        else:
            rows[job.reply_to].append((ticket, index))
            _cache_vector(job, group.texts[index], vectors[index], encoder, keys, outcome)
    for reply_to, pairs in rows.items():
        reply = outcome.reply(reply_to)
        reply.tickets.extend(ticket for ticket, _ in pairs)
        reply.dimension = encoder.spec.dimension
        picked = vectors[[index for _, index in pairs]]
        reply.vectors += picked.astype("<f4", copy=False).tobytes()


def _embed_all(
    tokenized: list[TokenizedText],
    texts: list[str],
    normalize: bool,
    encoder: PooledEncoder,
    limits: BatchLimits,
) -> tuple[np.ndarray, dict[int, str]]:
    """Rows for every text; a batch that raises fails only its own texts."""
    vectors = np.zeros((len(tokenized), encoder.spec.dimension), dtype=np.float32)
    errors: dict[int, str] = {}
    batches = plan_batches(
        [len(t.ids) for t in tokenized],
        max_batch_tokens=limits.max_batch_tokens,
        max_batch_size=limits.max_batch_size,
    )
    for batch in batches:
        try:
            faults.raise_if_marked(texts[i] for i in batch)
            vectors[batch] = encoder.embed([tokenized[i].ids for i in batch], normalize=normalize)
        except Exception as exc:  # noqa: BLE001 - reported to the callers, worker goes on
            log.exception("encoder failed on a batch of %d texts", len(batch))
            message = f"encoder failed: {type(exc).__name__}: {str(exc)[:200]}"
            errors.update(dict.fromkeys(batch, message))
    return vectors, errors


def _cache_vector(
    job: queue_pb2.Job,
    text: str,
    vector: np.ndarray,
    encoder: PooledEncoder,
    keys: Keys,
    outcome: Outcome,
) -> None:
    # Keyed by this worker's own fingerprint: if a server's view of the model
    # is stale, it misses the cache rather than read another model's vectors.
    variant = variant_fingerprint(
        encoder.spec.fingerprint, normalize=job.normalize, truncate=job.truncate, prompt=job.prompt
    )
    outcome.cache[keys.cache(variant, text_sha256(text))] = vector.astype("<f4").tobytes()


def _tokenize_job(job: queue_pb2.Job, encoder: PooledEncoder, outcome: Outcome) -> None:
    texts = [job.prompt + item.text for item in job.items]
    max_len = encoder.spec.max_seq_length
    for item, tokens in zip(job.items, encoder.tokenize(texts), strict=True):
        if not job.truncate and tokens.truncated:
            outcome.fail(job, item.ticket, INVALID_ARGUMENT, _over_length_message(tokens, max_len))
            continue
        outcome.reply(job.reply_to).tokens.add(
            ticket=item.ticket,
            ids=tokens.ids,
            tokens=encoder.token_strings(tokens.ids),
            truncated=tokens.truncated,
            full_length=tokens.full_length,
        )
