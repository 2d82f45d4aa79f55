"""The ASCII shortcut through the tokenizer gives exactly the full pipeline's ids
(workers/backends/ascii_tokens.py), and is refused where that cannot be shown."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

pytest.importorskip("torch")

from embedq.workers.backends import (  # noqa: E402
    PooledEncoder,
    ascii_tokens,  # noqa: E402
    bundled_model_path,
)
from embedq.workers.backends.ascii_tokens import AsciiShortcut  # noqa: E402
from helpers_tiny_model import TINY_TEXTS, write_tiny_bert  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from texts import SHORT, varied_texts  # noqa: E402
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors  # noqa: E402

ASCII = "".join(map(chr, range(128)))
PIECES = ["[MASK]", "[mask]", "[Cls]", "[SEP", "PAD]", "Hello", "WORLD", "don't", "  ", "\t\r\n"]


def plain_tokenizer(folder: Path) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def full_ids(tokenizer: Tokenizer):
    return lambda texts: [encoding.ids for encoding in tokenizer.encode_batch(texts)]


@pytest.fixture(scope="module")
def bundled() -> Tokenizer:
    return plain_tokenizer(bundled_model_path())


@pytest.fixture(scope="module")
def tiny_lowercased(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A cased WordPiece behind do_lower_case: Sequence[Lowercase, BertNormalizer]."""
    folder = write_tiny_bert(
        tmp_path_factory.mktemp("tiny") / "lower",
        sbert_config={"max_seq_length": 24, "do_lower_case": True},
    )
    return PooledEncoder.load(str(folder))._transformer._fast


def shortcut_of(tokenizer: Tokenizer) -> AsciiShortcut:
    shortcut = AsciiShortcut.build(tokenizer)
    assert shortcut is not None
    return shortcut


def assert_same(tokenizer: Tokenizer, texts: list[str]) -> None:
    full = full_ids(tokenizer)
    assert shortcut_of(tokenizer).ids(texts, full) == full(texts)


def with_normalizer(tokenizer: Tokenizer, normalizer) -> Tokenizer:
    other = Tokenizer.from_str(tokenizer.to_str())
    other.normalizer = normalizer
    return other


@pytest.mark.parametrize("normalizer", ["bert", "lowercase only", "none"])
def test_every_pair_of_ascii_characters(bundled: Tokenizer, normalizer: str) -> None:
    """The normalizer's table is per character and the word split is BERT's: every ASCII
    pair, between words, agrees (without BERT's cleaning, control characters and all
    whitespace reach the split)."""
    tokenizer = {
        "bert": bundled,
        "lowercase only": with_normalizer(bundled, normalizers.Lowercase()),
        "none": with_normalizer(bundled, None),
    }[normalizer]
    texts = [f"Ab{a}{b}Cd" for a, b in itertools.product(ASCII, repeat=2)]
    assert_same(tokenizer, texts)


def test_known_words_stay_bounded(bundled: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The word table holds at most KNOWN_BYTES (estimated), starting over past it; words
    too long for WordPiece are never kept; the ids stay the full pipeline's throughout."""
    monkeypatch.setattr(ascii_tokens, "KNOWN_BYTES", 20_000)
    shortcut = shortcut_of(bundled)
    texts = varied_texts(300) + ["x" * 5000 + " y" * 10, "Q" * 101]
    full = full_ids(bundled)
    for start in range(0, len(texts), 40):
        batch = texts[start : start + 40]
        assert shortcut.ids(batch, full) == full(batch)
        assert 0 < shortcut._known_bytes <= 20_000
        assert max(map(len, shortcut._known)) <= ascii_tokens.KNOWN_WORD_CHARS


def test_other_pre_tokenizers_take_the_shorter_pipeline(bundled: Tokenizer) -> None:
    """No word-by-word split without BERT's pre-tokenizer; still the same ids."""
    other = Tokenizer.from_str(bundled.to_str())
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    shortcut = shortcut_of(other)
    assert shortcut._split is None
    texts = varied_texts(200) + PIECES
    assert shortcut.ids(texts, full_ids(other)) == full_ids(other)(texts)


def test_sentences_and_mixed_scripts(bundled: Tokenizer) -> None:
    """Real sentences take the shortcut; non-ASCII ones and added tokens go the full way."""
    texts = varied_texts(400) + [t.upper() for t in SHORT] + PIECES
    assert_same(bundled, texts)


@pytest.fixture(scope="module")
def bundled_shortcut(bundled: Tokenizer) -> AsciiShortcut:
    return shortcut_of(bundled)  # built once (a build checks every ASCII pair: ~0.1 s)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(alphabet=ASCII, max_size=12), st.sampled_from(PIECES))))
def test_random_ascii_texts(bundled, bundled_shortcut: AsciiShortcut, parts: list[str]) -> None:
    texts, full = ["".join(parts), " ".join(parts)], full_ids(bundled)
    assert bundled_shortcut.ids(texts, full) == full(texts)


def test_lowercase_sequence_of_a_cased_vocabulary(tiny_lowercased: Tokenizer) -> None:
    texts = TINY_TEXTS + [t.upper() for t in TINY_TEXTS] + PIECES
    texts += [f"the{a}{b}FOX" for a, b in itertools.product(ASCII, repeat=2)]
    assert_same(tiny_lowercased, texts)


def test_cased_normalizer_keeps_case(bundled: Tokenizer) -> None:
    cased = with_normalizer(
        bundled, normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    )
    assert_same(cased, ["Hello WORLD", "MiXeD cAsE\x07 text"] + PIECES)


@pytest.mark.parametrize(
    "normalizer",
    [normalizers.Replace("a", "b"), normalizers.Strip(), normalizers.Prepend("_")],
    ids=["replace", "strip", "prepend"],
)
def test_refused_for_a_normalizer_that_looks_at_neighbours(bundled: Tokenizer, normalizer) -> None:
    other = with_normalizer(bundled, normalizers.Sequence([normalizers.Lowercase(), normalizer]))
    assert AsciiShortcut.build(other) is None


@pytest.mark.parametrize(
    ("normalizer", "token", "text"),
    [
        (None, "café", "a cafe here and a CAFE there"),  # BERT's normalizer strips accents
        (None, "new\tword", "a new word here"),  # ... and turns the tab into a space
        (normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()]), "ﬁle", "the FILE"),
    ],
    ids=["accent", "tab", "ligature"],
)
def test_added_tokens_matched_after_normalizing(bundled: Tokenizer, normalizer, token, text):
    """A `normalized` added token matches its normalized content: an ASCII text holding that
    form takes the full pipeline."""
    from tokenizers import AddedToken

    other = Tokenizer.from_str(bundled.to_str())
    if normalizer is not None:
        other.normalizer = normalizer
    other.add_tokens([AddedToken(token, normalized=True)])
    added_id = other.token_to_id(token)
    assert added_id in full_ids(other)([text])[0]
    assert_same(other, [text, "plain text", text.upper()])


def test_refused_with_many_added_tokens(bundled: Tokenizer) -> None:
    other = Tokenizer.from_str(bundled.to_str())
    other.add_tokens([f"tok{i}" for i in range(ascii_tokens.MAX_ADDED_TOKENS)])
    assert AsciiShortcut.build(other) is None


def test_refused_for_a_post_processor_that_is_not_a_template(bundled: Tokenizer) -> None:
    other = Tokenizer.from_str(bundled.to_str())
    other.post_processor = processors.ByteLevel()
    assert AsciiShortcut.build(other) is None


def test_bundled_model_uses_it() -> None:
    """The served path takes the shortcut for the bundled model (else it would be slow, not
    wrong: the token-id tests in test_backend_model.py prove the served ids either way)."""
    encoder = PooledEncoder.load(None)
    assert encoder._transformer._ascii is not None
