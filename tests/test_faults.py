"""Nothing lost under faults: real faults injected into real processes.

Each test builds its own small deployment (Redis, server, workers) so that
killing or pausing a process affects nobody else.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import conftest
import grpc
import numpy as np
import pytest
import redis
from conftest import Service, log_tail
from embedq.apps.embedded import EmbeddedRedis
from embedq.server.router import STREAM_TEXT_WINDOW
from embedq.workers.batching import FRESH_JOB_MS
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedq.keys import CONSUMER_GROUP, RETRY_AFTER_MS_KEY, Keys
from embedq.v1 import embedq_pb2 as pb
from embedq.v1 import embedq_pb2_grpc

MODEL = "all-MiniLM-L6-v2"
FAULT_WORKER = Path(__file__).with_name("fault_worker.py")


def rows(response) -> np.ndarray:
    return np.frombuffer(response.embeddings, "<f4").reshape(response.count, response.dimension)


def stub_for(service: Service) -> tuple[grpc.Channel, embedq_pb2_grpc.EmbedderStub]:
    channel = grpc.insecure_channel(service.target)
    return channel, embedq_pb2_grpc.EmbedderStub(channel)


def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout}s")


def pending_count(client: redis.Redis, keys: Keys) -> int:
    try:
        return client.xpending(keys.jobs(MODEL), CONSUMER_GROUP)["pending"]
    except redis.ResponseError:
        return 0


def cached(client: redis.Redis, keys: Keys, text: str) -> bool:
    return any(True for _ in client.scan_iter(match=keys.cache("*", _sha(text))))


def _sha(text: str) -> str:
    from embedq.keys import text_sha256

    return text_sha256(text)


@pytest.fixture
def deployment(redis_server):
    services: list[Service] = []

    def make() -> Service:
        svc = Service(redis_server.url, namespace=f"f{uuid.uuid4().hex[:8]}")
        services.append(svc)
        return svc

    yield make
    for svc in services:
        svc.stop()


def _spawn_with_faults(args: list[str], name: str, env: dict[str, str] | None = None):
    """conftest._spawn through tests/fault_worker.py: the same commands, with
    workers' encoders and servers' background tasks wrapped to obey
    EMBEDQ_FAULT_INJECT / EMBEDQ_FAULT_INJECT_TASK."""
    log = open(conftest.LOG_DIR / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, str(FAULT_WORKER), *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def fault_injection(monkeypatch):
    """Processes started in the test run through the fault-injecting launcher."""
    monkeypatch.setattr(conftest, "_spawn", _spawn_with_faults)


def test_sigkilled_worker_loses_nothing(deployment, reference_model):
    """A worker killed mid-batch: another claims its jobs; every text arrives once."""
    svc = deployment()
    svc.start_worker("--claim-idle-ms", "1500")
    svc.start_server()
    keys, client = Keys(svc.namespace), redis.Redis.from_url(svc.redis_url)
    texts = [f"kill test sentence number {i} with a few more words" for i in range(600)]
    channel, stub = stub_for(svc)
    with channel, ThreadPoolExecutor(8) as pool:
        futures = [
            pool.submit(stub.Encode, pb.EncodeRequest(texts=texts[i : i + 50]), timeout=120)
            for i in range(0, len(texts), 50)
        ]
        wait_until(lambda: pending_count(client, keys) > 0, what="worker mid-batch")
        victim = svc.workers.pop()
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        assert pending_count(client, keys) > 0  # the dead worker's jobs are still pending
        svc.start_worker("--claim-idle-ms", "1500")
        got = np.concatenate([rows(future.result()) for future in futures])
    assert got.shape == (600, 384)
    assert np.abs(got - reference_model.encode(texts)).max() <= 1e-5
    assert pending_count(client, keys) == 0


def row_counts_from_a_slow_accelerator(deployment, pass_ms: int, calls: int, texts: int):
    """Rows per call for `calls` Encode calls of `texts` new texts sent at once to one
    worker with a simulated accelerator (passes of at most 4 texts, `pass_ms` each) that
    claims after 1200 ms idle and dead-letters on the first claim (--max-deliveries 1)."""
    svc = deployment()
    svc.start_worker(
        *("--backend", "bench-sim", "--allow-bench-backend", "--sim-forward-ms", str(pass_ms)),
        *("--max-batch-size", "4", "--claim-idle-ms", "1200", "--max-deliveries", "1"),
    )
    svc.start_server()
    channel, stub = stub_for(svc)
    requests = [
        pb.EncodeRequest(texts=[f"slow {pass_ms} call {i} text {j}" for j in range(texts)])
        for i in range(calls)
    ]
    with channel, ThreadPoolExecutor(calls) as pool:
        futures = [pool.submit(stub.Encode, request, timeout=60) for request in requests]
        return [future.result().count for future in futures]


def test_a_long_reads_capacity_is_published_while_it_runs(deployment):
    """A read of many passes (here one call's 256 texts, 4 texts a pass of 150 ms on a
    simulated accelerator: 10 s) publishes the worker's measured capacity while it runs, not
    only at its end: a fresh worker behind a flood (one job can hold thousands of texts)
    otherwise left admission blind, and calls were admitted to run into their deadline."""
    svc = deployment()
    svc.start_worker(
        *("--backend", "bench-sim", "--allow-bench-backend", "--sim-forward-ms", "150"),
        *("--max-batch-size", "4"),
    )
    svc.start_server()
    channel, stub = stub_for(svc)
    with channel:
        call = stub.Encode.future(
            pb.EncodeRequest(texts=[f"a long read, text {i}" for i in range(256)]), timeout=120
        )

        def capacity() -> float:
            return stub.Info(pb.InfoRequest(), timeout=5).models[0].capacity_texts_per_s

        while True:
            ended = call.done()  # before the look: capacity seen then was seen during it
            if capacity() > 0 or ended:
                break
            time.sleep(0.1)
        assert not ended, "capacity was published only when the read had ended"
        assert call.result().count == 256


def test_jobs_waiting_for_their_busy_worker_are_not_claimed_as_stale(deployment):
    """A read runs a forward pass at a time, so its last jobs wait for the worker's own
    model longer than --claim-idle-ms. They are its work in progress, not stale: nobody
    claims them (claims would count deliveries until the jobs were dead-lettered, and their
    callers would get INTERNAL), and every call is answered once."""
    # Passes of 600 ms: a read of 16 texts (what the reader gathers at most) takes 2.4 s,
    # twice the claim idle time, so the jobs gathered meanwhile wait that long: the old
    # worker claimed them back as stale and dead-lettered them. The heartbeat touches them
    # every 400 ms (a third of the claim time; not shorter: a busy machine may stall it).
    assert row_counts_from_a_slow_accelerator(deployment, 600, calls=8, texts=8) == [8] * 8


def test_a_stuck_models_worker_does_not_claim_its_own_jobs(deployment):
    """A pass longer than --claim-idle-ms (the model stuck, as far as anyone can tell): the
    heartbeat stops touching the worker's held jobs, so that other workers may take them.
    The worker's own reader must not claim them, neither during the pass nor right after it
    (before the heartbeat touches them again): a claim counts a delivery, and here the first
    one dead-lettered them. With no other worker, they are answered after the pass."""
    # Passes of 5 s: a job stops being touched 1.2 s into a pass and looks stale 1.2 s
    # later; the reader looks for stale jobs every 0.6 s.
    assert row_counts_from_a_slow_accelerator(deployment, 5000, calls=2, texts=4) == [4, 4]


def test_streams_survive_a_worker_kill_exactly_once(deployment):
    svc = deployment()
    svc.start_workers(["--claim-idle-ms", "1500"], ["--claim-idle-ms", "1500"])
    svc.start_server()
    keys, client = Keys(svc.namespace), redis.Redis.from_url(svc.redis_url)
    channel, stub = stub_for(svc)
    results: dict[int, list[str]] = {}

    def run(stream_no: int) -> None:
        messages = (
            pb.EncodeStreamRequest(id=f"{stream_no}-{i}", texts=[f"stream {stream_no} text {i}"])
            for i in range(80)
        )
        results[stream_no] = [
            r.id for r in stub.EncodeStream(messages, timeout=120) if not r.HasField("error")
        ]

    with channel:
        threads = [threading.Thread(target=run, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        wait_until(lambda: pending_count(client, keys) > 0, what="work pending")
        svc.workers[0].send_signal(signal.SIGKILL)
        for thread in threads:
            thread.join()
    for stream_no, ids in results.items():
        assert sorted(ids) == sorted(f"{stream_no}-{i}" for i in range(80))


def test_poison_text_fails_its_caller_only(deployment, fault_injection, monkeypatch):
    """The encoder raising on a text: that request gets INTERNAL naming it; the worker goes on."""
    monkeypatch.setenv("EMBEDQ_FAULT_INJECT", "raise:POISON")
    svc = deployment()
    svc.start_worker()
    svc.start_server()
    channel, stub = stub_for(svc)
    with channel:
        with pytest.raises(grpc.RpcError) as info:
            stub.Encode(pb.EncodeRequest(texts=["fine", "POISON pill"]), timeout=60)
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert "injected fault" in info.value.details()
        assert stub.Encode(pb.EncodeRequest(texts=["still serving"]), timeout=60).count == 1
    assert svc.workers[0].poll() is None


def assert_dead_lettered(stub, text: str) -> None:
    """Encoding `text` fails with INTERNAL naming the dead-letter stream (not a timeout)."""
    with pytest.raises(grpc.RpcError) as info:
        stub.Encode(pb.EncodeRequest(texts=[text]), timeout=90)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "dead-letter" in info.value.details()


def test_job_that_kills_workers_is_dead_lettered(deployment, fault_injection, monkeypatch):
    """A text that crashes every worker that takes it: after N deliveries it goes
    to the dead-letter stream and the caller gets an error, not silence."""
    monkeypatch.setenv("EMBEDQ_FAULT_INJECT", "crash:KILLER")
    svc = deployment()
    svc.start_workers(*[["--claim-idle-ms", "1000", "--max-deliveries", "2"]] * 3)
    svc.start_server()
    keys, client = Keys(svc.namespace), redis.Redis.from_url(svc.redis_url)
    channel, stub = stub_for(svc)
    with channel:
        assert_dead_lettered(stub, "KILLER text")
        assert client.xlen(keys.dead_letters(MODEL)) == 1
        survivors = [w for w in svc.workers if w.poll() is None]
        assert len(survivors) == 1
        assert stub.Encode(pb.EncodeRequest(texts=["harmless"]), timeout=60).count == 1


def test_a_text_the_tokenizer_fails_on_is_dead_lettered_not_hung(
    deployment, fault_injection, monkeypatch
):
    """Tokenizing fails on the worker's reader thread: the read stays pending (claimed again,
    then dead-lettered, so the caller gets an error), and the reader goes on serving."""
    dead_lettered_then_serving(deployment, monkeypatch, "tokenize-raise:BADTOKENS")


def dead_lettered_then_serving(deployment, monkeypatch, fault: str) -> Service:
    """One worker with `fault` (MODE:MARKER) injected: a text holding the marker ends in
    the dead-letter stream (its caller gets INTERNAL), the next call is served, and the
    worker is still running."""
    monkeypatch.setenv("EMBEDQ_FAULT_INJECT", fault)
    svc = deployment()
    svc.start_worker("--claim-idle-ms", "500", "--max-deliveries", "1")
    svc.start_server()
    channel, stub = stub_for(svc)
    with channel:
        assert_dead_lettered(stub, f"{fault.partition(':')[2]} here")
        assert stub.Encode(pb.EncodeRequest(texts=["still serving"]), timeout=30).count == 1
    assert svc.workers[0].poll() is None
    return svc


def test_a_result_write_that_fails_is_dead_lettered_not_hung(
    deployment, fault_injection, monkeypatch
):
    """A bug in the writer thread's result write: the writer goes on (a dead one left every
    later call hanging till its deadline); the jobs stay pending, are claimed again and
    dead-lettered, so the caller gets an error; the worker still serves."""
    svc = dead_lettered_then_serving(deployment, monkeypatch, "write-raise:BADWRITE")
    assert "writing results failed" in log_tail(f"worker-{svc.namespace}-0", lines=400)


class HealthWatch:
    """Polls health ("" and embedq.v1.Embedder) every 50 ms and records changes."""

    NAMES = ("", "embedq.v1.Embedder")

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = health_pb2_grpc.HealthStub(self.channel)
        self.changes: list[tuple[float, str, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last: dict[str, str] = {}
        while not self.stop.is_set():
            for name in self.NAMES:
                try:
                    reply = self.stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        continue  # a slow answer on a busy machine, not a change of state
                    status = exc.code().name
                if last.get(name) != status:
                    self.changes.append((time.monotonic(), name, status))
                    last[name] = status
            time.sleep(0.05)

    def __enter__(self) -> HealthWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.channel.close()

    def not_serving_periods(self, name: str, since: float) -> int:
        """Times `name` turned from SERVING to anything else after `since`."""
        periods, serving = 0, None
        for at, which, status in self.changes:
            if which != name:
                continue
            if at >= since and serving and status != "SERVING":
                periods += 1
            serving = status == "SERVING"
        return periods


def test_redis_restart_nothing_hangs_and_service_recovers(tmp_path):
    """Redis stopped and restarted empty under load: calls whose work was lost fail
    fast with UNAVAILABLE (not at their deadline), calls sent just after the restart
    succeed (no false "lost"), and health turns NOT_SERVING at most once."""
    redis_server = EmbeddedRedis().start()
    svc = Service(redis_server.url, namespace="restart")
    try:
        svc.start_worker()
        svc.start_server()
        channel, stub = stub_for(svc)
        outcomes: list[tuple[str, float, str]] = []
        early: list[tuple[str, float, str]] = []
        deadline_s = 20.0

        def call(i: int, texts: int = 40, into: list = outcomes) -> None:
            started = time.monotonic()
            try:
                stub.Encode(
                    pb.EncodeRequest(texts=[f"restart {i} {j}" for j in range(texts)]),
                    timeout=deadline_s,
                )
                into.append(("OK", time.monotonic() - started, ""))
            except grpc.RpcError as exc:
                into.append((exc.code().name, time.monotonic() - started, exc.details()))

        with (
            channel,
            HealthWatch(svc.target) as health,
            ThreadPoolExecutor(6) as pool,
            ThreadPoolExecutor(4) as early_pool,
        ):
            futures = [pool.submit(call, i) for i in range(30)]
            time.sleep(0.5)
            port = redis_server.port
            stopped = time.monotonic()
            redis_server.stop()
            time.sleep(0.5)
            redis_server = EmbeddedRedis(port=port).start()
            # Calls sent in the first 0.1 s after the restart: their work is queued
            # on the new Redis and must not be reported lost.
            early_futures = [early_pool.submit(call, f"early {i}", 2, early) for i in range(4)]
            for future in futures + early_futures:
                future.result()
            assert {code for code, _, _ in outcomes} <= {"OK", "UNAVAILABLE"}, outcomes
            # Lost work fails fast: at the restart, not at the 20 s deadline (the slack is
            # for a slow machine: the worker's reconnect backoff, then 40 texts a call).
            assert all(elapsed < deadline_s * 0.75 for _, elapsed, _ in outcomes), outcomes
            assert [code for code, _, _ in early] == ["OK"] * 4, early

            def serves() -> bool:
                try:
                    return (
                        stub.Encode(pb.EncodeRequest(texts=["after restart"]), timeout=5).count == 1
                    )
                except grpc.RpcError:
                    return False

            wait_until(serves, timeout=30, what="service back after redis restart")
            # Health went down at most once for the restart, and stays up afterwards
            # (the ~10 s later flap came from stale pooled connections).
            wait_until(lambda: time.monotonic() > stopped + 15, timeout=20, what="15 s")
        for name in HealthWatch.NAMES:
            assert health.not_serving_periods(name, stopped) <= 1, health.changes
    except Exception:
        print(log_tail("server-restart"), log_tail("worker-restart-0"))
        raise
    finally:
        svc.stop()
        redis_server.stop()


def test_a_bad_reply_entry_is_skipped_not_fatal(deployment):
    """Bytes in the reply stream that are no Reply: logged and skipped; the listener
    goes on and the server keeps answering uncached work."""
    svc = deployment()
    svc.start_worker()
    svc.start_server()
    client = redis.Redis.from_url(svc.redis_url)
    channel, stub = stub_for(svc)
    with channel:
        assert stub.Encode(pb.EncodeRequest(texts=["make the reply stream"]), timeout=60).count
        (reply_key,) = client.scan_iter(match=f"{svc.namespace}:v1:{{reply-*}}:replies")
        client.xadd(reply_key, {b"m": b"\xff\xff not a protobuf"})
        client.xadd(reply_key, {b"wrong field": b"x"})
        for i in range(3):
            texts = [f"after a bad reply {i} {j}" for j in range(5)]
            assert stub.Encode(pb.EncodeRequest(texts=texts), timeout=30).count == 5
    log = log_tail(f"server-{svc.namespace}", 200)
    assert "skipped reply entry" in log and "Traceback" not in log


def test_a_failed_background_task_is_restarted_and_health_says_so(
    deployment, monkeypatch, tmp_path, fault_injection
):
    """Any exception in a background task (here the reply listener, by fault
    injection): health NOT_SERVING for "" and embedq.v1.Embedder while it is down,
    logged at most once per 10 s, restarted with backoff; calls work again after."""
    fault = tmp_path / "fail-replies"
    monkeypatch.setenv("EMBEDQ_FAULT_INJECT_TASK", f"replies={fault}")
    svc = deployment()
    svc.start_worker()
    svc.start_server()
    channel, stub = stub_for(svc)
    with channel, HealthWatch(svc.target) as health:
        assert stub.Encode(pb.EncodeRequest(texts=["before the fault"]), timeout=60).count == 1
        failed_at = time.monotonic()
        fault.touch()
        for name in HealthWatch.NAMES:
            wait_until(
                lambda name=name: any(
                    n == name and s == "NOT_SERVING" and t >= failed_at
                    for t, n, s in health.changes
                ),
                timeout=20,
                what=f"{name!r} NOT_SERVING",
            )
        time.sleep(3)  # several failures and restarts meanwhile
        fault.unlink()
        recovered_at = time.monotonic()
        texts = [f"after the listener came back {j}" for j in range(4)]
        assert stub.Encode(pb.EncodeRequest(texts=texts), timeout=30).count == 4
        for name in HealthWatch.NAMES:
            wait_until(
                lambda name=name: any(
                    n == name and s == "SERVING" and t >= recovered_at for t, n, s in health.changes
                ),
                timeout=20,
                what=f"{name!r} SERVING again",
            )
    assert svc.server.poll() is None
    log = log_tail(f"server-{svc.namespace}", 400)
    assert log.count("background task 'replies' failed") == 1, log  # once per 10 s


def test_killed_server_leaves_nothing_forever(deployment):
    svc = deployment()
    svc.start_worker()
    svc.start_server()
    other = Service(svc.redis_url, namespace=svc.namespace)
    other.start_server()
    client = redis.Redis.from_url(svc.redis_url)
    try:
        channel, stub = stub_for(svc)
        with channel:
            stub.Encode(pb.EncodeRequest(texts=["make a reply stream"]), timeout=60)
        reply_keys = list(client.scan_iter(match=f"{svc.namespace}:v1:{{reply-*}}:replies"))
        assert reply_keys
        svc.server.send_signal(signal.SIGKILL)
        svc.server.wait()
        for key in reply_keys:
            assert 0 < client.ttl(key) <= 300  # it expires: nothing lives forever
        channel, stub = stub_for(other)
        with channel:
            assert stub.Encode(pb.EncodeRequest(texts=["other server"]), timeout=60).count == 1
    finally:
        other.stop()


def test_graceful_server_shutdown_finishes_in_flight_calls(deployment):
    svc = deployment()
    svc.start_worker()
    svc.start_server()
    channel, stub = stub_for(svc)
    texts = [f"graceful server {i} with some words to encode" for i in range(400)]
    with channel, ThreadPoolExecutor(1) as pool:
        future = pool.submit(stub.Encode, pb.EncodeRequest(texts=texts), timeout=60)
        client = redis.Redis.from_url(svc.redis_url)
        queued = Keys(svc.namespace).jobs(MODEL)
        wait_until(lambda: client.xlen(queued) > 0 or future.done(), what="the call in flight")
        client.close()
        svc.server.send_signal(signal.SIGTERM)
        assert future.result().count == 400
        assert svc.server.wait(timeout=30) == 0


def test_graceful_server_shutdown_answers_what_a_stream_read_and_ends_it(deployment):
    """SIGTERM during an EncodeStream that keeps sending: the stream stops reading at once,
    answers the messages it was working on (the answered ids have no gap, none twice) and
    ends UNAVAILABLE ("server shutting down ...") well within the grace; the server exits 0.
    Before: a stream that kept sending was served until the grace ran out (10 s), then cut
    (UNAVAILABLE "Cancelling all calls"): the answers in flight lost, nothing said of which."""
    svc = deployment()
    svc.start_worker()
    svc.start_server()
    channel, stub = stub_for(svc)
    stop_sending = threading.Event()

    def messages():
        for i in range(100_000):
            if stop_sending.is_set():
                return
            yield pb.EncodeStreamRequest(id=f"m{i}", texts=[f"graceful stream {i} of words"])
            time.sleep(0.01)

    answered: list[str] = []
    with channel:
        responses = stub.EncodeStream(messages(), timeout=60)
        for response in responses:
            assert not response.HasField("error"), response.error.message
            answered.append(response.id)
            if len(answered) == 20:
                break
        svc.server.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        with pytest.raises(grpc.RpcError) as ended:
            for response in responses:
                assert not response.HasField("error"), response.error.message
                answered.append(response.id)
        took = time.monotonic() - signalled
        stop_sending.set()
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, ended.value.details()
    assert "server shutting down" in ended.value.details()
    assert took < 5, took  # not the 10 s grace
    assert sorted(answered) == sorted(f"m{i}" for i in range(len(answered)))
    assert svc.server.wait(timeout=30) == 0


def test_an_answer_over_the_message_size_limit_is_refused_alone(deployment, monkeypatch):
    """With the message size cap lowered (64 KiB), an answer too big to send is refused with
    INVALID_ARGUMENT naming the limit: a unary Encode; in a stream that message alone, under
    its id, and the stream goes on. Before: gRPC refused the send: the unary call ended
    RESOURCE_EXHAUSTED "SERVER: Sent message larger than max (73807 vs. 65536)" (which
    clients retry, to the same end), and so did the whole stream, "small" unanswered."""
    monkeypatch.setenv("EMBEDQ_MAX_MESSAGE_BYTES", str(64 * 1024))
    svc = deployment()
    svc.start_worker()
    svc.start_server()
    channel, stub = stub_for(svc)
    many = [f"an answer over the size limit {i}" for i in range(48)]  # 48 x 1,536 bytes
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    with channel:
        with pytest.raises(grpc.RpcError) as refused:
            stub.Encode(pb.EncodeRequest(texts=many), timeout=60)
        assert refused.value.code() == invalid, refused.value.details()
        assert "--max-message-bytes" in refused.value.details()
        messages = [
            pb.EncodeStreamRequest(id="big", texts=many),
            pb.EncodeStreamRequest(id="small", texts=many[:4]),
        ]
        by_id = {r.id: r for r in stub.EncodeStream(iter(messages), timeout=60)}
    assert by_id["big"].error.code == invalid.value[0]
    assert "--max-message-bytes" in by_id["big"].error.message
    assert by_id["small"].count == 4


def test_graceful_worker_shutdown_acks_its_batch(deployment):
    svc = deployment()
    svc.start_worker()
    svc.start_server()
    keys, client = Keys(svc.namespace), redis.Redis.from_url(svc.redis_url)
    channel, stub = stub_for(svc)
    # Within one call window (256 texts), so the whole call is in the worker's hands
    # when it is told to stop (texts not yet queued would wait for another worker).
    texts = [f"graceful worker {i} with some words to encode" for i in range(200)]
    with channel, ThreadPoolExecutor(1) as pool:
        future = pool.submit(stub.Encode, pb.EncodeRequest(texts=texts), timeout=60)
        wait_until(lambda: pending_count(client, keys) > 0, what="worker mid-batch")
        svc.workers[0].send_signal(signal.SIGTERM)
        assert future.result().count == 200
        assert svc.workers[0].wait(timeout=30) == 0
    assert pending_count(client, keys) == 0


@pytest.fixture
def paused_worker(deployment, monkeypatch):
    """A deployment whose single worker can be frozen (SIGSTOP) and thawed."""
    monkeypatch.setenv("EMBEDQ_MAX_QUEUED_JOBS", "2")
    svc = deployment()
    svc.start_worker()
    svc.start_server()
    worker = svc.workers[0]
    yield svc, worker
    if worker.poll() is None:
        os.kill(worker.pid, signal.SIGCONT)


def test_full_queue_is_refused_at_once(paused_worker):
    svc, worker = paused_worker
    channel, stub = stub_for(svc)
    with channel:
        os.kill(worker.pid, signal.SIGSTOP)
        client, keys = redis.Redis.from_url(svc.redis_url), Keys(svc.namespace)
        first = []
        for i in range(2):  # one at a time: requests arriving together share one job
            first.append(stub.Encode.future(pb.EncodeRequest(texts=[f"queued {i}"]), timeout=60))
            wait_until(lambda n=i: client.xlen(keys.jobs(MODEL)) > n, what=f"job {i} queued")
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stub.Encode(pb.EncodeRequest(texts=["one too many"]), timeout=60)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - started < 5  # refused at once, not after a wait
        os.kill(worker.pid, signal.SIGCONT)
        assert all(f.result().count == 1 for f in first)


def test_a_stream_message_with_its_own_time_limit_fails_alone_and_in_time(paused_worker):
    """EncodeStreamRequest.timeout_ms: a message that cannot be answered within its own limit
    fails with DEADLINE_EXCEEDED at that limit (not the stream's 60 s), the stream goes on, and
    the worker does not encode it once it is back. The limit counts from when the server read
    the message, its wait for the stream's window included (it counted from the answer's
    start)."""
    import queue as queue_module

    svc, worker = paused_worker
    client, keys = redis.Redis.from_url(svc.redis_url), Keys(svc.namespace)
    channel, stub = stub_for(svc)
    outbox: queue_module.Queue = queue_module.Queue()

    def messages():
        while (message := outbox.get()) is not None:
            yield message

    with channel:
        os.kill(worker.pid, signal.SIGSTOP)
        call = stub.EncodeStream(messages(), timeout=60)
        answers = iter(call)
        started = time.monotonic()
        outbox.put(pb.EncodeStreamRequest(id="hurried", texts=["its own limit"], timeout_ms=500))
        hurried = next(answers)
        waited = time.monotonic() - started
        deadline_exceeded = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        assert hurried.id == "hurried" and hurried.error.code == deadline_exceeded
        assert waited < 10, waited  # its own half second, not the stream's 60 s
        os.kill(worker.pid, signal.SIGCONT)
        outbox.put(pb.EncodeStreamRequest(id="patient", texts=["the stream goes on"]))
        patient = next(answers)
        assert patient.id == "patient" and patient.count == 1 and not patient.HasField("error")
        # The limit counts from when the server read the message: a wait for the stream's
        # window (behind a message holding all of its texts, frozen in the queue) is in it.
        os.kill(worker.pid, signal.SIGSTOP)
        whole = [f"holds the whole window {i}" for i in range(STREAM_TEXT_WINDOW)]
        outbox.put(pb.EncodeStreamRequest(id="whole", texts=whole))
        outbox.put(pb.EncodeStreamRequest(id="behind", texts=["behind it"], timeout_ms=300))
        time.sleep(1.5)
        os.kill(worker.pid, signal.SIGCONT)
        first, behind = next(answers), next(answers)
        assert first.id == "whole" and first.count == len(whole), first.error
        assert behind.id == "behind" and behind.error.code == deadline_exceeded
        assert "waited for the stream's window" in behind.error.message
        outbox.put(None)
        assert list(answers) == []
    wait_until(lambda: client.xlen(keys.jobs(MODEL)) == 0, what="queue drained")
    assert not cached(client, keys, "its own limit")  # expired in the queue: not encoded


def test_expired_and_cancelled_work_is_skipped(paused_worker):
    svc, worker = paused_worker
    client, keys = redis.Redis.from_url(svc.redis_url), Keys(svc.namespace)
    channel, stub = stub_for(svc)
    with channel:
        os.kill(worker.pid, signal.SIGSTOP)
        with pytest.raises(grpc.RpcError) as info:
            stub.Encode(pb.EncodeRequest(texts=["expires while queued"]), timeout=1)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        messages = iter([pb.EncodeStreamRequest(id="c", texts=["cancelled while queued"])])
        call = stub.EncodeStream(messages, timeout=60)
        wait_until(lambda: client.xlen(keys.jobs(MODEL)) >= 2, what="both jobs queued")
        call.cancel()
        cancelled_sets = f"{svc.namespace}:*cancelled*"
        wait_until(  # both tickets: the expired call's, and the cancelled stream's
            lambda: sum(client.scard(key) for key in client.scan_iter(match=cancelled_sets)) >= 2,
            what="the server marks the cancelled ticket",
        )
        # A job queued less than FRESH_JOB_MS ago, read by an idle model, is encoded without
        # asking (by design: batching.needs_cancel_check); this one must have waited longer.
        time.sleep(4 * FRESH_JOB_MS / 1000)
        os.kill(worker.pid, signal.SIGCONT)
        wait_until(lambda: client.xlen(keys.jobs(MODEL)) == 0, what="queue drained")
        assert stub.Encode(pb.EncodeRequest(texts=["after the thaw"]), timeout=60).count == 1
    assert not cached(client, keys, "expires while queued")
    assert not cached(client, keys, "cancelled while queued")
    assert cached(client, keys, "after the thaw")


def encodes(stub: embedq_pb2_grpc.EmbedderStub, text: str) -> bool:
    try:
        return stub.Encode(pb.EncodeRequest(texts=[text]), timeout=30).count == 1
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        return False


def test_a_full_redis_refuses_new_texts_at_once_and_still_answers_the_calls_it_held(
    reference_model,
):
    """Redis at `maxmemory` under `noeviction` refuses every write. A call whose job was
    queued just before gets its vectors once memory frees (here an operator raises
    `maxmemory`), not its deadline: the worker gives up the cache entries, not the replies.
    Meanwhile new texts are refused at once with RESOURCE_EXHAUSTED saying why, with a
    retry hint, cached texts are still served, and a caller whose deadline passes is told
    that Redis is full, not that the worker is busy or gone. (Before: the worker's refused
    replies were acknowledged and lost, the call ran into its deadline, and new texts got
    `UNAVAILABLE: redis unavailable: OutOfMemoryError`.)"""
    server = EmbeddedRedis(extra_args=["--maxmemory-policy", "noeviction"]).start()
    svc = Service(server.url, namespace=f"full{uuid.uuid4().hex[:6]}")
    try:
        svc.start_worker()
        svc.start_server()
        worker, client = svc.workers[0], redis.Redis.from_url(server.url)
        keys = Keys(svc.namespace)
        channel, stub = stub_for(svc)
        texts = [f"a sentence queued as redis fills up, number {i}" for i in range(48)]
        with channel:
            assert stub.Encode(pb.EncodeRequest(texts=["already cached"]), timeout=60).count
            os.kill(worker.pid, signal.SIGSTOP)
            held = stub.Encode.future(pb.EncodeRequest(texts=texts), timeout=90)
            wait_until(lambda: client.xlen(keys.jobs(MODEL)) > 0, what="the job queued")
            # Full: far below what Redis holds, so no write fits until maxmemory is raised
            # (whatever memory trimming frees meanwhile).
            client.config_set("maxmemory", 1)
            os.kill(worker.pid, signal.SIGCONT)
            wait_until(
                lambda: "wait for room" in log_tail(f"worker-{svc.namespace}-0", 50),
                what="the worker's replies refused",
            )
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                stub.Encode(pb.EncodeRequest(texts=["a new text"]), timeout=30)
            refused_after = time.monotonic() - started
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
            assert "redis is out of memory" in info.value.details()
            assert int(dict(info.value.trailing_metadata())[RETRY_AFTER_MS_KEY]) > 0
            assert refused_after < 5  # refused, not run into its deadline
            assert stub.Encode(pb.EncodeRequest(texts=["already cached"]), timeout=30).count
            # A caller waiting on texts in flight (no write needed) that runs out of time is
            # told why its result is late (the message's own limit: the server's status).
            late = stub.EncodeStream(
                iter([pb.EncodeStreamRequest(id="late", texts=texts[:4], timeout_ms=1500)]),
                timeout=30,
            )
            error = next(iter(late)).error
            assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0], error
            assert "redis was out of memory" in error.message, error.message
            assert not held.done()
            client.config_set("maxmemory", 0)
            got = rows(held.result())
            # Served again (once the server has seen the worker's heartbeat again, which
            # the full Redis refused: on a slow machine that may take a refresh, 1 s).
            wait_until(lambda: encodes(stub, "a new text"), timeout=10, what="new texts served")
        assert np.abs(got - reference_model.encode(texts)).max() <= 1e-5
        assert "out of memory" in log_tail(f"server-{svc.namespace}", 50)
    finally:
        if svc.workers and svc.workers[0].poll() is None:
            os.kill(svc.workers[0].pid, signal.SIGCONT)
        svc.stop()
        server.stop()
