"""The two cores in-process, no subprocesses: the server's Dispatcher against a real
Redis-compatible server with a fake worker loop written here, and the worker's
run_jobs with the tiny test model.

The fake worker speaks only what embedq/keys.py and queue.proto define: it
reads the job stream through the consumer group and answers on each job's
reply stream, so these tests pin the contract between server and workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis
from embedq.apps.embedded import EmbeddedRedis, free_port
from embedq.server.admission import QueueBounds
from embedq.server.errors import RequestError, as_request_error
from embedq.server.nearcache import ENTRY_OVERHEAD_BYTES, NearCache
from embedq.server.queue import Dispatcher, Variant
from embedq.server.registry import ModelRegistry, ServedModel
from embedq.workers.pipeline import (
    BatchLimits,
    Outcome,
    iter_steps,
    prepare,
    pretokenize,
    run_jobs,
)
from embedq.workers.worker import RECHECK_CANCELLED_S, Read, Worker, Write
from fault_worker import FaultyEncoder
from helpers_tiny_model import write_tiny_bert
from redis.exceptions import ResponseError

from embedq.internal.v1 import queue_pb2
from embedq.keys import (
    CONSUMER_GROUP,
    ErrorKind,
    Keys,
    decode_job,
    decode_reply,
    encode_message,
    text_sha256,
    variant_fingerprint,
)
from embedq.settings import RedisSettings, WorkerSettings
from embedq.trouble import unsent

MODEL = "fake"
DIM = 4
# Texts the fake worker treats specially.
NEVER = "never answered"
TOO_LONG = "too long for the model"


def fake_vector(text: str) -> np.ndarray:
    """Deterministic stand-in for an embedding."""
    return np.frombuffer(hashlib.sha256(text.encode()).digest()[:DIM], np.uint8).astype("<f4")


def fake_outcome(jobs: list[queue_pb2.Job], keys: Keys) -> Outcome:
    """What a worker would write: vectors and cache entries, or a failure kind."""
    outcome = Outcome()
    for job in jobs:
        reply = outcome.reply(job.reply_to)
        reply.dimension = DIM
        for item in job.items:
            if item.text == NEVER:
                continue
            if item.text == TOO_LONG:
                reply.failures.add(ticket=item.ticket, kind=ErrorKind.TOO_LONG, message="over")
                continue
            vector = fake_vector(item.text)
            reply.tickets.append(item.ticket)
            reply.vectors += vector.tobytes()
            outcome.cache[keys.cache(job.variant, text_sha256(item.text))] = vector.tobytes()
    return outcome


@dataclass
class FakeWorker:
    """A worker loop: XREADGROUP, answer (`answer`), write cache and replies, XACK."""

    redis: aioredis.Redis
    keys: Keys
    answer: Callable[[list[queue_pb2.Job], Keys], Outcome] = fake_outcome
    seen: list[str] = field(default_factory=list)
    # Stopped by a flag, not by cancelling: redis-py can swallow a cancel (queue.py's stop).
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        stream = self.keys.jobs(MODEL)
        with contextlib.suppress(ResponseError):  # BUSYGROUP: made already
            await self.redis.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
        while not self.stopping.is_set():
            response = await self.redis.xreadgroup(
                CONSUMER_GROUP, "fake-worker", {stream: ">"}, count=64, block=50
            )
            for _stream, entries in response or []:
                await self._handle(stream, entries)

    async def _handle(self, stream: str, entries: list) -> None:
        jobs = [decode_job(fields) for _entry_id, fields in entries]
        self.seen += [item.text for job in jobs for item in job.items]
        outcome = self.answer(jobs, self.keys)
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, value in outcome.cache.items():
                pipe.set(key, value, ex=60)
            for reply_to, reply in outcome.replies.items():
                pipe.xadd(reply_to, encode_message(reply))
            ids = [entry_id for entry_id, _fields in entries]
            pipe.xack(stream, CONSUMER_GROUP, *ids)
            pipe.xdel(stream, *ids)
            pipe.decrby(self.keys.backlog(MODEL), sum(len(job.items) for job in jobs))
            await pipe.execute()


@dataclass
class Core:
    dispatcher: Dispatcher
    worker: FakeWorker
    redis: aioredis.Redis
    keys: Keys

    def variant(self, capacity: float = 0.0, dimension: int = DIM) -> Variant:
        registration = queue_pb2.ModelRegistration(
            name=MODEL, fingerprint="fp", dimension=dimension
        )
        return Variant(ServedModel(registration, workers_alive=1, capacity=capacity), True, True)


@contextlib.asynccontextmanager
async def core(
    redis_url: str,
    bounds: QueueBounds | None = None,
    answer=fake_outcome,
    near_cache: NearCache | None = None,
    server_url: str | None = None,
) -> AsyncIterator[Core]:
    """A Dispatcher and a fake worker on a fresh namespace of the test Redis (the
    dispatcher's connection through `server_url` when given: say, as another user)."""
    keys = Keys(f"core{uuid.uuid4().hex[:8]}")
    server_redis = aioredis.Redis.from_url(server_url or redis_url)
    worker_redis = aioredis.Redis.from_url(redis_url)
    worker = FakeWorker(worker_redis, keys, answer)
    worker_task = asyncio.create_task(worker.run())
    bounds = bounds or QueueBounds()
    dispatcher = Dispatcher(server_redis, keys, bounds=bounds, near_cache=near_cache)
    await dispatcher.start()
    try:
        yield Core(dispatcher, worker, server_redis, keys)
    finally:
        await dispatcher.stop()
        worker.stopping.set()
        await worker_task
        await server_redis.aclose()
        await worker_redis.aclose()


def run(redis_server, body, **options) -> None:
    """Run `body(core)` on a fresh Dispatcher and fake worker."""

    async def main() -> None:
        async with core(redis_server.url, **options) as c:
            await asyncio.wait_for(body(c), 30)

    asyncio.run(main())


# -- Dispatcher ------------------------------------------------------------------------


def test_misses_are_computed_then_served_from_the_cache(redis_server):
    async def body(c: Core) -> None:
        texts = ["alpha", "beta"]
        vectors, cached = await c.dispatcher.encode(c.variant(), texts, 10)
        assert not cached.any() and c.worker.seen == texts
        assert np.array_equal(vectors, np.stack([fake_vector(t) for t in texts]))
        again, cached = await c.dispatcher.encode(c.variant(), [*texts, "gamma"], 10)
        assert cached.tolist() == [True, True, False]
        assert c.worker.seen == [*texts, "gamma"]  # hits never reached the worker
        assert np.array_equal(again[:2], vectors)

    run(redis_server, body)


def test_a_call_its_caller_left_during_the_look_up_is_not_queued(redis_server):
    async def body(c: Core) -> None:
        c.dispatcher.one_trip_texts = 0  # the two-trip path: look up, then route
        look_up, caller = c.dispatcher._lookup, None

        async def look_up_then_leave(*args, **kwargs):
            found = await look_up(*args, **kwargs)
            caller.cancel()  # the client goes away while the look-up is out
            await asyncio.sleep(0)  # ...and its call is forgotten before the routing
            return found

        c.dispatcher._lookup = look_up_then_leave
        caller = asyncio.create_task(c.dispatcher.encode(c.variant(), ["left early"], 10))
        with pytest.raises(asyncio.CancelledError):
            await caller
        c.dispatcher._lookup = look_up
        await c.dispatcher.encode(c.variant(), ["after it"], 10)  # a later flush has run
        assert c.worker.seen == ["after it"]  # nothing queued for the caller that left
        assert not c.dispatcher._tickets and c.dispatcher._pending_chars == 0

    run(redis_server, body)


def test_hot_texts_are_answered_from_the_near_cache_without_redis(redis_server):
    async def mgets(c: Core) -> int:
        return (await c.redis.info("commandstats")).get("cmdstat_mget", {}).get("calls", 0)

    async def body(c: Core) -> None:
        texts, near = ["alpha", "beta"], c.dispatcher.near_cache
        computed, _cached = await c.dispatcher.encode(c.variant(), texts, 10)
        assert len(near) == 0  # a worker's answer is not kept near: only what Redis returns
        first, cached = await c.dispatcher.encode(c.variant(), texts, 10)
        assert cached.all() and len(near) == 2 and np.array_equal(first, computed)
        before = await mgets(c)
        again, cached = await c.dispatcher.encode(c.variant(), texts, 10)
        assert await mgets(c) == before  # no Redis round trip
        assert cached.all() and np.array_equal(again, computed)
        again[0] = 0  # the caller's copy, not the cache's
        assert np.array_equal((await c.dispatcher.encode(c.variant(), texts, 10))[0], computed)
        # One text not near: the whole call goes the usual way (one MGET for all).
        mixed, cached = await c.dispatcher.encode(c.variant(), ["alpha", "gamma"], 10)
        assert cached.tolist() == [True, False] and await mgets(c) == before + 1
        assert c.worker.seen == [*texts, "gamma"]
        # Another variant (say, normalize off) is another cache key: not served from near.
        other = Variant(c.variant().model, False, True)
        _vectors, cached = await c.dispatcher.encode(other, texts, 10)
        assert not cached.any()

    run(redis_server, body, near_cache=NearCache(1 << 20))


def test_the_near_cache_drops_the_least_recently_used_past_its_budget():
    entry = len("k0") + 16 + ENTRY_OVERHEAD_BYTES
    near = NearCache(3 * entry)
    for name in ("k0", "k1", "k2"):
        near.put(name, bytes(16))
    assert near.get_all(["k0"]) == [bytes(16)]  # k0 now the most recently used
    near.put("k3", bytes(16))
    assert near.get_all(["k1"]) is None and len(near) == 3 and near.bytes == 3 * entry
    assert near.get_all(["k0", "k2", "k3"]) is not None
    near.put("k2", bytes(16))  # again: replaced, not counted twice
    assert near.bytes == 3 * entry
    near.put("huge", bytes(4 * entry))  # bigger than the whole budget: not kept
    assert near.get_all(["huge"]) is None and len(near) == 3
    off = NearCache(0)
    off.put("k0", bytes(16))
    assert len(off) == 0 and off.get_all(["k0"]) is None


def test_the_same_text_in_flight_is_sent_to_the_worker_once(redis_server):
    async def body(c: Core) -> None:
        variant = c.variant()
        # The second caller's deadline is earlier: it may wait on the first one's ticket.
        first = c.dispatcher.encode(variant, ["same", "other", "same"], 10)
        second = c.dispatcher.encode(variant, ["same"], 5)
        (one, _), (two, _) = await asyncio.gather(first, second)
        assert sorted(c.worker.seen) == ["other", "same"]
        assert np.array_equal(one[0], one[2]) and np.array_equal(one[0], two[0])

    run(redis_server, body)


def test_a_text_repeated_across_windows_of_one_call_is_encoded_once(redis_server):
    """A call over CALL_WINDOW texts is queued a window at a time; a text at its first and
    last rows must still be one ticket (else two forward passes give it two vectors that
    differ in the last bits: found by the fuzz test)."""
    from embedq.server.queue import CALL_WINDOW

    async def body(c: Core) -> None:
        texts = [f"text {i}" for i in range(CALL_WINDOW + 44)]
        texts[-1] = texts[-2] = texts[0]
        vectors, _cached = await c.dispatcher.encode(c.variant(), texts, 10)
        assert c.worker.seen.count(texts[0]) == 1
        assert sorted(c.worker.seen) == sorted(set(texts))
        assert np.array_equal(vectors[0], vectors[-1]) and np.array_equal(vectors[0], vectors[-2])

    run(redis_server, body)


def test_a_deadline_that_expires_fails_the_call_and_cancels_its_work(redis_server):
    async def body(c: Core) -> None:
        started = time.monotonic()
        with pytest.raises(RequestError) as caught:
            await c.dispatcher.encode(c.variant(), [NEVER], 0.3)
        assert caught.value.kind is ErrorKind.DEADLINE
        assert "no result within 0.3s" in caught.value.message
        assert time.monotonic() - started < 5
        # Nobody waits for the ticket any more: workers are told to skip it.
        cancelled = c.keys.cancelled(c.dispatcher.reply_key)
        for _ in range(100):
            if await c.redis.scard(cancelled):
                break
            await asyncio.sleep(0.02)
        assert await c.redis.scard(cancelled) == 1

    run(redis_server, body)


def test_work_that_cannot_finish_in_time_is_refused_at_once(redis_server):
    async def body(c: Core) -> None:
        texts = [f"text {i}" for i in range(100)]
        with pytest.raises(RequestError) as caught:
            # 100 texts at a measured 10 texts/s: 10 s of work, 1 s left.
            await c.dispatcher.encode(c.variant(capacity=10.0), texts, 1.0)
        assert caught.value.kind is ErrorKind.OVERLOADED
        assert "split the request" in caught.value.message
        assert c.worker.seen == []  # refused before anything was queued

    run(redis_server, body)


def test_a_server_waiting_for_too_much_refuses_with_a_retry_hint(redis_server):
    async def body(c: Core) -> None:
        variant = c.variant()
        waiting = asyncio.create_task(c.dispatcher.encode(variant, [NEVER], 10))
        for _ in range(100):  # until its text is queued (and never answered)
            if c.worker.seen:
                break
            await asyncio.sleep(0.02)
        with pytest.raises(RequestError) as caught:
            await c.dispatcher.encode(variant, ["one more"], 10)
        assert caught.value.kind is ErrorKind.OVERLOADED
        assert caught.value.retry_after_ms == 1000
        assert "waiting for 1 texts already" in caught.value.message
        waiting.cancel()
        assert c.worker.seen == [NEVER]

    run(redis_server, body, bounds=QueueBounds(max_pending_texts=1))


def test_a_worker_failure_reaches_its_caller_with_its_kind(redis_server):
    async def body(c: Core) -> None:
        with pytest.raises(RequestError) as caught:
            await c.dispatcher.encode(c.variant(), ["fine", TOO_LONG], 10)
        assert caught.value.kind is ErrorKind.TOO_LONG
        assert caught.value.message == "texts[1]: over"

    run(redis_server, body)


def _calls_arriving_during_the_first_look_up(c: Core, texts: list[str], later: list) -> None:
    """Make `later` get one encode task per text, started while the dispatcher's first
    look-up is in flight (they are in its inbox when that flush has routed its calls).
    Flushes take two round trips here (look-up, then enqueue): what rides with what."""
    c.dispatcher.one_trip_texts = 0
    look_up = c.dispatcher._lookup

    async def look_up_then_more(calls, ahead=None):
        result = await look_up(calls, ahead)
        if not later:
            later.extend(
                asyncio.create_task(c.dispatcher.encode(c.variant(), [text], 10)) for text in texts
            )
            await asyncio.sleep(0)  # their calls reach the inbox
        return result

    c.dispatcher._lookup = look_up_then_more


def test_a_flush_sends_its_jobs_with_the_next_look_up_when_calls_wait(redis_server):
    """Calls that came during a flush's look-up: that flush's jobs (XADD) go in the same
    round trip as their look-up, not in one of their own, and every call is answered."""

    async def body(c: Core) -> None:
        sent_alone: list[int] = []
        send = c.dispatcher._send

        async def record(writes):
            sent_alone.append(writes.seq)
            await send(writes)

        c.dispatcher._send = record
        later: list[asyncio.Task] = []
        _calls_arriving_during_the_first_look_up(c, ["two", "three"], later)
        first, _cached = await c.dispatcher.encode(c.variant(), ["one"], 10)
        answers = [vectors for vectors, _cached in await asyncio.gather(*later)]
        assert np.array_equal(first[0], fake_vector("one"))
        for text, vectors in zip(["two", "three"], answers, strict=True):
            assert np.array_equal(vectors[0], fake_vector(text))
        assert sorted(c.worker.seen) == ["one", "three", "two"]
        # Flush 1 (one) wrote with flush 2's look-up (two, three); only flush 2's went alone.
        assert sent_alone == [2]

    run(redis_server, body)


def test_calls_whose_jobs_rode_with_a_failed_look_up_fail_not_hang(redis_server):
    """The round trip that carries one flush's jobs and the next flush's look-up fails:
    the calls of both get UNAVAILABLE at once, none waits for its deadline."""

    async def body(c: Core) -> None:
        later: list[asyncio.Task] = []
        _calls_arriving_during_the_first_look_up(c, ["two"], later)
        look_up = c.dispatcher._lookup

        async def fail_when_carrying_jobs(calls, ahead=None):
            if ahead is not None:
                raise ConnectionError("redis went away")
            return await look_up(calls, ahead)

        c.dispatcher._lookup = fail_when_carrying_jobs
        started = time.monotonic()
        with pytest.raises(RequestError) as caught:
            await c.dispatcher.encode(c.variant(), ["one"], 10)
        assert caught.value.kind is ErrorKind.UNAVAILABLE
        with pytest.raises(RequestError) as caught_later:
            await later[0]
        assert caught_later.value.kind is ErrorKind.UNAVAILABLE
        assert time.monotonic() - started < 5

    run(redis_server, body)


def test_a_refused_write_fails_its_own_calls_not_the_look_up_it_rode_with(redis_server):
    """Redis refuses the jobs of one flush (here an XADD error; in production OOM or READONLY)
    in the round trip that also carries the next flush's look-up: the refused calls get
    UNAVAILABLE, and the calls looked up beside them are still answered from the cache."""

    async def body(c: Core) -> None:
        await c.dispatcher.encode(c.variant(), ["two"], 10)  # now cached
        other = Variant(
            ServedModel(
                queue_pb2.ModelRegistration(name="other", fingerprint="fp2", dimension=DIM),
                workers_alive=1,
            ),
            True,
            True,
        )
        # A stream whose last id is the largest there is: XLEN reads it, XADD is refused.
        await c.redis.xadd(c.keys.jobs("other"), {"f": "v"}, id=f"{2**64 - 1}-{2**64 - 1}")
        later: list[asyncio.Task] = []
        _calls_arriving_during_the_first_look_up(c, ["two"], later)
        with pytest.raises(RequestError) as caught:
            await c.dispatcher.encode(other, ["refused"], 10)
        assert caught.value.kind is ErrorKind.UNAVAILABLE
        vectors, cached = await later[0]
        assert cached.tolist() == [True]
        assert np.array_equal(vectors[0], fake_vector("two"))
        await c.redis.delete(c.keys.jobs("other"))

    run(redis_server, body)


def _count_round_trips(c: Core) -> dict[str, int]:
    """Count the dispatcher's look-ups (_lookup), lone enqueues (_send) and one-trip scripts."""
    counts = {"lookup": 0, "send": 0, "one_trip": 0}
    dispatcher = c.dispatcher
    for name, attribute in (("lookup", "_lookup"), ("send", "_send"), ("one_trip", "_one_trip")):
        original = getattr(dispatcher, attribute)

        async def counted(*args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return await _original(*args, **kwargs)

        setattr(dispatcher, attribute, counted)
    return counts


def test_new_texts_are_looked_up_and_queued_in_one_round_trip(redis_server):
    async def body(c: Core) -> None:
        trips = _count_round_trips(c)
        vectors, cached = await c.dispatcher.encode(c.variant(), ["fresh", "new", "fresh"], 10)
        assert trips == {"lookup": 0, "send": 0, "one_trip": 1}
        assert not cached.any() and c.worker.seen == ["fresh", "new"]
        assert np.array_equal(
            vectors, np.stack([fake_vector(t) for t in ["fresh", "new", "fresh"]])
        )
        # The backlog counter and the markers were written as the two-trip path writes them.
        model = c.keys.job_marker(MODEL, c.dispatcher.server_id)
        assert await c.redis.get(model) == await c.redis.get(c.dispatcher.reply_marker) == b"1"

    run(redis_server, body)


def test_a_cached_text_sends_the_flush_the_usual_way_from_the_script_s_read(redis_server):
    """The script finds a text cached: it writes nothing, and the flush routes the misses
    from what the script read (no second look-up) and queues them in one more round trip."""

    async def body(c: Core) -> None:
        await c.dispatcher.encode(c.variant(), ["alpha"], 10)  # computed, now cached
        trips = _count_round_trips(c)
        vectors, cached = await c.dispatcher.encode(c.variant(), ["alpha", "beta"], 10)
        assert cached.tolist() == [True, False]
        assert trips == {"lookup": 0, "send": 1, "one_trip": 1}
        assert c.worker.seen == ["alpha", "beta"]  # alpha was not queued again
        assert np.array_equal(vectors, np.stack([fake_vector("alpha"), fake_vector("beta")]))
        assert not c.dispatcher._tickets and not c.dispatcher._in_flight

    run(redis_server, body)


def test_the_script_admits_against_the_queue_it_reads_not_the_last_one_known(redis_server):
    """The dispatcher last saw an empty queue; another server has since queued 100 texts.
    At a measured 10 texts/s with 1 s left, the script must not queue the text, and the call
    is refused as the two-trip path refuses it."""

    async def body(c: Core) -> None:
        await c.redis.set(c.keys.backlog(MODEL), 100)
        with pytest.raises(RequestError) as caught:
            await c.dispatcher.encode(c.variant(capacity=10.0), ["late"], 1.0)
        assert caught.value.kind is ErrorKind.OVERLOADED
        assert caught.value.retry_after_ms and "100 texts queued" in caught.value.message
        assert c.worker.seen == [] and await c.redis.xlen(c.keys.jobs(MODEL)) == 0
        await c.redis.delete(c.keys.backlog(MODEL))

    run(redis_server, body)


def test_a_call_that_fits_only_once_its_repeats_are_counted_is_admitted(redis_server):
    """40 copies of one text at a measured 10 texts/s with 3 s left: as 40 new texts it would
    be refused (4 s of work), as the one text it is it fits. The one-trip routing skips a call
    refused even at that upper bound (so a burst's refused calls are routed once, not twice);
    the look-up's exact routing then admits it, in two round trips."""

    async def body(c: Core) -> None:
        trips = _count_round_trips(c)
        vectors, cached = await c.dispatcher.encode(c.variant(capacity=10.0), ["same"] * 40, 3.0)
        assert trips == {"lookup": 1, "send": 1, "one_trip": 0}
        assert not cached.any() and c.worker.seen == ["same"]
        assert np.array_equal(vectors, np.stack([fake_vector("same")] * 40))

    run(redis_server, body)


def test_a_redis_user_without_scripting_gets_two_round_trips(redis_server, caplog):
    """A least-privilege ACL user without EVALSHA: the script is refused (NOPERM), once,
    and every flush looks up and queues in two round trips, with the same answers. The
    warning names the missing grants (only for NOPERM: a demoted master's READONLY is no
    ACL matter)."""
    admin = redis.Redis.from_url(redis_server.url)
    user, password = f"noscript-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    admin.execute_command(
        "ACL", "SETUSER", user, "on", f">{password}", "~*", "&*", "+@all", "-@scripting"
    )
    host = redis_server.url.split("://", 1)[1]

    async def body(c: Core) -> None:
        trips = _count_round_trips(c)
        vectors, _cached = await c.dispatcher.encode(c.variant(), ["one"], 10)
        vectors_two, _cached = await c.dispatcher.encode(c.variant(), ["two"], 10)
        assert np.array_equal(vectors[0], fake_vector("one"))
        assert np.array_equal(vectors_two[0], fake_vector("two"))
        # Tried once, then paused: each flush looked up and queued in two round trips.
        assert trips == {"lookup": 2, "send": 2, "one_trip": 1}
        assert c.worker.seen == ["one", "two"] and not c.dispatcher._tickets

    try:
        run(redis_server, body, server_url=f"redis://{user}:{password}@{host}")
    finally:
        admin.execute_command("ACL", "DELUSER", user)
        admin.close()
    assert "(NoPermissionError; a Redis user needs +evalsha and +script|load" in caplog.text


# -- ModelRegistry ---------------------------------------------------------------------


def test_the_registry_keeps_a_live_model_through_a_redis_that_restarted_empty(redis_server):
    """Between a Redis restart and the workers' next heartbeat there are no registrations:
    a model whose workers were alive is kept (calls are queued, not refused with "no model
    is registered yet") for the grace counted from the first refresh that missed it, even
    after a long outage; a model with no live worker is not kept. Clocks are made up."""

    async def main() -> None:
        keys = Keys(f"reg{uuid.uuid4().hex[:8]}")
        redis = aioredis.Redis.from_url(redis_server.url)
        registry = ModelRegistry(redis, keys, worker_stale_s=15, republish_grace_s=5)
        registry.redis_ok = True  # what run() sets after a refresh that worked
        live = queue_pb2.ModelRegistration(name=MODEL, fingerprint="fp", dimension=DIM)
        idle = queue_pb2.ModelRegistration(name="idle", fingerprint="fp2", dimension=DIM)
        t0 = time.time()
        try:
            await redis.hset(keys.models(), MODEL, live.SerializeToString())
            await redis.hset(keys.models(), "idle", idle.SerializeToString())
            await redis.zadd(keys.workers(MODEL), {"w1": t0})
            await registry.refresh(now=t0)
            assert registry.resolve(MODEL).workers_alive == 1
            assert registry.resolve("idle").workers_alive == 0
            await redis.delete(keys.models(), keys.workers(MODEL))  # restarted empty
            await registry.refresh(now=t0 + 100)  # first refresh after a 100 s outage
            assert set(registry.models) == {MODEL}  # "idle" had no live worker: not kept
            await registry.refresh(now=t0 + 104)
            assert registry.resolve(MODEL).name == MODEL
            await registry.refresh(now=t0 + 105)  # no heartbeat re-published it in 5 s
            with pytest.raises(RequestError, match="no model is registered yet"):
                registry.resolve(MODEL)
            await redis.hset(keys.models(), MODEL, live.SerializeToString())  # back
            await redis.zadd(keys.workers(MODEL), {"w1": t0 + 106})
            await registry.refresh(now=t0 + 106)
            await redis.delete(keys.models(), keys.workers(MODEL))  # and a second restart
            await registry.refresh(now=t0 + 107)
            assert registry.resolve(MODEL).name == MODEL  # a new grace, not the old one
        finally:
            await redis.delete(keys.models(), keys.workers(MODEL))
            await redis.aclose()

    asyncio.run(main())


# -- run_jobs with the tiny model -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    from embedq.workers.backends import PooledEncoder

    return PooledEncoder.load(str(write_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert")))


def job(texts: list[str], reply_to: str = "r", **fields) -> queue_pb2.Job:
    fields = {"kind": queue_pb2.JOB_KIND_ENCODE, "normalize": True, "truncate": True, **fields}
    out = queue_pb2.Job(reply_to=reply_to, variant="v", **fields)
    for ticket, text in enumerate(texts, 1):
        out.items.add(ticket=ticket, text=text)
    return out


def rows(reply: queue_pb2.Reply) -> dict[int, np.ndarray]:
    matrix = np.frombuffer(reply.vectors, "<f4").reshape(len(reply.tickets), reply.dimension)
    return dict(zip(reply.tickets, matrix, strict=True))


def test_outcomes_combine_in_order_once() -> None:
    """What a writer that fell behind sends in one round trip: each reply stream's tickets
    and rows in step order, every cache entry, failures and counts; one outcome as is."""

    def outcome(reply_to: str, tickets: list[int], fill: float, encoded: int) -> Outcome:
        out = Outcome(texts_encoded=encoded)
        reply = out.reply(reply_to)
        reply.tickets.extend(tickets)
        reply.dimension = 2
        reply.vectors = np.full((len(tickets), 2), fill, "<f4").tobytes()
        out.cache[f"{reply_to}:{fill}"] = b"x"
        return out

    first, second, third = (
        outcome("a", [1, 2], 1, 2),
        outcome("b", [7], 2, 1),
        outcome("a", [3], 3, 1),
    )
    third.fail(job([], "a"), 9, ErrorKind.DEADLINE, "late")
    combined = Outcome.combined([first, second, third])
    assert list(combined.replies) == ["a", "b"]
    a = combined.replies["a"]
    assert list(a.tickets) == [1, 2, 3] and [f.ticket for f in a.failures] == [9]
    assert {t: v.tolist() for t, v in rows(a).items()} == {1: [1, 1], 2: [1, 1], 3: [3, 3]}
    assert rows(combined.replies["b"])[7].tolist() == [2, 2]
    assert set(combined.cache) == {"a:1", "b:2", "a:3"} and combined.texts_encoded == 4
    assert Outcome.combined([first]) is first and Outcome.combined([]).empty


class CountingEncoder:
    """Delegates to an encoder, counting the texts it runs through the model."""

    def __init__(self, inner) -> None:
        self.inner, self.spec, self.embedded = inner, inner.spec, 0
        self.tokenized: list[str] = []

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def embed(self, batch, normalize=None):
        self.embedded += len(batch)
        return self.inner.embed(batch, normalize=normalize)

    def tokenize(self, texts):
        self.tokenized.extend(texts)
        return self.inner.tokenize(texts)


def test_run_jobs_encodes_each_text_once_and_caches_it(tiny_encoder):
    counting = CountingEncoder(tiny_encoder)
    keys = Keys("t")
    outcome = run_jobs([job(["hello world", "the fox"]), job(["hello world"], "s")], counting, keys)
    assert counting.embedded == 2  # "hello world" shared across the two jobs
    expected = tiny_encoder.encode(["hello world", "the fox"], normalize=True)
    mine, theirs = rows(outcome.replies["r"]), rows(outcome.replies["s"])
    assert np.allclose(mine[1], expected[0], atol=1e-6) and np.allclose(mine[2], expected[1])
    assert np.array_equal(theirs[1], mine[1])
    # Cached under the worker's own fingerprint (whatever the server expected).
    variant = variant_fingerprint(tiny_encoder.spec.fingerprint, normalize=True, truncate=True)
    assert outcome.cache.keys() == {
        keys.cache(variant, text_sha256(t)) for t in ["hello world", "the fox"]
    }
    assert outcome.cache[keys.cache(variant, text_sha256("the fox"))] == mine[2].tobytes()


def test_texts_tokenized_ahead_are_not_tokenized_again(tiny_encoder):
    """The reader tokenizes jobs as they arrive (pretokenize), while the model runs; the
    hand-over (prepare) tokenizes only what is new, and the vectors stay the same."""
    counting, keys = CountingEncoder(tiny_encoder), Keys("t")
    early = [job(["hello world", "the fox"]), job(["hello world"], "s", prompt="q: ")]
    known: dict = {}
    pretokenize(early, counting, known)
    tokenize_job = job(["not for the model"], "tok", kind=queue_pb2.JOB_KIND_TOKENIZE)
    pretokenize([tokenize_job], counting, known)  # tokenize jobs are answered at hand-over
    assert counting.tokenized == ["hello world", "the fox", "q: hello world"]
    late = job(["the fox", "a new text"], "late")
    prepared = prepare([*early, late], counting, known=known)
    assert counting.tokenized[3:] == ["a new text"]
    steps = iter_steps([*early, late], counting, keys, prepared=prepared)
    merged = Outcome.combined([step.outcome for step in steps])
    expected = run_jobs([*early, late], tiny_encoder, keys)
    for reply_to, reply in expected.replies.items():
        assert rows(merged.replies[reply_to]).keys() == rows(reply).keys()
        for ticket, vector in rows(reply).items():
            assert np.array_equal(rows(merged.replies[reply_to])[ticket], vector)
    assert merged.cache == expected.cache


def test_a_read_that_waited_for_the_busy_model_drops_callers_that_left_meanwhile(
    redis_server, tiny_encoder
):
    """A read is checked for cancelled items when it comes in; one that then waits for the
    busy model is checked again at hand-over, so callers who left meanwhile are not encoded."""
    namespace = f"t{uuid.uuid4().hex[:8]}"
    settings = WorkerSettings(redis=RedisSettings(url=redis_server.url, namespace=namespace))
    worker = Worker(settings, encoder=tiny_encoder)
    try:
        worker.register()
        worker.redis.xadd(worker.jobs_key, encode_message(job(["stays", "leaves"], "replies")))
        read = worker._next_read(Read(), block_ms=1000, nothing_pending=True)
        assert read is not None
        assert [item.text for item in read.jobs[0].items] == ["stays", "leaves"]
        worker.redis.sadd(worker.keys.cancelled("replies"), 2)  # the server marks ticket 2
        read.checked_at = time.monotonic()  # (however slow the machine was until now)
        worker._hand_over(read)  # at once: nothing asked again
        assert [item.text for item in read.jobs[0].items] == ["stays", "leaves"]
        worker.redis.xadd(worker.jobs_key, encode_message(job(["stays", "leaves"], "replies")))
        read = worker._next_read(Read(), block_ms=1000, nothing_pending=True)
        read.checked_at -= RECHECK_CANCELLED_S  # it waited for a pass of the model
        worker._hand_over(read)
        assert [item.text for item in read.jobs[0].items] == ["stays"]
        assert read.sizes == [2]  # both were queued: the backlog counter counts both
        steps = iter_steps(read.jobs, tiny_encoder, worker.keys, prepared=read.prepared)
        assert Outcome.combined([step.outcome for step in steps]).texts_encoded == 1
    finally:
        worker.redis.delete(worker.jobs_key, worker.keys.cancelled("replies"))
        worker.redis.delete(worker.keys.models(), worker.keys.workers(worker.name))
        worker.redis.close()


def test_a_running_read_stops_encoding_for_callers_who_leave_before_its_later_passes(
    redis_server, tiny_encoder
):
    """While the model runs a read of several passes, the reader asks which of its callers
    left since it began: their items in later passes are dropped unanswered, not encoded,
    and their job is still finished (acknowledged) with the others' answers."""
    namespace = f"t{uuid.uuid4().hex[:8]}"
    settings = WorkerSettings(
        redis=RedisSettings(url=redis_server.url, namespace=namespace), max_batch_size=2
    )
    worker = Worker(settings, encoder=tiny_encoder)
    texts = ["a fox", "b fox", "c fox", "d fox", "e fox", "f fox"]  # one length: in order
    try:
        worker.register()
        worker.redis.xadd(worker.jobs_key, encode_message(job(texts, "replies")))
        read = worker._next_read(Read(), block_ms=1000, nothing_pending=True)
        worker._hand_over(read)
        assert worker._reads.get_nowait() is read
        assert read.prepared.several_passes(worker.limits)  # 3 passes of 2: watched
        counting = CountingEncoder(tiny_encoder)
        steps = iter_steps(
            read.jobs, counting, worker.keys, worker.limits, prepared=read.prepared, gone=read.gone
        )
        first = next(steps)  # the first pass ran; tickets 1 and 2
        worker.redis.sadd(worker.keys.cancelled("replies"), 4, 5, 6)
        read.checked_at = time.monotonic()
        worker._watch(Read())  # within RECHECK_CANCELLED_S of the last look: not asked yet
        assert not read.gone
        read.checked_at -= RECHECK_CANCELLED_S
        # The read waiting for the model is asked in the same round trip.
        worker.redis.xadd(worker.jobs_key, encode_message(job(["g fox", "h fox"], "others")))
        waiting = worker._next_read(Read(), block_ms=1000, nothing_pending=True)
        worker.redis.sadd(worker.keys.cancelled("others"), 1)
        waiting.checked_at -= RECHECK_CANCELLED_S
        worker._watch(waiting)
        assert read.gone == {("replies", 4), ("replies", 5), ("replies", 6)}
        assert [item.text for item in waiting.jobs[0].items] == ["h fox"]
        rest = list(steps)
        answered = Outcome.combined([s.outcome for s in [first, *rest]]).replies["replies"]
        assert list(answered.tickets) == [1, 2, 3] and not answered.failures
        assert counting.embedded == 3  # "d fox" shared a pass with "c fox": dropped alone
        assert [step.finished_jobs for step in rest if step.finished_jobs] == [[0]]
        assert sum(step.answered_items for step in [first, *rest]) == 6  # backlog: all six
    finally:
        cancelled = [worker.keys.cancelled(name) for name in ("replies", "others")]
        worker.redis.delete(worker.jobs_key, *cancelled)
        worker.redis.delete(worker.keys.models(), worker.keys.workers(worker.name))
        worker.redis.close()


def test_redis_trouble_is_told_apart_from_refusals():
    """Which errors mean "send it again" (a result write) or UNAVAILABLE (a caller): Redis
    out of reach, a cluster's outage errors (not RedisErrors in redis-py) and a cluster or
    replica set between states (CLUSTERDOWN during a failover, TRYAGAIN, READONLY). Not
    refusals that would be refused again: MOVED reaches us only from a plain client talking
    to a cluster, which no retry mends (OOM waits for room apart)."""
    errors = redis.exceptions
    again = [
        errors.ConnectionError("gone"),
        errors.TimeoutError("slow"),
        errors.RedisClusterUnreachableError("no node answers"),
        errors.SlotNotCoveredError('Slot "42" is not covered by the cluster.'),
        errors.ClusterDownError("The cluster is down"),
        errors.TryAgainError("TRYAGAIN"),
        errors.ReadOnlyError("You can't write against a read only replica."),
    ]
    refused = [
        ResponseError("NOGROUP"),
        errors.MovedError("3999 127.0.0.1:6381"),
        errors.OutOfMemoryError("OOM"),
        b"OK",
        3,
    ]
    assert all(unsent(reply) for reply in again)
    assert not any(unsent(reply) for reply in refused)
    for error in again:  # what a caller is told
        assert as_request_error(error, "test").kind is ErrorKind.UNAVAILABLE


def _registered_worker_holding_a_job(redis_server, encoder, **worker_settings) -> Worker:
    namespace = f"t{uuid.uuid4().hex[:8]}"
    redis_settings = RedisSettings(url=redis_server.url, namespace=namespace)
    worker = Worker(WorkerSettings(redis=redis_settings, **worker_settings), encoder=encoder)
    worker.register()
    worker.redis.xadd(worker.jobs_key, encode_message(job(["a fox"], f"{namespace}:replies")))
    return worker


def _forget(worker: Worker) -> None:
    cancelled = worker.keys.cancelled(f"{worker.keys.namespace}:replies")
    worker.redis.delete(worker.jobs_key, cancelled, worker.keys.models())
    worker.redis.delete(worker.keys.workers(worker.name), worker.keys.rates(worker.name))
    worker.redis.close()


def test_a_read_is_kept_when_its_check_for_cancelled_items_meets_redis_trouble(
    redis_server, tiny_encoder
):
    """The check for callers who left (a saving, asked for a read the busy model will make
    wait) fails for Redis trouble: the read is still run and held, its items encoded anyway.
    Before, the read was dropped, its entries pending to a live worker that did not hold
    them, until the stale claim tens of seconds later (one more delivery counted)."""
    worker = _registered_worker_holding_a_job(redis_server, tiny_encoder)

    def reply_streams_master_failing_over(jobs):
        raise redis.exceptions.ConnectionError("gone")

    worker._left = reply_streams_master_failing_over  # the model is busy: checked
    try:
        read = worker._next_read(Read(), block_ms=1000, nothing_pending=True)
        assert read is not None and [item.text for item in read.jobs[0].items] == ["a fox"]
        assert worker._held.ids() == read.entry_ids
    finally:
        _forget(worker)


def test_the_heartbeat_touches_held_jobs_when_its_registration_write_fails(
    redis_server, tiny_encoder
):
    """The heartbeat's parts are independent: on a cluster the registrations' master may be
    failing over while the model's keys are fine. The beat and the touch of held jobs still
    run, so the jobs this worker runs do not look idle and no other worker takes them over
    (each claim counting a delivery towards dead-lettering them). Before, one pipeline
    carried beat and registration, and the touch was skipped when it failed."""
    worker = _registered_worker_holding_a_job(redis_server, tiny_encoder, claim_idle_ms=300)
    # Every write of the registration fails (WRONGTYPE: a real Redis error, in place of a
    # master failing over), the model's keys are fine.
    worker.redis.delete(worker.keys.models())
    worker.redis.set(worker.keys.models(), "not a hash")
    try:
        read = worker._next_read(Read(), block_ms=1000, nothing_pending=True)
        worker._model_idle.set()  # not stuck: its held jobs are touched
        beats = threading.Thread(target=worker._heartbeat_loop, daemon=True)
        started = time.time()
        beats.start()
        time.sleep(1.0)  # beats every 0.1 s (claim_idle_ms / 3)
        worker._stop.set()
        beats.join(timeout=5)
        (pending,) = worker.redis.xpending_range(worker.jobs_key, CONSUMER_GROUP, "-", "+", 10)
        assert pending["message_id"] == read.entry_ids[0]
        assert pending["time_since_delivered"] < 300 and pending["times_delivered"] == 1
        beat = worker.redis.zscore(worker.keys.workers(worker.name), worker.worker_id)
        assert beat is not None and beat > started
    finally:
        _forget(worker)


def test_a_result_write_refused_while_redis_changes_roles_is_sent_again(tiny_encoder):
    """A result write Redis refuses because it is between states (READONLY here: a master
    demoted under its clients, as in a failover; CLUSTERDOWN and TRYAGAIN alike) is sent again
    until it takes effect: the reply reaches its caller, the job is acknowledged and the
    backlog counter taken down once. Taken for a refusal, it was given up and the caller
    waited out its deadline (seen in tests/test_cluster.py's failover under load)."""
    with EmbeddedRedis() as private:  # demoted for a moment: not the session's server
        settings = WorkerSettings(redis=RedisSettings(url=private.url, namespace="t"))
        worker = Worker(settings, encoder=tiny_encoder)
        admin = redis.Redis.from_url(private.url)
        backlog = worker.keys.backlog(worker.name)
        try:
            worker.register()
            admin.incrby(backlog, 2)  # as a server does when it queues the job
            admin.xadd(worker.jobs_key, encode_message(job(["a fox", "b fox"], "replies")))
            read = worker._next_read(Read(), block_ms=1000, nothing_pending=True)
            (step,) = iter_steps(read.jobs, tiny_encoder, worker.keys)
            write = Write([step.outcome], list(read.entry_ids), texts_done=2)
            admin.replicaof("127.0.0.1", free_port())  # writes refused: READONLY
            promoted = threading.Timer(0.5, admin.replicaof, args=("NO", "ONE"))
            promoted.start()
            worker._write(write)
            promoted.join()
            (reply,) = admin.xrange("replies")
            assert list(decode_reply(reply[1]).tickets) == [1, 2]
            assert admin.xpending(worker.jobs_key, CONSUMER_GROUP)["pending"] == 0
            assert int(admin.get(backlog)) == 0
            assert len(step.outcome.cache) == 2
            assert all(admin.exists(key) for key in step.outcome.cache)
        finally:
            admin.close()
            worker.redis.close()


def test_a_running_worker_skips_callers_who_leave_during_a_long_read(redis_server, tiny_encoder):
    """The same through a running worker's threads: a read of three slow passes; callers of
    the third leave during the first. Their texts are not encoded, the job is acknowledged
    with the others' answers, and the backlog counter drains to zero."""
    first_pass = threading.Event()

    class SlowPasses(CountingEncoder):
        def embed(self, batch, normalize=None):
            vectors = super().embed(batch, normalize)
            first_pass.set()
            time.sleep(0.6)  # the reader asks about the callers meanwhile (every 50 ms)
            return vectors

    namespace = f"t{uuid.uuid4().hex[:8]}"
    settings = WorkerSettings(
        redis=RedisSettings(url=redis_server.url, namespace=namespace), max_batch_size=2
    )
    slow = SlowPasses(tiny_encoder)
    worker = Worker(settings, encoder=slow)
    reply_to = f"{namespace}:replies"
    texts = ["a fox", "b fox", "c fox", "d fox", "e fox", "f fox"]  # one length: in order
    worker.redis.incrby(worker.keys.backlog(worker.name), len(texts))  # as a server does
    worker.redis.xadd(worker.jobs_key, encode_message(job(texts, reply_to)))
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        assert first_pass.wait(30)
        worker.redis.sadd(worker.keys.cancelled(reply_to), 5, 6)
        deadline = time.monotonic() + 30
        while worker.redis.xlen(worker.jobs_key) and time.monotonic() < deadline:
            time.sleep(0.05)  # acknowledged and deleted once every item is done
        assert worker.redis.xlen(worker.jobs_key) == 0
        replies = [decode_reply(fields) for _, fields in worker.redis.xrange(reply_to)]
        assert sorted(t for reply in replies for t in reply.tickets) == [1, 2, 3, 4]
        assert not any(reply.failures for reply in replies)
        assert slow.embedded == 4
        assert int(worker.redis.get(worker.keys.backlog(worker.name))) == 0
    finally:
        worker.request_stop()
        thread.join(timeout=30)
        keys = [worker.jobs_key, reply_to, worker.keys.cancelled(reply_to)]
        worker.redis.delete(*keys, worker.keys.backlog(worker.name))
        worker.redis.close()


def test_a_read_of_one_pass_is_not_watched(tiny_encoder):
    """Only a read the model needs several passes for is asked about while it runs."""
    limits = BatchLimits(max_batch_tokens=64, max_batch_size=4)
    one = prepare([job(["a b", "c d", "e f"])], tiny_encoder)
    assert not one.several_passes(limits)
    assert not prepare([job(["a b"] * 6)], tiny_encoder).several_passes(limits)  # one text
    assert prepare([job(["a b", "c d", "e f", "g h", "i j"])], tiny_encoder).several_passes(limits)
    long_texts = [f"{letter} " + "a b " * 10 for letter in "cdef"]  # 4 × 23 tokens > 64
    assert prepare([job(long_texts)], tiny_encoder).several_passes(limits)
    two_settings = [job(["a b"]), job(["c d"], normalize=False)]
    assert prepare(two_settings, tiny_encoder).several_passes(limits)


def test_run_jobs_fails_items_with_their_kinds(tiny_encoder):
    now = int(time.time() * 1000)
    jobs = [
        job(["the " * 40], truncate=False),  # over max_seq_length 24, REJECT
        job(["hello world"], "late", deadline_unix_ms=now - 1),
        job(["quick fox POISON"], "poisoned"),
    ]
    faulty = FaultyEncoder(tiny_encoder, "raise:POISON")
    outcome = run_jobs(jobs, faulty, Keys("t"), now_ms=now)
    failures = {reply_to: list(reply.failures) for reply_to, reply in outcome.replies.items()}
    assert {reply_to: [f.kind for f in got] for reply_to, got in failures.items()} == {
        "r": [ErrorKind.TOO_LONG],
        "late": [ErrorKind.DEADLINE],
        "poisoned": [ErrorKind.INTERNAL],
    }
    assert "over the model's max_seq_length of 24" in failures["r"][0].message
    assert "injected fault" in failures["poisoned"][0].message
    assert not outcome.cache  # nothing computed, nothing cached


def test_a_text_the_encoder_fails_on_fails_alone_not_its_batch(tiny_encoder):
    """Texts of several callers share a forward pass; one the encoder raises on used to fail
    them all with INTERNAL. The batch is tried again in halves: only that text fails."""
    texts = [f"innocent bystander {i}" for i in range(6)]
    jobs = [
        job(texts[:3], "before"),
        job(["quick fox POISON"], "poisoned"),
        job(texts[3:], "after"),
    ]
    faulty = FaultyEncoder(tiny_encoder, "raise:POISON")
    outcome = run_jobs(jobs, faulty, Keys("t"), now_ms=int(time.time() * 1000))
    failures = {reply_to: list(reply.failures) for reply_to, reply in outcome.replies.items()}
    assert [f.kind for f in failures["poisoned"]] == [ErrorKind.INTERNAL]
    assert "injected fault" in failures["poisoned"][0].message
    assert not failures["before"] and not failures["after"]
    assert len(outcome.cache) == len(texts)  # every other text encoded and cached
    expected = tiny_encoder.encode(texts, normalize=True)
    got = [np.frombuffer(row, "<f4") for row in outcome.cache.values()]
    assert all(np.abs(row - expected).max(axis=1).min() < 1e-6 for row in got)


def test_a_real_worker_failure_reaches_the_caller(redis_server, tiny_encoder):
    """run_jobs' own Failure, through Redis and the Dispatcher, as the caller's error."""

    def answer(jobs, keys) -> Outcome:
        return run_jobs(jobs, tiny_encoder, keys)

    async def body(c: Core) -> None:
        variant = c.variant(dimension=tiny_encoder.spec.dimension)
        vectors, _ = await c.dispatcher.encode(variant, ["hello world"], 10)
        assert np.allclose(vectors[0], tiny_encoder.encode(["hello world"], normalize=True)[0])
        reject = Variant(variant.model, normalize=True, truncate=False)
        with pytest.raises(RequestError) as caught:
            await c.dispatcher.encode(reject, ["the " * 40], 10)
        assert caught.value.kind is ErrorKind.TOO_LONG
        assert caught.value.code_number == 3  # INVALID_ARGUMENT, as callers always saw
        assert caught.value.message.startswith("texts[0]: text is 42 tokens")

    run(redis_server, body, answer=answer)
