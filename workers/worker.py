"""The worker loop: read jobs through the consumer group, run them, write
the cache and the replies, then acknowledge.

A job is acknowledged (XACK) and deleted only in the same pipeline that
writes its results, so a worker that dies mid-batch loses nothing: its
pending jobs are claimed by another worker (XAUTOCLAIM) once idle for
`claim_idle_ms`. A job delivered `max_deliveries` times goes to the
dead-letter stream and its callers get an error instead of silence.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
import uuid

import grpc
from google.protobuf.message import DecodeError
from redis.exceptions import RedisError, ResponseError

from embedq.internal.v1 import queue_pb2
from embedq.keys import CONSUMER_GROUP, Keys, decode_job, encode_message
from embedq.settings import WorkerSettings

from . import faults, metrics
from .backends import PooledEncoder
from .pipeline import BatchLimits, Outcome, run_jobs
from .prompts import read_prompts

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0
# How long a server's reply stream survives without its server.
REPLY_TTL_S = 300
# Bound on a reply stream if its server stops reading.
REPLY_MAXLEN = 100_000
INTERNAL = grpc.StatusCode.INTERNAL.value[0]

Entry = tuple[bytes, dict[bytes, bytes]]


class Worker:
    def __init__(self, settings: WorkerSettings, encoder: PooledEncoder | None = None) -> None:
        self.settings = settings
        self.keys = Keys(settings.redis.namespace)
        self.encoder = encoder or PooledEncoder.load(
            settings.model, device=settings.device, fp16=settings.fp16, backend=settings.backend
        )
        self.name = self.encoder.spec.name
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.redis = settings.redis.connect()
        self.jobs_key = self.keys.jobs(self.name)
        self.limits = BatchLimits(settings.batch_tokens(), settings.max_batch_size)
        self._stop = threading.Event()
        self._last_claim = 0.0

    # -- lifecycle --------------------------------------------------------------

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def run(self) -> None:
        self._wait_for_redis()
        if self._stop.is_set():
            return
        self.register()
        beat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        beat.start()
        spec = self.encoder.spec
        where = f"{self.encoder.device} ({spec.backend} backend)"
        log.info("worker %s serving model %s on %s", self.worker_id, self.name, where)
        try:
            while not self._stop.is_set():
                self.step()
        finally:
            self._unregister()
            log.info("worker %s stopped", self.worker_id)

    def step(self) -> None:
        """One read-process-write round; Redis trouble is waited out, not fatal."""
        try:
            entries = self._claim_stale() or self._read()
            if entries:
                self.handle(entries)
        except (RedisError, OSError) as exc:
            log.warning("redis trouble (%s); retrying", type(exc).__name__)
            self._stop.wait(0.5)
            self._ensure_group_quietly()
        except Exception:
            # A bug must not kill the worker; the jobs stay pending, are
            # redelivered and end in the dead-letter stream if they keep failing.
            log.exception("processing a read failed; its jobs stay pending")
            self._stop.wait(0.5)

    # -- registration -----------------------------------------------------------

    def registration(self) -> queue_pb2.ModelRegistration:
        spec = self.encoder.spec
        prompts, default_prompt = read_prompts(spec.source)
        return queue_pb2.ModelRegistration(
            prompts=prompts,
            default_prompt_name=default_prompt,
            name=spec.name,
            fingerprint=spec.fingerprint,
            dimension=spec.dimension,
            pooling=spec.pooling,
            max_seq_length=spec.max_seq_length,
            normalize=spec.normalize,
            source=spec.source,
            registered_unix_ms=int(time.time() * 1000),
        )

    def register(self) -> None:
        self._ensure_group()
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.keys.models(), self.name, self.registration().SerializeToString())
        pipe.zadd(self.keys.workers(self.name), {self.worker_id: time.time()})
        pipe.execute()

    def _ensure_group(self) -> None:
        try:
            # From id 0: jobs queued before any worker existed are served too.
            self.redis.xgroup_create(self.jobs_key, CONSUMER_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _ensure_group_quietly(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            self.register()

    def _unregister(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            self.redis.zrem(self.keys.workers(self.name), self.worker_id)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                now = time.time()
                pipe = self.redis.pipeline(transaction=False)
                pipe.zadd(self.keys.workers(self.name), {self.worker_id: now})
                pipe.zremrangebyscore(self.keys.workers(self.name), "-inf", now - 3600)
                # Re-publish in case Redis restarted empty.
                pipe.hsetnx(self.keys.models(), self.name, self.registration().SerializeToString())
                pipe.execute()
            except (RedisError, OSError):
                pass

    def _wait_for_redis(self) -> None:
        while not self._stop.is_set():
            try:
                self.redis.ping()
                return
            except (RedisError, OSError) as exc:
                reason = self.settings.redis.describe_error(exc)
                log.warning("waiting for redis at %s: %s", self.settings.redis.safe_url, reason)
                self._stop.wait(1.0)

    # -- reading ------------------------------------------------------------------

    def _read(self) -> list[Entry]:
        response = self.redis.xreadgroup(
            CONSUMER_GROUP,
            self.worker_id,
            {self.jobs_key: ">"},
            count=self.settings.read_count,
            block=1000,
        )
        return [entry for _stream, entries in response or [] for entry in entries]

    def _claim_stale(self) -> list[Entry]:
        """Jobs a dead worker left pending, at most once per idle period."""
        now = time.monotonic()
        if now - self._last_claim < self.settings.claim_idle_ms / 2000:
            return []
        self._last_claim = now
        _next, claimed, *_ = self.redis.xautoclaim(
            self.jobs_key,
            CONSUMER_GROUP,
            self.worker_id,
            min_idle_time=self.settings.claim_idle_ms,
            count=self.settings.read_count,
        )
        return self._drop_poison([entry for entry in claimed if entry[1]])

    def _drop_poison(self, entries: list[Entry]) -> list[Entry]:
        """Dead-letter jobs delivered too often; return the rest."""
        if not entries:
            return []
        pending = self.redis.xpending_range(
            self.jobs_key, CONSUMER_GROUP, min=entries[0][0], max=entries[-1][0], count=len(entries)
        )
        deliveries = {p["message_id"]: p["times_delivered"] for p in pending}
        keep = []
        for entry_id, fields in entries:
            if deliveries.get(entry_id, 0) > self.settings.max_deliveries:
                self._dead_letter(entry_id, fields)
            else:
                keep.append((entry_id, fields))
        return keep

    def _dead_letter(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        job = decode_job(fields)
        log.error(
            "job %s failed %d deliveries; dead-lettered", entry_id, self.settings.max_deliveries
        )
        outcome = Outcome()
        message = f"job failed on {self.settings.max_deliveries} deliveries and was dead-lettered"
        for item in job.items:
            outcome.fail(job, item.ticket, INTERNAL, message)
        self._write(outcome, [entry_id], dead_letter=fields)
        metrics.dead_lettered()

    # -- processing ---------------------------------------------------------------

    def handle(self, entries: list[Entry]) -> None:
        begun = time.perf_counter()
        jobs, entry_ids = [], []
        for entry_id, fields in entries:
            try:
                jobs.append(decode_job(fields))
                entry_ids.append(entry_id)
            except (KeyError, DecodeError):
                # Nobody can be answered for bytes we cannot read; keep them for a human.
                log.error("malformed job %s dead-lettered", entry_id)
                self._write(Outcome(), [entry_id], dead_letter=fields)
                metrics.dead_lettered()
        self._drop_cancelled(jobs)
        faults.crash_if_marked(item.text for job in jobs for item in job.items)
        started = time.perf_counter()
        outcome = run_jobs(jobs, metrics.measured(self.encoder), self.keys, self.limits)
        log.debug(
            "%d jobs, %d texts encoded in %.1f ms",
            len(jobs),
            outcome.texts_encoded,
            (time.perf_counter() - started) * 1000,
        )
        self._write(outcome, entry_ids)
        metrics.record_jobs(jobs, outcome.replies, time.perf_counter() - begun)

    def _drop_cancelled(self, jobs: list[queue_pb2.Job]) -> None:
        """Remove items whose caller cancelled or gave up (one round trip)."""
        asked = [(job, self.keys.cancelled(job.reply_to)) for job in jobs if job.items]
        if not asked:
            return
        pipe = self.redis.pipeline(transaction=False)
        for job, key in asked:
            pipe.smismember(key, [item.ticket for item in job.items])
        for (job, _key), flags in zip(asked, pipe.execute(), strict=True):
            if any(flags):
                kept = [item for item, gone in zip(job.items, flags, strict=True) if not gone]
                log.debug("skipping %d cancelled items", len(job.items) - len(kept))
                del job.items[:]
                job.items.extend(kept)

    def _write(
        self, outcome: Outcome, entry_ids: list[bytes], dead_letter: dict | None = None
    ) -> None:
        """Cache, replies, ack and delete: one round trip, retried until Redis takes it.

        Stopping while Redis is down gives up: the jobs stay pending and
        another worker claims them.
        """
        while True:
            pipe = self.redis.pipeline(transaction=False)
            if dead_letter is not None:
                pipe.xadd(self.keys.dead_letters(self.name), dead_letter, maxlen=10_000)
            for key, value in outcome.cache.items():
                pipe.set(key, value, ex=self.settings.cache_ttl_s)
            for reply_to, reply in outcome.replies.items():
                pipe.xadd(reply_to, encode_message(reply), maxlen=REPLY_MAXLEN, approximate=True)
                pipe.expire(reply_to, REPLY_TTL_S)
            pipe.xack(self.jobs_key, CONSUMER_GROUP, *entry_ids)
            pipe.xdel(self.jobs_key, *entry_ids)
            try:
                pipe.execute()
                return
            except ResponseError as exc:
                # A command was refused (say, NOGROUP after a Redis restart); the
                # others ran. Retrying would repeat the refusal forever.
                log.warning("redis refused part of a result write: %s", exc)
                return
            except (RedisError, OSError) as exc:
                if self._stop.is_set():
                    raise
                log.warning("writing results failed (%s); retrying", type(exc).__name__)
                time.sleep(0.5)
