"""asyncio client over grpc.aio."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
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

T = TypeVar("T")


class AsyncClient(ClientSettings):
    """The :class:`~embedq.client.Client` API as coroutines (same arguments, same results).

    TLS, token and ``retry`` arguments as for Client. The channel is opened on first
    use, inside the running event loop (a grpc.aio channel belongs to the loop
    it was created in). Use ``async with AsyncClient(...)`` or ``await
    client.close()``.
    """

    def __init__(self, target: str = DEFAULT_TARGET, **settings: Any) -> None:
        # Arguments as ClientSettings declares them (one signature for both clients).
        super().__init__(target, **settings)
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.EmbedderStub | None = None

    @property
    def stub(self) -> pb_grpc.EmbedderStub:
        if self._stub is None:
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(
                    self.target, options=self._channel_options
                )
            else:
                self._channel = grpc.aio.secure_channel(
                    self.target, self._credentials, options=self._channel_options
                )
            self._stub = pb_grpc.EmbedderStub(self._channel)
        return self._stub

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = self._stub = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _run(self, plan: _plans.Plan[T]) -> T:
        """Send a plan's requests, at most max_in_flight at once; combine in order."""
        method = getattr(self.stub, plan.method)
        at = deadline(self.timeout)
        window = asyncio.Semaphore(self.max_in_flight)

        policy = self.retry

        async def one(request: Any) -> Any:
            async with window:
                attempt = 1
                while True:
                    try:
                        response = await method(
                            request, timeout=remaining(at), metadata=self._metadata
                        )
                        break
                    except grpc.RpcError as error:
                        pause = policy.pause(attempt + 1, error, remaining(at))
                        if pause is None:
                            raise EmbedqError.from_rpc_error(error, attempts=attempt) from error
                    await asyncio.sleep(pause)
                    attempt += 1
            return plan.parse(response)

        tasks = [asyncio.ensure_future(one(request)) for request in plan.requests]
        try:
            with rpc_errors():
                parts = await asyncio.gather(*tasks)
        except BaseException:
            # Stop the other chunks, and collect their outcomes so that no
            # "exception was never retrieved" warning follows the real error.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return plan.combine(list(parts))

    async def encode(
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
        """(n, dim) for a sequence of texts, (dim,) for one str; options as in
        :meth:`Client.encode <embedq.client.Client.encode>`."""
        return await self._run(
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

    async def similarity(
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
        scores = await self.similarity_pairs(
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

    async def similarity_pairs(
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
        return await self._run(
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

    async def rank(
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
        output = output_options(dimension=dimension, prompt=prompt, prompt_name=prompt_name)
        return await self._run(
            _plans.rank(
                query,
                candidates,
                per_request=await self._candidates_per_request(len(candidates)),
                top_k=top_k,
                metric=metric,
                normalize=normalize,
                truncate=truncate,
                model=model,
                output=output,
            )
        )

    async def _candidates_per_request(self, count: int) -> int:
        known = self._known_candidate_limit(count)
        if known is not None:
            return known
        return self._remember_candidate_limit((await self.info()).limits.max_candidates)

    async def lookup(
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
        return await self._run(
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

    async def tokenize(
        self, texts: Sequence[str] | str, *, truncate: bool = True, model: str = ""
    ) -> list[TokenizedText]:
        return await self._run(
            _plans.tokenize(texts, chunk_size=self.chunk_size, truncate=truncate, model=model)
        )

    async def info(self) -> Info:
        return await self._run(_plans.info())

    @overload
    def encode_stream(
        self,
        texts: AsyncIterable[str] | Iterable[str],
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
    ) -> AsyncIterator[tuple[str, np.ndarray]]: ...

    @overload
    def encode_stream(
        self,
        texts: AsyncIterable[str] | Iterable[str],
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
    ) -> AsyncIterator[stream.StreamItem]: ...

    async def encode_stream(
        self,
        texts: AsyncIterable[str] | Iterable[str],
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
    ) -> AsyncIterator[stream.StreamItem]:
        """Async generator form of :meth:`Client.encode_stream`; `texts` may be
        an async or a sync iterable (a sync one is read inside the event loop,
        so it must not block)."""
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
        call = self.stub.EncodeStream(aiter(feed), timeout=timeout, metadata=self._metadata)
        try:
            async for response in call:
                yield stream.result(response, on_error)
        except EmbedqError:
            raise
        except grpc.RpcError as error:
            raise feed.failure(error) from error
        except asyncio.CancelledError:
            # grpc.aio cancels the call when the request iterator raises.
            if feed.error is None:
                raise
            raise feed.error from None
        finally:
            call.cancel()
