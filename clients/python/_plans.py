"""What each client method sends and how it reads the answers.

Both clients share these plans; they differ only in how the requests are sent
(grpc futures in Client, tasks in AsyncClient). A plan is a list of unary
requests for one stub method, a parser for one response, and a combiner that
folds the parsed responses, kept in request order, into the method's result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import accumulate
from typing import Any, Generic, TypeVar

import grpc
import numpy as np

from embedq.v1 import embedq_pb2 as pb

from ._convert import (
    PLAIN,
    Info,
    LookupResult,
    OutputOptions,
    TokenizedText,
    encode_options,
    hash_bytes,
    metric_value,
    quantize_calibrated,
    unpack,
)
from ._errors import EmbedqError

T = TypeVar("T")
Item = TypeVar("Item")


@dataclass(frozen=True)
class Plan(Generic[T]):
    method: str
    requests: list[Any]
    parse: Callable[[Any], Any]
    combine: Callable[[list[Any]], T]


def chunked(items: Sequence[Item], size: int) -> list[Sequence[Item]]:
    """Consecutive slices of at most `size` items; one empty slice for no items,
    so that an empty call still reaches the server and gets its INVALID_ARGUMENT."""
    size = max(1, size)
    return [items[i : i + size] for i in range(0, len(items), size)] or [items[:0]]


def _first(parts: list[T]) -> T:
    return parts[0]


def _encode_rows(response: pb.EncodeResponse) -> np.ndarray:
    return unpack(response.embeddings, response.count, response.dimension, response.dtype)


def _sent(output: OutputOptions, requests: int) -> tuple[OutputOptions, bool]:
    """The output options to send, and whether to calibrate INT8/UINT8 here.

    INT8/UINT8 without ranges calibrates on each request's own vectors. Split
    over several requests, every chunk would get its own ranges, so the codes
    would depend on chunk_size. Instead the client asks for float32 (at the
    requested dimension) and quantises once over the whole input, with the
    same formula: the result is what one request for all of it would give.
    """
    if output.self_calibrated and requests > 1:
        return replace(output, precision=pb.PRECISION_FLOAT32), True
    return output, False


def encode(
    texts: Sequence[str] | str,
    *,
    chunk_size: int,
    normalize: bool | None,
    truncate: bool,
    model: str,
    output: OutputOptions = PLAIN,
) -> Plan[np.ndarray]:
    single = isinstance(texts, str)
    batch = [texts] if single else list(texts)
    chunks = chunked(batch, chunk_size)
    sent, calibrate_here = _sent(output, len(chunks))
    options = encode_options(model=model, normalize=normalize, truncate=truncate, output=sent)
    requests = [pb.EncodeRequest(texts=c, options=options) for c in chunks]

    def combine(parts: list[np.ndarray]) -> np.ndarray:
        rows = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if rows.shape[0] != len(batch):
            raise EmbedqError(
                grpc.StatusCode.INTERNAL, f"got {rows.shape[0]} vectors for {len(batch)} texts"
            )
        if calibrate_here:
            rows = quantize_calibrated(rows, output.precision)
        return rows[0] if single else rows

    return Plan("Encode", requests, _encode_rows, combine)


def _scores(response: pb.SimilarityResponse) -> np.ndarray:
    return np.asarray(response.scores, dtype=np.float32)


def similarity_pairs(
    pairs: Sequence[tuple[str, str]],
    *,
    chunk_size: int,
    metric: str,
    normalize: bool | None,
    truncate: bool,
    model: str,
    output: OutputOptions = PLAIN,
) -> Plan[np.ndarray]:
    metric_id = metric_value(metric)
    options = encode_options(model=model, normalize=normalize, truncate=truncate, output=output)
    text_pairs = [pb.TextPair(a=a, b=b) for a, b in pairs]
    # Two texts per pair: keep each request near chunk_size texts.
    requests = [
        pb.SimilarityRequest(pairs=pb.PairList(pairs=c), metric=metric_id, options=options)
        for c in chunked(text_pairs, chunk_size // 2)
    ]
    return Plan("Similarity", requests, _scores, np.concatenate)


def _matches(response: pb.SimilarityResponse) -> list[tuple[int, float]]:
    return [(m.index, m.score) for m in response.matches]


def rank(
    query: str,
    candidates: Sequence[str],
    *,
    per_request: int,
    top_k: int,
    metric: str,
    normalize: bool | None,
    truncate: bool,
    model: str,
    output: OutputOptions = PLAIN,
) -> Plan[list[tuple[int, float]]]:
    """`per_request`: most candidates in one request (the server's Limits.max_candidates)."""
    metric_id = metric_value(metric)
    options = encode_options(model=model, normalize=normalize, truncate=truncate, output=output)
    chunks = chunked(list(candidates), per_request)
    requests = [
        pb.SimilarityRequest(
            ranking=pb.QueryCandidates(query=query, candidates=c),
            metric=metric_id,
            top_k=top_k,
            options=options,
        )
        for c in chunks
    ]
    offsets = list(accumulate((len(c) for c in chunks[:-1]), initial=0))

    def combine(parts: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
        if len(parts) == 1:
            return parts[0]  # the server's own order, ties included
        # Each chunk ranked its own candidates: shift to global indices, merge.
        merged = [(i + off, s) for off, part in zip(offsets, parts, strict=True) for i, s in part]
        merged.sort(key=lambda m: -m[1])
        return merged[:top_k] if top_k > 0 else merged

    return Plan("Similarity", requests, _matches, combine)


def _misses(rows: int, width: int, dtype: np.dtype) -> np.ndarray:
    """Rows for misses: NaN for float dtypes, 0 for the integer ones (no NaN there)."""
    fill = np.nan if np.issubdtype(dtype, np.floating) else 0
    return np.full((rows, width), fill, dtype=dtype)


def _lookup_part(response: pb.LookupResponse) -> LookupResult:
    found = np.asarray(response.found, dtype=bool)
    rows = unpack(response.embeddings, response.count, response.dimension, response.dtype)
    if rows.shape[0] != int(found.sum()):
        raise EmbedqError(
            grpc.StatusCode.INTERNAL, f"{rows.shape[0]} vectors for {int(found.sum())} hits"
        )
    vectors = _misses(len(found), rows.shape[1], rows.dtype)
    vectors[found] = rows
    return LookupResult(response.model, found, vectors)


def _lookup_combine(parts: list[LookupResult]) -> LookupResult:
    if len(parts) == 1:
        return parts[0]
    # A part with no hits may come without a dimension (an older server); widen it.
    widest = max(parts, key=lambda p: p.vectors.shape[1])
    width, dtype = widest.vectors.shape[1], widest.vectors.dtype
    vectors = [
        p.vectors if p.vectors.shape[1] == width else _misses(len(p), width, dtype) for p in parts
    ]
    model = next((p.model for p in parts if p.model), "")
    return LookupResult(model, np.concatenate([p.found for p in parts]), np.concatenate(vectors))


def _nonempty(items: Sequence[Item], size: int) -> list[Sequence[Item]]:
    return chunked(items, size) if items else []


def lookup(
    texts: Sequence[str] | str,
    sha256: Sequence[bytes | str],
    *,
    chunk_size: int,
    normalize: bool | None,
    truncate: bool,
    model: str,
    output: OutputOptions = PLAIN,
) -> Plan[LookupResult]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    hashes = [hash_bytes(h) for h in sha256]
    # Texts-only requests, then hashes-only ones: concatenated in request order
    # that is the response's own "texts first, then hashes" order.
    text_chunks, hash_chunks = _nonempty(texts, chunk_size), _nonempty(hashes, chunk_size)
    sent, calibrate_here = _sent(output, len(text_chunks) + len(hash_chunks))
    options = encode_options(model=model, normalize=normalize, truncate=truncate, output=sent)
    requests = [pb.LookupRequest(texts=c, options=options) for c in text_chunks]
    requests += [pb.LookupRequest(sha256=c, options=options) for c in hash_chunks]
    if not requests:  # nothing asked: let the server answer INVALID_ARGUMENT
        requests = [pb.LookupRequest(options=options)]

    def combine(parts: list[LookupResult]) -> LookupResult:
        result = _lookup_combine(parts)
        if not calibrate_here:
            return result
        # As the server does: calibrate on the hits (none: nothing to quantise).
        hits = result.vectors[result.found]
        codes = quantize_calibrated(hits, output.precision) if len(hits) else None
        dtype = np.dtype(np.uint8 if output.precision == pb.PRECISION_UINT8 else np.int8)
        vectors = _misses(len(result), result.vectors.shape[1], dtype)
        if codes is not None:
            vectors[result.found] = codes
        return LookupResult(result.model, result.found, vectors)

    return Plan("Lookup", requests, _lookup_part, combine)


def _tokenized(response: pb.TokenizeResponse) -> list[TokenizedText]:
    return [TokenizedText.from_proto(t) for t in response.texts]


def _flatten(parts: list[list[TokenizedText]]) -> list[TokenizedText]:
    return [t for part in parts for t in part]


def tokenize(
    texts: Sequence[str] | str, *, chunk_size: int, truncate: bool, model: str
) -> Plan[list[TokenizedText]]:
    batch = [texts] if isinstance(texts, str) else list(texts)
    options = encode_options(model=model, normalize=None, truncate=truncate)
    requests = [pb.TokenizeRequest(texts=c, options=options) for c in chunked(batch, chunk_size)]
    return Plan("Tokenize", requests, _tokenized, _flatten)


def info() -> Plan[Info]:
    return Plan("Info", [pb.InfoRequest()], Info.from_proto, _first)
