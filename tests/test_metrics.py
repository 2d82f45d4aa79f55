"""Observability against a real deployment: Prometheus metrics of the server
and a worker, JSON logs with request ids, and `embedq status`."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator

import grpc
import pytest
import redis
from conftest import LOG_DIR, Service, log_tail
from embedq.apps.embedded import free_port
from embedq.apps.serve import with_observability
from embedq.apps.status import collect, format_table
from prometheus_client.parser import text_string_to_metric_families

from embedq.keys import Keys
from embedq.v1 import embedq_pb2 as pb
from embedq.v1 import embedq_pb2_grpc

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def deployment(redis_server, monkeypatch_module) -> Iterator[tuple[Service, int, int]]:
    """One worker and one server, each with a metrics port; the server logs JSON."""
    service = Service(redis_server.url, namespace=f"m{uuid.uuid4().hex[:8]}")
    worker_port, server_port = free_port(), free_port()
    try:
        service.start_worker("--metrics-port", str(worker_port))
        monkeypatch_module.setenv("EMBEDQ_LOG_FORMAT", "json")
        service.start_server("--metrics-port", str(server_port))
        monkeypatch_module.delenv("EMBEDQ_LOG_FORMAT")
        yield service, server_port, worker_port
    finally:
        service.stop()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def stub(deployment) -> Iterator[embedq_pb2_grpc.EmbedderStub]:
    service, _, _ = deployment
    with grpc.insecure_channel(service.target) as channel:
        yield embedq_pb2_grpc.EmbedderStub(channel)


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_requests_cache_and_batches(deployment, stub):
    _service, server_port, worker_port = deployment
    before = scrape(server_port)
    fresh = [[f"metrics text {uuid.uuid4().hex} {i}" for i in range(3)] for _ in range(2)]
    for texts in fresh:  # misses: the worker encodes them
        assert not any(stub.Encode(pb.EncodeRequest(texts=texts), timeout=60).cached)
    repeated = fresh[0] + fresh[1][:1]
    assert all(stub.Encode(pb.EncodeRequest(texts=repeated), timeout=60).cached)  # hits
    # Hits again: now from the server's near cache (it keeps what Redis returned).
    assert all(stub.Encode(pb.EncodeRequest(texts=repeated), timeout=60).cached)
    with pytest.raises(grpc.RpcError) as info:
        stub.Encode(pb.EncodeRequest(), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # grpc's abort() sends the status before the interceptor's bookkeeping (_Call.end)
    # resumes, so the refused call can reach the client a moment before it is counted.
    # _Call.end counts the request before its duration: waiting for the duration suffices.
    deadline = time.monotonic() + 10
    after = scrape(server_port)
    while delta("embedq_request_duration_seconds_count", method="Encode") < 5:
        assert time.monotonic() < deadline, "the refused call was never counted"
        time.sleep(0.05)
        after = scrape(server_port)

    assert delta("embedq_requests_total", method="Encode", code="OK") == 4
    assert delta("embedq_requests_total", method="Encode", code="INVALID_ARGUMENT") == 1
    assert delta("embedq_request_duration_seconds_count", method="Encode") == 5
    assert delta("embedq_texts_total", method="Encode") == 6 + 2 * len(repeated)
    assert delta("embedq_cache_hits_total") == 2 * len(repeated)
    assert delta("embedq_near_cache_hits_total") == len(repeated)
    assert delta("embedq_cache_misses_total") == 6

    model = "all-MiniLM-L6-v2"
    deadline = time.monotonic() + 10  # gauges refresh in the background
    while value(scrape(server_port), "embedq_workers_alive", model=model) != 1:
        assert time.monotonic() < deadline, "embedq_workers_alive never reached 1"
        time.sleep(0.2)
    assert ("embedq_queue_depth", (("model", model),)) in scrape(server_port)

    worker = scrape(worker_port)
    assert value(worker, "embedq_worker_batches_total") >= 1
    assert value(worker, "embedq_worker_batch_texts_count") >= 1
    assert value(worker, "embedq_worker_batch_texts_sum") >= 6
    assert value(worker, "embedq_worker_batch_tokens_sum") > 0
    assert value(worker, "embedq_worker_jobs_total", outcome="ok") >= 1
    assert value(worker, "embedq_worker_jobs_total", outcome="failed") == 0
    assert value(worker, "embedq_worker_busy_seconds_total") > 0


def test_request_id_in_json_log_and_trailing_metadata(deployment, stub):
    service, _, _ = deployment
    request = pb.EncodeRequest(texts=["secret text"], options=pb.EncodeOptions(model="nope"))
    with pytest.raises(grpc.RpcError) as info:
        stub.Encode(request, metadata=[("x-request-id", "abc123")], timeout=60)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert ("x-request-id", "abc123") in tuple(info.value.trailing_metadata())

    # No id sent: the server makes one up and still returns it.
    _response, call = stub.Encode.with_call(pb.EncodeRequest(texts=["hi"]), timeout=60)
    made = dict(call.trailing_metadata())["x-request-id"]
    assert len(made) == 16 and int(made, 16) >= 0

    log_path = LOG_DIR / f"server-{service.namespace}.log"
    deadline = time.monotonic() + 10
    while True:
        lines = log_path.read_text(errors="replace").splitlines()
        records = [json.loads(line) for line in lines if line.startswith("{")]
        mine = [r for r in records if r.get("request_id") == "abc123"]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert mine, log_tail(f"server-{service.namespace}")
    assert mine[0]["code"] == "NOT_FOUND" and mine[0]["method"] == "Encode"
    assert {"time", "level", "logger", "message"} <= set(mine[0])
    assert any("listening" in r["message"] for r in records)  # start-up lines are JSON too
    assert "secret text" not in log_path.read_text(errors="replace")


def test_status_command(deployment, stub):
    service, _, _ = deployment
    stub.Encode(pb.EncodeRequest(texts=[f"status {uuid.uuid4().hex}"]), timeout=60)
    result = subprocess.run(
        [sys.executable, "-m", "embedq.cli", "status", "--redis-url", service.redis_url]
        + ["--namespace", service.namespace, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    (model,) = status["models"]
    assert model["name"] == "all-MiniLM-L6-v2" and model["dimension"] == 384
    assert len(model["fingerprint"]) == 64
    assert model["workers_alive"] == 1 and len(model["workers"]) == 1
    assert (model["queue_depth"], model["pending"], model["dead_letters"]) == (0, 0, 0)
    assert model["texts_queued"] == 0  # every text answered: the backlog counter is back to 0
    assert status["cache_keys"] >= 1 and status["cache_keys_complete"]

    client = redis.Redis.from_url(service.redis_url)
    bounded = collect(client, Keys(service.namespace), scan_limit=1)
    table = format_table(bounded, service.redis_url)
    assert table.splitlines()[1].split() == [
        "MODEL", "DIM", "FINGERPRINT", "QUEUED", "TEXTS", "PENDING", "DEAD", "WORKERS"
    ]  # fmt: skip
    assert "all-MiniLM-L6-v2  384" in table
    assert model["workers"][0]["id"] in table
    assert "cached vectors: ≥1 (scan stopped)" in table

    empty = collect(client, Keys(f"none{uuid.uuid4().hex[:6]}"))
    assert empty["models"] == [] and empty["cache_keys"] == 0
    assert "no model registered" in format_table(empty, "redis://x")


def test_status_without_redis_says_so():
    result = subprocess.run(
        [sys.executable, "-m", "embedq.cli", "status", "--redis-url"]
        + [f"redis://:hunter2@127.0.0.1:{free_port()}/0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "embedq status: redis at" in result.stderr and "hunter2" not in result.stderr


def test_serve_gives_workers_their_own_metrics_ports_and_log_flags():
    args = argparse.Namespace(
        metrics_port=9100,
        metrics_host="0.0.0.0",
        devices="cpu",
        log_level="DEBUG",
        log_format="json",
    )
    base = [sys.executable, "-m", "embedq.cli", "worker", "--devices", "cpu"]
    argvs = with_observability(args, [list(base), list(base)])
    ports = [argv[argv.index("--metrics-port") + 1] for argv in argvs]
    assert ports == ["9101", "9102"]
    for argv in argvs:
        assert argv.index("--log-format") < argv.index("worker")
        assert argv[argv.index("--metrics-host") + 1] == "0.0.0.0"
    args.metrics_port = 0  # off: workers are told so (an inherited EMBEDQ_METRICS_PORT is not used)
    assert with_observability(args, [list(base)])[0][-4:-2] == ["--metrics-port", "0"]


def test_log_formats_carry_the_request_id():
    import logging

    from embedq.logs import REQUEST_ID, JsonFormatter, RequestIdFilter, TextFormatter

    record = logging.LogRecord("embedq.x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    record.code = "NOT_FOUND"  # as logged with extra=
    token = REQUEST_ID.set("rid-1")
    try:
        RequestIdFilter().filter(record)
    finally:
        REQUEST_ID.reset(token)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "hello you" and entry["request_id"] == "rid-1"
    assert entry["code"] == "NOT_FOUND" and entry["level"] == "INFO"
    assert entry["time"].endswith("Z") and entry["logger"] == "embedq.x"
    assert TextFormatter("%(message)s").format(record) == "hello you request_id=rid-1"
    outside = logging.LogRecord("embedq.x", logging.INFO, __file__, 1, "plain", None, None)
    RequestIdFilter().filter(outside)
    assert "request_id" not in json.loads(JsonFormatter().format(outside))


class _EndedContext:
    """What _Call.end reads of a call that ended with `code`."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def set_trailing_metadata(self, metadata: tuple) -> None:
        pass


def _end_calls(code: grpc.StatusCode, count: int) -> None:
    from embedq.server.metrics import _Call

    for _ in range(count):
        call, context = _Call("/embedq.v1.Embedder/Tokenize", ()), _EndedContext(code, "why")
        call.end(None, context, call.begin(context))


def test_a_burst_of_refusals_is_one_log_line_and_other_failures_one_each(caplog, monkeypatch):
    import logging

    from embedq.server import metrics

    # A fresh throttle: another test's refusals must not have started its quiet period.
    monkeypatch.setattr(metrics, "_refusals", metrics.Throttled(metrics.log))
    before = _sample("embedq_requests_total", method="Tokenize", code="RESOURCE_EXHAUSTED")
    with caplog.at_level(logging.INFO, logger=metrics.log.name):
        _end_calls(grpc.StatusCode.RESOURCE_EXHAUSTED, 50)
        _end_calls(grpc.StatusCode.INVALID_ARGUMENT, 3)
    lines = [r.getMessage() for r in caplog.records]
    assert [line for line in lines if "RESOURCE_EXHAUSTED" in line] == [lines[0]] and lines[
        0
    ].startswith("Tokenize failed: RESOURCE_EXHAUSTED")
    assert sum("INVALID_ARGUMENT" in line for line in lines) == 3
    # Every refusal is still counted, and at DEBUG every one is logged.
    after = _sample("embedq_requests_total", method="Tokenize", code="RESOURCE_EXHAUSTED")
    assert after - before == 50
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger=metrics.log.name):
        _end_calls(grpc.StatusCode.RESOURCE_EXHAUSTED, 5)
    assert sum("RESOURCE_EXHAUSTED" in r.getMessage() for r in caplog.records) == 5


def _sample(name: str, **labels: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0
