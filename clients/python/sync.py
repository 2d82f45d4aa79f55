"""Blocking client over grpc's sync channel."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal, TypeVar, overload

import grpc
import numpy as np

from embedq.v1 import embedq_pb2_grpc as pb_grpc

from . import _plans, stream
from ._common import (
    DEFAULT_TARGET,
    ClientSettings,
    deadline,
    remaining,
)
from ._convert import (
    Info,
    LookupResult,
    Precision,
    Ranges,
    TokenizedText,
    encode_options,
    output_options,
)
from ._errors import EmbedqError, rpc_errors
from ._retry import RetryPolicy

T = TypeVar("T")


class Client(ClientSettings):
    """Blocking embedq client.

    ``timeout`` bounds each method call as a whole (all its chunks), None for
    no deadline. Inputs longer than ``chunk_size`` texts are split into
    requests of ``chunk_size`` texts, at most ``max_in_flight`` of them sent at
    once; results keep input order. A ranking is split only past the server's
    ``Limits.max_candidates`` (asked once, for rankings of more than
    ``chunk_size - 1`` candidates) or the ``max_candidates`` given here. Every
    failure raises :class:`EmbedqError`.

    ``retry``: a request refused with UNAVAILABLE or RESOURCE_EXHAUSTED is
    sent again after an exponential backoff with jitter, or after the server's
    ``retry-after-ms`` hint, within ``timeout`` (never past it): by default
    up to 5 attempts, pauses of 0.2, 0.4, 0.8, 1.6 s (+-20 %, at most 5 s);
    pass a :class:`RetryPolicy` to change that, ``retry=False`` for none.
    ``encode_stream`` is not retried (see there).
    ``normalize=None`` means the model's own default; ``truncate=False`` makes
    the server refuse over-long texts (INVALID_ARGUMENT) instead of cutting them.

    Security: ``tls_ca`` (a PEM path or bytes) verifies a TLS server (``tls=True``
    alone: TLS with grpc's default roots); ``tls_cert``/``tls_key`` present a
    client certificate (mutual TLS); ``token`` sends ``authorization: Bearer
    <token>`` with every call, over TLS or not.
    """

    def __init__(self, target: str = DEFAULT_TARGET, **settings: Any) -> None:
        # Arguments as ClientSettings declares them (one signature for both clients).
        super().__init__(target, **settings)
        if self._credentials is None:
            self.channel = grpc.insecure_channel(target, options=self._channel_options)
        else:
            self.channel = grpc.secure_channel(
                target, self._credentials, options=self._channel_options
            )
        self._stub = pb_grpc.EmbedderStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self, plan: _plans.Plan[T]) -> T:
        """Send a plan's requests, a bounded window at a time, parse them in order."""
        method = getattr(self._stub, plan.method)
        at = deadline(self.timeout)
        pending: deque[Any] = deque()
        parts: list[Any] = []
        try:
            with rpc_errors():
                for request in plan.requests:
                    if len(pending) >= self.max_in_flight:
                        parts.append(plan.parse(pending.popleft().result()))
                    pending.append(_Retrying(method, request, at, self._metadata, self.retry))
                while pending:
                    parts.append(plan.parse(pending.popleft().result()))
        finally:
            for future in pending:  # only left over after a failure
                future.cancel()
        return plan.combine(parts)

    def encode(
        self,
        texts: Sequence[str] | str,
        *,
        normalize: bool | None = None,
        truncate: bool = True,
        model: str = "",
        dimension: int | None = None,
        precision: Precision = "float32",
        prompt: str | None = None,
        prompt_name: str | None = None,
        ranges: Ranges | None = None,
    ) -> np.ndarray:
        """(n, dim) for a sequence of texts, (dim,) for one str.

        ``dimension``: keep the first N values (Matryoshka), re-normalised when
        normalisation is on; None/0: the model's. ``precision``: "float32"
        (default), "float16", "int8", "uint8" (arrays of that dtype), "binary"
        or "ubinary" (int8/uint8 rows of ceil(dim / 8) packed bits), as
        sentence-transformers' ``quantize_embeddings``. ``ranges`` calibrates
        int8/uint8: (2, dim) per-dimension minimums and maximums; without it the
        input's own vectors calibrate (at least 2 texts), over the whole input
        even when it is split into chunks. ``prompt`` is prepended to every text
        ("" turns off the model's default prompt); ``prompt_name`` picks one of
        the model's prompts (``info().model().prompts``).
        """
        return self._run(
            _plans.encode(
                texts,
                chunk_size=self.chunk_size,
                normalize=normalize,
                truncate=truncate,
                model=model,
                output=output_options(
                    dimension=dimension,
                    precision=precision,
                    prompt=prompt,
                    prompt_name=prompt_name,
                    ranges=ranges,
                ),
            )
        )

    def similarity(
        self,
        a: str,
        b: str,
        *,
        metric: str = "cosine",
        normalize: bool | None = None,
        truncate: bool = True,
        model: str = "",
        dimension: int | None = None,
        prompt: str | None = None,
        prompt_name: str | None = None,
    ) -> float:
        """Score of one pair; higher is more similar for every metric."""
        scores = self.similarity_pairs(
            [(a, b)],
            metric=metric,
            normalize=normalize,
            truncate=truncate,
            model=model,
            dimension=dimension,
            prompt=prompt,
            prompt_name=prompt_name,
        )
        return float(scores[0])

    def similarity_pairs(
        self,
        pairs: Sequence[tuple[str, str]],
        *,
        metric: str = "cosine",
        normalize: bool | None = None,
        truncate: bool = True,
        model: str = "",
        dimension: int | None = None,
        prompt: str | None = None,
        prompt_name: str | None = None,
    ) -> np.ndarray:
        """float32 scores, one per (a, b) pair, in pair order.

        ``dimension``/``prompt``/``prompt_name`` as in :meth:`encode`; scoring
        always uses float32 vectors (there is no precision here).
        """
        return self._run(
            _plans.similarity_pairs(
                pairs,
                chunk_size=self.chunk_size,
                metric=metric,
                normalize=normalize,
                truncate=truncate,
                model=model,
                output=output_options(dimension=dimension, prompt=prompt, prompt_name=prompt_name),
            )
        )

    def rank(
        self,
        query: str,
        candidates: Sequence[str],
        *,
        top_k: int = 0,
        metric: str = "cosine",
        normalize: bool | None = None,
        truncate: bool = True,
        model: str = "",
        dimension: int | None = None,
        prompt: str | None = None,
        prompt_name: str | None = None,
    ) -> list[tuple[int, float]]:
        """(candidate index, score) best first; the best top_k only when top_k > 0.

        Up to the server's ``Limits.max_candidates`` candidates (10,000 by
        default) go in one request; more are split and the rankings merged.
        """
        output = output_options(dimension=dimension, prompt=prompt, prompt_name=prompt_name)
        return self._run(
            _plans.rank(
                query,
                candidates,
                per_request=self._candidates_per_request(len(candidates)),
                top_k=top_k,
                metric=metric,
                normalize=normalize,
                truncate=truncate,
                model=model,
                output=output,
            )
        )

    def _candidates_per_request(self, count: int) -> int:
        known = self._known_candidate_limit(count)
        if known is not None:
            return known
        return self._remember_candidate_limit(self.info().limits.max_candidates)

    def lookup(
        self,
        texts: Sequence[str] | str = (),
        *,
        sha256: Sequence[bytes | str] = (),
        normalize: bool | None = None,
        truncate: bool = True,
        model: str = "",
        dimension: int | None = None,
        precision: Precision = "float32",
        prompt: str | None = None,
        prompt_name: str | None = None,
        ranges: Ranges | None = None,
    ) -> LookupResult:
        """Cached vectors only (misses are not computed): texts first, then hashes.

        ``sha256`` items are raw 32-byte digests (see :func:`text_sha256`) or
        64-digit hex strings. ``normalize``/``truncate``/``prompt``/``prompt_name``
        pick the cache variant; ``dimension``/``precision``/``ranges`` shape the
        answer as in :meth:`encode` (int8/uint8 without ranges calibrate on the hits).
        """
        return self._run(
            _plans.lookup(
                texts,
                sha256,
                chunk_size=self.chunk_size,
                normalize=normalize,
                truncate=truncate,
                model=model,
                output=output_options(
                    dimension=dimension,
                    precision=precision,
                    prompt=prompt,
                    prompt_name=prompt_name,
                    ranges=ranges,
                ),
            )
        )

    def tokenize(
        self, texts: Sequence[str] | str, *, truncate: bool = True, model: str = ""
    ) -> list[TokenizedText]:
        """The model tokenizer's view of each text (a str counts as one text)."""
        return self._run(
            _plans.tokenize(texts, chunk_size=self.chunk_size, truncate=truncate, model=model)
        )

    def info(self) -> Info:
        """Served models and request limits."""
        return self._run(_plans.info())

    @overload
    def encode_stream(
        self,
        texts: Iterable[str],
        *,
        ids: Iterable[str] | None = ...,
        normalize: bool | None = ...,
        truncate: bool = ...,
        model: str = ...,
        dimension: int | None = ...,
        precision: Precision = ...,
        prompt: str | None = ...,
        prompt_name: str | None = ...,
        ranges: Ranges | None = ...,
        on_error: Literal["raise"] = ...,
        timeout: float | None = ...,
        message_timeout: float | None = ...,
    ) -> Iterator[tuple[str, np.ndarray]]: ...

    @overload
    def encode_stream(
        self,
        texts: Iterable[str],
        *,
        ids: Iterable[str] | None = ...,
        normalize: bool | None = ...,
        truncate: bool = ...,
        model: str = ...,
        dimension: int | None = ...,
        precision: Precision = ...,
        prompt: str | None = ...,
        prompt_name: str | None = ...,
        ranges: Ranges | None = ...,
        on_error: Literal["yield"],
        timeout: float | None = ...,
        message_timeout: float | None = ...,
    ) -> Iterator[stream.StreamItem]: ...

    def encode_stream(
        self,
        texts: Iterable[str],
        *,
        ids: Iterable[str] | None = None,
        normalize: bool | None = None,
        truncate: bool = True,
        model: str = "",
        dimension: int | None = None,
        precision: Precision = "float32",
        prompt: str | None = None,
        prompt_name: str | None = None,
        ranges: Ranges | None = None,
        on_error: stream.OnError = "raise",
        timeout: float | None = None,
        message_timeout: float | None = None,
    ) -> Iterator[stream.StreamItem]:
        """Embed texts as `texts` yields them; yield (id, vector) in completion order.

        Each text is one EncodeStream message with id ``ids[i]`` or ``str(i)``.
        A failed message raises EmbedqError (``.id`` names it) and ends the
        stream, or with ``on_error="yield"`` comes out as ``(id, EmbedqError)``.
        ``timeout`` bounds the whole stream (default none: streams are long-lived).
        ``message_timeout`` (seconds) is each text's own limit (``timeout_ms`` of its
        message): one not answered in time fails alone with DEADLINE_EXCEEDED, and work
        that cannot finish within it is refused at once, while the stream goes on.
        Leaving the loop early cancels the stream. A stream is never retried
        (its texts are read once, as they come): a failure of the whole call
        raises EmbedqError; a message refused with UNAVAILABLE or
        RESOURCE_EXHAUSTED comes out like any failed message (``.id``,
        ``.retryable``), for the caller to send again. The output options are those
        of :meth:`encode`; "int8"/"uint8" need ``ranges`` here (one text per
        message has nothing to calibrate on), else ValueError.
        """
        stream.check_on_error(on_error)
        output = output_options(
            dimension=dimension,
            precision=precision,
            prompt=prompt,
            prompt_name=prompt_name,
            ranges=ranges,
        )
        stream.check_output(output)
        options = encode_options(model=model, normalize=normalize, truncate=truncate, output=output)
        feed = stream.Feed(texts, ids, options, message_timeout)
        call = self._stub.EncodeStream(iter(feed), timeout=timeout, metadata=self._metadata)
        try:
            for response in call:
                yield stream.result(response, on_error)
        except EmbedqError:
            raise
        except grpc.RpcError as error:
            raise feed.failure(error) from error
        finally:
            call.cancel()


class _Retrying:
    """One request of a call: a grpc future, sent again while the policy says so.

    Sending happens at construction (so that several requests are in flight
    at once); waiting and any retries happen in result().
    """

    def __init__(
        self,
        method: Any,
        request: Any,
        at: float | None,
        metadata: Any,
        policy: RetryPolicy,
    ) -> None:
        self._method = method
        self._request = request
        self._at = at
        self._metadata = metadata
        self._policy = policy
        self._cancelled = False
        self._send()

    def _send(self) -> None:
        self._future = self._method.future(
            self._request, timeout=remaining(self._at), metadata=self._metadata
        )

    def result(self) -> Any:
        attempt = 1
        while True:
            try:
                return self._future.result()
            except grpc.RpcError as error:
                pause = None
                if not self._cancelled:
                    pause = self._policy.pause(attempt + 1, error, remaining(self._at))
                if pause is None:
                    raise EmbedqError.from_rpc_error(error, attempts=attempt) from error
            time.sleep(pause)
            attempt += 1
            self._send()

    def cancel(self) -> None:
        self._cancelled = True
        self._future.cancel()
