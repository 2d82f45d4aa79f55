"""Per-request options against sentence-transformers' own functions:
precision, Matryoshka dimension, prompts, several models, big rankings.
"""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from conftest import Service
from helpers_tiny_model import TINY_TEXTS, write_tiny_bert
from sentence_transformers.util.quantization import quantize_embeddings

from embedq.v1 import embedq_pb2 as pb
from embedq.v1 import embedq_pb2_grpc

TEXTS = [
    "A man is playing a guitar.",
    "A woman is slicing an onion.",
    "The stock market fell sharply today.",
    "Two dogs run across a snowy field.",
    "東京は日本の首都です。",
    "I ❤️ pizza",
]
NUMPY_DTYPE = {
    pb.DTYPE_FLOAT32: "<f4",
    pb.DTYPE_FLOAT16: "<f2",
    pb.DTYPE_INT8: "i1",
    pb.DTYPE_UINT8: "u1",
    pb.DTYPE_BINARY: "i1",
    pb.DTYPE_UBINARY: "u1",
}


def unpack(response) -> np.ndarray:
    values = np.frombuffer(response.embeddings, NUMPY_DTYPE[response.dtype])
    return values.reshape(response.count, -1)


def encode(stub, texts, **options):
    return stub.Encode(
        pb.EncodeRequest(texts=texts, options=pb.EncodeOptions(**options)), timeout=60
    )


@pytest.fixture(scope="module")
def stub(channel):
    return embedq_pb2_grpc.EmbedderStub(channel)


@pytest.fixture(scope="module")
def reference(reference_model) -> np.ndarray:
    return reference_model.encode(TEXTS)


@pytest.mark.parametrize(
    "precision, name, dtype",
    [
        (pb.PRECISION_BINARY, "binary", pb.DTYPE_BINARY),
        (pb.PRECISION_UBINARY, "ubinary", pb.DTYPE_UBINARY),
        (pb.PRECISION_INT8, "int8", pb.DTYPE_INT8),
        (pb.PRECISION_UINT8, "uint8", pb.DTYPE_UINT8),
    ],
)
def test_quantized_bytes_equal_quantize_embeddings(stub, reference, precision, name, dtype):
    response = encode(stub, TEXTS, precision=precision)
    assert response.dtype == dtype and response.dimension == 384
    float32 = unpack(encode(stub, TEXTS))
    # Same inputs, same calibration: identical bytes.
    expected = quantize_embeddings(float32, name)
    assert unpack(response).tobytes() == np.ascontiguousarray(expected).tobytes()
    # Against the reference's own vectors (which differ by ~1e-7) a code can
    # only sit one bucket off, where a value lies right on a bucket boundary.
    from_reference = quantize_embeddings(reference, name).astype(np.int16)
    assert np.abs(unpack(response).astype(np.int16) - from_reference).max() <= (
        1 if name.endswith("int8") else 0
    )


def test_int8_with_calibration_ranges(stub, reference_model, reference):
    calibration = reference_model.encode([f"calibration sentence {i}" for i in range(50)])
    ranges = np.vstack([calibration.min(axis=0), calibration.max(axis=0)])
    response = encode(stub, TEXTS[:1], precision=pb.PRECISION_INT8, ranges=ranges.ravel().tolist())
    float32 = unpack(encode(stub, TEXTS[:1]))
    expected = quantize_embeddings(float32, "int8", ranges=ranges)
    assert unpack(response).tobytes() == expected.tobytes()
    from_reference = quantize_embeddings(reference[:1], "int8", ranges=ranges)
    assert np.abs(unpack(response).astype(np.int16) - from_reference).max() <= 1


def test_float16_and_float32(stub, reference):
    half = unpack(encode(stub, TEXTS, precision=pb.PRECISION_FLOAT16))
    assert half.dtype == np.float16
    assert np.abs(half.astype(np.float32) - reference).max() <= 1e-3
    full = unpack(encode(stub, TEXTS, precision=pb.PRECISION_FLOAT32))
    assert np.abs(full - reference).max() <= 1e-5


def test_int8_single_text_without_ranges_is_refused(stub):
    with pytest.raises(grpc.RpcError) as info:
        encode(stub, ["alone"], precision=pb.PRECISION_INT8)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ranges" in info.value.details()


def test_matryoshka_dimension(stub, reference_model):
    got = unpack(encode(stub, TEXTS, dimension=128))
    expected = reference_model.encode(TEXTS, truncate_dim=128, normalize_embeddings=True)
    assert got.shape == (len(TEXTS), 128)
    assert np.abs(got - expected).max() <= 1e-5
    raw = unpack(encode(stub, TEXTS, dimension=64, normalize=False))
    unnormalised = unpack(encode(stub, TEXTS, normalize=False))
    assert np.abs(raw - unnormalised[:, :64]).max() <= 1e-6
    binary = unpack(encode(stub, TEXTS, dimension=64, precision=pb.PRECISION_UBINARY))
    assert binary.shape == (len(TEXTS), 8)


def test_dimension_above_the_model_is_refused(stub):
    with pytest.raises(grpc.RpcError) as info:
        encode(stub, ["x"], dimension=385)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "385" in info.value.details()


def test_free_prompt(stub, reference_model):
    got = unpack(encode(stub, TEXTS, prompt="query: "))
    expected = reference_model.encode(TEXTS, prompt="query: ")
    assert np.abs(got - expected).max() <= 1e-5


def test_variants_never_share_cache_entries(stub):
    text = ["a sentence that is cached in several variants"]
    plain = encode(stub, text)
    prompted = encode(stub, text, prompt="query: ")
    assert not prompted.cached[0]  # the unprompted vector is not served for a prompt
    assert plain.embeddings != prompted.embeddings
    again = encode(stub, text, prompt="query: ")
    assert again.cached[0] and again.embeddings == prompted.embeddings
    as_int8 = encode(stub, text + ["second"], precision=pb.PRECISION_INT8)
    assert as_int8.dtype == pb.DTYPE_INT8 and len(as_int8.embeddings) == 2 * 384
    unknown = pb.EncodeOptions(prompt_name="nope")
    with pytest.raises(grpc.RpcError) as info:
        stub.Encode(pb.EncodeRequest(texts=text, options=unknown), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_lookup_applies_output_options(stub):
    text = "lookup with options"
    full = unpack(encode(stub, [text]))
    response = stub.Lookup(
        pb.LookupRequest(texts=[text], options=pb.EncodeOptions(dimension=32)), timeout=30
    )
    got = unpack(response)
    assert got.shape == (1, 32)
    assert np.abs(got[0] - full[0, :32] / np.linalg.norm(full[0, :32])).max() <= 1e-6


def test_ranking_ten_thousand_candidates_in_one_call(stub, reference_model):
    unique = [f"candidate sentence {i} about topic {i % 17}" for i in range(500)]
    candidates = [unique[i % len(unique)] for i in range(10_000)]
    query = "a sentence about topic 3"
    response = stub.Similarity(
        pb.SimilarityRequest(
            ranking=pb.QueryCandidates(query=query, candidates=candidates), top_k=10
        ),
        timeout=240,
    )
    vectors = reference_model.encode([query, *unique])
    scores = (vectors[1:] @ vectors[0])[np.arange(10_000) % len(unique)]
    assert len(response.matches) == 10
    got = np.array([m.score for m in response.matches])
    assert np.allclose(got, np.sort(scores)[::-1][:10], atol=1e-5)
    assert all(abs(scores[m.index] - m.score) < 1e-5 for m in response.matches)


@pytest.fixture(scope="module")
def two_models(redis_server, tmp_path_factory):
    """The bundled model and a tiny one with named prompts, in one deployment."""
    folder = write_tiny_bert(tmp_path_factory.mktemp("tiny") / "tiny", normalize=True)
    config = {"prompts": {"query": "query: ", "doc": "passage: "}, "default_prompt_name": "query"}
    (folder / "config_sentence_transformers.json").write_text(json.dumps(config))
    svc = Service(redis_server.url, namespace="two-models")
    try:
        svc.start_workers([], ["--model", f"tiny={folder}"])
        svc.start_server("--default-model", "all-MiniLM-L6-v2")
        with grpc.insecure_channel(svc.target) as channel:
            yield embedq_pb2_grpc.EmbedderStub(channel), folder
    finally:
        svc.stop()


def test_several_models_with_their_own_prompts(two_models):
    from sentence_transformers import SentenceTransformer

    stub, folder = two_models
    info = stub.Info(pb.InfoRequest())
    models = {m.name: m for m in info.models}
    assert set(models) == {"all-MiniLM-L6-v2", "tiny"} and info.default_model == "all-MiniLM-L6-v2"
    assert dict(models["tiny"].prompts) == {"query": "query: ", "doc": "passage: "}
    assert models["tiny"].default_prompt_name == "query"
    reference = SentenceTransformer(str(folder), device="cpu")
    default = unpack(encode(stub, TINY_TEXTS, model="tiny"))
    assert np.abs(default - reference.encode(TINY_TEXTS)).max() <= 1e-5  # default prompt
    doc = unpack(encode(stub, TINY_TEXTS, model="tiny", prompt_name="doc"))
    assert np.abs(doc - reference.encode(TINY_TEXTS, prompt_name="doc")).max() <= 1e-5
    bare = unpack(encode(stub, TINY_TEXTS, model="tiny", prompt=""))
    assert np.abs(bare - reference.encode(TINY_TEXTS, prompt="")).max() <= 1e-5


def test_one_models_vectors_never_served_for_another(two_models):
    stub, _folder = two_models
    text = ["a text only this test sends, to both models"]
    bundled = encode(stub, text)
    tiny = encode(stub, text, model="tiny")
    assert not tiny.cached[0] and tiny.dimension != bundled.dimension
    lookup = stub.Lookup(
        pb.LookupRequest(texts=["never encoded by tiny"], options=pb.EncodeOptions(model="tiny"))
    )
    assert list(lookup.found) == [False]
    with pytest.raises(grpc.RpcError) as info:
        encode(stub, text, model="missing")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
