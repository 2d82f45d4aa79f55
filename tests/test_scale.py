"""Scale-out on one machine: several servers and workers on one Redis.

Two stateless servers and three workers share one Redis and one namespace;
a client spreads Encode requests and EncodeStreams over both servers. Every
text must come back exactly once with the reference vector, and the work must
really be spread over the workers (each worker's own Prometheus counters say
how many texts it encoded; XINFO CONSUMERS lists every worker in the group).
Then a worker joins while requests are in flight: nothing is lost or doubled.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.request
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import redis
from conftest import Service
from embedq.apps.embedded import free_port
from embedq.tools.bench import generated_texts

from embedq.keys import CONSUMER_GROUP, Keys
from embedq.v1 import embedq_pb2 as pb
from embedq.v1 import embedq_pb2_grpc

TOLERANCE = 1e-5
CHUNK = 24


def rows(response) -> np.ndarray:
    assert response.dtype == pb.DTYPE_FLOAT32
    return np.frombuffer(response.embeddings, dtype="<f4").reshape(
        response.count, response.dimension
    )


def unique_texts(count: int, tag: str) -> list[str]:
    """STS-like sentences, all distinct, none cached by another test."""
    return [f"{text} [{tag}]" for text in generated_texts(count)]


def texts_encoded(metrics_port: int) -> float:
    """Texts this worker ran through its encoder (its own /metrics)."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = response.read().decode()
    match = re.search(r"^embedq_worker_batch_texts_sum (\S+)$", body, re.MULTILINE)
    assert match, body[:2000]
    return float(match.group(1))


def settled_consumers(redis_url: str, namespace: str, model: str) -> list[dict]:
    """XINFO CONSUMERS of the model's job stream once nothing is pending (a worker
    acknowledges in the same pipeline as its reply, a moment after it)."""
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 10
    while True:
        group = client.xinfo_consumers(Keys(namespace).jobs(model), CONSUMER_GROUP)
        if all(c["pending"] == 0 for c in group) or time.monotonic() > deadline:
            return group
        time.sleep(0.1)


class Client:
    """Sends texts over several servers and records every answer it gets."""

    def __init__(self, targets: list[str]) -> None:
        self.channels = [grpc.insecure_channel(target) for target in targets]
        self.stubs = [embedq_pb2_grpc.EmbedderStub(channel) for channel in self.channels]
        self.lock = threading.Lock()
        # text -> every vector received for it (exactly one expected)
        self.received: dict[str, list[np.ndarray]] = {}

    def close(self) -> None:
        for channel in self.channels:
            channel.close()

    def _record(self, texts: list[str], vectors: np.ndarray) -> None:
        assert vectors.shape[0] == len(texts)
        with self.lock:
            for text, vector in zip(texts, vectors, strict=True):
                self.received.setdefault(text, []).append(vector.copy())

    def encode(self, texts: list[str], first_server: int = 0) -> None:
        """Requests of CHUNK texts, alternating over the servers, 4 in flight."""
        chunks = [texts[i : i + CHUNK] for i in range(0, len(texts), CHUNK)]

        def one(index: int) -> None:
            stub = self.stubs[(first_server + index) % len(self.stubs)]
            response = stub.Encode(pb.EncodeRequest(texts=chunks[index]), timeout=180)
            assert response.count == len(chunks[index])
            self._record(chunks[index], rows(response))

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(one, range(len(chunks))))

    def stream(self, texts: list[str], server: int) -> None:
        """One EncodeStream, one text per message; every id answered once."""
        by_id = {f"m{i}": text for i, text in enumerate(texts)}
        requests = (pb.EncodeStreamRequest(id=i, texts=[t]) for i, t in by_id.items())
        stub = self.stubs[server % len(self.stubs)]
        answered = Counter()
        for response in stub.EncodeStream(requests, timeout=180):
            assert not response.HasField("error"), response.error.message
            answered[response.id] += 1
            self._record([by_id[response.id]], rows(response))
        assert answered == Counter(dict.fromkeys(by_id, 1))

    def check(self, texts: list[str], reference_model) -> None:
        """Every text answered exactly once, with the reference vector."""
        assert set(self.received) == set(texts)
        doubled = [text for text, got in self.received.items() if len(got) != 1]
        assert not doubled, f"{len(doubled)} texts answered more than once"
        got = np.stack([self.received[text][0] for text in texts])
        expected = reference_model.encode(texts, batch_size=64, convert_to_numpy=True)
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= TOLERANCE


def run_concurrently(*jobs) -> None:
    """Run callables in threads; re-raise the first failure."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result()


@pytest.fixture(scope="module")
def fleet(redis_server):
    """Two servers and three workers (each with a metrics port) in one namespace."""
    namespace = f"scale{uuid.uuid4().hex[:8]}"
    front = Service(redis_server.url, namespace)  # server 1, and the workers
    back = Service(redis_server.url, namespace)  # server 2, same Redis and namespace
    ports: list[int] = []
    try:
        while len(ports) < 3:  # distinct: the workers bind them at once
            if (port := free_port()) not in ports:
                ports.append(port)
        front.start_workers(*[["--metrics-port", str(port)] for port in ports])
        front.start_server()
        back.start_server()
        yield front, back, ports
    finally:
        back.stop()
        front.stop()


def test_two_servers_three_workers_every_text_once(fleet, reference_model):
    front, back, ports = fleet
    texts = unique_texts(600, uuid.uuid4().hex[:6])
    batch, streamed = texts[:480], texts[480:]
    client = Client([front.target, back.target])
    try:
        run_concurrently(
            lambda: client.encode(batch[:240], first_server=0),
            lambda: client.encode(batch[240:], first_server=1),
            *(lambda i=i: client.stream(streamed[i::4], server=i) for i in range(4)),
        )
        client.check(texts, reference_model)
        model = client.stubs[0].Info(pb.InfoRequest(), timeout=10).models[0]
    finally:
        client.close()
    assert model.workers_alive == 3

    # Every worker joined the one consumer group of the model's job stream...
    group = settled_consumers(front.redis_url, front.namespace, model.name)
    assert len(group) == 3, group
    assert all(c["pending"] == 0 for c in group), group  # ...and acknowledged all it took.
    # ...and more than one of them did the work (each worker's own count).
    per_worker = [texts_encoded(port) for port in ports]
    print(f"texts encoded per worker: {per_worker}")
    assert sum(count > 0 for count in per_worker) >= 2, per_worker
    # Every distinct text was encoded (a redelivery after a stall may add some).
    assert sum(per_worker) >= len(texts), per_worker


def test_worker_added_mid_run(redis_server, reference_model):
    service = Service(redis_server.url, f"grow{uuid.uuid4().hex[:8]}")
    try:
        ports = [free_port(), free_port()]
        service.start_worker("--metrics-port", str(ports[0]))
        service.start_server()
        texts = unique_texts(240, uuid.uuid4().hex[:6])
        first, second = texts[:120], texts[120:]
        client = Client([service.target])
        try:
            # The first half goes out with one worker; a second worker is
            # started (and registers) while it is in flight; then the rest.
            def first_half() -> None:
                run_concurrently(
                    lambda: client.encode(first[:96]),
                    lambda: client.stream(first[96:], server=0),
                )

            sender = ThreadPoolExecutor(1)
            pending = sender.submit(first_half)
            service.start_worker("--metrics-port", str(ports[1]))
            run_concurrently(
                lambda: client.encode(second[:96]),
                lambda: client.stream(second[96:], server=0),
            )
            pending.result(timeout=180)
            sender.shutdown()
            client.check(texts, reference_model)
            model = client.stubs[0].Info(pb.InfoRequest(), timeout=10).models[0]
        finally:
            client.close()
        assert model.workers_alive == 2
        group = settled_consumers(service.redis_url, service.namespace, model.name)
        assert all(c["pending"] == 0 for c in group), group
        # Which worker took what depends on timing: reported, not asserted.
        per_worker = [texts_encoded(port) for port in ports]
        print(f"texts encoded, first worker and the one added: {per_worker}")
        assert sum(per_worker) >= len(texts), per_worker
    finally:
        service.stop()
