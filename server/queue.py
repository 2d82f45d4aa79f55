"""The server's core stage: cache look-up, enqueueing of misses, replies.

Requests never talk to Redis one by one. They drop a `Call` into an inbox;
one flusher task takes everything that arrived since its last round trip,
looks all of it up in the cache with a single MGET, and enqueues the misses
as one Job per (model, options) with a single pipelined XADD (group commit:
no timer, the batch is whatever queued up while Redis answered). A listener
task reads this server's reply stream and fills the waiting calls.

The same text requested twice at once (within or across requests) is sent
to the workers once: later callers wait on the ticket already in flight.

Admission is by time: a request whose misses cannot be encoded before its
deadline, given the texts queued for the model (all servers) and the
workers' measured rate, is refused at once with RESOURCE_EXHAUSTED and a
retry-after hint. A large request is queued a window of texts at a time, so
that smaller requests arriving meanwhile are not queued behind all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import redis.asyncio as aioredis
from google.protobuf.message import DecodeError
from redis.exceptions import NoPermissionError, ResponseError

from embedq import streams
from embedq.internal.v1 import queue_pb2
from embedq.keys import (
    PAYLOAD_FIELD,
    REPLY_TTL_S,
    Keys,
    decode_reply,
    encode_message,
    texts_sha256,
    variant_fingerprint,
)
from embedq.trouble import REDIS_TROUBLE

from . import held, metrics, one_trip
from .admission import CALL_WINDOW, Admission, ModelLoad, QueueBounds, admit_limit
from .errors import (
    RequestError,
    deadline,
    error_of_failure,
    redis_failure,
    redis_is_full,
    unavailable,
)
from .nearcache import NearCache
from .registry import ServedModel
from .supervise import Supervisor, Throttled, cancel_all

log = logging.getLogger(__name__)

ENCODE = queue_pb2.JOB_KIND_ENCODE
TOKENIZE = queue_pb2.JOB_KIND_TOKENIZE
# While texts are in flight, the write markers are checked this often (s).
MARKER_CHECK_S = 1.0
# Reply stream and markers get their TTL renewed this often (s).
KEEPALIVE_S = 5.0
# Reply listener: first retry after a Redis error, doubling up to the cap (s).
LISTEN_BACKOFF_S = (0.05, 1.0)
LOST_WORK = "redis restarted and lost the queued work; retry"
# One round trip for look-up and enqueue (one_trip.py) while at least this share of recent
# look-ups found none of their texts cached (else flushes would mostly be routed twice), for
# flushes of at most this many texts.
ONE_TRIP_ALL_NEW_SHARE = 0.5
ONE_TRIP_TEXTS = 256
# Weight of the latest look-up in that share (an exponential average).
ALL_NEW_WEIGHT = 0.2
# A Redis that refused the script (scripting disabled, not allowed, out of memory...) is
# asked again after this long; meanwhile flushes take two round trips (s).
ONE_TRIP_PAUSE_S = 60.0


@dataclass(frozen=True)
class Variant:
    """One way of turning texts into vectors: model plus effective options."""

    model: ServedModel
    normalize: bool
    truncate: bool
    prompt: str = ""

    @functools.cached_property  # read per text on the hot path: hash once
    def fingerprint(self) -> str:
        reg = self.model.registration
        return variant_fingerprint(
            reg.fingerprint, normalize=self.normalize, truncate=self.truncate, prompt=self.prompt
        )


def default_row_name(row: int) -> str:
    return f"texts[{row}]"


@dataclass
class Call:
    """One request's texts, waiting for their rows."""

    kind: int
    variant: Variant
    texts: list[str]
    deadline_unix_ms: int
    future: asyncio.Future
    row_name: Callable[[int], str] = default_row_name
    vectors: np.ndarray = field(init=False)
    cached: np.ndarray = field(init=False)
    tokens: list[queue_pb2.Tokens | None] = field(init=False)
    remaining: int = field(init=False)
    tickets: list[int] = field(default_factory=list)
    # Cache-key hashes of the texts and their cache keys (encode calls: see
    # Dispatcher._hash), and the missed rows not queued yet (popped from the end: kept
    # in reverse order).
    hashes: list[str] | None = None
    cache_keys: list[str] = field(default_factory=list)
    unrouted: list[int] = field(default_factory=list)
    # Missed rows repeating an earlier row's text, by that row: they wait on its ticket, so
    # one text gets one vector even when a window queues its rows far apart.
    repeats: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.texts)
        dim = self.variant.model.registration.dimension if self.kind == ENCODE else 0
        self.vectors = np.zeros((n, dim), dtype=np.float32)
        self.cached = np.zeros(n, dtype=bool)
        self.tokens = [None] * n if self.kind == TOKENIZE else []
        self.remaining = n

    def _rows_done(self, count: int = 1) -> None:
        self.remaining -= count
        if self.remaining == 0 and not self.future.done():
            self.future.set_result(self)

    def set_rows(self, rows: list[int], vectors: np.ndarray) -> None:
        """Computed (not cached) vectors for several rows at once."""
        self.vectors[rows] = vectors
        self._rows_done(len(rows))

    def fill_hits(self, values: list[bytes | None]) -> list[int]:
        """Fill the rows the cache had, in one copy; return the missed rows.
        A value of the wrong size is a miss, never served."""
        size = self.vectors.shape[1] * 4
        if None not in values and set(map(len, values)) == {size}:
            # Every row cached (the common case for hot texts): the joined values become
            # the matrix (writable), with no per-row scatter into the zeros.
            joined = bytearray().join(values)  # type: ignore[arg-type]
            self.vectors = np.frombuffer(joined, dtype="<f4").reshape(len(values), -1)
            self.cached[:] = True
            self._rows_done(len(values))
            return []
        hits = [row for row, value in enumerate(values) if value is not None and len(value) == size]
        if hits:
            packed = b"".join([values[row] for row in hits])  # type: ignore[misc]
            self.vectors[hits] = np.frombuffer(packed, dtype="<f4").reshape(len(hits), -1)
            self.cached[hits] = True
            self._rows_done(len(hits))
        hit = set(hits)
        return [row for row in range(len(self.texts)) if row not in hit]

    def set_tokens(self, row: int, tokens: queue_pb2.Tokens) -> None:
        self.tokens[row] = tokens
        self._rows_done()

    def fail(self, error: RequestError) -> None:
        if not self.future.done():
            self.future.set_exception(error)

    @property
    def queued(self) -> int:
        """Rows queued and not answered yet (not counting those still to queue)."""
        held = sum(map(len, self.repeats.values()))  # rows not attached to a ticket yet
        return self.remaining - len(self.unrouted) - held

    def hold_repeats(self, misses: list[int]) -> list[int]:
        """The missed rows whose text is new to this call; the others go to `repeats`."""
        if self.hashes is None:
            return misses
        hashes = self.hashes
        if len({hashes[row] for row in misses}) == len(misses):
            return misses  # no text repeats (the usual case): one set, no per-row bookkeeping
        first: dict[str, int] = {}
        kept = []
        for row in misses:
            earlier = first.setdefault(self.hashes[row], row)
            if earlier == row:
                kept.append(row)
            else:
                self.repeats.setdefault(earlier, []).append(row)
        return kept

    def rows_of(self, row: int) -> list[int]:
        """`row` and the rows repeating its text (released from `repeats`)."""
        return [row, *self.repeats.pop(row, [])]

    def seconds_left(self) -> float:
        return self.deadline_unix_ms / 1000 - time.time()


@dataclass
class Ticket:
    """One item in flight; several (call, row) pairs may wait on it."""

    waiters: list[tuple[Call, int]]
    dedupe_key: tuple[str, str] | None
    chars: int = 0
    # Deadline of the job that carries it: workers skip the item after it.
    deadline_unix_ms: int = 0
    # Model of the job, and the sequence number of the flush that queued it
    # (compared with the write markers to tell what a Redis failure lost).
    model: str = ""
    seq: int = 0


@dataclass
class Writes:
    """What one flush writes: its jobs (XADD) and their markers, the cancellations."""

    seq: int  # the flush's sequence number (its tickets carry it; its markers get it)
    jobs: dict[tuple, queue_pb2.Job]
    calls: list[Call]  # failed if the writes fail
    models: list[str]
    markers: list[str]  # job streams' markers of `models`, then the reply stream's
    abandoned: list[int]
    sent: bool = False  # their round trip came back (or failed and their calls with it)


def _unsent(writes: Writes | None) -> list[Call]:
    """The calls of writes whose round trip never came back: they fail with the flush."""
    return writes.calls if writes is not None and not writes.sent else []


class Dispatcher:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        *,
        server_id: str | None = None,
        bounds: QueueBounds | None = None,
        near_cache: NearCache | None = None,
    ) -> None:
        self._redis = redis
        self.near_cache = near_cache if near_cache is not None else NearCache(0)
        self._keys = keys
        self.server_id = server_id or uuid.uuid4().hex[:12]
        self.reply_key = keys.replies(self.server_id)
        self._inbox: list[Call] = []
        self._wakeup = asyncio.Event()
        self._next_ticket = itertools.count(1)
        self._tickets: dict[int, Ticket] = {}
        self._in_flight: dict[tuple[str, str], int] = {}
        self._last_reply_id = "0-0"
        self._tasks: list[asyncio.Task] = []
        self._pending_chars = 0
        # Tickets whose callers left; workers are told to skip them.
        self._abandoned: list[int] = []
        # Windowed calls ready for their next texts.
        self._refills: dict[int, Call] = {}
        # Admitted calls with rows not queued yet (their windows' rest): work that no backlog
        # counter sees yet, shared with the other servers (server/held.py).
        self._held_back = held.HeldBack(redis, keys, self.server_id)
        self._admission = Admission(bounds or QueueBounds(), self._held_back)
        # Lost-work detection (see _verify_markers): each flush that queues jobs gets
        # a sequence number, stamped on its tickets and written (SET) as a marker
        # beside each job stream it wrote to and beside the reply stream, in the same
        # pipeline as its XADDs. A marker that is gone or behind what we wrote means
        # that node lost data (restarted empty, or failed over to a replica that had
        # not got it): exactly the tickets queued after the marker's value are lost.
        # A topology change that kept the data changes nothing.
        self._seq = 0
        self._written: dict[str, int] = {}  # model -> seq of its last completed flush
        self._reply_written = 0  # seq of the last completed flush, reply marker
        self.reply_marker = keys.reply_marker(self.reply_key)
        self._throttled = Throttled(log)
        # When Redis last refused this server's writes for lack of memory (time.monotonic());
        # None once a write was taken since.
        self._redis_full_at: float | None = None
        # One-trip flushes (one_trip.py): the last queue lengths read per model, the
        # recent share of look-ups that found nothing cached, and when the script may run.
        self.one_trip_texts = ONE_TRIP_TEXTS  # 0: always two round trips
        self._one_trip_script = redis.register_script(one_trip.SCRIPT)
        self._one_trip_after = 0.0  # time.monotonic() before which it is not used
        self._last_load: dict[str, ModelLoad] = {}
        self._all_new_share = 1.0

    # -- public API -----------------------------------------------------------

    async def start(self, supervisor: Supervisor | None = None) -> None:
        """Start the flusher, reply listener and keepalive under `supervisor`
        (restarted with backoff if they fail; one of our own when None)."""
        supervisor = supervisor or Supervisor()
        self._tasks = [
            supervisor.spawn("flush", self._flush_loop),
            supervisor.spawn("replies", self._listen_loop),
            supervisor.spawn("reply-keepalive", self._keepalive_loop),
            supervisor.spawn("held-publisher", lambda: self._held_back.shared.run(self._throttled)),
        ]

    async def stop(self) -> None:
        await cancel_all(self._tasks)
        with contextlib.suppress(*REDIS_TROUBLE):  # else they expire on their own
            await self._redis.delete(self.reply_key, self.reply_marker)
            for model in self._written:
                await self._redis.delete(self._keys.job_marker(model, self.server_id))
            await self._held_back.shared.withdraw()

    async def encode(
        self,
        variant: Variant,
        texts: list[str],
        timeout_s: float,
        row_name: Callable[[int], str] = default_row_name,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Vectors (n, dim) float32 and per-row cache-hit flags. `row_name` names a text in
        a worker's failure (what the caller calls it: say "pairs[3].b")."""
        call = await self._submit(ENCODE, variant, texts, timeout_s, row_name)
        return call.vectors, call.cached

    async def tokenize(
        self, variant: Variant, texts: list[str], timeout_s: float
    ) -> list[queue_pb2.Tokens]:
        call = await self._submit(TOKENIZE, variant, texts, timeout_s)
        return [tokens for tokens in call.tokens if tokens is not None]

    @property
    def cluster(self) -> bool:
        return isinstance(self._redis, aioredis.RedisCluster)

    async def mget(self, keys: list[str]) -> list[bytes | None]:
        """MGET that also works when the keys live in several cluster slots."""
        if self.cluster:
            return await self._redis.mget_nonatomic(keys)
        return await self._redis.mget(keys)

    # -- calls ------------------------------------------------------------------

    async def _submit(
        self,
        kind: int,
        variant: Variant,
        texts: list[str],
        timeout_s: float,
        row_name: Callable[[int], str] = default_row_name,
    ) -> Call:
        loop = asyncio.get_running_loop()
        deadline_ms = int((time.time() + timeout_s) * 1000)
        call = Call(kind, variant, texts, deadline_ms, loop.create_future(), row_name)
        if kind == ENCODE and self._answered_nearby(call):
            return call
        self._inbox.append(call)
        self._wakeup.set()
        # A timer on the call's own future rather than wait_for(): no extra task
        # and futures per call (profiled: per-message overhead of waiting streams).
        expiry = loop.call_later(timeout_s, self._expire, call.future, timeout_s)
        try:
            return await call.future
        finally:
            expiry.cancel()
            self._forget(call)

    def _answered_nearby(self, call: Call) -> bool:
        """Answer the call from the near cache if every one of its texts is there: no Redis
        round trip, no wait for the next flush (see nearcache.py)."""
        if not self.near_cache.max_bytes:
            return False
        self._hash(call)
        values = self.near_cache.get_all(call.cache_keys)
        if values is None or set(map(len, values)) != {call.vectors.shape[1] * 4}:
            return False
        call.fill_hits(values)  # every row, so the call is done
        metrics.record_near_cache_hits(len(values))
        return True

    def _forget(self, call: Call) -> None:
        """Drop a finished, failed or abandoned call's interest in its tickets."""
        self._drop_unrouted(call)
        call.repeats.clear()
        self._refills.pop(id(call), None)
        for ticket_id in call.tickets:
            ticket = self._tickets.get(ticket_id)
            if ticket is None:
                continue
            ticket.waiters = [(c, row) for c, row in ticket.waiters if c is not call]
            if not ticket.waiters:
                self._drop_ticket(ticket_id)
                self._abandoned.append(ticket_id)
        call.tickets.clear()
        if self._abandoned:
            self._wakeup.set()

    def _drop_ticket(self, ticket_id: int) -> Ticket | None:
        ticket = self._tickets.pop(ticket_id, None)
        if ticket is not None:
            self._pending_chars -= ticket.chars
            if self._in_flight.get(ticket.dedupe_key) == ticket_id:
                del self._in_flight[ticket.dedupe_key]
        return ticket

    def _drop_unrouted(self, call: Call) -> None:
        call.unrouted.clear()
        self._held_back.discard(call.variant.model.name, call)

    def _joinable(self, dedupe_key: tuple[str, str] | None, call: Call) -> int | None:
        """The in-flight ticket this call can wait on: same text and variant, and
        queued with a deadline no earlier than the call's own (else the worker
        could skip it while this caller still waits)."""
        ticket_id = self._in_flight.get(dedupe_key) if dedupe_key else None
        if ticket_id is None:
            return None
        if self._tickets[ticket_id].deadline_unix_ms < call.deadline_unix_ms:
            return None
        return ticket_id

    def _lose(self, lost, where: str) -> None:
        """Fail the calls waiting on the tickets `lost(ticket)` picks: Redis lost
        their jobs or replies, so they would otherwise wait for their deadline."""
        ticket_ids = [tid for tid, ticket in self._tickets.items() if lost(ticket)]
        if not ticket_ids:
            return
        log.warning(
            "redis lost queued work (%s restarted or failed over without it): "
            "failing the calls waiting for %d texts",
            where,
            len(ticket_ids),
        )
        error = unavailable(LOST_WORK)
        for ticket_id in ticket_ids:
            ticket = self._drop_ticket(ticket_id)
            for call, _row in ticket.waiters if ticket else ():
                call.fail(error)

    # -- flushing: cache look-up and enqueue ---------------------------------

    def _has_work(self) -> bool:
        return bool(self._inbox or self._abandoned or self._refills)

    async def _flush_loop(self) -> None:
        while True:
            if not self._has_work():
                await self._wakeup.wait()
            self._wakeup.clear()
            writes: Writes | None = None  # a flush's writes, to go with the next look-up
            while self._has_work() or writes is not None:
                calls, self._inbox = self._inbox, []
                calls = [call for call in calls if not call.future.done()]
                refills = [c for c in self._refills.values() if not c.future.done()]
                self._refills = {}
                ahead, writes = writes, None
                try:
                    writes = await self._flush(calls, refills, ahead)
                except REDIS_TROUBLE as exc:
                    self._fail_all(calls + refills + _unsent(ahead), self._redis_failed(exc))
                except Exception:
                    # A bug, not Redis: its calls get an answer; the supervisor
                    # logs and restarts this loop.
                    error = unavailable("the server failed to queue the work; retry")
                    self._fail_all(calls + refills + _unsent(ahead), error)
                    raise

    def _redis_failed(self, exc: Exception) -> RequestError:
        if redis_is_full(exc):
            self._redis_full_at = time.monotonic()
            self._throttled.warning(
                "full",
                "redis is out of memory (maxmemory reached and nothing it may evict: see "
                "docs/deployment.md, Memory policy): refusing new texts; cached ones are served",
            )
        else:
            name = type(exc).__name__
            self._throttled.warning("flush", "queueing work failed (%s); failing its calls", name)
        return redis_failure(exc)

    def _expire(self, future: asyncio.Future, timeout_s: float) -> None:
        if not future.done():
            why = self._full_note("results") or " (worker busy or gone)"
            future.set_exception(deadline(f"no result within {timeout_s:.1f}s{why}"))

    def _full_note(self, what: str = "heartbeats") -> str:
        """Why workers may look dead or late: a full Redis refuses their heartbeats and their
        results too. (Dated: a server writes only when it queues work, so nothing newer says
        whether it still is.)"""
        if self._redis_full_at is None:
            return ""
        ago = time.monotonic() - self._redis_full_at
        return (
            f" (redis was out of memory at this server's last write, {ago:.0f}s ago: "
            f"it refuses the workers' {what} too; see docs/deployment.md, Memory policy)"
        )

    def _fail_all(self, calls: list[Call], error: RequestError) -> None:
        for call in calls:
            call.fail(error)
            self._forget(call)

    async def _flush(
        self, calls: list[Call], refills: list[Call] = (), ahead: Writes | None = None
    ) -> Writes | None:
        """Look the calls up and route them; `ahead` (the last flush's writes) goes in the
        same round trip. Returns this flush's writes when more work is already waiting
        (they then go ahead of its look-up: one round trip for both), else sends them."""
        self._seq += 1
        seq = self._seq  # stamped on the tickets this flush queues
        for call in calls:
            if call.kind == ENCODE and call.hashes is None:
                self._hash(call)
        if calls:
            found = await self._look_up(calls, refills, ahead, seq)
            if found is None:
                return None  # all new: looked up and queued in one round trip
            cached, load = found
        else:
            cached, load = {}, {}
            if ahead is not None:
                await self._send(ahead)
        jobs: dict[tuple, queue_pb2.Job] = {}
        for call in refills:
            self._refill(call, load, jobs)
        for call in calls:
            self._route(call, cached.get(id(call), []), load, jobs)
        if not (jobs or self._abandoned):
            return None
        writes = self._writes(seq, jobs, calls + list(refills))
        if self._inbox and not self.cluster:  # a cluster's keys span slots: not one pipeline
            return writes
        await self._send(writes)
        return None

    def _writes(self, seq: int, jobs: dict[tuple, queue_pb2.Job], calls: list[Call]) -> Writes:
        models = sorted({model for _kind, model, *_options in jobs})
        markers = [self._keys.job_marker(m, self.server_id) for m in models]
        markers += [self.reply_marker] if jobs else []
        abandoned, self._abandoned = self._abandoned, []
        return Writes(seq, jobs, calls, models, markers, abandoned)

    def _queue_writes(self, pipe, writes: Writes) -> None:
        """The XADDs of a flush, between GET and SET of the markers beside them (each
        marker's GET runs on its node before our XADDs, its SET after), and the
        cancellations (workers skip the tickets nobody waits for any more)."""
        for key in writes.markers:
            pipe.get(key)
        for (_kind, model, *_options), job in writes.jobs.items():
            pipe.xadd(self._keys.jobs(model), encode_message(job))
            pipe.incrby(self._keys.backlog(model), len(job.items))
        for key in writes.markers:
            pipe.set(key, writes.seq, ex=REPLY_TTL_S)
        if writes.abandoned:
            key = self._keys.cancelled(self.reply_key)
            pipe.sadd(key, *writes.abandoned)
            pipe.expire(key, REPLY_TTL_S)

    def _wrote(self, writes: Writes, results: list) -> None:
        writes.sent = True
        self._redis_full_at = None
        if writes.jobs:
            self._check_markers(writes.models, results[: len(writes.markers)], writes.seq)

    def _wrote_or_failed(self, writes: Writes, results: list) -> None:
        """The writes' part of a pipeline run with raise_on_error=False: a refused write
        (say, OOM or READONLY) fails their calls only, not the look-up beside them."""
        refused = next((r for r in results if isinstance(r, Exception)), None)
        if refused is None:
            self._wrote(writes, results)
            return
        writes.sent = True  # answered: failed here, not again by the flush loop
        self._fail_all(writes.calls, self._redis_failed(refused))

    async def _send(self, writes: Writes) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            self._queue_writes(pipe, writes)
            results = await pipe.execute()
        self._wrote(writes, results)

    def _check_markers(self, models: list[str], values: list, seq: int) -> None:
        """After flush `seq`: its GETs of the markers (job streams of `models`, then
        the reply stream) show whether those nodes kept what earlier flushes wrote."""
        for model, value in zip(models, values, strict=False):
            got, before = _marker_value(value), self._written.get(model, 0)
            if got < before:
                self._lose(
                    lambda t, m=model, g=got: t.model == m and g < t.seq < seq,
                    f"the node of model {model!r}'s job stream",
                )
            self._written[model] = max(before, seq)
        if _marker_value(values[-1]) < self._reply_written:
            self._lose(lambda t: t.seq < seq, "the node of this server's reply stream")
            self._last_reply_id = "0-0"
        self._reply_written = max(self._reply_written, seq)

    async def _verify_markers(self) -> None:
        """Compare the markers with what completed flushes wrote, for the tickets in
        flight; fail the calls whose work a Redis node lost. (A flush running
        meanwhile checks its own markers: see _check_markers.)"""
        if not self._tickets:
            return
        models = sorted({t.model for t in self._tickets.values()} & self._written.keys())
        expected = {model: self._written[model] for model in models}
        reply_expected = self._reply_written
        keys = [self._keys.job_marker(m, self.server_id) for m in models] + [self.reply_marker]
        values = await self.mget(keys)
        for model, value in zip(models, values, strict=False):
            got, upto = _marker_value(value), expected[model]
            if got < upto:
                self._lose(
                    lambda t, m=model, g=got, u=upto: t.model == m and g < t.seq <= u,
                    f"the node of model {model!r}'s job stream",
                )
        if _marker_value(values[-1]) < reply_expected:
            self._lose(lambda t: t.seq <= reply_expected, "the node of this server's reply stream")
            self._last_reply_id = "0-0"

    def _dedupe_key(self, call: Call, row: int) -> tuple[str, str] | None:
        return (call.variant.fingerprint, call.hashes[row]) if call.hashes is not None else None

    def _route(
        self,
        call: Call,
        values: list[bytes | None],
        load: dict[str, ModelLoad],
        jobs: dict[tuple, queue_pb2.Job],
    ) -> None:
        """Fill a call's cache hits; admit the rest or refuse the call, then queue
        (or join) the first window of its misses."""
        if call.future.done():
            # Its caller left (cancelled, or the deadline passed) during the look-up, and
            # has forgotten the call already: tickets made now would be encoded for nobody.
            return
        misses = call.fill_hits(values) if values else list(range(len(call.texts)))
        if not misses:
            return
        misses = call.hold_repeats(misses)
        new = self._joined(call, misses).count(None)
        refusal = self._refusal(call, new, load)
        if refusal is not None:
            self._admission.refused(call.variant.model.name, refusal, new)
            call.fail(refusal)
            self._forget(call)
            return
        self._admit(call, misses, new, load, jobs)

    def _joined(self, call: Call, rows: list[int]) -> list[int | None]:
        """Per row, the in-flight ticket it would wait on (None: it needs a new one): what
        _joinable says of each row, in one pass (every text of every call goes through here,
        refused calls too)."""
        if call.hashes is None:
            return [None] * len(rows)
        fingerprint, hashes = call.variant.fingerprint, call.hashes
        found = [self._in_flight.get((fingerprint, hashes[row])) for row in rows]
        tickets, deadline_ms = self._tickets, call.deadline_unix_ms
        return [
            None
            if found_id is None or tickets[found_id].deadline_unix_ms < deadline_ms
            else found_id
            for found_id in found
        ]

    def _admit(
        self,
        call: Call,
        misses: list[int],
        new: int,
        load: dict[str, ModelLoad],
        jobs: dict[tuple, queue_pb2.Job],
    ) -> None:
        model = call.variant.model.name
        call.unrouted = misses[::-1]
        load[model].admitted += self._queue_window(call, jobs)
        if call.unrouted:  # held back: admission counts them for the calls after it
            self._held_back.add(model, call)

    def _refill(
        self, call: Call, load: dict[str, ModelLoad], jobs: dict[tuple, queue_pb2.Job]
    ) -> None:
        """Queue a windowed call's next rows; counted as admitted in this flush (the backlog
        read before them does not have them) where its model is being routed."""
        queued = self._queue_window(call, jobs)
        if call.variant.model.name in load:
            load[call.variant.model.name].admitted += queued
        if not call.unrouted:
            self._drop_unrouted(call)

    def _queue_window(self, call: Call, jobs: dict[tuple, queue_pb2.Job]) -> int:
        """Queue the call's next missed rows, up to CALL_WINDOW of them in flight; return
        how many new texts that queued (rows that join a ticket in flight cost nothing)."""
        tickets_before = len(self._tickets)
        while call.unrouted and call.queued < CALL_WINDOW:
            row = call.unrouted.pop()
            rows = call.rows_of(row)
            self._wait_for(call, rows, call.texts[row], self._dedupe_key(call, row), jobs)
        return len(self._tickets) - tickets_before

    def _refusal(self, call: Call, new: int, load: dict[str, ModelLoad]) -> RequestError | None:
        """Why a call's `new` texts (not cached, not in flight) cannot be queued now, if they
        cannot (see Admission.refusal). _route_as_misses relies on more new texts never
        being refused less."""
        model = call.variant.model
        if model.workers_alive == 0:
            return unavailable(f"no worker alive for model {model.name!r}{self._full_note()}")
        waiting = (len(self._tickets), self._pending_chars)
        return self._admission.refusal(model, load[model.name], new, call.seconds_left(), waiting)

    async def _look_up(
        self, calls: list[Call], refills: list[Call], ahead: Writes | None, seq: int
    ) -> tuple[dict[int, list[bytes | None]], dict[str, ModelLoad]] | None:
        """What _lookup returns; None when the calls' texts were all new and went to the
        workers in the same round trip (one_trip.py)."""
        fits = self._one_trip_fits(calls, refills, ahead)
        routed = self._route_as_misses(calls, seq) if fits else None
        if routed is None:
            return await self._lookup(calls, ahead)
        jobs, limits = routed
        cache_keys = self._cache_keys(calls)
        try:
            reply = await self._one_trip(calls, cache_keys, jobs, limits, seq)
        except ResponseError as exc:
            self._unroute(calls, seq)
            self._one_trip_after = time.monotonic() + ONE_TRIP_PAUSE_S
            if redis_is_full(exc):  # the two round trips' refused writes tell the calls
                return await self._lookup(calls, ahead)
            # Named by class: a refusal's text can hold addresses.
            why = type(exc).__name__
            if isinstance(exc, NoPermissionError):
                why += "; a Redis user needs +evalsha and +script|load for it"
            self._throttled.warning(
                "one-trip",
                "redis refused the one-trip look-up script (%s): flushes take two round trips "
                "for %.0fs",
                why,
                ONE_TRIP_PAUSE_S,
            )
            return await self._lookup(calls, ahead)
        found = self._digest(calls, cache_keys, reply.values, reply.counts)
        if reply.markers is not None:
            return None
        self._unroute(calls, seq)  # some text was cached or the queue grew: route again
        return found

    def _one_trip_fits(self, calls: list[Call], refills: list[Call], ahead: Writes | None) -> bool:
        """Whether this flush may try one round trip: nothing else rides with it, recent
        look-ups mostly found nothing cached, and it is small enough to route twice. No call
        of more than a window (whatever `one_trip_texts` says): their admission reads the other
        servers' held calls (held.py), which the script does not."""
        return (
            ahead is None
            and not refills
            and not self._abandoned
            and not self.cluster
            and self._all_new_share >= ONE_TRIP_ALL_NEW_SHARE
            and time.monotonic() >= self._one_trip_after
            and sum(len(call.texts) for call in calls) <= self.one_trip_texts
            and (
                self.one_trip_texts <= CALL_WINDOW
                or all(len(c.texts) <= CALL_WINDOW for c in calls)
            )
        )

    def _route_as_misses(
        self, calls: list[Call], seq: int
    ) -> tuple[dict[tuple, queue_pb2.Job], dict[str, float]] | None:
        """Route every call of flush `seq` as if none of its texts were cached, admitted
        against the last queue lengths read; with each model's backlog under which all are
        still admitted. None, with nothing routed, where a call would be refused or would
        wait on work queued by an earlier flush (its rows could then be answered while the
        script runs, and routed again after it)."""
        load = {name: ModelLoad(last.jobs, last.texts) for name, last in self._last_load.items()}
        jobs: dict[tuple, queue_pb2.Job] = {}
        limits: dict[str, float] = {}
        for call in calls:
            model = call.variant.model
            model_load = load.setdefault(model.name, ModelLoad(0, 0))
            texts = len(call.texts)
            if self._refusal(call, texts, load) is not None:
                # Refused if every text were new: the exact count (repeats and texts already
                # in flight left out) may still fit, and the look-up's routing decides that.
                # Only a call at the edge loses its one round trip; a refused call is no
                # longer routed twice (measured: a burst's refusals, docs/benchmarks.md).
                # Admitted with all texts new, it is admitted with fewer: no second test.
                self._unroute(calls, seq)
                return None
            misses = call.hold_repeats(list(range(texts)))
            joined = self._joined(call, misses)
            if any(t is not None and self._tickets[t].seq != seq for t in joined):
                self._unroute(calls, seq)  # it would wait on an earlier flush's work
                return None
            new = joined.count(None)
            limit = admit_limit(model.capacity, new, call.seconds_left())
            limit -= model_load.admitted + self._held_back.ahead_of(model.name, new, CALL_WINDOW)
            limits[model.name] = min(limits.get(model.name, math.inf), limit)
            self._admit(call, misses, new, load, jobs)
        return (jobs, limits) if jobs else None

    def _unroute(self, calls: list[Call], seq: int) -> None:
        """Undo _route_as_misses: the tickets of flush `seq` dropped, never sent."""
        for call in calls:
            for ticket_id in call.tickets:
                ticket = self._tickets.get(ticket_id)
                if ticket is not None and ticket.seq == seq:
                    self._drop_ticket(ticket_id)
            call.tickets.clear()
            self._drop_unrouted(call)
            call.repeats.clear()

    async def _one_trip(
        self,
        calls: list[Call],
        cache_keys: list[str],
        jobs: dict[tuple, queue_pb2.Job],
        limits: dict[str, float],
        seq: int,
    ) -> one_trip.TripReply:
        """Look up and, if all missed and all are still admitted, queue `jobs`: one script."""
        writes = self._writes(seq, jobs, calls)
        queues = [
            one_trip.ModelQueue(
                model, self._keys.jobs(model), self._keys.backlog(model), limits[model]
            )
            for model in sorted(limits)
        ]
        trip = one_trip.Trip(
            cache_keys=cache_keys,
            models=queues,
            max_jobs=self._admission.bounds.max_queued_jobs,
            jobs=[
                one_trip.Job(model, len(job.items), job.SerializeToString())
                for (_kind, model, *_options), job in jobs.items()
            ],
            markers=writes.markers,
            seq=seq,
            ttl_s=REPLY_TTL_S,
            field=PAYLOAD_FIELD,
        )
        raw = await self._one_trip_script(keys=trip.keys(), args=trip.args())
        reply = one_trip.TripReply.parse(raw)
        if reply.markers is not None:
            self._wrote(writes, reply.markers)
        return reply

    def _hash(self, call: Call) -> None:
        """Hash an encode call's texts and name their cache keys, once: the near cache and
        the Redis look-up both read them."""
        call.hashes = texts_sha256(call.texts)
        prefix = self._keys.cache_prefix(call.variant.fingerprint)
        call.cache_keys = [prefix + sha for sha in call.hashes]

    @staticmethod
    def _cache_keys(calls: list[Call]) -> list[str]:
        return [key for call in calls for key in call.cache_keys]

    async def _lookup(
        self, calls: list[Call], ahead: Writes | None = None
    ) -> tuple[dict[int, list[bytes | None]], dict[str, ModelLoad]]:
        """The cached values of every text of every call, by id(call) (one MGET),
        and the queued work of each model involved, in one round trip (after the
        writes `ahead`, which then count in that work; never on a cluster: see _flush)."""
        cache_keys = self._cache_keys(calls)
        models = sorted({call.variant.model.name for call in calls})
        # Where a call may be of more than one window, the other servers' held calls too.
        huge = sorted({c.variant.model.name for c in calls if len(c.texts) > CALL_WINDOW})
        if self.cluster:
            # Cache keys spread over the cluster's slots: MGET per slot, in parallel.
            values = await self.mget(cache_keys) if cache_keys else []
            counts = []
            for model in models:
                counts.append(await self._redis.xlen(self._keys.jobs(model)))
                counts.append(await self._redis.get(self._keys.backlog(model)))
            held_fields = [await self._redis.hgetall(self._keys.held(model)) for model in huge]
        else:
            async with self._redis.pipeline(transaction=False) as pipe:
                if ahead is not None:
                    self._queue_writes(pipe, ahead)
                written = len(pipe.command_stack)
                if cache_keys:
                    pipe.mget(cache_keys)
                for model in models:
                    pipe.xlen(self._keys.jobs(model))
                    pipe.get(self._keys.backlog(model))
                for model in huge:
                    pipe.hgetall(self._keys.held(model))
                results = await pipe.execute(raise_on_error=False)
            if ahead is not None:
                self._wrote_or_failed(ahead, results[:written])
            results = results[written:]
            refused = next((r for r in results if isinstance(r, Exception)), None)
            if refused is not None:
                raise refused
            values = results[0] if cache_keys else []
            counts = results[1 if cache_keys else 0 :][: 2 * len(models)]
            held_fields = results[len(results) - len(huge) :]
        for model, fields in zip(huge, held_fields, strict=True):
            self._held_back.shared.read(model, fields)
        return self._digest(calls, cache_keys, values, counts)

    def _digest(
        self, calls: list[Call], cache_keys: list[str], values: list, counts: list
    ) -> tuple[dict[int, list[bytes | None]], dict[str, ModelLoad]]:
        """A look-up's values by id(call), and each model's queued work (`counts`: jobs,
        then texts, per model in name order); the near cache and statistics fed."""
        models = sorted({call.variant.model.name for call in calls})
        load = {
            model: ModelLoad(int(jobs), max(0, int(texts or 0)))
            for model, jobs, texts in zip(models, counts[::2], counts[1::2], strict=True)
        }
        self._last_load.update(load)
        for key, value in zip(cache_keys, values, strict=True):
            if value is not None:
                self.near_cache.put(key, value)
        by_call: dict[int, list[bytes | None]] = {}
        start = 0
        for call in calls:
            if call.hashes is not None:
                by_call[id(call)] = values[start : start + len(call.hashes)]
                start += len(call.hashes)
        found = sum(value is not None for value in values)
        metrics.record_cache_lookup(found, len(values))
        if values:
            self._all_new_share += ((found == 0) - self._all_new_share) * ALL_NEW_WEIGHT
        return by_call, load

    def _wait_for(
        self,
        call: Call,
        rows: list[int],
        text: str,
        dedupe_key: tuple[str, str] | None,
        jobs: dict[tuple, queue_pb2.Job],
    ) -> None:
        """Attach the call's `rows` (all of this text) to its ticket in flight, or a new one."""
        ticket_id = self._joinable(dedupe_key, call)
        if ticket_id is None:
            ticket_id = next(self._next_ticket)
            self._tickets[ticket_id] = Ticket(
                [], dedupe_key, len(text), call.deadline_unix_ms, call.variant.model.name, self._seq
            )
            self._pending_chars += len(text)
            if dedupe_key is not None:
                self._in_flight[dedupe_key] = ticket_id
            job = self._job_for(call, jobs)
            # The item's own deadline: the job carries the latest of its callers'. (Callers
            # that join this ticket later have no later deadline: see _joinable.)
            job.items.add(ticket=ticket_id, text=text, deadline_unix_ms=call.deadline_unix_ms)
            job.deadline_unix_ms = max(job.deadline_unix_ms, call.deadline_unix_ms)
        self._tickets[ticket_id].waiters.extend((call, row) for row in rows)
        call.tickets.append(ticket_id)

    def _job_for(self, call: Call, jobs: dict[tuple, queue_pb2.Job]) -> queue_pb2.Job:
        variant = call.variant
        key = (call.kind, variant.model.name, variant.normalize, variant.truncate, variant.prompt)
        job = jobs.get(key)
        if job is None:
            job = queue_pb2.Job(
                kind=call.kind,
                reply_to=self.reply_key,
                normalize=variant.normalize,
                truncate=variant.truncate,
                variant=variant.fingerprint,
                fingerprint=variant.model.registration.fingerprint,
                prompt=variant.prompt,
            )
            jobs[key] = job
        return job

    # -- replies --------------------------------------------------------------

    async def _listen_loop(self) -> None:
        """Read this server's reply stream and fill the waiting calls. Redis errors
        are retried with backoff from the last id read (replies written meanwhile
        wait in the stream); after one, the markers say whether work was lost."""
        backoff = LISTEN_BACKOFF_S[0]
        failed = False
        while True:
            try:
                response = await streams.xread(
                    self._redis, {self.reply_key: self._last_reply_id}, count=512, block_ms=1000
                )
                if failed:
                    await self._verify_markers()
                    failed = False
            except REDIS_TROUBLE as exc:
                self._throttled.warning(
                    "replies", "reading the reply stream failed (%s); retrying", type(exc).__name__
                )
                failed = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, LISTEN_BACKOFF_S[1])
                continue
            backoff = LISTEN_BACKOFF_S[0]
            for _stream, entries in response or []:
                for entry_id, fields in entries:
                    self._last_reply_id = entry_id
                    try:
                        reply = decode_reply(fields)
                        self._on_reply(reply)
                    except (DecodeError, KeyError, ValueError, TypeError) as exc:
                        # One bad entry costs its own tickets (they time out), not the listener.
                        self._throttled.warning(
                            "bad-reply",
                            "skipped reply entry %s of %s: not a usable Reply (%s)",
                            entry_id,
                            self.reply_key,
                            type(exc).__name__,
                        )

    def _on_reply(self, reply: queue_pb2.Reply) -> None:
        if reply.tickets:
            matrix = np.frombuffer(reply.vectors, dtype="<f4").reshape(
                len(reply.tickets), reply.dimension
            )
            # Rows per waiting call, then one copy per call (not one per row).
            rows: dict[int, tuple[Call, list[int], list[int]]] = {}
            for index, ticket_id in enumerate(reply.tickets):
                for call, row in self._take_waiters(ticket_id):
                    _call, call_rows, indices = rows.setdefault(id(call), (call, [], []))
                    call_rows.append(row)
                    indices.append(index)
            for call, call_rows, indices in rows.values():
                call.set_rows(call_rows, matrix[indices])
                self._refill_if_due(call)
        for tokens in reply.tokens:
            for call, row in self._take_waiters(tokens.ticket):
                call.set_tokens(row, tokens)
                self._refill_if_due(call)
        for failure in reply.failures:
            for call, row in self._take_waiters(failure.ticket):
                call.fail(error_of_failure(failure, f"{call.row_name(row)}: {failure.message}"))

    def _take_waiters(self, ticket_id: int) -> list[tuple[Call, int]]:
        ticket = self._drop_ticket(ticket_id)
        return ticket.waiters if ticket is not None else []

    def _refill_if_due(self, call: Call) -> None:
        """Half a windowed call's queued texts answered: queue its next ones."""
        if call.unrouted and call.queued <= CALL_WINDOW // 2:
            self._refills[id(call)] = call
            self._wakeup.set()

    async def _keepalive_loop(self) -> None:
        """Check the markers once a second while texts are in flight (a restart or
        failover that no command of ours saw fails the lost calls now, not at their
        deadline), and keep the reply stream and markers alive, the stream trimmed
        to unread entries."""
        last_keepalive = -math.inf
        while True:
            try:
                await self._verify_markers()
                if time.monotonic() - last_keepalive >= KEEPALIVE_S:
                    async with self._redis.pipeline(transaction=False) as pipe:
                        pipe.xtrim(self.reply_key, minid=self._last_reply_id)
                        pipe.expire(self.reply_key, REPLY_TTL_S)
                        pipe.expire(self.reply_marker, REPLY_TTL_S)
                        for model in self._written:
                            pipe.expire(self._keys.job_marker(model, self.server_id), REPLY_TTL_S)
                        await pipe.execute()
                    last_keepalive = time.monotonic()
            except REDIS_TROUBLE as exc:
                self._throttled.warning(
                    "keepalive", "reply stream keepalive failed (%s); retrying", type(exc).__name__
                )
            await asyncio.sleep(MARKER_CHECK_S)


def _marker_value(value: object) -> int:
    """A marker's sequence number (0: missing or unreadable)."""
    try:
        return int(value) if value is not None else 0
    except (TypeError, ValueError):
        return 0
