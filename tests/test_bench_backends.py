"""The benchmark-only backends (bench-zero, bench-sim): no model, deterministic hashed vectors
of the model's shape, refused unless allowed, their own fingerprints, and real worker processes
serving them."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from conftest import new_service  # noqa: E402
from embedq.workers.backends import (  # noqa: E402
    BENCH_BACKENDS,
    BackendUnavailableError,
    PooledEncoder,
    check_backend,
)
from embedq.workers.backends.simulated import SimCost, hashed_vectors, vector_table  # noqa: E402

from embedq.v1 import embedq_pb2 as pb  # noqa: E402
from embedq.v1 import embedq_pb2_grpc  # noqa: E402

TEXTS = ["A man is playing a guitar.", "Two dogs run in the park.", "", "東京 🙂", "x " * 400]


@pytest.fixture(scope="module")
def bench_zero() -> PooledEncoder:
    return PooledEncoder.load(None, backend="bench-zero", allow_bench=True)


def test_vectors_deterministic_and_shaped(bench_zero: PooledEncoder) -> None:
    spec = bench_zero.spec
    assert (spec.name, spec.dimension, spec.backend) == ("all-MiniLM-L6-v2", 384, "bench-zero")
    assert spec.source.startswith("bench-zero:")
    vectors = bench_zero.encode(TEXTS)
    assert vectors.shape == (len(TEXTS), 384) and vectors.dtype == np.float32
    assert vectors.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)  # normalises
    assert len({row.tobytes() for row in vectors}) == len(TEXTS)
    again = PooledEncoder.load(None, backend="bench-zero", allow_bench=True)
    np.testing.assert_array_equal(again.encode(TEXTS), vectors)  # another load, same vectors
    alone = bench_zero.encode(TEXTS[:1])
    np.testing.assert_array_equal(alone[0], vectors[0])  # independent of the batch
    raw = bench_zero.encode(TEXTS, normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    assert bench_zero.embed([]).shape == (0, 384)


def test_vector_table_is_fixed() -> None:
    table = vector_table(8, rows=4)
    assert table.dtype == np.float32 and table.min() >= -1 and table.max() < 1
    np.testing.assert_array_equal(table, vector_table(8, rows=4))
    rows = hashed_vectors([[101, 7, 102], [101, 8, 102]], vector_table(16), unit=True)
    assert rows.shape == (2, 16) and not np.array_equal(rows[0], rows[1])


def test_tokenizes_like_the_real_model(bench_zero: PooledEncoder) -> None:
    from embedq.workers.backends import resolve_model_source
    from transformers import AutoTokenizer

    _, folder = resolve_model_source(None)
    reference = AutoTokenizer.from_pretrained(folder)(TEXTS, truncation=True, max_length=256)
    assert [t.ids for t in bench_zero.tokenize(TEXTS)] == reference["input_ids"]


def test_refused_unless_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMBEDQ_ALLOW_BENCH_BACKEND", raising=False)
    for backend in BENCH_BACKENDS:
        with pytest.raises(BackendUnavailableError, match="for benchmarks only"):
            PooledEncoder.load(None, backend=backend)
        with pytest.raises(BackendUnavailableError, match="--allow-bench-backend"):
            check_backend(backend)
        check_backend(backend, "cuda:0", allow_bench=True)  # runs nothing on a device
    monkeypatch.setenv("EMBEDQ_ALLOW_BENCH_BACKEND", "1")
    check_backend("bench-sim")
    with pytest.raises(BackendUnavailableError):
        check_backend("bench-sim", allow_bench=False)  # an explicit no wins


def test_worker_cli_refuses_without_flag() -> None:
    env = {k: v for k, v in os.environ.items() if k != "EMBEDQ_ALLOW_BENCH_BACKEND"}
    argv = [sys.executable, "-m", "embedq.cli", "worker", "--redis-url", "redis://127.0.0.1:9"]
    for backend in BENCH_BACKENDS:
        done = subprocess.run(
            [*argv, "--backend", backend], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "for benchmarks only" in lines[0], done.stderr


def test_fingerprints_differ(bench_zero: PooledEncoder) -> None:
    torch_fp = PooledEncoder.load(None).spec.fingerprint
    sim = PooledEncoder.load(None, backend="bench-sim", allow_bench=True)
    assert len({torch_fp, bench_zero.spec.fingerprint, sim.spec.fingerprint}) == 3


def test_sim_sleeps_its_cost() -> None:
    cost = SimCost(forward_ms=20.0, token_us=100.0)
    assert cost.seconds([[1, 2, 3], [1] * 10]) == pytest.approx(0.020 + 2 * 10 * 100e-6)
    from embedq.workers.backends.simulated import load_bench_encoder

    sim = load_bench_encoder(None, "bench-sim", cost=cost)
    ids = [t.ids for t in sim.tokenize(TEXTS[:2])]
    started = time.perf_counter()
    vectors = sim.embed(ids)
    assert time.perf_counter() - started >= cost.seconds(ids) * 0.95  # a sleep, not compute
    zero = load_bench_encoder(None, "bench-zero")
    np.testing.assert_array_equal(vectors, zero.embed(ids))  # the same vectors as bench-zero


def test_workers_serve_bench_backends(redis_server, bench_zero: PooledEncoder) -> None:
    """Real worker processes (bench-zero and bench-sim on one model) behind a real server:
    the vectors are the hashed ones, Info names the backend, cache keys are their own."""
    service = new_service(redis_server, "--backend", "bench-zero", "--allow-bench-backend")
    try:
        with grpc.insecure_channel(service.target) as channel:
            stub = embedq_pb2_grpc.EmbedderStub(channel)
            (model,) = stub.Info(pb.InfoRequest(), timeout=10).models
            assert model.source.startswith("bench-zero:")
            assert model.fingerprint == bench_zero.spec.fingerprint
            reply = stub.Encode(pb.EncodeRequest(texts=TEXTS), timeout=60)
            got = np.frombuffer(reply.embeddings, dtype="<f4").reshape(reply.count, -1)
            np.testing.assert_array_equal(got, bench_zero.encode(TEXTS))
            assert not any(reply.cached)
            again = stub.Encode(pb.EncodeRequest(texts=TEXTS), timeout=60)
            assert all(again.cached)
        service.stop_workers()
        service.start_worker(
            "--backend", "bench-sim", "--allow-bench-backend", "--sim-forward-ms", "1"
        )
        with grpc.insecure_channel(service.target) as channel:
            stub = embedq_pb2_grpc.EmbedderStub(channel)
            model = wait_for_source(stub, "bench-sim:")
            assert model.fingerprint != bench_zero.spec.fingerprint
            reply = stub.Encode(pb.EncodeRequest(texts=TEXTS), timeout=60)
            assert not any(reply.cached)  # bench-zero's cached vectors are not bench-sim's
            got = np.frombuffer(reply.embeddings, dtype="<f4").reshape(reply.count, -1)
            np.testing.assert_array_equal(got, bench_zero.encode(TEXTS))
    finally:
        service.stop()


def wait_for_source(stub, prefix: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        (model,) = stub.Info(pb.InfoRequest(), timeout=10).models
        if model.source.startswith(prefix) and model.workers_alive:
            return model
        assert time.monotonic() < deadline, model
        time.sleep(0.2)
