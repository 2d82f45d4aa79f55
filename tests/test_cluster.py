"""The same binaries against a 3-master Redis Cluster of real server processes."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import grpc
import numpy as np
import pytest
import redis
from conftest import Service

from embedq.embedded import find_redis_binary
from embedq.keys import Keys
from embedq.v1 import embedq_pb2 as pb
from embedq.v1 import embedq_pb2_grpc

SLOTS = 16384


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    rng = random.Random()
    while True:
        port = rng.randint(20000, 45000)
        if all(_bindable(p) for p in (port, port + 10000)):
            return port


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class LocalCluster:
    """Three cluster-enabled masters on loopback, slots split evenly."""

    def __init__(self, masters: int = 3) -> None:
        self.binary = find_redis_binary()
        self.ports = [cluster_port() for _ in range(masters)]
        self.dir = tempfile.mkdtemp(prefix="embedq-cluster-")
        self.procs: dict[int, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}"

    def start(self) -> LocalCluster:
        for port in self.ports:
            self.procs[port] = subprocess.Popen(
                [
                    self.binary,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    self.dir,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    f"nodes-{port}.conf",
                    "--cluster-node-timeout",
                    "2000",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        clients = [self._wait(port) for port in self.ports]
        share = SLOTS // len(self.ports)
        for index, client in enumerate(clients):
            last = SLOTS - 1 if index == len(clients) - 1 else (index + 1) * share - 1
            client.execute_command("CLUSTER ADDSLOTSRANGE", index * share, last)
        for port in self.ports[1:]:
            clients[0].execute_command("CLUSTER MEET", "127.0.0.1", port)
        deadline = time.monotonic() + 30
        while not all(c.cluster("info")["cluster_state"] == "ok" for c in clients):
            assert time.monotonic() < deadline, "cluster did not form"
            time.sleep(0.2)
        return self

    def _wait(self, port: int) -> redis.Redis:
        client = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                return client
            except redis.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.05)

    def kill(self, port: int) -> None:
        self.procs[port].kill()
        self.procs[port].wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster_service():
    cluster = LocalCluster().start()
    svc = Service(cluster.url, namespace="cluster")
    try:
        svc.start_worker()
        svc.start_server()
        yield cluster, svc
    finally:
        svc.stop()
        cluster.stop()


def test_core_cases_on_a_cluster(cluster_service, reference_model):
    cluster, svc = cluster_service
    texts = [f"cluster sentence {i}" for i in range(120)]
    with grpc.insecure_channel(svc.target) as channel:
        stub = embedq_pb2_grpc.EmbedderStub(channel)
        first = stub.Encode(pb.EncodeRequest(texts=texts), timeout=120)
        got = np.frombuffer(first.embeddings, "<f4").reshape(first.count, first.dimension)
        assert np.abs(got - reference_model.encode(texts)).max() <= 1e-5
        second = stub.Encode(pb.EncodeRequest(texts=texts), timeout=60)
        assert all(second.cached) and second.embeddings == first.embeddings
        lookup = stub.Lookup(pb.LookupRequest(texts=texts[:5] + ["never"]), timeout=30)
        assert list(lookup.found) == [True] * 5 + [False]
        messages = (pb.EncodeStreamRequest(id=str(i), texts=[f"stream {i}"]) for i in range(40))
        ids = [r.id for r in stub.EncodeStream(messages, timeout=60)]
        assert sorted(ids, key=int) == [str(i) for i in range(40)]
    # The cache really spreads over the masters (no hash tag on cache keys).
    holders = [redis.Redis(port=port).dbsize() for port in cluster.ports]
    assert sum(1 for count in holders if count > 0) == len(cluster.ports)
    keys = Keys("cluster")
    assert "{" in keys.jobs("m") and "{" not in keys.cache("v", "h")


def test_a_master_down_is_a_clear_unavailable(cluster_service):
    """No replicas here: keys in the dead master's slots fail fast with UNAVAILABLE."""
    cluster, svc = cluster_service
    cluster.kill(cluster.ports[-1])
    outcomes: list[str] = []

    def call(i: int) -> None:
        try:
            texts = [f"after the master died {i} {j}" for j in range(30)]
            stub.Encode(pb.EncodeRequest(texts=texts), timeout=20)
            outcomes.append("OK")
        except grpc.RpcError as exc:
            outcomes.append(f"{exc.code().name}: {exc.details()}")

    with grpc.insecure_channel(svc.target) as channel:
        stub = embedq_pb2_grpc.EmbedderStub(channel)
        threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=40)
    assert len(outcomes) == 4
    failures = [o for o in outcomes if o != "OK"]
    assert failures, outcomes  # 30 random keys each: some land on the dead master
    assert all(o.startswith("UNAVAILABLE: redis unavailable") for o in failures), failures
