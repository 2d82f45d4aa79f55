"""The worker loop: read jobs through the consumer group, run them, write
the cache and the replies, then acknowledge.

Three threads, so that the model never waits for Redis:
  reader  XREADGROUP: everything that arrives while the model is busy joins
          the next read, handed over the moment the model is idle (so one-text
          requests still make full batches, and an idle model waits for nothing);
          cancelled items dropped, dead workers' jobs taken over, poison jobs
          dead-lettered, the next read deduplicated and tokenized;
  main    runs a read one forward pass at a time (pipeline.iter_steps);
  writer  writes each step's cache entries and replies, and acknowledges the
          jobs it finished, in one pipeline (steps queued meanwhile are merged).

A job is acknowledged (XACK) and deleted only in the same pipeline that
writes the last of its results, so a worker that dies mid-batch loses
nothing: its pending jobs are taken over by another worker as soon as its
heartbeat is `dead_after_s` old (or at once when `embedq serve` sees the
process exit), and any job idle for `claim_idle_ms` is claimed as a safety
net. A job delivered `max_deliveries` times goes to the dead-letter stream
and its callers get an error instead of silence.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import random
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import redis
from google.protobuf.message import DecodeError
from redis.exceptions import DataError, OutOfMemoryError, ReadOnlyError, ResponseError

from embedq import packed, streams
from embedq.internal.v1 import queue_pb2
from embedq.keys import (
    CONSUMER_GROUP,
    DEAD_LETTER_MAXLEN,
    REPLY_MAXLEN,
    REPLY_TTL_S,
    RESET_IDLE_BACKLOG_LUA,
    ErrorKind,
    Keys,
    decode_job,
    encode_message,
)
from embedq.logs import Throttled
from embedq.settings import WorkerSettings
from embedq.trouble import REDIS_TROUBLE, SETTLING, unsent

from . import metrics
from .backends import PooledEncoder
from .batching import FRESH_JOB_MS, RecentPeak, linger_s, needs_cancel_check, reader_wait
from .pipeline import (
    BatchLimits,
    Gone,
    Outcome,
    Prepared,
    Pretokenized,
    Step,
    iter_steps,
    prepare,
    pretokenize,
)
from .prompts import read_prompts

log = logging.getLogger(__name__)

# Heartbeats every second: a dead worker is noticed within --dead-after (3 s).
HEARTBEAT_S = 1.0
# How long a stopping worker waits for a heartbeat under way (one pipeline) to finish.
HEARTBEAT_JOIN_S = 5.0

# How often the reader looks for workers whose heartbeat stopped.
TAKEOVER_PERIOD_S = 1.0
# While the model runs, the reads waiting for it and the running read's later passes are
# checked this often (s) for items whose callers left meanwhile (a round trip), as a read is
# when it comes in; a read that waited longer since its last check is checked at hand-over.
RECHECK_CANCELLED_S = FRESH_JOB_MS / 1000
# Steps waiting for the writer; past it the model waits (Redis is down or slow).
WRITE_QUEUE_STEPS = 64
# Reads with fewer encoded texts say little about capacity (per-call overhead).
RATE_MIN_TEXTS = 32
# ... and within a long read, at least this often (about a heartbeat: see RateWindow).
RATE_WINDOW_S = 1.0
# While texts wait for a busy model the reader polls for more jobs this often (it
# stops waiting the moment the model is idle); with nothing pending it blocks on Redis.
ACCUMULATE_POLL_S = 0.002
# While the model is idle and waits a slow pass's linger for more texts, the reader polls
# this often (batching.reader_wait says why not a blocking read).
LINGER_POLL_S = 0.0005
# With nothing pending the reader blocks on Redis this long per read (ms).
IDLE_BLOCK_MS = 1000
# Texts gathered for the next read, in max_batch_size units: past it the reader waits.
ACCUMULATE_BATCHES = 4
# A read that starts within this of the previous one's end was waiting for the model.
SATURATED_GAP_S = 0.005

Entry = tuple[bytes, dict[bytes, bytes]]


@dataclass
class Read:
    """One XREADGROUP's decodable jobs, with their entry ids and queued sizes."""

    jobs: list[queue_pb2.Job] = field(default_factory=list)
    entry_ids: list[bytes] = field(default_factory=list)
    # Items each job had when queued (the backlog counter counted them).
    sizes: list[int] = field(default_factory=list)
    # Texts tokenized by the reader as they came, while the model ran the read before.
    tokens: Pretokenized = field(default_factory=dict)
    # Deduplicated and tokenized, at hand-over to the model.
    prepared: Prepared | None = None
    # Since when callers who left may have gone unnoticed: its oldest part's read or its
    # last check for cancelled items (monotonic s; inf: nothing read yet).
    checked_at: float = math.inf
    # Items of the running read whose callers left, learnt while it runs (pipeline.Gone).
    gone: Gone = field(default_factory=set)
    # Indices of its jobs the model has finished (model thread; the reader skips them).
    finished: set[int] = field(default_factory=set)

    def absorb(self, other: Read) -> None:
        self.jobs += other.jobs
        self.entry_ids += other.entry_ids
        self.sizes += other.sizes
        self.tokens.update(other.tokens)
        self.checked_at = min(self.checked_at, other.checked_at)

    @property
    def texts(self) -> int:
        return sum(self.sizes)

    def unfinished_jobs(self) -> list[queue_pb2.Job]:
        """Its jobs with items the model has not answered yet (for the reader's watch: a
        snapshot of the set the model thread adds to)."""
        done = set(self.finished)
        return [job for index, job in enumerate(self.jobs) if index not in done]


class HeldEntries:
    """Job entries this worker has read and not acknowledged yet (thread-safe).

    A read runs one forward pass at a time while the reader gathers the next jobs, so a
    job can wait for this worker's own model longer than claim_idle_ms. A claim, this
    worker's or another's, then took it as stale and counted a delivery each time: a busy
    worker dead-lettered its own queue (seen with --claim-idle-ms 1500 on a loaded machine).
    The heartbeat touches held entries instead (see Worker._touch_held).
    """

    def __init__(self) -> None:
        self._ids: set[bytes] = set()
        self._lock = threading.Lock()

    def hold(self, ids: list[bytes]) -> None:
        with self._lock:
            self._ids.update(ids)

    def release(self, ids: list[bytes]) -> None:
        """Acknowledged, or given up on (then claimable again: the dead-letter path)."""
        with self._lock:
            self._ids.difference_update(ids)

    def ids(self) -> list[bytes]:
        with self._lock:
            return sorted(self._ids)


@dataclass
class Write:
    """Results to write and the entries they finish (acknowledged with them)."""

    # Steps' outcomes, combined once when written (Outcome.combined).
    outcomes: list[Outcome]
    entry_ids: list[bytes] = field(default_factory=list)
    texts_done: int = 0
    # The latest deadline of the callers answered (Unix ms; 0: none known).
    deadline_ms: int = 0

    def absorb(self, other: Write) -> None:
        self.outcomes += other.outcomes
        self.entry_ids.extend(other.entry_ids)
        self.texts_done += other.texts_done
        self.deadline_ms = max(self.deadline_ms, other.deadline_ms)


class Backoff:
    """Waits between retries: doubling from `first_s` up to `max_s`, with jitter."""

    def __init__(self, first_s: float = 0.1, max_s: float = 5.0) -> None:
        self.first_s, self.max_s = first_s, max_s
        self._next = first_s

    def next(self) -> float:
        wait = self._next * random.uniform(0.8, 1.2)
        self._next = min(self.max_s, self._next * 2)
        return wait

    def reset(self) -> None:
        self._next = self.first_s


class RateMeter:
    """Capacity in texts per second: an average over reads big enough to fill
    batches (small reads measure per-call overhead, not capacity), a long read counting
    once per RATE_WINDOW_S of it (RateWindow). A read that was waiting when the previous
    one ended (the worker is saturated) is timed from that end: wall time, with
    tokenizing, writing and whatever else the machine does meanwhile, which is what
    admission must plan with."""

    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self.texts_per_s = 0.0

    def observe(self, texts: int, busy_s: float) -> None:
        if texts < RATE_MIN_TEXTS or busy_s <= 0:
            return
        rate = texts / busy_s
        if self.texts_per_s == 0.0:
            self.texts_per_s = rate
        else:
            self.texts_per_s += self.alpha * (rate - self.texts_per_s)


class RateWindow:
    """Feeds one read's passes to a RateMeter as they run, a window of RATE_WINDOW_S (and
    RATE_MIN_TEXTS) at a time, each one observed when the next one is complete; the read's
    end joins whatever is left to the last window. So every pass counts (a remainder of a
    few texts is not dropped) and a read shorter than two windows is one observation, as
    before. A read can hold thousands of texts (one job may), minutes on a CPU: measured
    only at its end, a fresh worker published no capacity all that time and the servers
    admitted every call, to run into its deadline (seen: 50,000 texts from 100 streams
    queued, capacity still 0 after 20 s)."""

    def __init__(self, meter: RateMeter, since: float) -> None:
        self.meter, self.since, self.texts = meter, since, 0
        self.last: tuple[int, float] | None = None  # the last complete window, not observed

    def step(self, texts: int, now: float) -> None:
        self.texts += texts
        if now - self.since >= RATE_WINDOW_S and self.texts >= RATE_MIN_TEXTS:
            if self.last is not None:
                self.meter.observe(*self.last)
            self.last = (self.texts, now - self.since)
            self.since, self.texts = now, 0

    def end(self, now: float) -> None:
        texts, seconds = self.last or (0, 0.0)
        self.meter.observe(texts + self.texts, seconds + now - self.since)


class Worker:
    def __init__(self, settings: WorkerSettings, encoder: PooledEncoder | None = None) -> None:
        self.settings = settings
        self.keys = Keys(settings.redis.namespace)
        self.encoder = encoder or PooledEncoder.load(
            settings.model, device=settings.device, fp16=settings.fp16, backend=settings.backend
        )
        self.name = self.encoder.spec.name
        # Read once, with the model: the heartbeat re-publishes the registration every second,
        # and a config file edited (or half written) meanwhile is not the model this serves.
        self._prompts = read_prompts(self.encoder.spec.source)
        self.worker_id = settings.worker_id or (
            f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        )
        # None: Redis could not be asked whether it is a cluster; asked again once it answers.
        self._cluster = settings.redis.probe_cluster()
        self.redis = settings.redis.connect(cluster=bool(self._cluster))
        self.jobs_key = self.keys.jobs(self.name)
        self.limits = BatchLimits(settings.batch_tokens(), settings.max_batch_size)
        self.rate = RateMeter()
        self._stop = threading.Event()
        self._last_claim = 0.0
        self._last_takeover = 0.0
        # At most one read (handed over only to an idle model) and the end marker.
        self._reads: queue.Queue[Read | None] = queue.Queue(2)
        # Set while the model waits for its next read.
        self._model_idle = threading.Event()
        # Linger policy inputs: texts per recent hand-over, the model's last busy time, and
        # since when the reader holds texts for an idle model.
        self._handed_over = RecentPeak()
        self._held = HeldEntries()
        # When the model last got a read or finished a forward pass (monotonic s): held
        # entries are touched only while it makes progress (see _touch_held).
        self._progress_at = time.monotonic()
        self._last_busy_s = 0.0
        self._linger_since: float | None = None
        # The read last handed over, while it may need more than one pass (reader thread
        # only): watched for callers who leave before its later passes (see _watch).
        self._running: Read | None = None
        # Transient Redis trouble: retried with backoff, logged at most once per 10 s.
        self._throttled = Throttled(log)
        self._read_backoff = Backoff()
        self._last_read_end = -math.inf
        self._writes: queue.Queue[Write | None] = queue.Queue(WRITE_QUEUE_STEPS)
        self._reset_idle_backlog = self.redis.register_script(RESET_IDLE_BACKLOG_LUA)

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
        heartbeat, reader, writer = (
            threading.Thread(target=loop, name=name, daemon=True)
            for loop, name in (
                (self._heartbeat_loop, "heartbeat"),
                (self._read_loop, "reader"),
                (self._write_loop, "writer"),
            )
        )
        for thread in (heartbeat, reader, writer):
            thread.start()
        spec = self.encoder.spec
        where = f"{self.encoder.device} ({spec.backend} backend)"
        log.info("worker %s serving model %s on %s", self.worker_id, self.name, where)
        try:
            self._compute_loop()
        finally:
            self._stop.set()  # also when the model's loop raised: the heartbeat ends too
            self._writes.put(None)
            writer.join(timeout=30)
            # A beat already under way when the stop came would land after _unregister's ZREM
            # and leave this worker counted alive for worker_stale_s (seen once in CI: Info's
            # workers_alive still 1 ten seconds after a clean stop).
            heartbeat.join(timeout=HEARTBEAT_JOIN_S)
            self._unregister()
            log.info("worker %s stopped", self.worker_id)

    def _compute_loop(self) -> None:
        """Run reads until stopped; reads already taken are finished first."""
        while True:
            self._model_idle.set()
            read = self._reads.get()
            self._model_idle.clear()
            if read is None:
                return
            started = time.monotonic()
            try:
                self.handle(read)
                self._last_busy_s = time.monotonic() - started
            except Exception:
                # A bug must not kill the worker; the jobs stay pending, are
                # redelivered and end in the dead-letter stream if they keep failing.
                log.exception("processing a read failed; its jobs stay pending")
                self._held.release(read.entry_ids)

    # -- registration -----------------------------------------------------------

    def registration(self) -> queue_pb2.ModelRegistration:
        spec = self.encoder.spec
        prompts, default_prompt = self._prompts
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
        with contextlib.suppress(*REDIS_TROUBLE):
            self.register()

    def _unregister(self) -> None:
        with contextlib.suppress(*REDIS_TROUBLE):
            pipe = self.redis.pipeline(transaction=False)
            pipe.zrem(self.keys.workers(self.name), self.worker_id)
            pipe.hdel(self.keys.rates(self.name), self.worker_id)
            pipe.execute()

    def _heartbeat_loop(self) -> None:
        # Often enough that held entries never look idle for claim_idle_ms (a floor, so
        # that a tiny claim time cannot spin the loop).
        period = max(0.05, min(HEARTBEAT_S, self.settings.claim_idle_ms / 3000))
        while not self._stop.wait(period):
            # Each on its own: one failing (a full Redis refuses the beat; on a cluster, the
            # registrations' master failing over) must not stop the others. Touched only
            # after a beat that failed, held jobs looked idle, and others took them over
            # (and counted deliveries towards dead-lettering them) while they ran here.
            for beat_part, what in (
                (self._beat, "heartbeat"),
                (self._republish, "registration"),
                (self._touch_held, "touch"),
            ):
                try:
                    beat_part()
                except REDIS_TROUBLE:
                    pass
                except Exception:
                    # A bug must not end the heartbeat: a worker without one looks dead, and
                    # others take over the jobs it is still running.
                    self._throttled.error(what, "%s failed; beating on", what, exc_info=True)

    def _beat(self) -> None:
        """This worker alive, and its measured rate (the model's keys: one slot)."""
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(self.keys.workers(self.name), {self.worker_id: now})
        pipe.zremrangebyscore(self.keys.workers(self.name), "-inf", now - 3600)
        if self.rate.texts_per_s:
            pipe.hset(self.keys.rates(self.name), self.worker_id, self.rate.texts_per_s)
        pipe.execute()

    def _republish(self) -> None:
        """The model's registration again, in case Redis restarted empty."""
        self.redis.hsetnx(self.keys.models(), self.name, self.registration().SerializeToString())

    def _touch_held(self) -> None:
        """Reset the idle time of the entries this worker holds: XCLAIM to itself with
        JUSTID, which counts no delivery, so that no claim takes them as stale while
        they wait for this worker's model. (Entries acknowledged meanwhile are no longer
        pending: XCLAIM skips them.) Not while a pass has run longer than claim_idle_ms:
        a model stuck with the heartbeat alive leaves its jobs to the other workers'
        claims, the safety net it always was."""
        if self._model_stuck():
            return
        held = self._held.ids()
        if held:
            self.redis.xclaim(self.jobs_key, CONSUMER_GROUP, self.worker_id, 0, held, justid=True)

    def _model_stuck(self) -> bool:
        """A pass has run longer than claim_idle_ms: this worker's jobs are for the others."""
        stuck_s = time.monotonic() - self._progress_at
        return not self._model_idle.is_set() and stuck_s > self.settings.claim_idle_ms / 1000

    def _wait_for_redis(self) -> None:
        """Wait until Redis answers and this worker is registered. Both retried: on a
        cluster, the node that answers the ping may not be the one holding the job stream,
        which may be failing over."""
        while not self._stop.is_set():
            try:
                self.redis.ping()
                self._fit_client_to_redis()
                self.register()
                return
            except REDIS_TROUBLE as exc:
                fatal = self.settings.redis.fatal_error(exc)
                if fatal is not None:
                    raise fatal from None
                if isinstance(exc, ResponseError) and not isinstance(exc, SETTLING):
                    raise  # refused: sending it again would be refused again
                reason = self.settings.redis.describe_error(exc)
                url = self.settings.redis.safe_url
                self._throttled.warning("wait", "waiting for redis at %s: %s", url, reason)
                self._stop.wait(1.0)

    def _fit_client_to_redis(self) -> None:
        """Ask again whether Redis is a cluster when it could not be asked at start-up (a
        cluster that came up after this worker); a cluster gets a cluster client. Runs
        before the loops start: nothing else holds the client yet."""
        if self._cluster is not None:
            return
        self._cluster = self.settings.redis.probe_cluster()
        if self._cluster:
            self.redis.close()
            self.redis = self.settings.redis.connect(cluster=True)
            self._reset_idle_backlog = self.redis.register_script(RESET_IDLE_BACKLOG_LUA)
            url = self.settings.redis.safe_url
            log.info("redis at %s is a cluster: connected as a cluster client", url)

    # -- reading (reader thread) ------------------------------------------------

    def _read_loop(self) -> None:
        """Gather jobs while the model is busy; hand them over the moment it is idle."""
        pending = Read()
        try:
            while not self._stop.is_set():
                idle = self._model_idle.is_set()
                if idle:
                    self._running = None  # done: nothing of it left to watch
                else:
                    self._watch(pending)
                full = self._full(pending)
                linger = self._linger_left(pending) if pending.jobs and idle and not full else 0.0
                if pending.jobs and idle and linger <= 0:
                    self._hand_over(pending)
                    pending = Read()
                elif full:
                    self._model_idle.wait(RECHECK_CANCELLED_S)
                else:
                    # Block, poll or sleep: batching.reader_wait says which and why.
                    wait = reader_wait(
                        bool(pending.jobs),
                        idle,
                        linger,
                        poll_s=ACCUMULATE_POLL_S,
                        linger_poll_s=LINGER_POLL_S,
                        idle_block_ms=IDLE_BLOCK_MS,
                    )
                    block_ms = self._watched_block_ms(wait.block_ms, idle)
                    # Nothing came for a while, and the model is idle: the queue may be empty.
                    nothing_pending = not pending.jobs and idle
                    got = self._next_read(pending, block_ms, nothing_pending=nothing_pending)
                    if got is not None:
                        pending.absorb(got)
                    elif wait.sleep_s > 0:
                        (self._stop if idle else self._model_idle).wait(wait.sleep_s)
        finally:
            if pending.jobs:
                self._hand_over(pending)  # read, so ours: finished before stopping
            self._reads.put(None)

    def _linger_left(self, pending: Read) -> float:
        """How much longer to wait for texts before the idle model gets `pending` (s; 0:
        hand over now). batching.linger_s: waiting consumers then fill one batch, not
        alternating halves."""
        now = time.monotonic()
        if self._linger_since is None:
            self._linger_since = now
        wait = linger_s(
            pending.texts,
            self._handed_over.peak(now),
            self._last_busy_s,
            now - self._linger_since,
            cap_s=self.settings.linger_ms / 1000,
        )
        return wait

    def _hand_over(self, read: Read) -> None:
        self._linger_since = None
        now = time.monotonic()
        if now - read.checked_at >= RECHECK_CANCELLED_S:
            self._drop_cancelled_quietly(read.jobs)
        read.checked_at = now
        try:
            read.prepared = prepare(read.jobs, self.encoder, known=read.tokens)
        except Exception:
            # A bug must not stop the reader (the model would wait forever): the jobs stay
            # pending, are claimed again and end in the dead-letter stream, whose callers
            # get an error, if they keep failing.
            log.exception("preparing a read of %d jobs failed; they stay pending", len(read.jobs))
            self._held.release(read.entry_ids)
            return
        self._handed_over.record(read.texts, time.monotonic())
        self._running = read if read.prepared.several_passes(self.limits) else None
        self._progress_at = time.monotonic()  # before the model counts as busy
        self._model_idle.clear()
        self._reads.put(read)

    def _full(self, read: Read) -> bool:
        return (
            len(read.jobs) >= self.settings.read_count
            or read.texts >= ACCUMULATE_BATCHES * self.settings.max_batch_size
        )

    def _next_read(
        self, pending: Read, block_ms: int | None, *, nothing_pending: bool
    ) -> Read | None:
        """The next jobs to run (None: nothing came); Redis trouble is waited out."""
        try:
            count = max(1, self.settings.read_count - len(pending.jobs))
            entries = self._take_over_dead() or self._claim_stale() or self._read(count, block_ms)
            self._read_backoff.reset()  # Redis answered
            if not entries:
                if nothing_pending:  # nothing came for a while: anything queued anywhere?
                    keys = [self.jobs_key, self.keys.backlog(self.name)]
                    self._reset_idle_backlog(keys=keys)
                return None
            read = self._decode(entries)
            if needs_cancel_check(read.entry_ids, time.time() * 1000, self._model_idle.is_set()):
                # Quietly: the entries are ours now. Dropped for trouble in this check (only
                # a saving), they waited for the stale claim, tens of seconds, unheld.
                self._drop_cancelled_quietly(read.jobs)
            self._pretokenize(read)
            if not read.jobs:
                return None
            # Only now: a read that failed above stays pending untouched, claimed again.
            self._held.hold(read.entry_ids)
            return read
        except REDIS_TROUBLE as exc:
            name = type(exc).__name__
            self._throttled.warning("read", "reading jobs: redis trouble (%s); retrying", name)
            self._stop.wait(self._read_backoff.next())
            self._ensure_group_quietly()
            return None
        except Exception:
            log.exception("reading jobs failed; they stay pending")
            self._stop.wait(0.5)
        return None

    def _read(self, count: int, block_ms: int | None) -> list[Entry]:
        response = streams.xreadgroup(
            self.redis, CONSUMER_GROUP, self.worker_id, {self.jobs_key: ">"}, count, block_ms
        )
        return [entry for _stream, entries in response or [] for entry in entries]

    def _take_over_dead(self) -> list[Entry]:
        """Pending jobs of workers whose heartbeat stopped (killed, frozen, gone),
        claimed at once rather than after claim_idle_ms."""
        now = time.time()
        if now - self._last_takeover < TAKEOVER_PERIOD_S:
            return []
        self._last_takeover = now
        since = now - self.settings.dead_after_s
        live = set(self.redis.zrangebyscore(self.keys.workers(self.name), since, "+inf"))
        live.add(self.worker_id.encode())
        claimed: list[Entry] = []
        for consumer in self.redis.xinfo_consumers(self.jobs_key, CONSUMER_GROUP):
            name = consumer["name"]
            name = name if isinstance(name, bytes) else str(name).encode()
            if consumer["pending"] and name not in live:
                try:
                    claimed += self._claim_from(name)
                except REDIS_TROUBLE:
                    if claimed:  # ours already: run them, the rest next time
                        break
                    raise
        return claimed

    def _claim_from(self, consumer: bytes) -> list[Entry]:
        pending = self.redis.xpending_range(
            self.jobs_key,
            CONSUMER_GROUP,
            min="-",
            max="+",
            count=self.settings.read_count,
            consumername=consumer,
        )
        # A minimum idle time, so that two workers taking over at once do not
        # both run the same jobs (the first claim resets the idle time).
        entries = self._claim(pending, min_idle_ms=500)
        if entries:
            log.warning(
                "took over %d pending jobs of worker %s (no heartbeat for %.0fs)",
                len(entries),
                consumer.decode(errors="replace"),
                self.settings.dead_after_s,
            )
        return entries

    def _claim_stale(self) -> list[Entry]:
        """Jobs left pending too long by anyone, at most once per idle period. None while
        this worker's own model is stuck: it could not run them (its own held jobs, untouched
        now, included), and each claim would count a delivery towards dead-lettering them."""
        now = time.monotonic()
        if now - self._last_claim < self.settings.claim_idle_ms / 2000 or self._model_stuck():
            return []
        self._last_claim = now
        held = set(self._held.ids())
        stale = self.redis.xpending_range(
            self.jobs_key,
            CONSUMER_GROUP,
            min="-",
            max="+",
            count=self.settings.read_count + len(held),
            idle=self.settings.claim_idle_ms,
        )
        # Not the entries this worker holds: they wait for its own model (right after a
        # long pass, before the heartbeat has touched them again), and a claim would count
        # a delivery and read them twice.
        others = [p for p in stale if p["message_id"] not in held]
        return self._claim(others[: self.settings.read_count], self.settings.claim_idle_ms)

    def _claim(self, pending: list[dict], min_idle_ms: int) -> list[Entry]:
        """XCLAIM entries as XPENDING listed them; those delivered more than
        --max-deliveries times, this claim included, are dead-lettered, not returned.
        (XPENDING's count plus this claim is exact: an entry claimed or touched by anyone
        since is no longer idle for min_idle_ms, and XCLAIM leaves it.)"""
        if not pending:
            return []
        deliveries = {p["message_id"]: p["times_delivered"] + 1 for p in pending}
        claimed = self.redis.xclaim(
            self.jobs_key,
            CONSUMER_GROUP,
            self.worker_id,
            min_idle_time=min_idle_ms,
            message_ids=list(deliveries),
        )
        keep = []
        for entry_id, fields in claimed:
            if not fields:  # deleted meanwhile (answered, acknowledged): nothing to run
                continue
            if deliveries[entry_id] > self.settings.max_deliveries:
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
            outcome.fail(job, item.ticket, ErrorKind.INTERNAL, message)
        write = Write([outcome], [entry_id], len(job.items), job.deadline_unix_ms)
        self._write(write, dead_letter=fields)
        metrics.dead_lettered()

    def _decode(self, entries: list[Entry]) -> Read:
        read = Read(checked_at=time.monotonic())
        for entry_id, fields in entries:
            try:
                job = decode_job(fields)
            except (KeyError, DecodeError):
                # Nobody can be answered for bytes we cannot read; keep them for a human.
                log.error("malformed job %s dead-lettered", entry_id)
                self._write(Write([], [entry_id]), dead_letter=fields)
                metrics.dead_lettered()
                continue
            read.jobs.append(job)
            read.entry_ids.append(entry_id)
            read.sizes.append(len(job.items))
        return read

    def _pretokenize(self, read: Read) -> None:
        """Tokenize a read's texts now, while the model is busy; on failure the hand-over
        tokenizes them again (and leaves the jobs pending if that fails too)."""
        try:
            pretokenize(read.jobs, self.encoder, read.tokens)
        except Exception:  # noqa: BLE001 - the hand-over tokenizes again (see _hand_over)
            log.warning("tokenizing ahead failed; left to the hand-over", exc_info=True)
            read.tokens.clear()

    def _watch(self, pending: Read) -> None:
        """While the model runs: every RECHECK_CANCELLED_S, ask which callers of the read
        waiting for it, and of the running read's later passes, left meanwhile (one round
        trip). Done here, the hand-over to the idle model rarely waits for the question, and
        a long read stops encoding for callers who left after it began."""
        now = time.monotonic()
        waiting = pending if now - pending.checked_at >= RECHECK_CANCELLED_S else None
        running = self._running
        if running is not None and now - running.checked_at < RECHECK_CANCELLED_S:
            running = None
        if waiting is None and running is None:
            return
        waiting_jobs = waiting.jobs if waiting is not None else []
        running_jobs = running.unfinished_jobs() if running is not None else []
        try:
            left = self._left(waiting_jobs + running_jobs)
        except Exception as exc:  # noqa: BLE001 - only a lost chance to skip work: never fatal
            self._throttled.warning("watch", "checking for cancelled items failed (%s)", _name(exc))
            left = []
        for read in (waiting, running):
            if read is not None:
                read.checked_at = now
        for job, flags in left[: len(waiting_jobs)]:
            _drop_items(job, flags)
        for job, flags in left[len(waiting_jobs) :]:
            running.gone.update(_gone_items(job, flags))

    def _watched_block_ms(self, block_ms: int | None, idle: bool) -> int | None:
        """A blocking read while a running read is watched ends in time for the next look."""
        if block_ms is None or idle or self._running is None:
            return block_ms
        return min(block_ms, int(RECHECK_CANCELLED_S * 1000))

    def _drop_cancelled_quietly(self, jobs: list[queue_pb2.Job]) -> None:
        """_drop_cancelled where Redis trouble only means the items are encoded anyway."""
        try:
            self._drop_cancelled(jobs)
        except REDIS_TROUBLE as exc:
            self._throttled.warning(
                "recheck", "checking for cancelled items failed (%s)", _name(exc)
            )

    def _drop_cancelled(self, jobs: list[queue_pb2.Job]) -> None:
        """Remove items whose caller cancelled or gave up (one round trip)."""
        for job, flags in self._left(jobs):
            _drop_items(job, flags)

    def _left(self, jobs: list[queue_pb2.Job]) -> list[tuple[queue_pb2.Job, list[int]]]:
        """Each job with, per item, whether its caller left (one round trip at most)."""
        commands = [
            ("SMISMEMBER", self.keys.cancelled(job.reply_to), *(item.ticket for item in job.items))
            for job in jobs
            if job.items
        ]
        answers = iter(packed.execute(self.redis, commands) if commands else ())
        return [(job, next(answers) if job.items else []) for job in jobs]

    # -- processing (main thread) -----------------------------------------------

    def handle(self, read: Read) -> None:
        """Run one read a forward pass at a time, handing each step to the writer."""
        begun = time.perf_counter()
        saturated = begun - self._last_read_end < SATURATED_GAP_S
        rate = RateWindow(self.rate, self._last_read_end if saturated else begun)
        encoder = metrics.measured(self.encoder)
        failed: set[tuple[str, int]] = set()
        encoded = 0
        deadline_ms = max((job.deadline_unix_ms for job in read.jobs), default=0)
        steps = iter_steps(
            read.jobs, encoder, self.keys, self.limits, prepared=read.prepared, gone=read.gone
        )
        for step in steps:
            encoded += step.outcome.texts_encoded
            rate.step(step.outcome.texts_encoded, time.perf_counter())
            failed.update(
                (reply_to, failure.ticket)
                for reply_to, reply in step.outcome.replies.items()
                for failure in reply.failures
            )
            self._progress_at = time.monotonic()
            read.finished.update(step.finished_jobs)
            entry_ids = [read.entry_ids[i] for i in step.finished_jobs]
            done = _texts_done(read, step)
            self._writes.put(Write([step.outcome], entry_ids, done, deadline_ms))
        ended = time.perf_counter()
        busy = ended - begun
        rate.end(ended)
        self._last_read_end = ended
        log.debug("%d jobs, %d texts encoded in %.1f ms", len(read.jobs), encoded, busy * 1000)
        metrics.record_job_outcomes(read.jobs, failed, busy, read.gone)

    # -- writing (writer thread) ------------------------------------------------

    def _write_loop(self) -> None:
        """Write steps as they come; whatever queued meanwhile goes in one pipeline."""
        finished = False
        while not finished:
            write = self._writes.get()
            if write is None:
                return
            while True:
                try:
                    more = self._writes.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    finished = True
                    break
                write.absorb(more)
            try:
                self._write(write)
            except DataError:
                self._drop_unwritable(write)  # our own arguments: retrying cannot help
            except REDIS_TROUBLE:
                log.error("stopping with results unwritten; their jobs stay pending")
                return
            except Exception:  # noqa: BLE001 - a bug must not stop the writer (see below)
                self._drop_unwritable(write)

    def _drop_unwritable(self, write: Write) -> None:
        """Give up a write that cannot succeed (a bug), not the writer: a dead writer would
        leave results piling up and the heartbeat keeping the jobs held, so callers hang.
        Released, the jobs go stale, are claimed again and end in the dead-letter stream
        if their writes keep failing."""
        log.exception("writing results failed; their %d jobs stay pending", len(write.entry_ids))
        self._held.release(write.entry_ids)

    def _write(self, write: Write, dead_letter: dict | None = None) -> None:
        """Cache, replies, ack and delete: one round trip, retried until Redis takes it.

        Stopping while Redis is down gives up: the jobs stay pending and
        another worker claims them. What Redis refuses is logged, not sent again
        (NOGROUP after a restart, say, would be refused forever), except what a full
        Redis refused: see _resend_when_room.
        """
        commands = self._write_commands(write, dead_letter)
        replies = self._execute_until_sent(commands)
        waiting = self._refused(commands, replies)
        if waiting:
            self._resend_when_room(waiting, write.deadline_ms)
        self._held.release(write.entry_ids)

    def _execute_until_sent(self, commands: list[tuple]) -> list:
        """Every command's reply, refusals (error replies) in their places. What did not take
        effect (Redis out of reach, or between states: embedq.trouble.unsent) is sent again until
        it does (raised once stopping), and only that: a cluster runs the rest of a pipeline
        on the nodes that answered, and a DECRBY sent twice would skew the backlog counter."""
        replies: list = [None] * len(commands)
        todo = list(range(len(commands)))
        backoff = Backoff()
        while True:
            try:
                sent = packed.execute(self.redis, [commands[i] for i in todo], raise_on_error=False)
            except DataError:
                raise  # an argument Redis cannot take: not Redis's fault (see _write_loop)
            except REDIS_TROUBLE as exc:
                failure = exc
            else:
                for index, reply in zip(todo, sent, strict=True):
                    replies[index] = reply
                todo = [index for index in todo if unsent(replies[index])]
                if not todo:
                    return replies
                failure = replies[todo[0]]
            if self._stop.is_set():
                raise failure
            self._reconnect_if_demoted(failure)
            name = _name(failure)
            self._throttled.warning("write", "writing results failed (%s); retrying", name)
            time.sleep(backoff.next())

    def _reconnect_if_demoted(self, failure: BaseException) -> None:
        """READONLY on a standalone client: its pooled connections may lead to a master
        demoted in a failover (a DNS name or virtual IP now points at the new one); closed,
        the next try connects afresh. A cluster client follows the new slot map itself."""
        if isinstance(failure, ReadOnlyError) and isinstance(self.redis, redis.Redis):
            self.redis.connection_pool.disconnect(inuse_connections=False)

    def _refused(self, commands: list[tuple], replies: list) -> list[tuple]:
        """Log the commands Redis refused; return those to send again once it has room.

        A full Redis (`maxmemory` under `noeviction`) refuses every command that adds
        data (EXPIRE, XACK, XDEL still run): the cache entries are given up (the cache
        gives way first, as under volatile-lru), but the replies, dead letters and the
        backlog count wait for room, with the EXPIREs of the reply streams. The
        acknowledgements ran: the jobs are done, their answers still owed."""
        refused = [
            (command, reply)
            for command, reply in zip(commands, replies, strict=True)
            if isinstance(reply, ResponseError)
        ]
        full = [command for command, reply in refused if isinstance(reply, OutOfMemoryError)]
        other = [(c, reply) for c, reply in refused if not isinstance(reply, OutOfMemoryError)]
        if other:
            command, reply = other[0]
            log.warning(
                "redis refused part of a result write (%d of %d commands; the first, %s): %s",
                len(other), len(commands), command[0], reply,
            )  # fmt: skip
        owed = [command for command in full if command[0] != "SET"]
        if full:
            self._throttled.warning(
                "full",
                "redis is out of memory (maxmemory reached and nothing it may evict: see "
                "docs/deployment.md, Memory policy): %d cache entries not stored, %d replies "
                "and counts wait for room",
                len(full) - len(owed), len(owed),
            )  # fmt: skip
        streams = {command[1] for command in owed if command[0] == "XADD"}
        return owed + [c for c in commands if c[0] == "EXPIRE" and c[1] in streams]

    def _resend_when_room(self, commands: list[tuple], deadline_ms: int) -> None:
        """Send `commands` again, those still refused each time, until a full Redis takes
        them (memory freed: job entries deleted, reply streams trimmed, an operator's
        `maxmemory` raised) or their callers' deadline passes (none: not at all), also
        while stopping (the jobs are acknowledged: nobody else would answer them).
        Meanwhile this writer waits, and so, once its queue is full, does the model:
        nothing it computed could be delivered either."""
        backoff = Backoff(first_s=0.05, max_s=1.0)
        while commands and time.time() + 0.05 < deadline_ms / 1000:
            time.sleep(backoff.next())
            try:
                replies = self._execute_until_sent(commands)
            except REDIS_TROUBLE:
                break  # stopping, Redis out of reach
            commands = self._refused(commands, replies)
        if commands:
            log.warning(
                "gave up %d commands a full redis refused (their callers' deadline passed or "
                "none is known, or the worker stopped with redis out of reach)",
                len(commands),
            )
        else:
            log.info("redis had room again: the delayed replies and counts were sent")

    def _write_commands(self, write: Write, dead_letter: dict | None) -> list[tuple]:
        """Dead letter, cache entries, replies, then acknowledgements: acked last, so
        a worker killed mid-write leaves its jobs pending for another to answer."""
        commands: list[tuple] = []
        if dead_letter is not None:
            commands.append(
                _xadd(self.keys.dead_letters(self.name), dead_letter, DEAD_LETTER_MAXLEN)
            )
        ttl, outcome = self.settings.cache_ttl_s, Outcome.combined(write.outcomes)
        commands += [("SET", key, value, "EX", ttl) for key, value in outcome.cache.items()]
        for reply_to, reply in outcome.replies.items():
            commands.append(_xadd(reply_to, encode_message(reply), REPLY_MAXLEN))
            commands.append(("EXPIRE", reply_to, REPLY_TTL_S))
        if write.entry_ids:
            commands.append(("XACK", self.jobs_key, CONSUMER_GROUP, *write.entry_ids))
            commands.append(("XDEL", self.jobs_key, *write.entry_ids))
        if write.texts_done:
            commands.append(("DECRBY", self.keys.backlog(self.name), write.texts_done))
        return commands


def _texts_done(read: Read, step: Step) -> int:
    """Texts a step takes off the backlog counter: the items it answered, and for each job it
    finishes, the items dropped as cancelled before the read ran (queued, so counted).

    Admission plans with the counter, and a refused caller's retry hint assumes the queue
    drains at the measured rate. Taken off a whole job at its acknowledgement, the counter
    stood still for a job's duration (0.6 s for 128 texts on 2 cores), and refused callers,
    told to come back in 50 ms, found it unchanged, again and again (measured: 180-300
    refusals a second in a burst of 32 clients, the model slowed by their look-ups). A worker
    killed after a step but before the job's acknowledgement has taken that step's items off
    once already; the job's next worker takes them off again, and the counter stays low until
    an idle worker resets it (the stream empty): admission is a little lenient for a while.
    """
    dropped = sum(read.sizes[i] - len(read.jobs[i].items) for i in step.finished_jobs)
    return step.answered_items + dropped


def _drop_items(job: queue_pb2.Job, flags: list[int]) -> None:
    """Remove the items of a job not read by the model yet whose `flags` are set."""
    if any(flags):
        kept = [item for item, gone in zip(job.items, flags, strict=True) if not gone]
        log.debug("skipping %d cancelled items", len(job.items) - len(kept))
        del job.items[:]
        job.items.extend(kept)


def _gone_items(job: queue_pb2.Job, flags: list[int]) -> Iterator[tuple[str, int]]:
    """(reply_to, ticket) of the items of a running job whose `flags` are set."""
    pairs = zip(job.items, flags, strict=True)
    return ((job.reply_to, item.ticket) for item, gone in pairs if gone)


def _name(exc: BaseException) -> str:
    return type(exc).__name__


def _xadd(key: str, fields: dict, maxlen: int) -> tuple:
    """XADD of `fields` with an approximate MAXLEN (trimmed in whole nodes: cheap)."""
    return (
        "XADD",
        key,
        "MAXLEN",
        "~",
        maxlen,
        "*",
        *(part for item in fields.items() for part in item),
    )
