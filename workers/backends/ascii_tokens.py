"""A shorter route through a fast tokenizer for plain-ASCII texts, with the same ids.

Profiled (STS-B sentences, batches of 256, one thread): of the Rust tokenizer's ~50 µs a
text, the normalizer (BertNormalizer tracks an alignment per character) and the
post-processor (the special-token template rebuilds every Encoding) took more than half.
Tokenizing is a worker's serial CPU stage when the accelerator is fast, so it bounds what
one worker can feed a GPU.

For ASCII text both steps reduce to simple maps, read from the tokenizer itself:

- the normalizers used by BERT-style models (lowercasing, cleaning, accents, Unicode
  forms) map each ASCII character on its own, so one `normalize_str` per ASCII character
  gives a table, applied with `str.lower` or `str.translate` (C speed);
- a template that puts fixed special tokens before and after the text gives fixed ids.

So an ASCII text that contains no added token (say a literal "[MASK]", or a `normalized`
token's normalized form) goes through a copy of the tokenizer without normalizer and
post-processor, and its ids are wrapped in the template's; every other text takes the full
pipeline.

With BERT's pre-tokenizer and a WordPiece model (most sentence-transformers models), the
rest is cut too: for ASCII that pre-tokenizer splits at whitespace and isolates each
punctuation character (one regular expression), and WordPiece maps each such word on its
own, so a word's ids are computed once and then looked up. A new word is encoded by the
same tokenizer (pre-tokenizer and model), so a word that the expression left whole where
BERT would split it still gets BERT's ids; a split BERT would not make is what the tests
rule out, for every pair of ASCII characters.

`AsciiShortcut.build` returns None for any tokenizer outside these cases, checks the
per-character table on every pair of ASCII characters, and checks its result against the
full pipeline on probe texts before it is used.
"""

from __future__ import annotations

import collections
import itertools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# Normalizers that map every ASCII character independently of its neighbours (the
# Unicode forms and accent stripping leave ASCII alone; BertNormalizer cleans,
# spaces CJK and lowercases per character).
PER_CHARACTER = {"BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents"}
# Post-processors that only put special tokens around a single text.
FIXED_TEMPLATES = {"TemplateProcessing", "BertProcessing", "RobertaProcessing"}
ASCII = "".join(map(chr, range(128)))
PRINTABLE = "".join(map(chr, range(0x20, 0x7F)))
# What BertPreTokenizer does to ASCII: whitespace (Rust's char::is_whitespace) separates
# words, and every ASCII punctuation character is a word of its own.
_PUNCTUATION = re.escape("".join(c for c in PRINTABLE if not c.isalnum() and c != " "))
BERT_WORDS = re.compile(rf"[^ \t\n\x0b\x0c\r{_PUNCTUATION}]+|[{_PUNCTUATION}]")
# Memory the table of known words may hold (estimated per entry: its characters, 36 bytes a
# token id, 150 bytes of dict entry and objects); past it the table starts over. Words
# longer than KNOWN_WORD_CHARS are not kept (WordPiece maps them to one unknown token).
KNOWN_BYTES = 16 * 2**20
KNOWN_WORD_CHARS = 100
# More added tokens than this and the check for them (one regular expression) would cost more
# than the shortcut saves (measured: 100 added tokens, 174 µs a text against 64 for the full
# pipeline), so such tokenizers keep the full pipeline.
MAX_ADDED_TOKENS = 32
# Texts the shortcut is checked on against the full pipeline before it is used.
PROBES = (
    "",
    " ",
    "Hello, World! A plain ASCII sentence; with punctuation (and UPPER case).",
    "tabs\tand\nnew\r\nlines, control \x00\x07\x0b\x0c\x1f\x7f chars",
    "literal [CLS] [sep] [Mask] <s> </s> <pad> tokens",
    "https://example.com/a?b=c&d=e#frag 3.14159 -42 +7 100% don't",
    ASCII,
    PRINTABLE * 3,
)

IdsOf = Callable[[list[str]], list[list[int]]]


class AsciiShortcut:
    """Token ids (special tokens included, not truncated) for ASCII texts, fast."""

    def __init__(
        self,
        bare: Any,
        table: dict[int, str],
        fold: Callable[[str], str] | None,
        added: Any,
        prefix: list[int],
        suffix: list[int],
        split: Callable[[str], list[str]] | None = None,
    ) -> None:
        # The tokenizer without normalizer and post-processor, for words not known yet.
        self._encode = getattr(bare, "encode_batch_fast", bare.encode_batch)
        self._table = table  # ASCII character -> its normalized text
        self._fold = fold  # the same map for printable ASCII as a str method, if there is one
        self._added = added  # a regex of the added tokens' contents (any case), or None
        self._prefix, self._suffix = prefix, suffix
        self._split = split  # words of a normalized text, where ids are per word (else None)
        self._known: dict[str, list[int]] = {}  # word -> its ids (read by several threads)
        self._known_bytes = 0  # estimated (see KNOWN_BYTES)

    @classmethod
    def build(cls, tokenizer: Any) -> AsciiShortcut | None:
        """The shortcut for a `tokenizers.Tokenizer` (no truncation or padding set), or None
        where its normalizer, post-processor or probe texts do not allow one."""
        from tokenizers import Tokenizer

        config = json.loads(tokenizer.to_str())
        if not _per_character(config.get("normalizer")):
            return None
        post = config.get("post_processor")
        if post is not None and post.get("type") not in FIXED_TEMPLATES:
            return None
        template = _special_ids(tokenizer)
        if template is None or len(tokenizer.get_added_tokens_decoder()) > MAX_ADDED_TOKENS:
            return None
        bare = Tokenizer.from_str(tokenizer.to_str())
        bare.normalizer = None
        bare.post_processor = None
        table = _ascii_table(tokenizer.normalizer)
        if not _pairs_map_per_character(tokenizer.normalizer, table):
            return None
        split = BERT_WORDS.findall if _word_by_word(config) else None
        shortcut = cls(bare, table, _fold_of(table), _added_tokens(tokenizer), *template, split)
        return shortcut if shortcut.agrees_with(_full_ids(tokenizer), PROBES) else None

    def ids(self, texts: Sequence[str], full: IdsOf) -> list[list[int]]:
        """Every text's ids: ASCII ones by the shortcut, the others through `full`."""
        rows, plain = [], []
        for row, text in enumerate(texts):
            normalized = self._normalized(text)
            if normalized is not None:
                rows.append(row)
                plain.append(normalized)
        result: list[list[int] | None] = [None] * len(texts)
        for row, content in zip(rows, self._content_ids(plain), strict=True):
            result[row] = [*self._prefix, *content, *self._suffix]
        others = [row for row, ids in enumerate(result) if ids is None]
        if others:
            for row, ids in zip(others, full([texts[row] for row in others]), strict=True):
                result[row] = ids
        return result  # type: ignore[return-value] - every None was replaced

    def _content_ids(self, plain: list[str]) -> list[list[int]]:
        """Ids without special tokens of normalized ASCII texts."""
        if self._split is None:
            return [encoding.ids for encoding in self._encode(plain, add_special_tokens=False)]
        split = list(map(self._split, plain))
        # _keep replaces a full table instead of emptying it, so this one stays whole while
        # another thread starts over.
        ids_of: Mapping[str, list[int]] = self._known
        new = {word for words in split for word in words if word not in ids_of}
        if new:
            ids_of = self._learn(new, ids_of)
        get = ids_of.__getitem__
        return [list(itertools.chain.from_iterable(map(get, words))) for words in split]

    def _learn(self, words: set[str], table: dict[str, list[int]]) -> Mapping[str, list[int]]:
        """`table` and the ids of `words` (new to it) from the Rust model, in one call; they
        are kept in the shared table too, within its budget."""
        new = list(words)
        encodings = self._encode(new, add_special_tokens=False)
        learnt = {word: encoding.ids for word, encoding in zip(new, encodings, strict=True)}
        self._keep(learnt)
        if all(word in table for word in new):
            return table  # the usual case: _keep put them in it
        # Some were not kept (too long) or the table started over: both, looked up slower.
        return collections.ChainMap(learnt, table)

    def _keep(self, learnt: dict[str, list[int]]) -> None:
        kept = {word: ids for word, ids in learnt.items() if len(word) <= KNOWN_WORD_CHARS}
        size = sum(len(word) + 36 * len(ids) + 150 for word, ids in kept.items())
        if self._known_bytes + size > KNOWN_BYTES:
            self._known = {}
            self._known_bytes = 0
        if size <= KNOWN_BYTES:
            self._known.update(kept)
            self._known_bytes += size

    def agrees_with(self, full: IdsOf, texts: Sequence[str]) -> bool:
        texts = list(texts)
        return self.ids(texts, full) == full(texts)

    def _normalized(self, text: str) -> str | None:
        """The normalizer's output for an ASCII text without added tokens, else None."""
        if not text.isascii():
            return None
        if self._fold is not None and text.isprintable():
            normalized = self._fold(text)
        else:
            normalized = text.translate(self._table)
        if self._added is not None and (self._added.search(text) or self._added.search(normalized)):
            return None
        return normalized


def _per_character(normalizer: dict | None) -> bool:
    if normalizer is None:
        return True
    if normalizer.get("type") == "Sequence":
        return all(map(_per_character, normalizer.get("normalizers", [])))
    return normalizer.get("type") in PER_CHARACTER


def _word_by_word(config: dict) -> bool:
    """BERT's pre-tokenizer before a WordPiece model: ids are per word, as BERT_WORDS splits."""
    pre_tokenizer = config.get("pre_tokenizer") or {}
    model = config.get("model") or {}
    return pre_tokenizer.get("type") == "BertPreTokenizer" and model.get("type") == "WordPiece"


def _ascii_table(normalizer: Any) -> dict[int, str]:
    if normalizer is None:
        return {}
    return {code: normalizer.normalize_str(chr(code)) for code in range(128)}


def _pairs_map_per_character(normalizer: Any, table: dict[int, str]) -> bool:
    """Every pair of ASCII characters normalizes to its two characters' table entries
    (checked, not only assumed from the normalizer's type; ~16k calls at load)."""
    if normalizer is None:
        return True
    return all(
        normalizer.normalize_str(a + b) == table[ord(a)] + table[ord(b)]
        for a, b in itertools.product(ASCII, repeat=2)
    )


def _fold_of(table: dict[int, str]) -> Callable[[str], str] | None:
    """str.lower or no change, where that is what the table does to printable ASCII."""
    mapped = "".join(table.get(ord(char), char) for char in PRINTABLE)
    if mapped == PRINTABLE:
        return str
    if mapped == PRINTABLE.lower():
        return str.lower
    return None


def _added_tokens(tokenizer: Any) -> Any:
    """A regex of the added tokens as written and as normalized (the pipeline matches a
    `normalized` token's normalized content in the normalized text), any case; None
    without added tokens."""
    contents = {token.content for token in tokenizer.get_added_tokens_decoder().values()}
    if tokenizer.normalizer is not None:
        contents |= {tokenizer.normalizer.normalize_str(content) for content in contents}
    contents.discard("")
    if not contents:
        return None
    return re.compile("|".join(map(re.escape, sorted(contents))), re.IGNORECASE)


def _special_ids(tokenizer: Any) -> tuple[list[int], list[int]] | None:
    """The ids the post-processor puts before and after a single text, if fixed."""
    found = set()
    for probe in ("a", "a b c"):
        with_specials = tokenizer.encode(probe, add_special_tokens=True).ids
        content = tokenizer.encode(probe, add_special_tokens=False).ids
        start = _find(with_specials, content)
        if start is None:
            return None
        end = start + len(content)
        found.add((tuple(with_specials[:start]), tuple(with_specials[end:])))
    if len(found) != 1:
        return None
    prefix, suffix = found.pop()
    return list(prefix), list(suffix)


def _find(sequence: list[int], part: list[int]) -> int | None:
    for start in range(len(sequence) - len(part) + 1):
        if sequence[start : start + len(part)] == part:
            return start
    return None


def _full_ids(tokenizer: Any) -> IdsOf:
    def ids(texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in tokenizer.encode_batch(texts)]

    return ids
