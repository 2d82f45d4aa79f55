"""End to end through real processes: gRPC server -> Redis -> worker -> cache.

The reference is sentence-transformers loading the same model folder.
"""

from __future__ import annotations

import hashlib
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from texts import varied_texts

from embedq.v1 import embedq_pb2 as pb
from embedq.v1 import embedq_pb2_grpc

TOLERANCE = 1e-5


def rows(response) -> np.ndarray:
    return np.frombuffer(response.embeddings, dtype="<f4").reshape(
        response.count, response.dimension
    )


@pytest.fixture(scope="module")
def stub(channel) -> embedq_pb2_grpc.EmbedderStub:
    return embedq_pb2_grpc.EmbedderStub(channel)


def test_vectors_match_sentence_transformers(stub, reference_model):
    texts = varied_texts(320)
    assert len(texts) >= 300 and len(set(texts)) < len(texts)  # duplicates included
    got = np.concatenate(
        [
            rows(stub.Encode(pb.EncodeRequest(texts=texts[i : i + 64]), timeout=120))
            for i in range(0, len(texts), 64)
        ]
    )
    expected = reference_model.encode(texts, batch_size=32, convert_to_numpy=True)
    assert got.shape == expected.shape == (len(texts), 384)
    assert np.abs(got - expected).max() <= TOLERANCE


def test_one_request_with_duplicates_and_order(stub, reference_model):
    texts = ["dup one", "other", "dup one", "third", "other", "dup one"]
    response = stub.Encode(pb.EncodeRequest(texts=texts), timeout=60)
    assert response.count == len(texts) and response.dtype == pb.DTYPE_FLOAT32
    assert np.abs(rows(response) - reference_model.encode(texts)).max() <= TOLERANCE


def test_second_request_is_served_from_cache(stub):
    texts = [f"cache me {i}" for i in range(20)]
    first = stub.Encode(pb.EncodeRequest(texts=texts), timeout=60)
    second = stub.Encode(pb.EncodeRequest(texts=texts), timeout=60)
    assert not any(first.cached) and all(second.cached)
    assert first.embeddings == second.embeddings


def test_normalize_option_changes_vectors_and_cache_variant(stub, reference_model):
    text = ["normalisation is a per-request option"]
    plain = rows(
        stub.Encode(
            pb.EncodeRequest(texts=text, options=pb.EncodeOptions(normalize=False)), timeout=60
        )
    )
    normed = rows(stub.Encode(pb.EncodeRequest(texts=text), timeout=60))
    assert abs(np.linalg.norm(normed) - 1) < 1e-5
    assert abs(np.linalg.norm(plain) - 1) > 1e-3
    assert np.abs(plain / np.linalg.norm(plain) - normed).max() <= TOLERANCE


def test_streams_return_every_id_exactly_once(stub, reference_model):
    streams, per_stream = 6, 30
    results: dict[int, list] = {}

    def run(stream_no: int) -> None:
        def requests():
            for i in range(per_stream):
                texts = [f"stream {stream_no} message {i} text {j}" for j in range(1 + i % 3)]
                yield pb.EncodeStreamRequest(id=f"{stream_no}-{i}", texts=texts)

        results[stream_no] = list(stub.EncodeStream(requests(), timeout=120))

    threads = [threading.Thread(target=run, args=(n,)) for n in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for stream_no in range(streams):
        responses = results[stream_no]
        ids = [r.id for r in responses]
        assert sorted(ids) == sorted(f"{stream_no}-{i}" for i in range(per_stream))
        for response in responses[:5]:
            assert not response.HasField("error")
            i = int(response.id.split("-")[1])
            texts = [f"stream {stream_no} message {i} text {j}" for j in range(1 + i % 3)]
            assert np.abs(rows(response) - reference_model.encode(texts)).max() <= TOLERANCE


def test_stream_error_is_per_message(stub):
    messages = [
        pb.EncodeStreamRequest(id="ok", texts=["fine"]),
        pb.EncodeStreamRequest(id="empty", texts=[]),
        pb.EncodeStreamRequest(id="badmodel", texts=["x"], options=pb.EncodeOptions(model="nope")),
        pb.EncodeStreamRequest(id="ok2", texts=["also fine"]),
    ]
    responses = {r.id: r for r in stub.EncodeStream(iter(messages), timeout=60)}
    assert set(responses) == {"ok", "empty", "badmodel", "ok2"}
    assert responses["empty"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert responses["badmodel"].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert responses["ok"].count == 1 and not responses["ok"].HasField("error")


def test_similarity_pairs_and_metrics(stub, reference_model):
    pairs = [("A cat sits.", "A kitten is sitting."), ("I like tea.", "Stocks fell today.")]
    a, b = (reference_model.encode([p[i] for p in pairs]) for i in (0, 1))
    expected = {
        pb.METRIC_COSINE: np.sum(a * b, axis=1)
        / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)),
        pb.METRIC_DOT: np.sum(a * b, axis=1),
        pb.METRIC_EUCLIDEAN: -np.linalg.norm(a - b, axis=1),
        pb.METRIC_MANHATTAN: -np.abs(a - b).sum(axis=1),
    }
    request_pairs = pb.PairList(pairs=[pb.TextPair(a=x, b=y) for x, y in pairs])
    for metric, want in expected.items():
        response = stub.Similarity(
            pb.SimilarityRequest(pairs=request_pairs, metric=metric), timeout=60
        )
        assert np.allclose(response.scores, want, atol=1e-5)
    assert expected[pb.METRIC_COSINE][0] > expected[pb.METRIC_COSINE][1]


def test_similarity_ranking_top_k(stub, reference_model):
    query, candidates = (
        "a fast car",
        ["a quick automobile", "a slow snail", "fresh bread", "racing"],
    )
    vectors = reference_model.encode([query, *candidates])
    scores = vectors[1:] @ vectors[0]
    response = stub.Similarity(
        pb.SimilarityRequest(
            ranking=pb.QueryCandidates(query=query, candidates=candidates), top_k=2
        ),
        timeout=60,
    )
    assert [m.index for m in response.matches] == list(np.argsort(-scores)[:2])
    assert np.allclose([m.score for m in response.matches], np.sort(scores)[::-1][:2], atol=1e-5)


def test_similarity_stream(stub):
    messages = [
        pb.SimilarityStreamRequest(
            id=str(i),
            request=pb.SimilarityRequest(
                pairs=pb.PairList(pairs=[pb.TextPair(a=f"text {i}", b=f"text {i}")])
            ),
        )
        for i in range(10)
    ]
    responses = list(stub.SimilarityStream(iter(messages), timeout=60))
    assert sorted(int(r.id) for r in responses) == list(range(10))
    assert all(abs(r.response.scores[0] - 1) < 1e-5 for r in responses)


def test_lookup_by_text_and_hash(stub):
    texts = ["lookup target one", "lookup target two"]
    encoded = stub.Encode(pb.EncodeRequest(texts=texts), timeout=60)
    digest = hashlib.sha256(texts[1].encode("utf-8")).digest()
    response = stub.Lookup(pb.LookupRequest(texts=[texts[0], "never encoded"], sha256=[digest]))
    assert list(response.found) == [True, False, True]
    assert response.count == 2
    got = rows(response)
    assert np.array_equal(got, rows(encoded))
    miss = stub.Lookup(
        pb.LookupRequest(texts=["lookup target one"], options=pb.EncodeOptions(normalize=False))
    )
    assert list(miss.found) == [False]  # another variant is another cache entry


def test_tokenize_matches_reference(stub, reference_model):
    texts = ["Hello, World!", "word " * 400]
    response = stub.Tokenize(pb.TokenizeRequest(texts=texts), timeout=60)
    reference = reference_model.tokenizer(texts, truncation=True, max_length=256)["input_ids"]
    assert [list(t.ids) for t in response.texts] == reference
    assert response.texts[0].tokens[0] == "[CLS]" and not response.texts[0].truncated
    assert response.texts[1].truncated and response.texts[1].full_length == 402


def test_info(stub):
    info = stub.Info(pb.InfoRequest())
    (model,) = info.models
    assert (model.name, model.dimension, model.pooling) == ("all-MiniLM-L6-v2", 384, "mean")
    assert model.max_seq_length == 256 and model.normalize and model.workers_alive == 1
    assert len(model.fingerprint) == 64
    assert info.default_model == "all-MiniLM-L6-v2"
    assert info.limits.max_batch_texts > 0 and info.limits.max_text_bytes > 0


def test_health_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "embedq.v1.Embedder"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert {"embedq.v1.Embedder", "grpc.health.v1.Health"} <= services
    assert database.FindFileContainingSymbol("embedq.v1.Embedder").name == "embedq/v1/embedq.proto"


BAD_INPUTS = {
    "empty request": ("Encode", pb.EncodeRequest(), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    "batch over limit": (
        "Encode",
        pb.EncodeRequest(texts=["x"] * 2049),
        grpc.StatusCode.INVALID_ARGUMENT,
        "limit",
    ),
    "text over byte limit": (
        "Encode",
        pb.EncodeRequest(texts=["ok", "é" * 40000]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "texts[1] is 80000 UTF-8 bytes",
    ),
    "over-long text, truncation off": (
        "Encode",
        pb.EncodeRequest(
            texts=["short", "word " * 300],
            options=pb.EncodeOptions(truncation=pb.TRUNCATION_REJECT),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "texts[1]: text is 302 tokens",
    ),
    "unknown truncation": (
        "Encode",
        pb.EncodeRequest(texts=["x"], options=pb.EncodeOptions(truncation=7)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "truncation",
    ),
    "unknown model": (
        "Encode",
        pb.EncodeRequest(texts=["x"], options=pb.EncodeOptions(model="no-such-model")),
        grpc.StatusCode.NOT_FOUND,
        "no-such-model",
    ),
    "negative top_k": (
        "Similarity",
        pb.SimilarityRequest(ranking=pb.QueryCandidates(query="q", candidates=["a"]), top_k=-1),
        grpc.StatusCode.INVALID_ARGUMENT,
        "top_k",
    ),
    "unknown metric": (
        "Similarity",
        pb.SimilarityRequest(pairs=pb.PairList(pairs=[pb.TextPair(a="a", b="b")]), metric=99),
        grpc.StatusCode.INVALID_ARGUMENT,
        "metric",
    ),
    "over-long pair text, truncation off": (
        "Similarity",
        pb.SimilarityRequest(
            pairs=pb.PairList(
                pairs=[pb.TextPair(a="a", b="b"), pb.TextPair(a="c", b="word " * 300)]
            ),
            options=pb.EncodeOptions(truncation=pb.TRUNCATION_REJECT),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "pairs[1].b: text is 302 tokens",  # named as sent, not by its row in the batch
    ),
    "over-long candidate, truncation off": (
        "Similarity",
        pb.SimilarityRequest(
            ranking=pb.QueryCandidates(query="q", candidates=["a", "word " * 300]),
            options=pb.EncodeOptions(truncation=pb.TRUNCATION_REJECT),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ranking.candidates[1]: text is 302 tokens",
    ),
    "candidate over byte limit": (
        "Similarity",
        pb.SimilarityRequest(ranking=pb.QueryCandidates(query="q", candidates=["é" * 40000])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ranking.candidates[0] is 80000 UTF-8 bytes",
    ),
    "similarity without input": (
        "Similarity",
        pb.SimilarityRequest(),
        grpc.StatusCode.INVALID_ARGUMENT,
        "pairs or ranking",
    ),
    "bad hash": (
        "Lookup",
        pb.LookupRequest(sha256=[b"short"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "32",
    ),
    "empty lookup": ("Lookup", pb.LookupRequest(), grpc.StatusCode.INVALID_ARGUMENT, "at least"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_its_status(stub, case):
    method, request, code, fragment = BAD_INPUTS[case]
    with pytest.raises(grpc.RpcError) as info:
        getattr(stub, method)(request, timeout=60)
    assert info.value.code() == code
    assert fragment in info.value.details()


def test_still_serving_after_bad_inputs(stub, service):
    response = stub.Encode(pb.EncodeRequest(texts=["still alive"]), timeout=60)
    assert response.count == 1
    assert service.server.poll() is None and all(w.poll() is None for w in service.workers)


def test_cache_answers_with_no_worker_running(redis_server, reference_model):
    from conftest import new_service

    svc = new_service(redis_server)
    try:
        with grpc.insecure_channel(svc.target) as channel:
            stub = embedq_pb2_grpc.EmbedderStub(channel)
            texts = ["served once", "then from the cache", "with no worker"]
            first = stub.Encode(pb.EncodeRequest(texts=texts), timeout=60)
            svc.stop_workers()
            _wait_until(lambda: stub.Info(pb.InfoRequest()).models[0].workers_alive == 0)
            second = stub.Encode(pb.EncodeRequest(texts=texts), timeout=10)
            assert all(second.cached) and second.embeddings == first.embeddings
            assert np.abs(rows(second) - reference_model.encode(texts)).max() <= TOLERANCE
            with pytest.raises(grpc.RpcError) as info:
                stub.Encode(pb.EncodeRequest(texts=["never seen before"]), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "no worker alive" in info.value.details()
    finally:
        svc.stop()


def _wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def test_undecodable_request_is_invalid_argument(channel, stub):
    """Invalid UTF-8 in a string field (sent raw): a clear status, not UNKNOWN."""
    bad_text = b"\x0a\x02\xff\xfe"  # field 1 (texts), length 2, not UTF-8
    raw_encode = channel.unary_unary("/embedq.v1.Embedder/Encode")
    with pytest.raises(grpc.RpcError) as info:
        raw_encode(bad_text, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("request is not a valid embedq.v1.EncodeRequest")
    raw_stream = channel.stream_stream(
        "/embedq.v1.Embedder/EncodeStream", response_deserializer=pb.EncodeStreamResponse.FromString
    )
    good = pb.EncodeStreamRequest(id="good", texts=["fine"]).SerializeToString()
    bad = b"\x12\x02\xff\xfe"  # field 2 (texts) of a stream message
    # The same with an id (field 1, "bad-7"): its error answers that id.
    bad_with_id = b"\x0a\x05bad-7" + bad
    responses = list(raw_stream(iter([bad, good, bad_with_id]), timeout=30))
    assert len(responses) == 3
    by_id = {r.id: r for r in responses}
    assert by_id[""].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert by_id["bad-7"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "not a valid embedq.v1.EncodeStreamRequest" in by_id["bad-7"].error.message
    assert by_id["good"].count == 1
