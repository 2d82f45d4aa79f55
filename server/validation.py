"""Request checks of the front stage: every rejection names the field.

Pure functions over the protobuf messages; they raise RequestError.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from embedq.settings import Limits
from embedq.v1 import embedq_pb2 as pb

from .errors import invalid

# What a caller calls text `row` of a request's texts (say "pairs[3].b").
RowName = Callable[[int], str]

KNOWN_TRUNCATIONS = set(pb.Truncation.values())
KNOWN_METRICS = set(pb.Metric.values())


def check_texts(
    texts: Sequence[str],
    limits: Limits,
    field: str = "texts",
    max_texts: int | None = None,
    name: RowName | None = None,
) -> None:
    """`name` says what the caller calls text i (default: `field[i]`)."""
    most = max_texts or limits.max_batch_texts
    if not texts:
        raise invalid(f"{field} is empty: send at least one text")
    if len(texts) > most:
        raise invalid(
            f"{field} has {len(texts)} entries, over the limit of {most} "
            "per request: split it into several requests"
        )
    # A str of n characters has at most 4n UTF-8 bytes: only long texts pay
    # for the encode.
    cheap_ok = limits.max_text_bytes // 4
    for index, text in enumerate(texts):
        if len(text) > cheap_ok:
            size = len(text.encode("utf-8", "surrogatepass"))
            if size > limits.max_text_bytes:
                where = name(index) if name else f"{field}[{index}]"
                raise invalid(
                    f"{where} is {size} UTF-8 bytes, over the limit of {limits.max_text_bytes}"
                )


def check_options(options: pb.EncodeOptions) -> None:
    if options.truncation not in KNOWN_TRUNCATIONS:
        raise invalid(f"options.truncation: unknown value {options.truncation}")


def resolve_prompt(options: pb.EncodeOptions, prompts: Mapping[str, str], default_name: str) -> str:
    """The prompt text a request asks for (explicit, named, or the model's default)."""
    if options.HasField("prompt"):
        if options.prompt_name:
            raise invalid("set options.prompt or options.prompt_name, not both")
        return options.prompt
    name = options.prompt_name or default_name
    if not name:
        return ""
    if name not in prompts:
        known = ", ".join(sorted(prompts)) or "none"
        raise invalid(f"options.prompt_name {name!r} is not one of the model's prompts ({known})")
    return prompts[name]


def check_prompt(prompt: str, limits: Limits) -> None:
    """A prompt is read with every text: it gets the same byte limit as one."""
    size = len(prompt.encode("utf-8", "surrogatepass"))
    if size > limits.max_text_bytes:
        raise invalid(
            f"options.prompt is {size} UTF-8 bytes, over the limit of {limits.max_text_bytes}"
        )


def truncate_flag(options: pb.EncodeOptions) -> bool:
    return options.truncation != pb.TRUNCATION_REJECT


def check_similarity(request: pb.SimilarityRequest, limits: Limits) -> tuple[list[str], RowName]:
    """Check a Similarity request; return the texts to embed ([a of every pair, then b of
    every pair], or [query, *candidates]) and their names as the caller sent them."""
    if request.metric not in KNOWN_METRICS:
        raise invalid(f"metric: unknown value {request.metric}")
    if request.top_k < 0:
        raise invalid(f"top_k must be 0 (all) or positive, got {request.top_k}")
    check_options(request.options)
    which = request.WhichOneof("input")
    if which is None:
        raise invalid("set either pairs or ranking")
    if which == "pairs":
        if request.top_k:
            raise invalid("top_k applies to ranking, not to pairs")
        pairs = request.pairs.pairs
        if not pairs:
            raise invalid("pairs is empty: send at least one pair")
        texts = [p.a for p in pairs] + [p.b for p in pairs]
        names = pair_text_name(len(pairs))
        check_texts(texts, limits, field="pairs (a and b texts)", name=names)
        return texts, names
    if not request.ranking.candidates:
        raise invalid("ranking.candidates is empty: send at least one candidate")
    texts = [request.ranking.query, *request.ranking.candidates]
    check_texts(
        texts,
        limits,
        field="ranking (query and candidates)",
        max_texts=limits.max_candidates + 1,
        name=ranking_text_name,
    )
    return texts, ranking_text_name


def pair_text_name(pairs: int) -> RowName:
    """Names of the texts [a of every pair, then b of every pair] as the caller sent them."""
    return lambda row: f"pairs[{row}].a" if row < pairs else f"pairs[{row - pairs}].b"


def ranking_text_name(row: int) -> str:
    """Name of text `row` of [query, *candidates] as the caller sent it."""
    return "ranking.query" if row == 0 else f"ranking.candidates[{row - 1}]"


def check_hashes(hashes: Sequence[bytes]) -> None:
    for index, digest in enumerate(hashes):
        if len(digest) != 32:
            raise invalid(f"sha256[{index}] is {len(digest)} bytes; a SHA-256 digest is 32")
