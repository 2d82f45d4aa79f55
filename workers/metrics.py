"""Worker metrics (Prometheus), served over HTTP with ``embedq worker --metrics-port``.

- ``embedq_worker_batches_total``: forward passes run;
- ``embedq_worker_batch_texts`` / ``embedq_worker_batch_tokens``: texts and
  padded tokens (texts x longest) per forward pass;
- ``embedq_worker_busy_seconds_total``: time spent handling reads of jobs
  (decode, encode, write back), as opposed to waiting for them;
- ``embedq_worker_jobs_total{outcome}``: jobs (stream entries) finished:
  ``ok``, ``failed`` (at least one text got an error, deadline included),
  ``dead_lettered``, ``cancelled`` (every caller of the job had gone).

Forward passes are counted by wrapping the encoder (:func:`measured`), so the
pipeline itself knows nothing about metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet

from prometheus_client import Counter, Histogram, start_http_server

from embedq.internal.v1 import queue_pb2

log = logging.getLogger(__name__)

BATCHES = Counter("embedq_worker_batches", "Forward passes run")
BATCH_TEXTS = Histogram(
    "embedq_worker_batch_texts",
    "Texts per forward pass",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
BATCH_TOKENS = Histogram(
    "embedq_worker_batch_tokens",
    "Tokens per forward pass as if padded (texts x longest text; packed batches compute fewer)",
    buckets=(16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536),
)
BUSY = Counter("embedq_worker_busy_seconds", "Seconds spent handling jobs, not waiting for them")
JOBS = Counter("embedq_worker_jobs", "Jobs finished, by outcome", ["outcome"])
OUTCOMES = ("ok", "failed", "dead_lettered", "cancelled")
for _outcome in OUTCOMES:  # every series exists from the start, at 0
    JOBS.labels(_outcome)


class MeasuredEncoder:
    """Delegates to an encoder; each embed() call is one forward pass, counted."""

    def __init__(self, encoder: object) -> None:
        self._encoder = encoder

    def __getattr__(self, name: str) -> object:
        return getattr(self._encoder, name)

    def embed(self, batch: Sequence[Sequence[int]], *args: object, **kwargs: object):
        vectors = self._encoder.embed(batch, *args, **kwargs)
        if batch:
            BATCHES.inc()
            BATCH_TEXTS.observe(len(batch))
            BATCH_TOKENS.observe(len(batch) * max(len(ids) for ids in batch))
        return vectors


def measured(encoder: object) -> object:
    return encoder if isinstance(encoder, MeasuredEncoder) else MeasuredEncoder(encoder)


def record_job_outcomes(
    jobs: Iterable[queue_pb2.Job],
    failed: set[tuple[str, int]],
    busy_s: float,
    gone: AbstractSet[tuple[str, int]] = frozenset(),
) -> None:
    """Count handled jobs by outcome and busy time; `failed` holds the (reply stream,
    ticket) pairs that got an error, `gone` those whose callers left while the job ran."""
    counts = dict.fromkeys(OUTCOMES, 0)
    for job in jobs:
        if not job.items or (gone and all((job.reply_to, i.ticket) in gone for i in job.items)):
            counts["cancelled"] += 1
        elif any((job.reply_to, item.ticket) in failed for item in job.items):
            counts["failed"] += 1
        else:
            counts["ok"] += 1
    for outcome, count in counts.items():
        if count:
            JOBS.labels(outcome).inc(count)
    BUSY.inc(max(0.0, busy_s))


def dead_lettered(count: int = 1) -> None:
    JOBS.labels("dead_lettered").inc(count)


def start_metrics_server(port: int, host: str = "127.0.0.1") -> object | None:
    """Serve /metrics from a daemon thread; a port in use is logged, not fatal
    (a worker without metrics still serves)."""
    try:
        server, _thread = start_http_server(port, addr=host)
    except OSError as exc:
        log.error("cannot serve metrics on %s:%d: %s; running without", host, port, exc.strerror)
        return None
    log.info("prometheus metrics on http://%s:%d/metrics", host, port)
    return server
