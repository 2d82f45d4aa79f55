"""Deterministic, varied test sentences (no data set needed)."""

from __future__ import annotations

import random

SHORT = [
    "hello world",
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog.",
    "Ceci n'est pas une pipe.",
    "¿Dónde está la biblioteca?",
    "Straße, Ärger, naïve café, résumé",
    "東京は日本の首都です。",
    "我喜欢吃苹果和香蕉。",
    "서울은 한국의 수도입니다.",
    "Москва — столица России.",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "I ❤️ pizza 🍕 and 🚀 rockets!",
    "👍🏽👨‍👩‍👧‍👦🏳️‍🌈",
    "mixed: hello 世界 مرحبا мир 🌍",
    "e\u0301 combining accent vs é",
    "def f(x): return x ** 2  # code",
    "SELECT * FROM users WHERE id = 42;",
    "https://example.com/path?query=1&b=2",
    "3.14159 2.71828 1.41421",
    "ALL CAPS SENTENCE HERE",
    "",
    " ",
    "   leading and trailing spaces   ",
    "\ttabs\tand\nnew\nlines\r\n",
    "\u00a0non-breaking\u00a0spaces\u00a0",
    "zero\u200bwidth\u200bspace",
    "a",
    "?",
]

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "are",
    "with",
    "as",
    "his",
    "they",
    "be",
    "at",
    "one",
    "have",
    "this",
    "from",
    "or",
    "had",
    "by",
    "word",
    "but",
    "what",
    "some",
    "we",
    "can",
    "out",
    "other",
    "were",
    "all",
    "there",
    "when",
    "up",
    "use",
    "your",
    "how",
    "said",
    "an",
    "each",
    "she",
    "embedding",
    "vector",
    "queue",
    "redis",
    "server",
    "worker",
    "batch",
    "token",
    "model",
    "cache",
    "stream",
    "latency",
]


def long_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


def varied_texts(count: int = 320, seed: int = 7) -> list[str]:
    """Short, over-long (truncated), CJK, emoji, mixed scripts, whitespace,
    with duplicates sprinkled in."""
    rng = random.Random(seed)
    texts: list[str] = list(SHORT)
    while len(texts) < count:
        kind = len(texts) % 6
        if kind == 0:
            texts.append(long_text(rng, rng.randint(300, 600)))  # beyond 256 tokens
        elif kind == 1:
            texts.append(long_text(rng, rng.randint(3, 40)))
        elif kind == 2:
            texts.append(
                "".join(
                    rng.choice("日本語中文한국어漢字かなカナ") for _ in range(rng.randint(2, 120))
                )
            )
        elif kind == 3:
            texts.append(rng.choice(SHORT) + " " + rng.choice("🙂🎉🔥✨🧠") * rng.randint(1, 5))
        elif kind == 4:
            texts.append(rng.choice(texts))  # duplicate
        else:
            texts.append(f"sentence number {len(texts)} about {rng.choice(WORDS)}")
    return texts
