"""Writes a tiny random BERT as a sentence-transformers folder, to prove pooling, normalisation
and lowercasing are read from the folder rather than hard-coded. Deterministic for a seed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import BertConfig, BertModel, BertTokenizer

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "hello",
    "world",
    "embed",
    "vector",
    "search",
    "cafe",
    "tokyo",
    "is",
    "a",
    "an",
    "of",
    "and",
    "to",
    "in",
    "on",
    "with",
    "for",
    "##s",
    "##ing",
    "##ed",
    "##er",
    "東",
    "京",
]
PUNCTUATION = list(".,!?;:'\"()-")
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
VOCAB = SPECIALS + WORDS + PUNCTUATION + LETTERS + [f"##{c}" for c in LETTERS]

HIDDEN = 32
TINY_TEXTS = [
    "the quick brown fox",
    "The Quick BROWN Fox jumps over the lazy dog!",
    "hello world",
    "Hello, World.",
    "",
    "   ",
    "embedding vectors searched",
    "東京 is a cafe",
    "unknownword zzz qqq",
    "the " * 40,  # longer than max_seq_length: truncated
    "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 3,
    "hello world",  # duplicate
]


def write_tiny_bert(
    folder: Path,
    *,
    pooling: dict[str, Any] | None = None,
    normalize: bool = False,
    sbert_config: dict[str, Any] | None = None,
    sentence_transformers: bool = True,
    seed: int = 0,
) -> Path:
    """A 2-layer, 32-wide BERT with a cased WordPiece vocab in ``folder``.

    pooling: 1_Pooling/config.json content (dimension added); default CLS, legacy keys.
    sentence_transformers False writes a plain Hugging Face folder (no modules.json).
    """
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    # Cased tokenizer, so do_lower_case in sentence_bert_config.json visibly matters.
    BertTokenizer(vocab=str(vocab_file), do_lower_case=False).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    BertModel(config).eval().save_pretrained(folder)
    if sentence_transformers:
        _write_modules(folder, pooling, normalize, sbert_config)
    return folder


def module_entry(idx: int, path: str, kind: str) -> dict[str, Any]:
    """One modules.json entry, as sentence-transformers writes it."""
    kind = f"sentence_transformers.models.{kind}"
    return {"idx": idx, "name": str(idx), "path": path, "type": kind}


def _write_modules(
    folder: Path,
    pooling: dict[str, Any] | None,
    normalize: bool,
    sbert_config: dict[str, Any] | None,
) -> None:
    modules = [module_entry(0, "", "Transformer"), module_entry(1, "1_Pooling", "Pooling")]
    if normalize:
        modules.append(module_entry(2, "2_Normalize", "Normalize"))
    (folder / "modules.json").write_text(json.dumps(modules, indent=2), encoding="utf-8")
    pooling_config = {"word_embedding_dimension": HIDDEN, "pooling_mode_cls_token": True}
    if pooling is not None:
        pooling_config = {"word_embedding_dimension": HIDDEN, **pooling}
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config), encoding="utf-8")
    settings = sbert_config if sbert_config is not None else {"max_seq_length": 24}
    (folder / "sentence_bert_config.json").write_text(json.dumps(settings), encoding="utf-8")
