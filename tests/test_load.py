"""Rude load: admission by time, per-batch progress, bounded streams, fair share,
and a dead worker's jobs taken over at once.

The pipeline tests run in-process with the real model; the rest talk to real
server and worker processes on a private Redis. Nothing here asserts on speed:
the properties are orderings, status codes and bounds.
"""

from __future__ import annotations

import itertools
import math
import signal
import statistics
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from conftest import LOG_DIR, Service, new_service
from embedq.server.admission import RetryLedger, broken_promise_refusal, late_refusal
from embedq.server.router import (
    STREAM_BYTE_WINDOW,
    STREAM_MIN_SHARE,
    STREAM_MIN_TEXT_WINDOW,
    STREAM_TEXT_WINDOW,
    STREAM_WINDOW_S,
    Credits,
    StreamShares,
    shared_text_window,
    stream_text_window,
)
from embedq.workers.pipeline import BatchLimits, iter_steps

from embedq.internal.v1 import queue_pb2
from embedq.keys import RETRY_AFTER_MS_KEY, ErrorKind, Keys
from embedq.v1 import embedq_pb2 as pb
from embedq.v1 import embedq_pb2_grpc

RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def unique_texts(n: int, tag: str = "") -> list[str]:
    tag = tag or uuid.uuid4().hex[:8]
    return [f"Sentence {i} of a rude burst about trains and weather ({tag})." for i in range(n)]


# -- admission policy (pure) ---------------------------------------------------------


def test_admission_admits_what_fits_and_refuses_with_a_hint():
    assert late_refusal("m", 0.0, 10**6, 100, 1.0) is None  # not measured: admit
    assert late_refusal("m", 1000.0, 100, 100, 1.0) is None  # 0.2 s of work, 1 s left
    refusal = late_refusal("m", 1000.0, 5000, 100, 1.0)  # 5.1 s of work, 1 s left
    assert refusal.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The queue must shrink by about 5100 - 900 texts: about 4.2 s at 1000 texts/s.
    assert 4000 <= refusal.retry_after_ms <= 4400
    alone = late_refusal("m", 100.0, 0, 1000, 2.0)  # 10 s of work on an idle service
    assert alone.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert alone.retry_after_ms == 0 and "split the request" in alone.message


def test_a_huge_call_that_would_make_an_admitted_one_late_is_refused():
    # An admitted call holds back 2,000 texts with 3 s left at 1,000 texts/s: 2 s of work
    # against its 2.4 s budget (ADMIT_SHARE). 1,000 more taking turns with it: 3 s, late.
    refusal = broken_promise_refusal("m", 1000.0, 0, [(2000, 3.0)], 1000)
    assert refusal.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refusal.retry_after_ms == 2000 and "miss its deadline" in refusal.message
    assert broken_promise_refusal("m", 1000.0, 0, [(2000, 3.0)], 300) is None  # 2.3 s: on time
    # Queued texts and the other held calls' turns count for it too.
    assert broken_promise_refusal("m", 1000.0, 200, [(2000, 3.0), (150, 9.0)], 300) is not None
    # Two calls it would make late: the hint waits for the later one, and for the texts of
    # callers told to come back before it.
    two = broken_promise_refusal("m", 1000.0, 0, [(1000, 3.0), (3000, 5.0)], 2000, promised=500)
    assert two.retry_after_ms == 4500  # (1,000 + 3,000 + 500) texts at 1,000 texts/s
    # Already late without the new call (2 s of work, 1 s left): not protected.
    assert broken_promise_refusal("m", 1000.0, 0, [(2000, 1.0)], 1000) is None
    assert broken_promise_refusal("m", 0.0, 0, [(2000, 1.0)], 1000) is None  # not measured


def test_held_calls_are_shared_between_servers_until_they_expire():
    from embedq.server import held

    now = 1_000_000
    field = held.encode([(700, now + 5000), (0, now + 9000)], now_ms=now)
    fields = {b"other": field, b"me": held.encode([(999, now + 1)], now_ms=now)}
    assert held.others(fields, "me", now_ms=now) == [(700, now + 5000)]  # own and empty left out
    # Unrefreshed past VALID_S (its server stopped or died): ignored; garbage too.
    later = now + int(held.VALID_S * 1000)
    assert held.others(fields, "me", now_ms=later) == []
    # Removed by the next look-up that reads it only when long gone (never its reader's own).
    assert held.stale(fields, "me", now_ms=later) == []
    gone = later + int(held.FORGET_AFTER_S * 1000)
    assert held.stale(fields, "me", now_ms=gone) == [b"other"]
    garbage = {b"x": b"\xff\xff not a message", b"other": field}
    assert held.others(garbage, "me", now_ms=now) == [(700, now + 5000)]
    assert held.stale(garbage, "me", now_ms=now) == [b"x"]
    # A call whose deadline has passed will never queue its texts: not counted.
    soon = {b"other": held.encode([(50, now + 1000)], now_ms=now)}
    assert held.others(soon, "me", now_ms=now + 1500) == []
    assert not held.stale(soon, "me", now + 1500)
    assert held.seconds_left(now + 2500, now_ms=now) == 2.5


def test_admission_counts_the_texts_huge_calls_hold_back_and_staggers_its_hints():
    """Admission over HeldBack, no Redis: a call of more than one window waits for what
    admitted huge calls (this server's and the others') still hold back; a call of one window
    does not; a refused caller's texts push the next caller's hint later; the bounds refuse
    before any estimate."""
    from types import SimpleNamespace

    from embedq.server import held
    from embedq.server.admission import Admission, ModelLoad, QueueBounds
    from embedq.server.registry import ServedModel

    from embedq.internal.v1 import queue_pb2

    held_back = held.HeldBack(None, Keys("unit"), "me")  # no Redis: nothing is published
    admission = Admission(QueueBounds(), held_back)
    model = ServedModel(queue_pb2.ModelRegistration(name="m"), 1, capacity=1000.0)
    deadline_ms = int(time.time() * 1000) + 60_000
    huge = SimpleNamespace(deadline_unix_ms=deadline_ms, unrouted=list(range(1500)))
    held_back.add("m", huge)
    held_back.shared.remote["m"] = [(500, deadline_ms)]
    assert held_back.calls("m") == [(1500, deadline_ms), (500, deadline_ms)]
    assert held_back.ahead_of("m", 256, 256) == 0
    assert held_back.ahead_of("m", 1000, 256) == 1000 + 500

    # 1,000 new texts within 2 s at 1,000 texts/s (80 %: 1,600 texts): 1,500 held ahead.
    refusal = admission.refusal(model, ModelLoad(0, 0), 1000, 2.0, (0, 0))
    assert refusal is not None and refusal.retry_after_ms > 0
    assert admission.refusal(model, ModelLoad(0, 0), 200, 2.0, (0, 0)) is None
    held_back.discard("m", huge)
    assert held_back.own("m") == [] and held_back.all_own() == {}
    assert admission.refusal(model, ModelLoad(0, 0), 1000, 2.0, (0, 0)) is None

    # 125 texts behind 2,000 within 1.25 s: refused, back in (2,125 / 1,000 - 1.25 x 0.8) s;
    # the next such caller waits for those 125 texts too (figures exact in binary).
    late = admission.refusal(model, ModelLoad(1, 2000), 125, 1.25, (0, 0))
    assert late.retry_after_ms == 1125
    admission.refused("m", late, 125)
    later = admission.refusal(model, ModelLoad(1, 2000), 125, 1.25, (0, 0))
    assert later.retry_after_ms == 1250
    full = admission.refusal(model, ModelLoad(0, 0), 1, 60.0, (QueueBounds().max_pending_texts, 0))
    assert full is not None and "waiting for" in full.message
    assert admission.refusal(model, ModelLoad(0, 0), 0, 0.0, (10**9, 0)) is None  # none new


def test_a_servers_held_calls_are_published_and_withdrawn(redis_server):
    """On the real Redis: a server's field appears when it holds calls (a long-dead server's
    field seen by its look-up goes with it), another server reads it, and it goes when the
    server holds none, and on a clean stop."""
    import asyncio

    import redis.asyncio as aioredis
    from embedq.server import held

    keys, own = Keys(f"held{uuid.uuid4().hex[:8]}"), {}
    calls = [(700, int(time.time() * 1000) + 60_000)]

    async def main() -> None:
        async with aioredis.Redis.from_url(redis_server.url) as client:
            server = held.SharedHeld(client, keys, "me", lambda: dict(own))
            await client.hset(keys.held("m"), "dead", held.encode([(5, 0)], now_ms=0))
            server.read("m", await client.hgetall(keys.held("m")))
            own["m"] = calls
            await server.publish()
            fields = await client.hgetall(keys.held("m"))
            assert set(fields) == {b"me"}
            other = held.SharedHeld(client, keys, "other", dict)
            other.read("m", fields)
            assert other.remote["m"] == calls
            own.clear()
            await server.publish()
            assert not await client.exists(keys.held("m"))  # its last field gone
            own["m"] = calls
            await server.publish()
            await server.withdraw()
            assert not await client.exists(keys.held("m"))

    asyncio.run(main())


def test_callers_refused_together_are_told_staggered_times():
    """Eight callers refused at one moment: each hint leaves room for the callers told to
    come back before it, so they return one after another, not all at once."""
    ledger, hints, now = RetryLedger(), [], 100.0
    for _ in range(8):
        promised = ledger.pending("m", now)
        refusal = late_refusal("m", 1000.0, 5000, 100, 1.0, promised)
        hints.append(refusal.retry_after_ms)
        ledger.promise("m", now + refusal.retry_after_ms / 1000, 100)
    assert hints == sorted(hints) and len(set(hints)) == 8
    # Each waits for one more caller's 100 texts at 1000 texts/s: 100 ms apart.
    gaps = [later - earlier for earlier, later in zip(hints, hints[1:], strict=False)]
    assert all(95 <= gap <= 105 for gap in gaps)
    # Promises last until their time: then the texts are queued (the backlog counts
    # them) or their caller is gone.
    assert ledger.pending("m", now + hints[0] / 1000) == 700
    assert ledger.pending("m", now + hints[-1] / 1000) == 0
    assert ledger.pending("other", now) == 0


def test_a_streams_credits_count_bytes_as_well_as_texts():
    """A message's bytes (its texts and its id, which the response carries back) hold the
    stream's byte budget too: a few big messages fill it long before the text window."""
    import asyncio

    async def main() -> None:
        credits = Credits(messages=8, shares=StreamShares(lambda: 0.0, most=8), size=1000)
        big = pb.EncodeStreamRequest(id="x" * 600, texts=["a"])
        first = await credits.acquire(big)
        assert first == (1, big.ByteSize())
        second = asyncio.create_task(credits.acquire(big))
        await asyncio.sleep(0.01)
        assert not second.done()  # 2 texts of 8, but 1,200 bytes of 1,000
        credits.release(first)
        credits.release(await asyncio.wait_for(second, 1))
        # A message bigger than the whole budget still goes, alone.
        huge_message = pb.EncodeStreamRequest(id="x" * 5000, texts=["a"])
        huge = await credits.acquire(huge_message)
        assert huge == (1, huge_message.ByteSize())
        blocked = asyncio.create_task(credits.acquire(pb.EncodeStreamRequest(texts=["b"])))
        await asyncio.sleep(0.01)
        assert not blocked.done()
        credits.release(huge)
        await asyncio.wait_for(blocked, 1)

    asyncio.run(main())


def test_a_computed_response_holds_its_bytes_until_sent():
    """A response echoes its request's id: once computed it holds its bytes too, so a stream
    of big ids holds at most the byte window of requests and responses together."""
    import asyncio

    async def main() -> None:
        credits = Credits(messages=8, shares=StreamShares(lambda: 0.0, most=8), size=1000)
        first = await credits.acquire(pb.EncodeStreamRequest(id="x" * 400, texts=["a"]))
        answered = credits.hold_response(first, pb.EncodeStreamResponse(id="x" * 400))
        assert answered[1] > first[1] + 400
        # 2 requests of ~400 bytes fit the 1,000, but not beside the computed response.
        second = asyncio.create_task(credits.acquire(pb.EncodeStreamRequest(id="y" * 400)))
        await asyncio.sleep(0.01)
        assert not second.done()
        credits.release(answered)
        credits.release(await asyncio.wait_for(second, 1))
        credits.close()

    asyncio.run(main())


def test_busy_streams_share_one_text_window():
    """The half second of work is for all busy streams together, evenly shared."""
    assert shared_text_window(300.0) == 150 and shared_text_window(10.0) == STREAM_MIN_TEXT_WINDOW
    assert shared_text_window(0.0) == STREAM_TEXT_WINDOW  # not measured yet
    assert stream_text_window(300.0, 1) == 150
    assert stream_text_window(300.0, 10) == 15
    assert stream_text_window(300.0, 1000) == STREAM_MIN_SHARE  # a few messages each
    assert stream_text_window(0.0, 4) == STREAM_TEXT_WINDOW // 4
    assert stream_text_window(10.0, 2) == STREAM_MIN_TEXT_WINDOW // 2


def test_a_busy_stream_gets_its_share_and_what_the_others_leave():
    import asyncio

    async def main() -> None:
        shares = StreamShares(lambda: 40.0)  # half a second is 20 texts: the floor, 64
        first, second = shares.credits(), shares.credits()
        message = pb.EncodeStreamRequest(texts=["a"] * 8)
        # Alone, or beside streams holding little, a stream fills the whole window.
        held = [await first.acquire(message) for _ in range(7)]  # 56 texts
        held_second = await second.acquire(message)  # 64 held: the window is full
        assert (shares.busy, shares.held) == (2, 64)
        blocked = asyncio.create_task(first.acquire(message))  # past its share of 32
        await asyncio.sleep(0.01)
        assert not blocked.done()
        # A stream under its even share always gets credits, the window full or not.
        held_second = [held_second, await asyncio.wait_for(second.acquire(message), 1)]
        first.release(held.pop())
        await asyncio.sleep(0.01)
        assert not blocked.done()  # 48 + 8 is over its share, and 64 + 8 over the window
        first.release(held.pop())  # 40 held by it, 56 in all: 8 more fit the window
        held.append(await asyncio.wait_for(blocked, 1))
        for cost in held_second:
            second.release(cost)
        assert (shares.busy, shares.held) == (1, 48)
        first.close()  # a stream that ends holding credits gives them all back
        assert (shares.busy, shares.held) == (0, 0)

    asyncio.run(main())


# -- the worker's core, in-process ---------------------------------------------------


@pytest.fixture(scope="module")
def encoder():
    from embedq.workers.backends import PooledEncoder

    return PooledEncoder.load(None)


class CountingEncoder:
    """The real encoder, counting forward passes."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.spec = inner.spec
        self.passes = 0

    def tokenize(self, texts):
        return self.inner.tokenize(texts)

    def embed(self, batch, normalize=None):
        self.passes += 1
        return self.inner.embed(batch, normalize=normalize)


def encode_job(texts: list[str], deadline_ms: int = 0, reply_to: str = "r") -> queue_pb2.Job:
    job = queue_pb2.Job(
        kind=queue_pb2.JOB_KIND_ENCODE,
        reply_to=reply_to,
        normalize=True,
        truncate=True,
        deadline_unix_ms=deadline_ms,
    )
    for ticket, text in enumerate(texts, 1):
        job.items.add(ticket=ticket, text=text)
    return job


def test_results_of_an_early_batch_come_before_later_batches_run(encoder):
    counting = CountingEncoder(encoder)
    texts = unique_texts(40)
    job = encode_job(texts)
    steps = iter_steps([job], counting, Keys("t"), BatchLimits(max_batch_size=8))
    first = next(steps)
    assert counting.passes == 1  # handed over before the second forward pass
    assert len(first.outcome.replies["r"].tickets) == 8
    assert first.finished_jobs == []  # acknowledged only with its last result
    assert first.answered_items == 8  # ...but off the backlog counter with its batch
    rest = list(steps)
    assert counting.passes == 5 and rest[-1].finished_jobs == [0]
    assert [step.answered_items for step in rest] == [8, 8, 8, 8]
    got: dict[int, np.ndarray] = {}
    for step in [first, *rest]:
        reply = step.outcome.replies["r"]
        rows = np.frombuffer(reply.vectors, "<f4").reshape(len(reply.tickets), -1)
        got.update(zip(reply.tickets, rows, strict=True))
    expected = encoder.encode(texts)
    assert np.abs(np.stack([got[t] for t in range(1, 41)]) - expected).max() <= 1e-5


def test_a_read_answers_its_first_jobs_first(encoder):
    # Each job (one caller's request) holds long and short texts. One length order over the
    # whole read would put every job's texts in its first and its last batches, so all three
    # would be answered only when the read ends; a caller's request is done with its last text.
    long = "A long sentence about the trains that ran late in the rain again, {} {} {}."
    jobs = [
        encode_job(
            [long.format(tag, i, "x" * (i % 5)) if i % 2 else f"{tag} {i}." for i in range(48)],
            reply_to=tag,
        )
        for tag in ("a", "b", "c")
    ]
    counting = CountingEncoder(encoder)
    limits = BatchLimits(max_batch_tokens=512, max_batch_size=64)
    finished_after: dict[int, int] = {}
    for step in iter_steps(jobs, counting, Keys("t"), limits):
        finished_after.update(dict.fromkeys(step.finished_jobs, counting.passes))
    passes = counting.passes
    assert finished_after[0] < finished_after[1] < finished_after[2] == passes
    assert finished_after[0] <= passes // 2


def test_items_that_expire_between_batches_are_not_encoded(encoder):
    counting = CountingEncoder(encoder)
    now = int(time.time() * 1000)
    times = iter([now, now, now + 60_000, now + 60_000, now + 60_000, now + 60_000])
    hurried = encode_job(unique_texts(24, "hurried"), deadline_ms=now + 1000, reply_to="a")
    patient = encode_job(unique_texts(8, "patient"), reply_to="b")
    limits = BatchLimits(max_batch_size=8)
    steps = list(
        iter_steps([hurried, patient], counting, Keys("t"), limits, clock=lambda: next(times))
    )
    failures = [f for s in steps for f in s.outcome.replies.get("a", queue_pb2.Reply()).failures]
    answered_a = sum(len(s.outcome.replies["a"].tickets) for s in steps if "a" in s.outcome.replies)
    answered_b = sum(len(s.outcome.replies["b"].tickets) for s in steps if "b" in s.outcome.replies)
    assert answered_b == 8  # no deadline: always encoded
    assert answered_a + len(failures) == 24 and len(failures) >= 8
    assert all(f.kind == ErrorKind.DEADLINE for f in failures)
    encoded = sum(s.outcome.texts_encoded for s in steps)
    assert encoded == 32 - len(failures)  # expired texts never reached the model
    assert sum(s.answered_items for s in steps) == 32  # failed ones leave the backlog too
    assert sorted(i for s in steps for i in s.finished_jobs) == [0, 1]


def test_each_callers_own_deadline_counts_not_its_jobs(encoder):
    """One job coalesces many callers and carries the latest deadline: a caller whose own
    deadline passed (before the read, or between batches) is failed, not encoded, while the
    job's other items still are."""
    counting = CountingEncoder(encoder)
    now = int(time.time() * 1000)
    job = queue_pb2.Job(
        kind=queue_pb2.JOB_KIND_ENCODE, reply_to="r", normalize=True, truncate=True,
        deadline_unix_ms=now + 120_000,
    )  # fmt: skip
    texts = unique_texts(24)
    # Rows 0-7 expired while queued, 8-15 expire after the first batch, 16-23 are patient.
    deadlines = [now - 1] * 8 + [now + 1000] * 8 + [now + 120_000] * 8
    for ticket, (text, deadline) in enumerate(zip(texts, deadlines, strict=True), 1):
        job.items.add(ticket=ticket, text=text, deadline_unix_ms=deadline)
    times = iter([now] * 2 + [now + 60_000] * 10)
    steps = list(
        iter_steps([job], counting, Keys("t"), BatchLimits(max_batch_size=8), lambda: next(times))
    )
    replies = [step.outcome.replies["r"] for step in steps if "r" in step.outcome.replies]
    failed = {f.ticket for reply in replies for f in reply.failures}
    answered = [ticket for reply in replies for ticket in reply.tickets]
    assert set(range(1, 9)) <= failed  # expired in the queue: never tokenized for the model
    assert all(f.kind == ErrorKind.DEADLINE for reply in replies for f in reply.failures)
    assert set(range(17, 25)) <= set(answered)  # the patient callers, same job
    assert len(failed) + len(answered) == 24 and not failed & set(answered)
    assert sum(step.outcome.texts_encoded for step in steps) == len(answered) < 24
    assert counting.passes <= 2  # the first batch, then the patient rows
    assert [i for step in steps for i in step.finished_jobs] == [0]


def test_a_job_whose_callers_all_left_is_finished_at_once(encoder):
    empty = encode_job([])
    steps = list(iter_steps([empty], encoder, Keys("t")))
    assert steps[0].finished_jobs == [0] and steps[0].outcome.empty


# -- end to end ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def busy_service(redis_server):
    svc = new_service(redis_server)
    yield svc
    svc.stop()


def wait_for_capacity(stub, timeout: float = 30.0) -> float:
    """Encode one full read so the worker measures its rate, then wait until
    the server's registry has it (heartbeat, then refresh)."""
    stub.Encode(pb.EncodeRequest(texts=unique_texts(128)), timeout=120)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        capacity = model_capacity(stub)
        if capacity > 0:
            return capacity
        time.sleep(0.2)
    raise AssertionError("no measured capacity published")


def wait_backlog(service: Service, stub, until, timeout: float = 60.0) -> None:
    """Until the model's backlog counter (texts queued, all servers) satisfies `until`."""
    model = stub.Info(pb.InfoRequest(), timeout=5).models[0].name
    key = Keys(service.namespace).backlog(model)
    with redis.Redis.from_url(service.redis_url) as client:
        deadline = time.monotonic() + timeout
        while not until(int(client.get(key) or 0)):
            assert time.monotonic() < deadline, f"backlog {client.get(key)} after {timeout} s"
            time.sleep(0.02)


def test_work_that_cannot_meet_its_deadline_is_refused_at_once(busy_service: Service):
    with grpc.insecure_channel(busy_service.target) as channel:
        stub = embedq_pb2_grpc.EmbedderStub(channel)
        capacity = wait_for_capacity(stub)
        # Several callers queue about 4 s of work (each within one window).
        per_call = 200
        callers = max(2, int(4 * capacity / per_call) + 1)
        queued = [
            stub.Encode.future(pb.EncodeRequest(texts=unique_texts(per_call)), timeout=300)
            for _ in range(callers)
        ]
        wait_backlog(busy_service, stub, lambda texts: texts >= callers * per_call // 2)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stub.Encode(pb.EncodeRequest(texts=unique_texts(8)), timeout=1.0)
        refused_after = time.monotonic() - started
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
        hint = dict(info.value.trailing_metadata() or ())
        assert int(hint[RETRY_AFTER_MS_KEY]) > 0
        assert "busy" in info.value.details()
        assert refused_after < 1.0  # refused, not run into its deadline
        for future in queued:
            future.cancel()


def test_huge_calls_are_admitted_only_as_far_as_their_deadlines_allow(busy_service: Service):
    """The texts an admitted call still holds back (it queues CALL_WINDOW at a time) are work
    ahead of later calls as much as those queued in Redis. Counted by the backlog only, 8
    calls of 1,000 texts with a 20 s deadline (30 s of work together) were all admitted,
    shared the worker and all ran into DEADLINE_EXCEEDED (ad hoc, 3 runs: goodput 0); now 3-4
    are admitted and answered, the rest refused at once (docs/benchmarks.md)."""
    from embedq.server.queue import CALL_WINDOW

    with grpc.insecure_channel(busy_service.target) as channel:
        stub = embedq_pb2_grpc.EmbedderStub(channel)
        capacity = idle_capacity(busy_service, stub)
        per_call = max(4 * CALL_WINDOW, math.ceil(capacity * 2))
        # Time for about 3.2 calls' work: 2.56 of them within the admitted share (0.8).
        deadline = 3.2 * per_call / capacity
        calls = []
        for _ in range(6):
            request = pb.EncodeRequest(texts=unique_texts(per_call))
            calls.append(stub.Encode.future(request, timeout=deadline))
            time.sleep(0.1)
        time.sleep(1.0)  # a refusal comes at once; an admitted call takes seconds
        refused = [call for call in calls if call.done() and call.code() == RESOURCE_EXHAUSTED]
        for call in calls:
            call.cancel()  # the admitted ones: what they would prove is measured, not tested
    # Counting only what is in Redis (at most a window of each earlier call), all 6 fit.
    assert len(refused) >= 2, ([call.code() for call in calls], capacity, per_call)
    for call in refused:
        assert int(dict(call.trailing_metadata())[RETRY_AFTER_MS_KEY]) > 0


def test_a_huge_call_is_refused_where_it_would_make_an_admitted_one_late(busy_service: Service):
    """A huge call takes turns with an admitted huge call's later windows: admitted on its own
    deadline alone, a second call of the same size with a long deadline was (before) admitted
    and pushed the first past its deadline. Now it is refused at once, with a hint."""
    from embedq.server.queue import CALL_WINDOW

    with grpc.insecure_channel(busy_service.target) as channel:
        stub = embedq_pb2_grpc.EmbedderStub(channel)
        capacity = idle_capacity(busy_service, stub)
        per_call = max(4 * CALL_WINDOW, math.ceil(capacity * 2))
        # On time alone (its work is 0.625 of the deadline; admitted up to 0.8), not when
        # another call of its size takes turns with it (1.25).
        first_deadline = 1.6 * per_call / capacity
        first = stub.Encode.future(
            pb.EncodeRequest(texts=unique_texts(per_call)), timeout=first_deadline
        )
        time.sleep(0.2)
        second = stub.Encode.future(pb.EncodeRequest(texts=unique_texts(per_call)), timeout=300)
        time.sleep(1.0)  # a refusal comes at once; an admitted call takes seconds
        codes = [call.code() if call.done() else "running" for call in (first, second)]
        first.cancel()
        second.cancel()
    assert codes[1] == RESOURCE_EXHAUSTED, (codes, capacity, per_call)
    assert "miss its deadline" in second.details()
    assert int(dict(second.trailing_metadata())[RETRY_AFTER_MS_KEY]) > 0


def test_a_huge_call_held_by_another_server_counts_for_admission(busy_service: Service):
    """Two servers, one worker: a huge call admitted by the first, on time alone; then one of
    its size with a long deadline at the second. That server saw only the backlog (the first
    call's queued window) and admitted it, which made the first late; now it reads the first
    server's held-back texts (server/held.py) and refuses at once."""
    from embedq.server.queue import CALL_WINDOW

    second_server = Service(busy_service.redis_url, busy_service.namespace)
    second_server.start_server()
    try:
        with (
            grpc.insecure_channel(busy_service.target) as channel,
            grpc.insecure_channel(second_server.target) as other_channel,
        ):
            stub = embedq_pb2_grpc.EmbedderStub(channel)
            other = embedq_pb2_grpc.EmbedderStub(other_channel)
            capacity = idle_capacity(busy_service, stub)
            deadline = time.monotonic() + 30  # the second server admits by time too
            while model_capacity(other) <= 0:
                assert time.monotonic() < deadline, "no capacity at the second server"
                time.sleep(0.1)
            per_call = max(4 * CALL_WINDOW, math.ceil(capacity * 2))
            first = stub.Encode.future(
                pb.EncodeRequest(texts=unique_texts(per_call)), timeout=1.6 * per_call / capacity
            )
            time.sleep(0.5)  # published at once on admission; a look-up reads it
            request = pb.EncodeRequest(texts=unique_texts(per_call))
            second = other.Encode.future(request, timeout=300)
            time.sleep(1.0)  # a refusal comes at once; an admitted call takes seconds
            codes = [call.code() if call.done() else "running" for call in (first, second)]
            first.cancel()
            second.cancel()
    finally:
        second_server.stop()
    assert codes[1] == RESOURCE_EXHAUSTED, (codes, capacity, per_call)
    assert "miss its deadline" in second.details()


def test_a_small_request_is_not_queued_behind_a_huge_one(busy_service: Service):
    with grpc.insecure_channel(busy_service.target) as channel:
        stub = embedq_pb2_grpc.EmbedderStub(channel)
        huge = stub.Encode.future(pb.EncodeRequest(texts=unique_texts(1000)), timeout=300)
        time.sleep(0.3)
        small = stub.Encode(pb.EncodeRequest(texts=unique_texts(4)), timeout=300)
        assert small.count == 4
        assert not huge.done()  # the small one overtook most of the huge one
        assert huge.result().count == 1000


def test_a_small_call_is_not_refused_for_a_huge_calls_held_back_texts(busy_service: Service):
    """A huge call's rows not queued yet (its later windows) are not ahead of a small call:
    its texts go in behind the queued window. Admission that counted them all refused such a
    call whose deadline left time for two windows (a review found it; the test fails so)."""
    from embedq.server.queue import CALL_WINDOW

    with grpc.insecure_channel(busy_service.target) as channel:
        stub = embedq_pb2_grpc.EmbedderStub(channel)
        capacity = idle_capacity(busy_service, stub)
        huge_texts = max(4 * CALL_WINDOW, math.ceil(capacity * 4))
        huge = stub.Encode.future(pb.EncodeRequest(texts=unique_texts(huge_texts)), timeout=300)
        time.sleep(0.3)
        # Time for two windows and the small call at the admitted share (0.8), not for more.
        deadline = (2 * CALL_WINDOW + 4) / (capacity * 0.8)
        small = stub.Encode.future(pb.EncodeRequest(texts=unique_texts(4)), timeout=deadline)
        error = small.exception()
        huge.cancel()
        assert error is None or error.code() != RESOURCE_EXHAUSTED, error.details()


def model_capacity(stub) -> float:
    return stub.Info(pb.InfoRequest(), timeout=5).models[0].capacity_texts_per_s


def settled_capacity(stub, timeout: float = 30.0) -> float:
    """The capacity the server will use next: two readings 2.5 s apart (beyond a worker
    heartbeat and a registry refresh) agree, with nothing encoding meanwhile."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        capacity = model_capacity(stub)
        if capacity == last:
            return capacity
        last = capacity
        time.sleep(2.5)
    raise AssertionError("the published capacity did not settle")


def idle_capacity(service: Service, stub) -> float:
    """The capacity the server admits with, measured and settled, once earlier tests' work
    has drained (nothing queued)."""
    wait_for_capacity(stub)
    capacity = settled_capacity(stub)
    wait_backlog(service, stub, lambda queued: queued == 0)
    return capacity


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_stream_that_never_reads_holds_bounded_memory(busy_service: Service):
    pid = busy_service.server.pid
    offered = 0
    stop = threading.Event()

    def requests():
        nonlocal offered
        for i in range(200_000):
            if stop.is_set():
                return
            offered += 1
            yield pb.EncodeStreamRequest(id=str(i), texts=[f"never read {i} {uuid.uuid4().hex}"])

    with (
        grpc.insecure_channel(busy_service.target) as channel,
        grpc.insecure_channel(
            busy_service.target, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as other,
    ):
        stub = embedq_pb2_grpc.EmbedderStub(channel)
        wait_for_capacity(stub)
        capacity = settled_capacity(stub)  # the stream's window is timed from it
        model = stub.Info(pb.InfoRequest(), timeout=5).models[0].name
        backlog_key = Keys(busy_service.namespace).backlog(model)
        wait_backlog(busy_service, stub, lambda queued: queued == 0)  # earlier tests' drained
        before = rss_mb(pid)
        call = stub.EncodeStream(requests(), timeout=120)  # responses never read
        backlog = []  # texts queued or being encoded: only this stream's now
        with redis.Redis.from_url(busy_service.redis_url) as client:
            for _ in range(50):
                time.sleep(0.1)
                backlog.append(int(client.get(backlog_key) or 0))
        growth = rss_mb(pid) - before
        # Other callers are still served while it sits there.
        other_stub = embedq_pb2_grpc.EmbedderStub(other)
        assert other_stub.Encode(pb.EncodeRequest(texts=unique_texts(2)), timeout=60).count == 2
        stop.set()
        call.cancel()
    assert offered > 2000  # the client really tried to send a lot
    assert growth < 30, f"server grew {growth:.1f} MB"
    # Another caller's texts queue behind about STREAM_WINDOW_S of this stream's work, not
    # STREAM_TEXT_WINDOW texts. The backlog counter drops a job's texts when the whole job is
    # acknowledged, so a job partly answered (at most a window of texts) still counts: seen
    # 174-181 with a window of 139-143 on 2 cores, and 537 when the window was 512 texts.
    window = stream_text_window(capacity)
    assert 0 < max(backlog) <= 2 * window, (max(backlog), window, capacity)


def test_many_busy_streams_queue_about_one_streams_window_together(busy_service: Service):
    """16 pipelined consumers (64 one-text messages in flight each, the next sent as an
    answer comes) queue about half a second of the model's work together, not half a second
    each: another caller's text waits behind that much. Each stream's own window used to be
    half a second: 16 of them queued 8 s of work, and a caller with a deadline under that
    was refused for as long as they ran (measured: 0 of 40 1-text calls with a 2 s deadline
    served beside 32 such streams; docs/benchmarks.md)."""
    import asyncio

    import redis.asyncio as aioredis

    streams, depth = 16, 64

    async def consumer(stub, stop: asyncio.Event, answers: list[str]) -> None:
        call = stub.EncodeStream(timeout=120)
        in_flight = asyncio.Semaphore(depth)

        async def send() -> None:
            for i in itertools.count():
                await in_flight.acquire()
                await call.write(pb.EncodeStreamRequest(id=str(i), texts=unique_texts(1)))

        sender = asyncio.create_task(send())
        while not stop.is_set():
            response = await call.read()
            assert response is not grpc.aio.EOF and not response.HasField("error"), response
            answers.append(response.id)
            in_flight.release()
        sender.cancel()
        call.cancel()

    async def main(backlog_key: str) -> tuple[list[int], list[float], list[list[str]]]:
        stop, backlog, capacities = asyncio.Event(), [], []
        answers: list[list[str]] = [[] for _ in range(streams)]
        async with (
            grpc.aio.insecure_channel(busy_service.target) as channel,
            aioredis.Redis.from_url(busy_service.redis_url) as client,
        ):
            stub = embedq_pb2_grpc.EmbedderStub(channel)
            tasks = [asyncio.create_task(consumer(stub, stop, mine)) for mine in answers]
            await asyncio.sleep(1.5)  # past the first windows, taken as the streams joined
            for _ in range(30):
                backlog.append(int(await client.get(backlog_key) or 0))
                capacities.append(
                    (await stub.Info(pb.InfoRequest(), timeout=5)).models[0].capacity_texts_per_s
                )
                await asyncio.sleep(0.1)
            other = await stub.Encode(pb.EncodeRequest(texts=unique_texts(1)), timeout=60)
            assert other.count == 1
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
        return backlog, capacities, answers

    with grpc.insecure_channel(busy_service.target) as channel:
        stub = embedq_pb2_grpc.EmbedderStub(channel)
        idle_capacity(busy_service, stub)
        model = stub.Info(pb.InfoRequest(), timeout=5).models[0].name
    backlog, capacities, answers = asyncio.run(main(Keys(busy_service.namespace).backlog(model)))
    # Every stream was served, each of its messages answered once.
    assert all(mine and len(set(mine)) == len(mine) for mine in answers)
    # The window follows the capacity the server reads meanwhile: its highest.
    capacity = max(capacities)
    together = stream_text_window(capacity)
    # As in the single stream's test, a job partly answered still counts whole: twice the
    # window. One window per stream would be 16 times it (or 16 x 64 texts, the clients').
    assert 0 < statistics.median(backlog) <= 2 * max(together, streams * STREAM_MIN_SHARE), (
        backlog,
        together,
        capacities,
    )


@pytest.fixture(scope="module")
def fast_service(redis_server):
    """A service whose worker answers in microseconds (bench-zero): a stream's answers pile
    up as fast as the client sends."""
    service = new_service(redis_server, "--backend", "bench-zero", "--allow-bench-backend")
    yield service
    service.stop()


def _unread_message(method: str, i: int) -> object:
    text = f"unread {i} {uuid.uuid4().hex}"
    if method == "EncodeStream":
        return pb.EncodeStreamRequest(id=str(i), texts=[text])
    ranking = pb.QueryCandidates(query=text, candidates=[f"{text} a", f"{text} b"])
    return pb.SimilarityStreamRequest(id=str(i), request=pb.SimilarityRequest(ranking=ranking))


@pytest.mark.parametrize("method", ["EncodeStream", "SimilarityStream"])
def test_a_stream_never_read_stays_bounded_and_its_cancel_ends_quietly(
    fast_service: Service, method: str
):
    """Both streaming methods stop reading a client that stops reading (server memory bounded
    while it sends as fast as it can), and a cancel with answers unsent ends the handler as
    cancelled, at most with an INFO line. When gRPC wrote the answers itself, such a cancel
    logged an ERROR "ExecuteBatchError raised in core" with a traceback (EncodeStream: 5 of 5
    runs of this test on the code before)."""
    import asyncio

    pid, offered = fast_service.server.pid, 0

    async def send_unread() -> list[float]:
        async def requests():
            nonlocal offered
            for i in range(200_000):
                offered += 1
                yield _unread_message(method, i)

        async with grpc.aio.insecure_channel(fast_service.target) as channel:
            stub = embedq_pb2_grpc.EmbedderStub(channel)
            call = getattr(stub, method)(requests(), timeout=60)
            samples = []
            for _ in range(30):  # answers pile up unread; the server stops reading
                await asyncio.sleep(0.1)
                samples.append(rss_mb(pid))
            call.cancel()
            return samples

    before, since = rss_mb(pid), server_log_path(fast_service).stat().st_size
    growth = max(asyncio.run(send_unread())) - before
    server_log = wait_for_log(fast_service, f"{method} failed: CANCELLED", since)
    assert offered > 5000  # the client really tried to send a lot
    assert growth < 30, f"server grew {growth:.1f} MB"
    assert f"{method} failed: CANCELLED" in server_log
    # A write that failed logs "stream ended by its caller before a response could be sent";
    # whether one was in flight when the cancel came (rather than a wait) is a race.
    assert "ExecuteBatchError raised in core" not in server_log
    assert "Traceback" not in server_log


def test_a_never_read_stream_of_big_messages_stays_bounded(fast_service: Service):
    """Messages of one short text with a 256 kB id each: the text window (512) would let the
    server hold 128 MB of them for a client that does not read; the byte window does not."""
    import asyncio

    pid, offered, padding = fast_service.server.pid, 0, "x" * 256 * 1024

    async def send_unread() -> list[float]:
        async def requests():
            nonlocal offered
            for i in range(2_000):
                offered += 1
                yield pb.EncodeStreamRequest(id=f"{i}:{padding}", texts=[f"big {i} {uuid.uuid4()}"])

        async with grpc.aio.insecure_channel(fast_service.target) as channel:
            call = embedq_pb2_grpc.EmbedderStub(channel).EncodeStream(requests(), timeout=60)
            samples = []
            for _ in range(30):
                await asyncio.sleep(0.1)
                samples.append(rss_mb(pid))
            call.cancel()
            return samples

    before = rss_mb(pid)
    growth = max(asyncio.run(send_unread())) - before
    assert growth < 30, f"server grew {growth:.1f} MB"
    assert offered * len(padding) > STREAM_BYTE_WINDOW  # more than the server may hold


def server_log_path(service: Service) -> Path:
    return LOG_DIR / f"server-{service.namespace}.log"


def wait_for_log(service: Service, text: str, since: int = 0, timeout: float = 10.0) -> str:
    """The server's log from byte `since` on, once it holds `text` (or after `timeout`)."""
    path = server_log_path(service)
    deadline = time.monotonic() + timeout
    while True:
        with path.open("rb") as handle:
            handle.seek(since)
            content = handle.read().decode(errors="replace")
        if text in content or time.monotonic() > deadline:
            return content
        time.sleep(0.1)


def test_a_streams_text_window_is_half_a_second_of_the_models_work():
    assert stream_text_window(0.0) == STREAM_TEXT_WINDOW  # not measured yet: the full window
    assert stream_text_window(300.0) == math.ceil(300 * STREAM_WINDOW_S) < STREAM_TEXT_WINDOW
    assert stream_text_window(10.0) == STREAM_MIN_TEXT_WINDOW  # still a batch's worth
    assert stream_text_window(50_000.0) == STREAM_TEXT_WINDOW  # a GPU: the memory bound


def test_a_killed_workers_jobs_are_taken_over_in_seconds(redis_server):
    """SIGKILL mid-job: the next worker takes the dead one's pending jobs as soon
    as its heartbeat is stale, not by the idle claim (set to 120 s here, past the calls'
    deadline, so that a slow machine's 600 texts can take their time)."""
    svc = Service(redis_server.url, namespace=f"k{uuid.uuid4().hex[:8]}")
    try:
        victim = svc.start_worker("--dead-after", "3")
        svc.start_server()
        client, keys = redis.Redis.from_url(svc.redis_url), Keys(svc.namespace)
        # A survivor, idle until it takes over.
        svc.start_worker("--dead-after", "3", "--claim-idle-ms", "120000")
        texts = unique_texts(600)
        with grpc.insecure_channel(svc.target) as channel, ThreadPoolExecutor(4) as pool:
            stub = embedq_pb2_grpc.EmbedderStub(channel)
            futures = [
                pool.submit(stub.Encode, pb.EncodeRequest(texts=texts[i : i + 150]), timeout=90)
                for i in range(0, 600, 150)
            ]
            _wait_pending_on(client, keys, victim.pid)
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            results = [future.result() for future in futures]  # within 90 s < 120 s idle claim
        assert sum(r.count for r in results) == 600
    finally:
        svc.stop()


def _wait_pending_on(client: redis.Redis, keys: Keys, pid: int, timeout: float = 60) -> None:
    """Until the worker process `pid` holds pending jobs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for consumer in client.xinfo_consumers(keys.jobs("all-MiniLM-L6-v2"), "workers"):
            name = consumer["name"]
            name = name.decode() if isinstance(name, bytes) else name
            if f"-{pid}-" in name and consumer["pending"]:
                return
        time.sleep(0.02)
    raise AssertionError("victim never held a job")


def test_the_backlog_counter_drains_batch_by_batch(busy_service: Service):
    # Admission reads the counter, and a refused caller's retry hint assumes the queue drains
    # at the measured rate: a job's texts leave it with each batch that answers them, not all
    # at once when the job is acknowledged.
    with grpc.insecure_channel(busy_service.target) as channel:
        stub = embedq_pb2_grpc.EmbedderStub(channel)
        model = stub.Info(pb.InfoRequest(), timeout=5).models[0].name
        backlog_key = Keys(busy_service.namespace).backlog(model)
        texts = unique_texts(256)  # one call window: one job, several forward passes
        seen: set[int] = set()
        wait_backlog(busy_service, stub, lambda queued: queued == 0)  # earlier tests' drained
        with (
            redis.Redis.from_url(busy_service.redis_url) as client,
            ThreadPoolExecutor(1) as pool,
        ):
            call = pool.submit(stub.Encode, pb.EncodeRequest(texts=texts), timeout=120)
            while not call.done():
                seen.add(int(client.get(backlog_key) or 0))
                time.sleep(0.005)
            assert call.result().count == 256
    assert 256 in seen and any(0 < value < 256 for value in seen), sorted(seen)


def test_a_call_over_several_windows_with_repeated_texts_completes(busy_service: Service):
    """Windows are refilled however the replies group the tickets (here, few unique
    texts repeated over 3 windows: one reply answers a whole window at once)."""
    texts = [f"repeated {i % 7}" for i in range(800)]
    with grpc.insecure_channel(busy_service.target) as channel:
        stub = embedq_pb2_grpc.EmbedderStub(channel)
        reply = stub.Encode(pb.EncodeRequest(texts=texts), timeout=120)
    rows = np.frombuffer(reply.embeddings, "<f4").reshape(reply.count, -1)
    assert reply.count == 800
    assert np.array_equal(rows[0], rows[7]) and not np.array_equal(rows[0], rows[1])
