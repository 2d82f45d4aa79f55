"""Health that means ready, and serve's worker bookkeeping (real processes)."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
from conftest import LOG_DIR, Service
from embedq.apps.embedded import free_port
from embedq.apps.serve import default_model_name
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedq.v1 import embedq_pb2 as pb
from embedq.v1 import embedq_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
EMBEDDER = "embedq.v1.Embedder"


def status(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
    except grpc.RpcError:
        return -1


def wait_status(channel, service: str, wanted: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if status(channel, service) == wanted:
            return
        time.sleep(0.1)
    raise AssertionError(f"health {service!r} never became {wanted}")


def test_embedder_health_follows_live_workers(redis_server):
    svc = Service(redis_server.url, namespace=f"h{uuid.uuid4().hex[:8]}")
    try:
        svc.start_server()  # waits for "" SERVING: Redis is reachable
        with grpc.insecure_channel(svc.target) as channel:
            assert status(channel, "") == SERVING
            assert status(channel, EMBEDDER) != SERVING  # nobody computes yet
            svc.start_worker()
            wait_status(channel, EMBEDDER, SERVING)
            wait_status(channel, f"{EMBEDDER}/all-MiniLM-L6-v2", SERVING)
            svc.stop_workers()  # a clean stop removes its heartbeat
            wait_status(channel, EMBEDDER, health_pb2.HealthCheckResponse.NOT_SERVING)
            assert status(channel, "") == SERVING  # cached answers still work
    finally:
        svc.stop()


def test_serve_is_serving_only_when_work_can_be_computed():
    port = free_port()
    log = open(LOG_DIR / f"serve-ready-{port}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedq.cli", "serve", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            deadline = time.monotonic() + 120
            while status(channel, "") != SERVING:
                assert proc.poll() is None, "serve exited"
                assert time.monotonic() < deadline, "serve never became SERVING"
                time.sleep(0.05)
            # The moment it says SERVING, uncached work goes through.
            stub = embedq_pb2_grpc.EmbedderStub(channel)
            reply = stub.Encode(pb.EncodeRequest(texts=[f"ready {uuid.uuid4()}"]), timeout=60)
            assert reply.count == 1
            assert status(channel, EMBEDDER) == SERVING
            info = stub.Info(pb.InfoRequest(), timeout=5)
            assert "/" not in info.models[0].source  # no file-system path for callers
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


@pytest.mark.parametrize(
    "spec",
    [None, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "cls=all-MiniLM-L6-v2"],
)
def test_serve_names_the_default_model_as_the_worker_will(spec):
    from embedq.workers.backends.source import resolve_model_source

    assert default_model_name(spec) == resolve_model_source(spec)[0]


def test_serve_default_model_name_of_a_folder(tmp_path: Path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert default_model_name(str(folder)) == "my-model"
    assert default_model_name(f"{folder}/") == "my-model"


@pytest.mark.parametrize("command", ["server", "worker"])
def test_a_wrong_redis_password_stops_start_up_with_one_line(command):
    from embedq.apps.embedded import EmbeddedRedis

    with EmbeddedRedis(password="right-secret") as guarded:
        url = guarded.url.replace("right-secret", "")  # no password in the URL itself
        env = {**__import__("os").environ, "EMBEDQ_REDIS_PASSWORD": "wrong-secret"}
        args = [sys.executable, "-m", "embedq.cli", command, "--redis-url", url]
        if command == "server":
            args += ["--port", str(free_port())]
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert any("refused our credentials" in line for line in errors), done.stderr[-2000:]
    assert "wrong-secret" not in done.stderr and "Traceback" not in done.stderr


def test_serve_stops_when_its_worker_refuses_its_configuration(tmp_path):
    """A worker that exits 2 would fail again: serve stops with one line, no restart loop."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "EMBEDQ_ALLOW_BENCH_BACKEND"}
    args = ["serve", "--port", str(free_port()), "--backend", "bench-zero"]
    done = subprocess.run(
        [sys.executable, "-m", "embedq.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "refused its configuration" in done.stderr
    assert "--allow-bench-backend" in done.stderr
    assert "Traceback" not in done.stderr
