"""Request checks of the front stage: every rejection names the field.

Pure functions over the protobuf messages; they raise RequestError.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from embedq.settings import Limits
from embedq.v1 import embedq_pb2 as pb

from .errors import invalid

KNOWN_TRUNCATIONS = set(pb.Truncation.values())
KNOWN_METRICS = set(pb.Metric.values())


def check_texts(
    texts: Sequence[str], limits: Limits, field: str = "texts", max_texts: int | None = None
) -> None:
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
                raise invalid(
                    f"{field}[{index}] is {size} UTF-8 bytes, over the limit of "
                    f"{limits.max_text_bytes}"
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


def check_similarity(request: pb.SimilarityRequest, limits: Limits) -> None:
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
        check_texts(texts, limits, field="pairs (a and b texts)")
    else:
        if not request.ranking.candidates:
            raise invalid("ranking.candidates is empty: send at least one candidate")
        check_texts(
            [request.ranking.query, *request.ranking.candidates],
            limits,
            field="ranking (query and candidates)",
            max_texts=limits.max_candidates + 1,
        )


def check_hashes(hashes: Sequence[bytes]) -> None:
    for index, digest in enumerate(hashes):
        if len(digest) != 32:
            raise invalid(f"sha256[{index}] is {len(digest)} bytes; a SHA-256 digest is 32")
