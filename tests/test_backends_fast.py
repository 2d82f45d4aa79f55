"""The opt-in CPU backends (torch-int8, onnx, onnx-int8) against sentence-transformers.

int8 is not exact: per text, cosine to the float32 vector is ~0.993 (median) with 8-bit
activations; odd texts ("", "?", emoji only) are the worst, ~0.97. Their STS-B cost is measured
by scripts/stsb_eval.py, not here. onnx (float32) matches to float rounding.
"""

from __future__ import annotations

import importlib.util
import os
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from conftest import Service  # noqa: E402
from embedq.workers import cli as worker_cli  # noqa: E402
from embedq.workers.backends import (  # noqa: E402
    BACKENDS,
    BackendUnavailableError,
    PooledEncoder,
    check_backend,
    quantized,
)
from texts import varied_texts  # noqa: E402

from embedq.cli import main  # noqa: E402
from embedq.v1 import embedq_pb2 as pb  # noqa: E402
from embedq.v1 import embedq_pb2_grpc  # noqa: E402

FAST = ["onnx", "onnx-int8"]
if quantized.unsupported_reason() is None:  # else refused: test_torch_int8_refused_without_vnni
    FAST.insert(0, "torch-int8")
TEXTS = varied_texts(50, seed=11)  # odd short texts, truncated long ones, CJK, emoji


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """A private ONNX cache: exported here once, then reused by the worker processes."""
    path = tmp_path_factory.mktemp("embedq-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMBEDQ_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def expected(reference_model) -> np.ndarray:
    return reference_model.encode(TEXTS, batch_size=64, convert_to_numpy=True)


@pytest.fixture(scope="module")
def torch_fingerprint() -> str:
    return PooledEncoder.load(None).spec.fingerprint


@pytest.fixture(scope="module")
def encoders(cache_dir: Path) -> dict[str, PooledEncoder]:
    return {backend: PooledEncoder.load(None, backend=backend) for backend in FAST}


def cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    return (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)


def check_close(backend: str, got: np.ndarray, want: np.ndarray) -> None:
    cos = cosines(got, want)
    worst = (float(cos.min()), TEXTS[int(cos.argmin())])
    if backend == "onnx":
        assert cos.min() > 0.99999 and np.abs(got - want).max() < 1e-4, worst
    else:  # measured: median 0.993, min 0.967
        assert np.median(cos) >= 0.99 and cos.min() >= 0.95, worst


def test_backend_names_and_refusals() -> None:
    assert worker_cli.BACKEND_CHOICES == BACKENDS
    with pytest.raises(BackendUnavailableError, match="unknown backend 'int4'"):
        check_backend("int4")
    with pytest.raises(BackendUnavailableError, match="CPU only"):
        check_backend("onnx-int8", "cuda:0")


@pytest.mark.parametrize("backend", FAST)
def test_vectors_close_to_sentence_transformers(
    backend: str, encoders: dict[str, PooledEncoder], expected: np.ndarray, cache_dir: Path
) -> None:
    encoder = encoders[backend]
    assert encoder.spec.backend == backend
    check_close(backend, encoder.encode(TEXTS), expected)
    if backend.startswith("onnx"):  # exported once, into the cache folder
        assert (cache_dir / "onnx" / encoder.spec.fingerprint / "model.onnx").is_file()


def test_fingerprints_all_differ(encoders: dict[str, PooledEncoder], torch_fingerprint: str):
    fingerprints = {torch_fingerprint, *(encoder.spec.fingerprint for encoder in encoders.values())}
    assert len(fingerprints) == 1 + len(FAST)


def test_torch_int8_refused_without_vnni(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's 7-bit fallback loses 0.9 STS-B points: refused, before any weights load."""
    monkeypatch.setattr(quantized, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    with pytest.raises(BackendUnavailableError, match="neither AVX512-VNNI nor AMX"):
        PooledEncoder.load(None, backend="torch-int8")


def test_workers_with_backends_end_to_end(
    redis_server, bundled_model_path: Path, encoders: dict[str, PooledEncoder], expected
) -> None:
    """One worker per backend, each serving the bundled model under the backend's name."""
    service = Service(redis_server.url, namespace=f"fast{uuid.uuid4().hex[:8]}")
    try:
        for backend in FAST:  # start_worker returns once any model has a worker: all load at once
            model = f"{backend}={bundled_model_path}"
            service.start_worker("--devices", "cpu", "--model", model, "--backend", backend)
        service.start_server()
        with grpc.insecure_channel(service.target) as channel:
            stub = embedq_pb2_grpc.EmbedderStub(channel)
            served = wait_for_models(stub, set(FAST))
            for backend in FAST:
                assert served[backend].fingerprint == encoders[backend].spec.fingerprint
                options = pb.EncodeOptions(model=backend)
                reply = stub.Encode(pb.EncodeRequest(texts=TEXTS, options=options), timeout=60)
                got = np.frombuffer(reply.embeddings, dtype="<f4").reshape(reply.count, -1)
                check_close(backend, got, expected)
    finally:
        service.stop()


def wait_for_models(stub, names: set[str], timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        models = {m.name: m for m in stub.Info(pb.InfoRequest(), timeout=10).models}
        if all(name in models and models[name].workers_alive for name in names):
            return models
        assert time.monotonic() < deadline, f"workers not up: {sorted(models)}"
        time.sleep(0.2)


def test_missing_package_fails_at_worker_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], redis_server
) -> None:
    """Without onnxruntime the worker exits 2 before loading anything, naming the package."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name)
    )
    argv = ["worker", "--redis-url", redis_server.url, "--devices", "cpu", "--backend", "onnx"]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "pip install onnxruntime" in error and "embedq[fast]" in error
