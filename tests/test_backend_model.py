"""PooledEncoder against sentence-transformers itself, on the bundled model and tiny BERTs
whose folders ask for other pooling, normalisation and lowercasing."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from embedq.workers.backends import (  # noqa: E402
    BUNDLED_NAME,
    ModelNotFoundError,
    PooledEncoder,
    TokenizedText,
    UnsupportedModelError,
    bundled_model_path,
    resolve_model_source,
)
from embedq.workers.backends.lean_bert import ATTENTION_GROUP, LeanBert, pays_off  # noqa: E402
from embedq.workers.backends.packing import pack  # noqa: E402
from embedq.workers.batching import plan_batches  # noqa: E402
from helpers_tiny_model import TINY_TEXTS, module_entry, write_tiny_bert  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

TOLERANCE = 1e-5
BUNDLED_MAX_SEQ = 256
WORDS = [
    "the",
    "model",
    "embeds",
    "sentences",
    "into",
    "vectors",
    "for",
    "semantic",
    "search",
    "and",
    "clustering",
    "while",
    "a",
    "queue",
    "batches",
    "requests",
    "from",
    "many",
    "clients",
    "Redis",
    "stores",
    "results",
    "cache",
    "hits",
    "skip",
    "encoder",
    "naïve",
    "café",
    "résumé",
    "Zürich",
    "São",
    "Paulo",
    "Ångström",
    "jalapeño",
    "façade",
    "coöperate",
]


def _long_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


def varied_texts() -> list[str]:
    """Over 300 texts: edge cases, scripts, emoji, long (truncated) and duplicates."""
    rng = random.Random(1234)
    special = [
        "",
        " ",
        "   \n\t  ",
        "\u200b",
        "Hello world",
        "HELLO WORLD",
        "hello   world",
        " leading and trailing spaces ",
        "héllo wörld, café naïve résumé",
        "e\u0301 vs é",
        "東京は日本の首都です。",
        "我喜欢自然语言处理和向量搜索",
        "한국어 문장도 임베딩합니다",
        "Привет, мир! Как дела?",
        "مرحبا بالعالم",
        "שלום עולם",
        "नमस्ते दुनिया",
        "สวัสดีครับ",
        "🙂🚀🔥",
        "family 👩‍👩‍👧 emoji ZWJ",
        "mixed 東京 Paris Москва 🙂 ok",
        "ǅ İstanbul ΣΊΣΥΦΟΣ straße",
        "[CLS] [SEP] [MASK] [PAD] literal special tokens",
        "tabs\tand\nnew\r\nlines",
        "https://example.com/a?b=c&d=e#frag",
        "def f(x):\n    return x ** 2  # code",
        "3.14159 2,718 1e-9 -42 +7 100%",
        "control \x00\x07 chars",
        "a" * 1000,
        "x" * 65536,
        _long_text(rng, 12000),  # about 64 KB of words
    ]
    short = [_long_text(rng, rng.randint(1, 40)) for _ in range(215)]
    long = [_long_text(rng, rng.randint(250, 700)) for _ in range(24)]
    cased = [text.upper() for text in short[:20]]
    duplicates = special[4:12] + short[:10] + long[:2]
    return special + short + long + cased + duplicates


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return varied_texts()


@pytest.fixture(scope="module")
def encoder() -> PooledEncoder:
    return PooledEncoder.load(None)


@pytest.fixture(scope="module")
def reference() -> SentenceTransformer:
    return SentenceTransformer(str(bundled_model_path()), device="cpu")


def embed_all(model: PooledEncoder, texts: list[str], normalize: bool | None = None) -> np.ndarray:
    """The worker's path: tokenize, plan token-budgeted batches, embed, restore order."""
    tokens = model.tokenize(texts)
    out = np.zeros((len(texts), model.spec.dimension), dtype=np.float32)
    plan = plan_batches([len(t.ids) for t in tokens], max_batch_tokens=8192, max_batch_size=64)
    for batch in plan:
        out[batch] = model.embed([tokens[i].ids for i in batch], normalize=normalize)
    return out


def reference_ids(reference: SentenceTransformer, texts: list[str]) -> list[list[int]]:
    features = reference.preprocess(texts)
    rows = zip(features["input_ids"], features["attention_mask"], strict=True)
    return [ids[mask.bool()].tolist() for ids, mask in rows]


def test_bundled_spec(encoder: PooledEncoder) -> None:
    spec = encoder.spec
    assert (spec.name, spec.dimension, spec.pooling) == (BUNDLED_NAME, 384, "mean")
    assert spec.max_seq_length == BUNDLED_MAX_SEQ and spec.normalize is True
    assert Path(spec.source) == bundled_model_path()
    assert len(spec.fingerprint) == 64 and spec.fingerprint == spec.fingerprint.lower()
    int(spec.fingerprint, 16)


def test_vectors_match_sentence_transformers(encoder, reference, texts) -> None:
    assert len(texts) >= 300
    ours = embed_all(encoder, texts)
    theirs = reference.encode(texts, batch_size=32, convert_to_numpy=True)
    assert ours.dtype == np.float32 and ours.flags["C_CONTIGUOUS"] and ours.shape == theirs.shape
    diff = float(np.abs(ours - theirs).max())
    print(f"max abs diff vs sentence-transformers over {len(texts)} texts: {diff:.3e}")
    assert diff <= TOLERANCE
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_packed_batches_match_sentence_transformers(encoder, reference, texts) -> None:
    """A batch in arrival order (lengths mixed) runs packed on the CPU, several texts to a
    row; its vectors are still the reference's, and the padded batch's."""
    if not encoder._transformer._packing:  # proven on probes at load, or off (logged)
        pytest.skip("packing is off for this model here (GPU, no SDPA, or probes differ)")
    batch = texts[:64]
    tokens = [t.ids for t in encoder.tokenize(batch)]
    packed_batch = pack(tokens, pad_id=0, max_width=encoder.spec.max_seq_length)
    assert packed_batch is not None and packed_batch.input_ids.shape[0] < len(batch)
    packed = encoder.embed(tokens)
    theirs = reference.encode(batch, batch_size=32, convert_to_numpy=True)
    assert float(np.abs(packed - theirs).max()) <= TOLERANCE
    encoder._transformer._packing = False
    try:
        padded = encoder.embed(tokens)
    finally:
        encoder._transformer._packing = True
    assert float(np.abs(packed - padded).max()) <= TOLERANCE


def test_lean_forward_matches_sentence_transformers(encoder, reference, texts) -> None:
    """The bundled BERT runs the lean forward on the CPU (proven on probes at load): batches
    of one text, of one attention group and of several (sorted by length, a truncated text
    among them) give the reference's vectors, and the Hugging Face forward's."""
    transformer = encoder._transformer
    lean_forward = transformer._lean
    assert lean_forward is not None, "the bundled BERT should run the lean forward here"
    truncated = [i for i, t in enumerate(encoder.tokenize(texts)) if t.truncated]
    rng = random.Random(7)
    theirs = reference.encode(texts, batch_size=32, convert_to_numpy=True)
    for size in (1, 5, ATTENTION_GROUP, ATTENTION_GROUP + 1, 3 * ATTENTION_GROUP + 5):
        rows = rng.sample(range(len(texts)), size - 1) + [truncated[0]]
        tokens = [t.ids for t in encoder.tokenize([texts[i] for i in rows])]
        assert pays_off([len(ids) for ids in tokens]), size  # so the lean forward runs them
        lean = encoder.embed(tokens)
        assert float(np.abs(lean - theirs[rows]).max()) <= TOLERANCE, size
        transformer._lean = None
        try:
            hugging_face = encoder.embed(tokens)
        finally:
            transformer._lean = lean_forward
        assert float(np.abs(lean - hugging_face).max()) <= TOLERANCE, size


def test_lean_forward_keeps_no_second_copy_of_the_projections(encoder) -> None:
    """Query, key and value weights live once: the model's own are rows of the lean forward's
    stacked matrix (a copy beside them was a quarter of each layer's weights)."""
    lean = encoder._transformer._lean
    model = encoder._transformer.model
    for layer, stacked in zip(model.encoder.layer, lean._layers, strict=True):
        attention = layer.attention.self
        for index, projection in enumerate((attention.query, attention.key, attention.value)):
            rows = projection.weight.shape[0]
            assert projection.weight.untyped_storage().data_ptr() == (
                stacked.qkv_weight.untyped_storage().data_ptr()
            )
            assert projection.weight.data_ptr() == stacked.qkv_weight[index * rows].data_ptr()
            assert projection.bias.data_ptr() == stacked.qkv_bias[index * rows :].data_ptr()


def test_a_text_of_no_tokens_leaves_the_lean_forward_on(encoder) -> None:
    """Token lists come from tokenize() (special tokens included), but a batch with an empty
    one runs the padded path rather than turning the lean forward off for good."""
    ids = encoder.tokenize(["hello world"])[0].ids
    assert not encoder.embed([[]]).any()
    vectors = encoder.embed([[], ids])
    assert encoder._transformer._lean is not None
    np.testing.assert_allclose(vectors[1], encoder.embed([ids])[0], atol=TOLERANCE)


def test_lean_forward_where_it_pays_off() -> None:
    """A small batch, or one with padding to save; not many texts of equal length (long
    chunks of a document), where its index copies cost more than Hugging Face's fixed cost."""
    assert pays_off([7]) and pays_off([256]) and pays_off([30, 30]) and pays_off([16] * 16)
    assert pays_off([12, 30, 9, 25]) and pays_off([20] * 18 + [10] * 2)
    assert not pays_off([256] * 48) and not pays_off([256, 256]) and not pays_off([20] * 20)
    assert not pays_off([]) and not pays_off([0, 0])


def test_a_batch_the_model_itself_refuses_leaves_the_lean_forward_on(encoder) -> None:
    """A token id past the vocabulary fails in Hugging Face's forward too: the batch's error
    is raised, and the lean forward is not blamed for it."""
    ids = encoder.tokenize(["hello world"])[0].ids
    with pytest.raises(IndexError):
        encoder.embed([[ids[0], 10**7, ids[-1]], ids])
    assert encoder._transformer._lean is not None


def test_lean_forward_only_for_what_it_reproduces(encoder) -> None:
    """Not a BERT, or a BERT whose linear layers are not plain (a quantized copy): no lean
    forward, the model's own runs."""
    import torch

    assert LeanBert.build(torch.nn.Linear(4, 4)) is None
    quantized = torch.ao.quantization.quantize_dynamic(
        encoder._transformer.model, {torch.nn.Linear}, dtype=torch.qint8
    )
    assert LeanBert.build(quantized) is None
    try:
        assert LeanBert.build(encoder._transformer.model.train()) is None
    finally:
        encoder._transformer.model.eval()


def test_token_ids_match_reference(encoder, reference, texts) -> None:
    ours = encoder.tokenize(texts)
    assert [item.ids for item in ours] == reference_ids(reference, texts)
    tokenizer = reference.tokenizer
    for text, item in zip(texts, ours, strict=True):
        full = len(tokenizer(text, truncation=False, verbose=False)["input_ids"])
        assert item.full_length == full
        assert len(item.ids) == min(full, BUNDLED_MAX_SEQ)
        assert item.truncated == (full > BUNDLED_MAX_SEQ)
    assert sum(item.truncated for item in ours) >= 25


def test_tokenize_edge_cases(encoder: PooledEncoder) -> None:
    empty, spaces, huge = encoder.tokenize(["", " \t\n ", "word " * 20000])
    assert encoder.token_strings(empty.ids) == ["[CLS]", "[SEP]"] and not empty.truncated
    assert spaces.ids == empty.ids
    assert huge.truncated and huge.full_length == 20002 and len(huge.ids) == BUNDLED_MAX_SEQ
    assert encoder.token_strings(huge.ids)[-2:] == ["word", "[SEP]"]
    assert isinstance(huge, TokenizedText) and encoder.tokenize([]) == []
    assert encoder.embed([]).shape == (0, 384)


def test_normalize_override_on_bundled(encoder, reference, texts) -> None:
    sample = texts[:60] + texts[250:256]
    without_normalize = SentenceTransformer(modules=[reference[0], reference[1]], device="cpu")
    theirs = without_normalize.encode(sample, batch_size=32, convert_to_numpy=True)
    ours = embed_all(encoder, sample, normalize=False)
    assert float(np.abs(ours - theirs).max()) <= TOLERANCE
    assert np.abs(np.linalg.norm(ours, axis=1) - 1.0).max() > 0.1  # really unnormalised


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny")


TINY_VARIANTS = {
    "cls": ({"pooling_mode_cls_token": True}, "cls"),
    "max": ({"pooling_mode_max_tokens": True}, "max"),
    "mean_sqrt": ({"pooling_mode_mean_sqrt_len_tokens": True}, "mean_sqrt_len"),
    # Legacy booleans concatenate in sentence-transformers' fixed order, not the key order here.
    "legacy_combo": (
        {
            "pooling_mode_mean_sqrt_len_tokens": True,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": True,
            "pooling_mode_cls_token": True,
        },
        "cls+max+mean+mean_sqrt_len",
    ),
    # The 6.x format keeps the listed order.
    "new_format": (
        {"pooling_mode": ["max", "weightedmean", "lasttoken", "cls"]},
        "max+weightedmean+lasttoken+cls",
    ),
}


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_tiny_pooling_read_from_folder(tiny_root: Path, variant: str) -> None:
    pooling, expected_name = TINY_VARIANTS[variant]
    folder = write_tiny_bert(tiny_root / variant, pooling=pooling)
    ours = PooledEncoder.load(str(folder))
    theirs = SentenceTransformer(str(folder), device="cpu")
    assert ours.spec.pooling == expected_name and ours.spec.normalize is False
    modes = expected_name.count("+") + 1
    assert ours.spec.dimension == theirs.get_embedding_dimension() == 32 * modes
    assert ours.spec.max_seq_length == 24
    expected = theirs.encode(TINY_TEXTS, convert_to_numpy=True)
    assert float(np.abs(embed_all(ours, TINY_TEXTS) - expected).max()) <= TOLERANCE
    assert [t.ids for t in ours.tokenize(TINY_TEXTS)] == reference_ids(theirs, TINY_TEXTS)


def test_tiny_normalize_flag(tiny_root: Path) -> None:
    plain = PooledEncoder.load(str(write_tiny_bert(tiny_root / "norm_off")))
    raw = plain.encode(TINY_TEXTS)
    assert np.abs(np.linalg.norm(raw, axis=1) - 1.0).max() > 0.1
    unit = plain.encode(TINY_TEXTS, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)

    folder = write_tiny_bert(tiny_root / "norm_on", normalize=True)
    with_module = PooledEncoder.load(str(folder))
    assert with_module.spec.normalize is True
    expected = SentenceTransformer(str(folder), device="cpu").encode(TINY_TEXTS)
    assert float(np.abs(with_module.encode(TINY_TEXTS) - expected).max()) <= TOLERANCE


def test_tiny_do_lower_case(tiny_root: Path) -> None:
    """sentence_bert_config.json do_lower_case lowercases before the (cased) WordPiece."""
    settings = {"max_seq_length": 24, "do_lower_case": True}
    folder = write_tiny_bert(tiny_root / "lower", sbert_config=settings)
    ours = PooledEncoder.load(str(folder))
    theirs = SentenceTransformer(str(folder), device="cpu")
    tokens = ours.tokenize(["The QUICK Fox"])[0]
    assert ours.token_strings(tokens.ids) == ["[CLS]", "the", "quick", "fox", "[SEP]"]
    assert [t.ids for t in ours.tokenize(TINY_TEXTS)] == reference_ids(theirs, TINY_TEXTS)
    assert float(np.abs(ours.encode(TINY_TEXTS) - theirs.encode(TINY_TEXTS)).max()) <= TOLERANCE
    cased = PooledEncoder.load(str(write_tiny_bert(tiny_root / "cased")))
    assert "[UNK]" in cased.token_strings(cased.tokenize(["The QUICK Fox"])[0].ids)


def test_plain_hf_folder_defaults_to_mean(tiny_root: Path) -> None:
    """No modules.json: mean pooling, no normalisation, max_seq_length from the model limits."""
    folder = write_tiny_bert(tiny_root / "plain", sentence_transformers=False)
    ours = PooledEncoder.load(str(folder))
    theirs = SentenceTransformer(str(folder), device="cpu")
    assert (ours.spec.pooling, ours.spec.normalize) == ("mean", False)
    assert ours.spec.max_seq_length == theirs.max_seq_length == 64  # max_position_embeddings
    assert float(np.abs(ours.encode(TINY_TEXTS) - theirs.encode(TINY_TEXTS)).max()) <= TOLERANCE


def test_unsupported_modules_refused(tiny_root: Path) -> None:
    folder = write_tiny_bert(tiny_root / "dense")
    modules = json.loads((folder / "modules.json").read_text())
    modules.append(module_entry(2, "2_Dense", "Dense"))
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UnsupportedModelError, match="Dense"):
        PooledEncoder.load(str(folder))


def test_fingerprint_follows_content_not_path(tiny_root: Path) -> None:
    first = write_tiny_bert(tiny_root / "fp_a")
    second = tiny_root / "elsewhere" / "fp_b"
    shutil.copytree(first, second)
    base = PooledEncoder.load(str(first)).spec
    assert PooledEncoder.load(str(second)).spec.fingerprint == base.fingerprint
    assert PooledEncoder.load(f"other-name={second}").spec.fingerprint == base.fingerprint

    (second / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True})
    )
    mean = PooledEncoder.load(str(second)).spec
    assert mean.pooling == "mean" and mean.fingerprint != base.fingerprint

    (second / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16}))
    shorter = PooledEncoder.load(str(second)).spec
    assert shorter.max_seq_length == 16
    assert shorter.fingerprint not in (base.fingerprint, mean.fingerprint)
    (second / "README.md").write_text("docs change no vector")
    assert PooledEncoder.load(str(second)).spec.fingerprint == shorter.fingerprint


BUNDLED_ALIASES = [
    None,
    "",
    "all-MiniLM-L6-v2",
    "sentence-transformers/all-MiniLM-L6-v2",
    " All-MiniLM-L6-v2 ",
]


@pytest.mark.parametrize("spec", BUNDLED_ALIASES)
def test_resolve_bundled_aliases(spec: str | None) -> None:
    assert resolve_model_source(spec) == (BUNDLED_NAME, bundled_model_path())


def test_resolve_folders(tmp_path: Path) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert resolve_model_source(str(folder)) == ("my-model", folder.resolve())
    assert resolve_model_source(f"served={folder}") == ("served", folder.resolve())
    assert resolve_model_source("mini=all-MiniLM-L6-v2") == ("mini", bundled_model_path())
    (tmp_path / "file.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError):
        resolve_model_source(str(tmp_path / "file.bin"))


def test_resolve_offline_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    revision = "0" * 40
    repo = tmp_path / "models--acme--tiny-encoder"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert resolve_model_source("acme/tiny-encoder") == ("tiny-encoder", snapshot.resolve())


UNKNOWN_SPECS = ["no-such-org/no-such-model", "/no/such/folder", "not a repo id!", "x="]


@pytest.mark.parametrize("spec", UNKNOWN_SPECS)
def test_resolve_unknown(spec: str) -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model_source(spec)
    assert isinstance(caught.value, ValueError)


def test_cuda_without_gpu_is_a_clear_error() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="CUDA"):
        PooledEncoder.load(None, device="cuda", fp16=True)
