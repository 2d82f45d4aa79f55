"""The Python client library and the client CLI, against a real running embedq
(the session `service`: real Redis, real worker, bundled all-MiniLM-L6-v2),
compared with sentence-transformers itself."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pickle
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from conftest import Service
from embedq.client import (
    AsyncClient,
    Client,
    EmbedqError,
    LookupResult,
    RetryPolicy,
    text_sha256,
)
from embedq.client._retry import MIN_ATTEMPT_S, NO_RETRY, retry_after, retryable
from sentence_transformers.util.quantization import quantize_embeddings

from embedq.keys import Keys
from embedq.keys import texts_sha256 as server_hashes

ATOL = 1e-5
DIM = 384
TOPICS = ["cats", "the stock market", "rain in Paris", "quantum physics", "football", "jazz"]
TEXTS = [f"Sentence {i} is about {TOPICS[i % len(TOPICS)]}." for i in range(50)]
CANDIDATES = [
    "A cat sleeps on the sofa.",
    "Shares fell sharply on Wall Street.",
    "Kittens love to play with yarn.",
    "The orchestra played a symphony.",
    "My dog chases its tail.",
]
LONG_TEXT = "word " * 400  # far past the model's 256-token limit


def fresh(text: str) -> str:
    """A text no other test has sent, so the cache cannot have it yet."""
    return f"{text} [{uuid.uuid4().hex}]"


@pytest.fixture(scope="module")
def client(service) -> Iterator[Client]:
    with Client(service.target, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def reference(reference_model):
    def encode(texts: list[str]) -> np.ndarray:
        return reference_model.encode(texts, convert_to_numpy=True, batch_size=64)

    return encode


@pytest.fixture(scope="module")
def reference_texts(reference) -> np.ndarray:
    return reference(TEXTS)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---- encode -------------------------------------------------------------------


def test_encode_single_text_is_one_vector(client: Client, reference) -> None:
    vector = client.encode("A single sentence.")
    assert vector.shape == (DIM,)
    assert vector.dtype == np.float32
    np.testing.assert_allclose(vector, reference(["A single sentence."])[0], atol=ATOL)


def test_encode_batch_matches_reference(client: Client, reference_texts: np.ndarray) -> None:
    vectors = client.encode(TEXTS[:5])
    assert vectors.shape == (5, DIM)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, reference_texts[:5], atol=ATOL)
    vectors[0, 0] = 1.0  # callers own (may write to) the array


def test_encode_chunked_keeps_order(service, reference_texts: np.ndarray) -> None:
    with Client(service.target, timeout=120, chunk_size=7, max_in_flight=3) as small:
        vectors = small.encode(TEXTS)
    assert vectors.shape == (50, DIM)
    np.testing.assert_allclose(vectors, reference_texts, atol=ATOL)


def test_encode_without_normalisation_keeps_direction(client: Client, reference) -> None:
    texts = [fresh("Unnormalised vectors"), "A second, much longer sentence about the weather."]
    raw = client.encode(texts, normalize=False)
    norms = np.linalg.norm(raw, axis=1)
    assert not np.allclose(norms, 1.0, atol=1e-3)
    np.testing.assert_allclose(raw / norms[:, None], reference(texts), atol=ATOL)


def test_encode_empty_input_is_invalid_argument(client: Client) -> None:
    with pytest.raises(EmbedqError) as caught:
        client.encode([])
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details


def test_encode_reject_over_long_text(client: Client) -> None:
    with pytest.raises(EmbedqError) as caught:
        client.encode(["short", LONG_TEXT], truncate=False)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(caught.value).startswith("INVALID_ARGUMENT: ")


def test_unknown_model_is_not_found(client: Client) -> None:
    with pytest.raises(EmbedqError) as caught:
        client.encode(["hello"], model="no-such-model")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


# ---- encode_stream ------------------------------------------------------------


def test_encode_stream_answers_every_id_once(client: Client, reference_texts) -> None:
    results = list(client.encode_stream(iter(TEXTS[:20])))
    ids = [message_id for message_id, _ in results]
    assert sorted(ids, key=int) == [str(i) for i in range(20)]
    for message_id, vector in results:
        np.testing.assert_allclose(vector, reference_texts[int(message_id)], atol=ATOL)


def test_encode_stream_uses_given_ids(client: Client, reference_texts) -> None:
    ids = [f"event-{i}" for i in range(6)]
    results = dict(client.encode_stream(TEXTS[:6], ids=ids))
    assert sorted(results) == sorted(ids)
    np.testing.assert_allclose(results["event-3"], reference_texts[3], atol=ATOL)


def test_encode_stream_failed_message_yields_or_raises(client: Client) -> None:
    texts = ["fine", LONG_TEXT, "also fine"]
    results = dict(client.encode_stream(texts, truncate=False, on_error="yield"))
    assert sorted(results) == ["0", "1", "2"]
    assert isinstance(results["1"], EmbedqError)
    assert results["1"].code == grpc.StatusCode.INVALID_ARGUMENT
    assert results["1"].id == "1"
    assert results["0"].shape == (DIM,)

    with pytest.raises(EmbedqError) as caught:
        list(client.encode_stream([LONG_TEXT], ids=["bad"], truncate=False))
    assert caught.value.id == "bad"


def test_encode_stream_reports_the_callers_own_errors(client: Client) -> None:
    # Raised inside grpc's request reader, yet surfaced as themselves.
    with pytest.raises(ValueError, match="fewer ids"):
        list(client.encode_stream(["a", "b"], ids=["only-one"]))
    with pytest.raises(TypeError):
        list(client.encode_stream(["a", b"bytes"]))


# ---- similarity / rank --------------------------------------------------------


def test_similarity_matches_numpy_cosine(client: Client, reference) -> None:
    a, b = "A man is eating food.", "Someone is having a meal."
    va, vb = reference([a, b])
    assert client.similarity(a, b) == pytest.approx(cosine(va, vb), abs=ATOL)


def test_similarity_pairs_all_metrics(client: Client, reference) -> None:
    pairs = [("The cat sits.", "A cat is sitting."), ("Stocks rose.", "I like jazz.")]
    left = reference([a for a, _ in pairs])
    right = reference([b for _, b in pairs])
    expected = {
        "cosine": [cosine(x, y) for x, y in zip(left, right, strict=True)],
        "dot": np.sum(left * right, axis=1),
        "euclidean": -np.linalg.norm(left - right, axis=1),
        "manhattan": -np.sum(np.abs(left - right), axis=1),
    }
    for metric, want in expected.items():
        got = client.similarity_pairs(pairs, metric=metric)
        assert got.shape == (2,)
        np.testing.assert_allclose(got, want, atol=1e-4, err_msg=metric)
    assert expected["cosine"][0] > expected["cosine"][1]


def test_unknown_metric_is_value_error(client: Client) -> None:
    with pytest.raises(ValueError, match="metric"):
        client.similarity("a", "b", metric="jaccard")


def test_rank_orders_and_cuts_top_k(service, client: Client, reference) -> None:
    query = "pet cats"
    vectors = reference([query, *CANDIDATES])
    scores = [cosine(vectors[0], v) for v in vectors[1:]]
    order = list(np.argsort(scores)[::-1])

    ranked = client.rank(query, CANDIDATES)
    assert [i for i, _ in ranked] == order
    np.testing.assert_allclose([s for _, s in ranked], sorted(scores, reverse=True), atol=ATOL)
    assert client.rank(query, CANDIDATES, top_k=2) == ranked[:2]

    # Split over several requests (a cap below the server's), the merged ranking is the same.
    with Client(service.target, timeout=120, max_candidates=2) as small:
        merged = small.rank(query, CANDIDATES, top_k=3)
    assert [i for i, _ in merged] == order[:3]


def test_rank_sends_up_to_max_candidates_in_one_request(service, client: Client) -> None:
    # More candidates than chunk_size - 1: the client asks Info once for
    # Limits.max_candidates and still sends a single request.
    with Client(service.target, timeout=120, chunk_size=3) as small:
        assert small.rank("pet cats", CANDIDATES, top_k=2) == client.rank(
            "pet cats", CANDIDATES, top_k=2
        )
        assert small._server_max_candidates == client.info().limits.max_candidates == 10_000


def test_rank_negative_top_k_is_invalid(client: Client) -> None:
    with pytest.raises(EmbedqError) as caught:
        client.rank("q", ["a", "b"], top_k=-1)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


# ---- per-request options: precision, dimension, prompts -----------------------


def fresh_batch(count: int, tag: str) -> list[str]:
    """Texts no other test sent: computed in one batch, as the reference computes them."""
    marker = uuid.uuid4().hex[:8]
    return [f"{tag} {marker}: {TEXTS[i]}" for i in range(count)]


@pytest.mark.parametrize("precision", ["binary", "ubinary", "int8", "uint8"])
def test_precision_equals_quantize_embeddings(client: Client, reference, precision: str) -> None:
    texts = fresh_batch(8, precision)
    got = client.encode(texts, precision=precision)
    expected = quantize_embeddings(reference(texts), precision)
    width = DIM // 8 if precision.endswith("binary") else DIM
    assert got.shape == (8, width) and got.dtype == expected.dtype
    assert got.tobytes() == np.ascontiguousarray(expected).tobytes()
    # One text: the same row of the same batch (binary has no calibration).
    if precision.endswith("binary"):
        single = client.encode(texts[3], precision=precision)
        assert single.shape == (width,) and single.tobytes() == expected[3].tobytes()


def test_float16_and_explicit_float32(client: Client, reference_texts: np.ndarray) -> None:
    half = client.encode(TEXTS[:6], precision="float16")
    assert half.dtype == np.float16 and half.shape == (6, DIM)
    np.testing.assert_allclose(half.astype(np.float32), reference_texts[:6], atol=1e-3)
    full = client.encode(TEXTS[:6], precision="FLOAT32")
    assert full.dtype == np.float32
    np.testing.assert_allclose(full, reference_texts[:6], atol=ATOL)


def test_int8_split_into_chunks_is_calibrated_once(service, client: Client) -> None:
    # Without ranges, int8 calibrates on all of the input's vectors, whatever the chunking.
    floats = client.encode(TEXTS)
    whole = client.encode(TEXTS, precision="int8")  # one request: the server calibrates
    with Client(service.target, timeout=120, chunk_size=7) as small:
        chunked = small.encode(TEXTS, precision="int8")  # 8 requests: calibrated here
        chunked_u8 = small.encode(TEXTS, precision="uint8")
    assert chunked.dtype == np.int8 and chunked.tobytes() == whole.tobytes()
    assert chunked.tobytes() == quantize_embeddings(floats, "int8").tobytes()
    assert chunked_u8.tobytes() == quantize_embeddings(floats, "uint8").tobytes()


def test_int8_with_ranges(service, client: Client) -> None:
    calibration = client.encode(TEXTS)
    ranges = np.vstack([calibration.min(axis=0), calibration.max(axis=0)])
    floats = client.encode(TEXTS[:3])
    expected = quantize_embeddings(floats, "int8", ranges=ranges)
    assert client.encode(TEXTS[:3], precision="int8", ranges=ranges).tobytes() == expected.tobytes()
    single = client.encode(TEXTS[1], precision="int8", ranges=ranges.ravel().tolist())
    assert single.tobytes() == expected[1].tobytes()
    with Client(service.target, timeout=120, chunk_size=2) as small:
        chunked = small.encode(TEXTS[:3], precision="int8", ranges=ranges)
    assert chunked.tobytes() == expected.tobytes()
    # One text and no ranges: nothing to calibrate on, the server refuses.
    with pytest.raises(EmbedqError) as caught:
        client.encode(["alone"], precision="int8")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_matryoshka_dimension(client: Client, reference_model) -> None:
    texts = TEXTS[:6]
    got = client.encode(texts, dimension=128)
    expected = reference_model.encode(texts, truncate_dim=128, normalize_embeddings=True)
    assert got.shape == (6, 128) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=ATOL)
    bits = client.encode(texts, dimension=64, precision="ubinary")
    assert bits.shape == (6, 8) and bits.dtype == np.uint8
    assert client.encode(texts[0], dimension=0).shape == (DIM,)
    with pytest.raises(EmbedqError) as caught:
        client.encode(["x"], dimension=DIM + 1)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_prompt(client: Client, reference_model) -> None:
    texts = TEXTS[:5]
    got = client.encode(texts, prompt="query: ")
    np.testing.assert_allclose(got, reference_model.encode(texts, prompt="query: "), atol=ATOL)
    # "" is an explicit empty prompt: the plain vectors for a model without a default.
    np.testing.assert_allclose(client.encode(texts, prompt=""), client.encode(texts), atol=ATOL)
    with pytest.raises(EmbedqError) as caught:
        client.encode(texts, prompt_name="no-such-prompt")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_similarity_and_rank_with_prompt_and_dimension(client: Client, reference_model) -> None:
    a, b = "A man is eating food.", "Someone is having a meal."
    va, vb = reference_model.encode([a, b], truncate_dim=64, normalize_embeddings=True)
    assert client.similarity(a, b, dimension=64) == pytest.approx(cosine(va, vb), abs=ATOL)
    qa, qb = reference_model.encode([a, b], prompt="query: ")
    score = client.similarity_pairs([(a, b)], prompt="query: ")[0]
    assert score == pytest.approx(cosine(qa, qb), abs=ATOL)
    vectors = reference_model.encode(["pet cats", *CANDIDATES], prompt="query: ")
    scores = [cosine(vectors[0], v) for v in vectors[1:]]
    ranked = client.rank("pet cats", CANDIDATES, prompt="query: ")
    assert [i for i, _ in ranked] == list(np.argsort(scores)[::-1])


def test_options_refused_by_the_client(client: Client) -> None:
    with pytest.raises(ValueError, match="precision"):
        client.encode(["a"], precision="int4")
    with pytest.raises(ValueError, match="not both"):
        client.encode(["a"], prompt="q: ", prompt_name="query")
    with pytest.raises(ValueError, match="ranges"):
        client.encode(["a"], ranges=np.zeros((2, DIM)))
    with pytest.raises(ValueError, match="dimension"):
        client.encode(["a"], dimension=-1)
    with pytest.raises(ValueError, match="ranges"):
        list(client.encode_stream(["a", "b"], precision="int8"))


def test_encode_stream_and_lookup_with_options(client: Client) -> None:
    texts = [fresh("streamed bits"), fresh("streamed bits, second")]
    bits = client.encode(texts, precision="ubinary", dimension=128)
    streamed = dict(client.encode_stream(texts, precision="ubinary", dimension=128))
    assert streamed["0"].dtype == np.uint8 and streamed["0"].shape == (16,)
    np.testing.assert_array_equal(np.stack([streamed["0"], streamed["1"]]), bits)

    missing = fresh("never encoded")
    found = client.lookup([*texts, missing], precision="ubinary", dimension=128)
    assert found.found.tolist() == [True, True, False]
    assert found.vectors.dtype == np.uint8 and found.vectors.shape == (3, 16)
    np.testing.assert_array_equal(found.hits, bits)
    assert not found.vectors[2].any()  # integer misses are zero rows
    half = client.lookup(texts, precision="float16", dimension=32)
    assert half.vectors.dtype == np.float16 and half.vectors.shape == (2, 32)
    # int8 over texts and hashes (two requests): calibrated once, on all the hits.
    floats = client.encode(texts)
    mixed = client.lookup([texts[0]], sha256=[text_sha256(texts[1])], precision="int8")
    assert mixed.vectors.tobytes() == quantize_embeddings(floats, "int8").tobytes()
    # Prompts select another cache variant.
    assert not client.lookup(texts, prompt="query: ").found.any()


def test_info_exposes_prompts_and_max_candidates(client: Client) -> None:
    info = client.info()
    model = info.model()
    assert model.prompts == {} and model.default_prompt_name == ""
    assert info.limits.max_candidates == 10_000
    assert info.to_dict()["limits"]["max_candidates"] == 10_000


# ---- lookup / hashes ----------------------------------------------------------


def test_text_sha256_is_the_utf8_digest() -> None:
    assert text_sha256("héllo") == hashlib.sha256("héllo".encode()).digest()
    assert len(text_sha256("")) == 32
    # No Unicode normalisation: composed and decomposed forms differ.
    assert text_sha256("\u00e9") != text_sha256("e\u0301")
    # The server's hashes (its cache keys) follow the same rule.
    texts = ["héllo", "", "\u00e9", "e\u0301"]
    assert server_hashes(texts) == [text_sha256(text).hex() for text in texts]


def test_lookup_finds_encoded_texts_by_text_and_hash(client: Client) -> None:
    texts = [fresh("cached one"), fresh("cached two")]
    missing = fresh("never encoded")
    assert not client.lookup(texts).found.any()
    vectors = client.encode(texts)

    by_text = client.lookup([*texts, missing])
    assert isinstance(by_text, LookupResult)
    assert by_text.found.tolist() == [True, True, False]
    np.testing.assert_allclose(by_text.vectors[:2], vectors, atol=ATOL)
    assert np.isnan(by_text.vectors[2]).all()
    np.testing.assert_allclose(by_text.hits, vectors, atol=ATOL)

    by_hash = client.lookup(sha256=[text_sha256(texts[1]), text_sha256(missing).hex()])
    assert by_hash.found.tolist() == [True, False]
    np.testing.assert_allclose(by_hash.vectors[0], vectors[1], atol=ATOL)

    # Texts come first, then hashes; the other variant is a separate cache entry.
    mixed = client.lookup([texts[0]], sha256=[text_sha256(texts[1])])
    np.testing.assert_allclose(mixed.vectors, vectors, atol=ATOL)
    assert not client.lookup(texts, normalize=False).found.any()


def test_lookup_bad_hash_is_invalid_argument(client: Client) -> None:
    with pytest.raises(EmbedqError) as caught:
        client.lookup(sha256=[b"too short"])
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


# ---- tokenize / info ----------------------------------------------------------


def test_tokenize_matches_model_tokenizer(client: Client, reference_model) -> None:
    (short,) = client.tokenize(["Hello embedq world"])
    want = reference_model.tokenizer("Hello embedq world")["input_ids"]
    assert short.ids == want
    assert short.tokens[0] == "[CLS]" and short.tokens[-1] == "[SEP]"
    assert len(short.tokens) == len(short.ids)
    assert not short.truncated and short.full_length == len(want)

    long = client.tokenize(LONG_TEXT)[0]
    assert long.truncated
    assert len(long.ids) == reference_model.max_seq_length
    assert long.full_length == 402  # 400 words + [CLS] + [SEP]


def test_info_describes_the_bundled_model(client: Client, reference_model) -> None:
    info = client.info()
    model = info.model()
    assert model.name == info.default_model
    assert model.dimension == DIM
    assert model.max_seq_length == reference_model.max_seq_length
    assert model.pooling == "mean"
    assert model.normalize is True
    assert model.workers_alive >= 1
    assert len(model.fingerprint) >= 16
    assert info.limits.max_batch_texts > 0 and info.limits.max_text_bytes > 0
    with pytest.raises(KeyError):
        info.model("no-such-model")


# ---- AsyncClient --------------------------------------------------------------


async def _async_texts(texts: list[str]) -> AsyncIterator[str]:
    for text in texts:
        await asyncio.sleep(0)
        yield text


def test_async_client(service, reference, reference_texts) -> None:
    async def scenario() -> None:
        async with AsyncClient(service.target, timeout=120, chunk_size=7) as aclient:
            vectors = await aclient.encode(TEXTS)
            np.testing.assert_allclose(vectors, reference_texts, atol=ATOL)
            single = await aclient.encode(TEXTS[4])
            np.testing.assert_allclose(single, reference_texts[4], atol=ATOL)

            streamed = [r async for r in aclient.encode_stream(_async_texts(TEXTS[:8]))]
            assert sorted(i for i, _ in streamed) == sorted(str(i) for i in range(8))
            for message_id, vector in streamed:
                np.testing.assert_allclose(vector, reference_texts[int(message_id)], atol=ATOL)
            lettered = aclient.encode_stream(TEXTS[:3], ids=["a", "b", "c"])
            from_list = dict([r async for r in lettered])
            assert sorted(from_list) == ["a", "b", "c"]

            va, vb = reference_texts[0], reference_texts[1]
            score = await aclient.similarity(TEXTS[0], TEXTS[1])
            assert score == pytest.approx(cosine(va, vb), abs=ATOL)
            assert len(await aclient.rank(TEXTS[0], TEXTS[1:6], top_k=2)) == 2
            assert (await aclient.lookup(TEXTS[:2])).found.all()
            assert (await aclient.tokenize(["hi"]))[0].tokens == ["[CLS]", "hi", "[SEP]"]
            assert (await aclient.info()).model().dimension == DIM

            bits = await aclient.encode(TEXTS[:3], precision="binary", dimension=64)
            assert bits.dtype == np.int8 and bits.shape == (3, 8)
            int8 = await aclient.encode(TEXTS, precision="int8")  # chunked: calibrated once
            assert int8.tobytes() == quantize_embeddings(vectors, "int8").tobytes()
            prompted = await aclient.encode(TEXTS[:2], prompt="query: ")
            assert not np.allclose(prompted, reference_texts[:2], atol=1e-3)
            ranked = await aclient.rank(TEXTS[0], TEXTS[1:20], top_k=3, dimension=128)
            assert len(ranked) == 3

            with pytest.raises(EmbedqError) as caught:
                await aclient.encode([])
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(scenario())


# ---- CLI ----------------------------------------------------------------------


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "EMBEDQ_LOG_LEVEL": "WARNING"}
    return subprocess.run(
        [sys.executable, "-m", "embedq.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def test_cli_encode_file_to_npy(service, tmp_path: Path, reference_texts) -> None:
    source = tmp_path / "texts.txt"
    # A lone "\r" is part of its line; only the line ending goes.
    lines = [*TEXTS[:9], "", "carriage\rreturn inside"]
    source.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    out = tmp_path / "vectors.npy"
    result = run_cli(
        "encode",
        "--target",
        service.target,
        "--input",
        str(source),
        "--output",
        str(out),
        "--batch-size",
        "4",
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress bar when stderr is not a terminal
    vectors = np.load(out)
    assert vectors.shape == (11, DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors[:9], reference_texts[:9], atol=ATOL)
    with Client(service.target) as c:
        np.testing.assert_allclose(vectors[9:], c.encode(lines[9:]), atol=ATOL)


def test_cli_encode_precision_dimension_prompt(service, tmp_path: Path, reference_model) -> None:
    source = tmp_path / "texts.txt"
    source.write_text("".join(f"{line}\n" for line in TEXTS[:10]), encoding="utf-8")
    target = ["--target", service.target, "--input", str(source)]
    with Client(service.target) as c:
        floats = c.encode(TEXTS[:10])
        bits = c.encode(TEXTS[:10], precision="ubinary")

    out = tmp_path / "bits.npy"
    result = run_cli("encode", *target, "--precision", "ubinary", "--output", str(out))
    assert result.returncode == 0, result.stderr
    got = np.load(out)
    assert got.dtype == np.uint8 and got.shape == (10, 48)
    np.testing.assert_array_equal(got, bits)

    # int8 over several batches: calibrated once over the whole file.
    out = tmp_path / "int8.npy"
    result = run_cli(
        "encode", *target, "--precision", "int8", "--batch-size", "3", "--output", str(out)
    )
    assert result.returncode == 0, result.stderr
    got = np.load(out)
    assert got.dtype == np.int8 and got.tobytes() == quantize_embeddings(floats, "int8").tobytes()

    out = tmp_path / "small.jsonl"
    result = run_cli(
        "encode", *target, "--dimension", "64", "--prompt", "query: ", "--output", str(out)
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    expected = reference_model.encode(
        TEXTS[:10], prompt="query: ", truncate_dim=64, normalize_embeddings=True
    )
    np.testing.assert_allclose([r["embedding"] for r in records], expected, atol=ATOL)

    result = run_cli("encode", *target, "--precision", "binary", "--dimension", "16")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line)["embedding"] for line in result.stdout.splitlines()]
    assert all(len(row) == 2 and all(isinstance(x, int) for x in row) for row in rows)

    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    out = tmp_path / "empty.npy"
    result = run_cli(
        "encode", "--target", service.target, "--input", str(empty), "--output", str(out),
        "--precision", "binary", "--dimension", "100",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    got = np.load(out)
    assert got.shape == (0, 13) and got.dtype == np.int8

    bad = run_cli("encode", *target, "--prompt", "q", "--prompt-name", "query")
    assert bad.returncode == 2 and "not allowed with" in bad.stderr


def test_cli_encode_stdin_to_jsonl_stdout(service, reference_texts) -> None:
    result = run_cli("encode", "--target", service.target, stdin="\n".join(TEXTS[:3]))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2]
    assert [r["text"] for r in records] == TEXTS[:3]
    np.testing.assert_allclose([r["embedding"] for r in records], reference_texts[:3], atol=ATOL)


def test_cli_encode_error_is_one_line(service, tmp_path: Path) -> None:
    source = tmp_path / "long.txt"
    source.write_text(LONG_TEXT + "\n", encoding="utf-8")
    out = tmp_path / "never.npy"
    result = run_cli(
        "encode",
        "--target",
        service.target,
        "--no-truncate",
        "--input",
        str(source),
        "--output",
        str(out),
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: INVALID_ARGUMENT: ")
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_cli_target_from_environment(service, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDQ_TARGET", service.target)
    result = run_cli("similarity", "--metric", "dot", "A cat.", "A cat.")
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) == pytest.approx(1.0, abs=1e-4)


def test_cli_similarity(service, reference) -> None:
    a, b = "A man is eating food.", "Someone is having a meal."
    result = run_cli("similarity", "--target", service.target, a, b)
    assert result.returncode == 0, result.stderr
    va, vb = reference([a, b])
    assert float(result.stdout) == pytest.approx(cosine(va, vb), abs=ATOL)


def test_cli_info_json(service) -> None:
    result = run_cli("info", "--target", service.target, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    default = next(m for m in info["models"] if m["name"] == info["default_model"])
    assert default["dimension"] == DIM
    assert default["workers_alive"] >= 1
    assert info["limits"]["max_batch_texts"] > 0

    text = run_cli("info", "--target", service.target)
    assert text.returncode == 0, text.stderr
    assert default["fingerprint"] in text.stdout and "max_batch_texts" in text.stdout


def test_cli_lookup_and_tokenize(service) -> None:
    text = fresh("cli lookup")
    with Client(service.target) as c:
        vector = c.encode(text)
    missing = text_sha256(fresh("missing")).hex()
    result = run_cli("lookup", "--target", service.target, text, "--sha256", missing)
    assert result.returncode == 0, result.stderr
    hit, miss = (json.loads(line) for line in result.stdout.splitlines())
    assert hit["found"] and hit["text"] == text
    np.testing.assert_allclose(hit["embedding"], vector, atol=ATOL)
    assert miss == {"index": 1, "sha256": missing, "found": False, "embedding": None}

    tokens = run_cli("tokenize", "--target", service.target, "--json", "hi there")
    assert tokens.returncode == 0, tokens.stderr
    assert json.loads(tokens.stdout)["tokens"] == ["[CLS]", "hi", "there", "[SEP]"]


def test_cli_unreachable_server_is_one_line_error() -> None:
    result = run_cli("info", "--target", "127.0.0.1:1", "--timeout", "2")
    assert result.returncode == 1
    assert result.stderr.startswith("error: UNAVAILABLE: ") or result.stderr.startswith(
        "error: DEADLINE_EXCEEDED: "
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["encode", "similarity", "rank", "info", "lookup", "tokenize"])
def test_cli_help(command: str) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert f"embedq {command}" in result.stdout
    assert "--target" in result.stdout


# ---- README console examples ---------------------------------------------------

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_console(command: str) -> list[tuple[list[str], str]]:
    """(argv after `embedq`, the output lines shown) of each `$ embedq COMMAND` line."""
    lines = README.read_text().splitlines()
    found = []
    for i, line in enumerate(lines):
        if not line.startswith(f"$ embedq {command} "):
            continue
        output = []
        for after in lines[i + 1 :]:
            if after.startswith(("$ ", "```")):
                break
            output.append(after)
        found.append((shlex.split(line[2:].split("  #")[0])[1:], "\n".join(output)))
    return found


@pytest.mark.parametrize("command", ["similarity", "rank"])
def test_readme_console_examples_print_what_the_cli_prints(service, command: str) -> None:
    examples = readme_console(command)
    assert examples, f"README shows no `$ embedq {command}` example"
    for argv, shown in examples:
        result = run_cli(*argv, "--target", service.target)
        assert result.returncode == 0, result.stderr
        assert result.stdout.rstrip("\n") == shown, (argv, result.stdout)


# ---- retries ----------------------------------------------------------------------


def test_a_stream_texts_own_time_limit_goes_out_in_milliseconds() -> None:
    from embedq.client import stream

    from embedq.v1 import embedq_pb2 as pb

    sent = list(stream.Feed(["a", "b"], None, pb.EncodeOptions(), message_timeout=0.25))
    assert [m.timeout_ms for m in sent] == [250, 250]
    assert list(stream.Feed(["a"], None, pb.EncodeOptions(), 0.0001))[0].timeout_ms == 1
    assert list(stream.Feed(["a"], None, pb.EncodeOptions()))[0].timeout_ms == 0  # none


def test_a_streamed_messages_refusal_keeps_its_retry_hint() -> None:
    """A message refused RESOURCE_EXHAUSTED in a stream carries its hint in `Error`; the
    client's error gives it as `retry_after`, as a whole call's (it was None)."""
    from embedq.client import stream

    from embedq.v1 import embedq_pb2 as pb

    refused = pb.Error(code=8, message="queue is full", retry_after_ms=1500)
    ident, error = stream.result(pb.EncodeStreamResponse(id="7", error=refused), "yield")
    assert ident == "7" and error.id == "7" and error.retry_after == 1.5 and error.retryable
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    plain = pb.EncodeStreamResponse(id="8", error=pb.Error(code=3, message="bad"))
    assert stream.result(plain, "yield")[1].retry_after is None


def test_embedq_error_is_a_grpc_rpc_error() -> None:
    error = EmbedqError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "queue is full",
        trailing_metadata=(("retry-after-ms", "1500"),),
    )
    assert isinstance(error, grpc.RpcError)
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == "queue is full"
    assert error.trailing_metadata() == (("retry-after-ms", "1500"),)
    # The attribute forms of 0.1 still work.
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.code.name == "RESOURCE_EXHAUSTED"
    assert "full" in error.details and error.details == "queue is full"
    assert error.retry_after == 1.5 and error.retryable and error.attempts == 1
    again = pickle.loads(pickle.dumps(error))
    assert (again.code(), again.details(), again.retry_after) == (error.code(), error.details, 1.5)
    # Over the message size limit: RESOURCE_EXHAUSTED too, but sending it again never fits.
    too_big = EmbedqError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "Sent message larger than max (9 vs. 4)"
    )
    assert not too_big.retryable


def test_errors_from_the_server_are_rpc_errors_with_metadata(client: Client) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        client.encode([])
    error = caught.value
    assert isinstance(error, EmbedqError)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details()
    assert isinstance(error.trailing_metadata(), tuple)
    assert not error.retryable and error.attempts == 1


@pytest.mark.parametrize(
    ("metadata", "seconds"),
    [
        ((("retry-after-ms", "250"),), 0.25),
        ((("Retry-After-Ms", b" 40 "),), 0.04),
        ((("other", "1"), ("retry-after-ms", "0")), 0.0),
        ((("retry-after-ms", "-5"),), None),
        ((("retry-after-ms", "1.5"),), None),
        ((("retry-after-ms", "soon"),), None),
        ((("retry-after-ms", str(10**12)),), None),  # absurd: not believed
        ((), None),
        (None, None),
    ],
)
def test_retry_after_hint_parsing(metadata, seconds) -> None:
    assert retry_after(metadata) == seconds


def test_backoff_schedule_and_jitter() -> None:
    policy = RetryPolicy()  # the documented default
    assert (policy.max_attempts, policy.initial_backoff, policy.multiplier) == (5, 0.2, 2.0)
    assert (policy.max_backoff, policy.jitter) == (5.0, 0.2)
    middle = [policy.backoff(n, rand=lambda: 0.5) for n in range(2, 10)]
    assert middle == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0])
    assert policy.backoff(3, rand=lambda: 0.0) == pytest.approx(0.4 * 0.8)
    assert policy.backoff(3, rand=lambda: 1.0) == pytest.approx(0.4 * 1.2)


def unavailable(hint_ms: str | None = None) -> EmbedqError:
    metadata = (("retry-after-ms", hint_ms),) if hint_ms is not None else ()
    return EmbedqError(grpc.StatusCode.UNAVAILABLE, "no worker alive", trailing_metadata=metadata)


def test_pause_honours_the_hint_the_deadline_and_max_attempts() -> None:
    policy = RetryPolicy(jitter=0.2)
    half = lambda: 0.5  # noqa: E731
    assert policy.pause(2, unavailable(), None, half) == pytest.approx(0.2)
    # The hint replaces the backoff; jitter only lengthens it.
    assert policy.pause(2, unavailable("3000"), None, lambda: 0.0) == pytest.approx(3.0)
    assert policy.pause(2, unavailable("3000"), None, half) == pytest.approx(3.3)
    # Never past the deadline: a pause that would end after it gives up at once.
    assert policy.pause(2, unavailable("3000"), 2.0, half) is None
    assert policy.pause(4, unavailable(), 0.5, half) is None
    assert policy.pause(4, unavailable(), 1.0, half) == pytest.approx(0.8)
    # Nor an attempt that would start less than MIN_ATTEMPT_S before it.
    assert policy.pause(4, unavailable(), 0.8 + MIN_ATTEMPT_S / 2, half) is None
    # At most max_attempts attempts in all.
    assert policy.pause(5, unavailable(), None, half) is not None
    assert policy.pause(6, unavailable(), None, half) is None
    assert NO_RETRY.pause(2, unavailable(), None, half) is None
    # Only UNAVAILABLE and RESOURCE_EXHAUSTED, never a client-side size error.
    for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED):
        assert policy.pause(2, EmbedqError(code, "x"), None, half) is None
    too_big = EmbedqError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max (9 vs. 4)"
    )
    assert not retryable(too_big)
    assert retryable(EmbedqError(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full"))


def test_retry_argument_is_checked() -> None:
    assert Client("127.0.0.1:1", retry=False).retry.max_attempts == 1
    assert Client("127.0.0.1:1").retry == RetryPolicy()
    custom = RetryPolicy(max_attempts=9, initial_backoff=0.05)
    assert Client("127.0.0.1:1", retry=custom).retry is custom
    with pytest.raises(TypeError):
        Client("127.0.0.1:1", retry=3)
    for bad in ({"max_attempts": 0}, {"multiplier": 0.5}, {"jitter": 2}, {"max_backoff": -1}):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)


PATIENT = RetryPolicy(max_attempts=1000, initial_backoff=0.05, max_backoff=0.5)


@pytest.fixture(scope="module")
def lonely(redis_server) -> Iterator:
    """A server with no worker yet, refusing new misses past 1 pending text."""
    svc = Service(redis_server.url, namespace=f"t{uuid.uuid4().hex[:8]}")
    old = os.environ.get("EMBEDQ_MAX_PENDING_TEXTS")
    os.environ["EMBEDQ_MAX_PENDING_TEXTS"] = "1"
    try:
        svc.start_server()
    finally:
        if old is None:
            del os.environ["EMBEDQ_MAX_PENDING_TEXTS"]
        else:
            os.environ["EMBEDQ_MAX_PENDING_TEXTS"] = old
    yield svc
    svc.stop()


def wait_queued(service: Service, jobs: int, timeout: float = 30.0) -> None:
    """Until the service's job stream holds `jobs` entries (its worker stopped)."""
    client = redis.Redis.from_url(service.redis_url)
    key = Keys(service.namespace).jobs("all-MiniLM-L6-v2")
    try:
        deadline = time.monotonic() + timeout
        while client.xlen(key) < jobs:
            assert time.monotonic() < deadline, f"{jobs} job(s) not queued in {timeout} s"
            time.sleep(0.05)
    finally:
        client.close()


def test_unavailable_is_retried_until_a_worker_comes(lonely) -> None:
    # Retries off: the first UNAVAILABLE raises at once.
    started = time.monotonic()
    with Client(lonely.target, timeout=30, retry=False) as c, pytest.raises(EmbedqError) as off:
        c.encode(fresh("no worker yet"))
    assert off.value.code() == grpc.StatusCode.UNAVAILABLE and off.value.attempts == 1
    assert time.monotonic() - started < 10  # at once, not after the 30 s deadline
    # The CLI alike, with --no-retry.
    cli = run_cli("similarity", "--target", lonely.target, "--no-retry", fresh("a"), fresh("b"))
    assert cli.returncode == 1 and cli.stderr.startswith("error: UNAVAILABLE: "), cli.stderr

    # Retries on, but a deadline too short: gives up no later than the deadline.
    started = time.monotonic()
    with Client(lonely.target, timeout=1.5) as c, pytest.raises(EmbedqError) as short:
        c.encode(fresh("still no worker"))
    assert short.value.code() == grpc.StatusCode.UNAVAILABLE
    assert short.value.attempts > 1
    assert time.monotonic() - started < 1.5 + 1.5  # the deadline, and a busy machine's slack

    # Retries on: a worker started a second later answers the very same call.
    def start_worker() -> None:
        time.sleep(1)
        lonely.start_worker()

    starter = threading.Thread(target=start_worker)
    starter.start()
    try:
        with Client(lonely.target, timeout=180, retry=PATIENT) as c:
            vector = c.encode(fresh("worth the wait"))
    finally:
        starter.join()
    assert vector.shape == (DIM,)

    async def later() -> np.ndarray:  # and the asyncio client
        async with AsyncClient(lonely.target, timeout=60, retry=PATIENT) as c:
            return await c.encode([fresh("async")])

    assert asyncio.run(later()).shape == (1, DIM)


def test_resource_exhausted_is_retried_and_its_hint_read(lonely) -> None:
    """A stopped (but registered) worker keeps one text pending, so with
    EMBEDQ_MAX_PENDING_TEXTS=1 the next miss is refused: RESOURCE_EXHAUSTED."""
    if not lonely.workers:  # the test before starts one; alone (or after it failed), here
        lonely.start_worker()
        # Until the server's registry has seen the worker, a miss is UNAVAILABLE, not refused.
        with Client(lonely.target, timeout=60, retry=PATIENT) as c:
            c.encode(fresh("seen"))
    worker = lonely.workers[0]
    results: dict[str, object] = {}

    def encode(name: str, text: str) -> None:
        try:
            with Client(lonely.target, timeout=60, retry=PATIENT) as c:
                results[name] = c.encode(text)
        except Exception as error:  # reported by the asserts below
            results[name] = error

    worker.send_signal(signal.SIGSTOP)
    threads = []
    try:
        threads.append(threading.Thread(target=encode, args=("first", fresh("held"))))
        threads[-1].start()
        # The first call must be the pending one: a probe that came first would be held
        # instead, and time out rather than be refused (a new channel may take a while).
        wait_queued(lonely, 1)
        deadline = time.monotonic() + 10
        refused = None
        while refused is None and time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                with Client(lonely.target, timeout=10, retry=False) as c:
                    c.encode(fresh("refused"))
            except EmbedqError as error:
                refused = error
        assert refused is not None, "never refused"
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
        assert refused.attempts == 1 and refused.retryable
        hint = refused.retry_after  # the server's retry-after-ms, when it sends one
        assert hint is None or 0 <= hint <= 3600
        if hint is not None:
            policy = RetryPolicy(jitter=0.0)
            assert policy.pause(2, refused, None) == pytest.approx(hint)

        threads.append(threading.Thread(target=encode, args=("second", fresh("retried"))))
        threads[-1].start()
        time.sleep(1.0)  # refused at least once meanwhile
    finally:
        worker.send_signal(signal.SIGCONT)
        for thread in threads:
            thread.join(timeout=90)
    for name in ("first", "second"):
        assert isinstance(results.get(name), np.ndarray), (name, results.get(name))
        assert results[name].shape == (DIM,)
