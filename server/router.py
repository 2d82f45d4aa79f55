"""The front stage: gRPC handlers of embedq.v1.Embedder.

Handlers validate, resolve the model and options, hand texts to the
dispatcher (server/queue.py) and pack the vectors. Vectors stay numpy
matrices until they become one `bytes` field: no per-float Python work.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import PurePath

import grpc
import numpy as np
import redis.asyncio as aioredis
from google.protobuf.message import DecodeError, EncodeError, Message

from embedq import __version__
from embedq.internal.v1 import queue_pb2
from embedq.keys import RETRY_AFTER_MS_KEY, Keys, texts_sha256
from embedq.settings import ServerSettings
from embedq.v1 import embedq_pb2 as pb
from embedq.v1 import embedq_pb2_grpc

from . import similarity, validation
from .errors import RequestError, as_request_error, deadline, invalid, unavailable
from .output import OutputSpec, output_spec, ranking_vectors, shape
from .queue import Dispatcher, Variant, default_row_name
from .registry import ModelRegistry

log = logging.getLogger(__name__)

# Messages of one stream being worked on or waiting to be sent; reading the
# stream pauses beyond it (and HTTP/2 flow control then holds the client).
STREAM_WINDOW = 1024
# Texts of those messages: bounds the memory a stream holds whatever it sends,
# and how much of the workers' queue one stream can take ahead of other callers.
STREAM_TEXT_WINDOW = 512
# ... and, once the model's rate is measured, to this much of its work for all of this
# server's busy streams together, so that another caller's text waits behind about this long
# of the streams' work (a 512-text window per stream was 1.8-2.5 s on a 2-core CPU, and 16
# streams queued 16 times that); never below a batch, so that streams keep a worker busy.
STREAM_WINDOW_S = 0.5
STREAM_MIN_TEXT_WINDOW = 64
# A busy stream's share of that, however many streams share it: a few messages in flight.
STREAM_MIN_SHARE = 4
# Bytes of those messages and of their computed responses: a message's texts and its `id`
# (which its response carries back) may be megabytes each; a few hundred of them must not
# stay on the server for a client that does not read. Above what 512 texts of sentences take
# (~0.5 MB) with their vectors (512 x 384 floats: 0.8 MB; 1,024 dimensions: 2 MB); a model of
# 4,096 dimensions gets about 250 texts in flight per stream from it.
STREAM_BYTE_WINDOW = 4 * 2**20
# An answer's bytes besides its vectors: model name, id, flags and framing (one `cached`
# flag a text at most: 2,048 bytes), with room to spare.
ANSWER_OVERHEAD_BYTES = 16 * 2**10


class Undecodable:
    """Stands in for request bytes that do not parse (say, invalid UTF-8 in a
    string field), so that the caller gets INVALID_ARGUMENT, not UNKNOWN; a stream
    message's answer carries its id where the id itself can be read."""

    def __init__(self, type_name: str, id: str = "") -> None:  # noqa: A002 - the field's name
        self.type_name = type_name
        self.id = id

    def error(self) -> RequestError:
        return invalid(
            f"request is not a valid {self.type_name} message (strings must be valid UTF-8)"
        )


def tolerant_parser(message_class: type) -> Callable[[bytes], object]:
    has_id = message_class.DESCRIPTOR.fields_by_name.get("id") is not None

    def parse(data: bytes) -> object:
        try:
            return message_class.FromString(data)
        except DecodeError:
            message_id = stream_message_id(data) if has_id else ""
            return Undecodable(message_class.DESCRIPTOR.full_name, message_id)

    return parse


def stream_message_id(data: bytes) -> str:
    """The id of stream message bytes that do not parse ("" where it cannot be read: the
    framing broken, or the id itself not UTF-8). Without it, a client with several messages
    in flight could not tell which one failed, and one waiting for that id waited forever."""
    try:
        return queue_pb2.StreamMessageId.FromString(data).id.decode("utf-8")
    except (DecodeError, UnicodeDecodeError):
        return ""


def add_to_server(servicer: EmbedderService, server: grpc.aio.Server) -> None:
    """Register the Embedder handlers (as the generated helper would, but
    with parsers that turn undecodable requests into a clear status)."""
    service = pb.DESCRIPTOR.services_by_name["Embedder"]
    handlers = {}
    for method in service.methods:
        request_class = getattr(pb, method.input_type.name)
        response_class = getattr(pb, method.output_type.name)
        make = (
            grpc.stream_stream_rpc_method_handler
            if method.client_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=tolerant_parser(request_class),
            response_serializer=response_class.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )


def unary(handler: Callable[..., Awaitable]) -> Callable[..., Awaitable]:
    """Turn RequestError into its status; anything unexpected into INTERNAL."""

    @functools.wraps(handler)
    async def wrapped(self, request, context: grpc.aio.ServicerContext):
        try:
            if isinstance(request, Undecodable):
                raise request.error()
            return await handler(self, request, context)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            if isinstance(exc, RequestError) and caller_gone(context):
                # There is nobody to send a status to, and grpc would log the failed
                # send as an error (with a traceback, once per call: a burst's worth).
                raise asyncio.CancelledError from None
            error = as_request_error(exc, handler.__name__)
            hint = (
                ((RETRY_AFTER_MS_KEY, str(error.retry_after_ms)),) if error.retry_after_ms else ()
            )
            try:
                await context.abort(error.code, error.message, trailing_metadata=hint)
            except (grpc.aio.AbortError, RequestError):
                # Sent: how abort() ends a gRPC handler (the HTTP front's raises the status).
                raise
            except Exception as failed:  # noqa: BLE001 - grpc's ExecuteBatchError, private
                # The call ended under us: its caller left between the check above and
                # the send (a deadline and our own wait for its texts end together).
                log.info(
                    "%s: the caller left before its %s status could be sent (%s)",
                    handler.__name__,
                    error.code.name,
                    type(failed).__name__,
                )
                raise asyncio.CancelledError from None

    return wrapped


def caller_gone(context: grpc.aio.ServicerContext) -> bool:
    """The caller hung up or its deadline has passed: a status would reach nobody."""
    remaining = context.time_remaining()
    return context.cancelled() or (remaining is not None and remaining <= 0)


async def send_all(responses: AsyncIterator, context: grpc.aio.ServicerContext) -> None:
    """Write a stream's responses as they come (the handler is a writer, not a generator).

    A write fails when the call is over: the caller cancelled (a reader that stopped
    reading, then hung up with answers unsent), its deadline passed, or the connection
    dropped. There is nobody left to answer, so the handler ends as cancelled with one
    INFO line. gRPC's own loop over a generator's responses logged each such failed send
    as an ERROR with a traceback (measured: every slow-reader stream its client cancelled).
    """
    async with contextlib.aclosing(responses):
        async for response in responses:
            try:
                await context.write(response)
            except (asyncio.CancelledError, EncodeError, TypeError):
                raise  # cancelled here, or a response that cannot be serialized: a bug
            except Exception as failed:  # noqa: BLE001 - grpc's ExecuteBatchError, private
                log.info(
                    "stream ended by its caller before a response could be sent (%s)",
                    type(failed).__name__,
                )
                raise asyncio.CancelledError from None


def as_error(exc: BaseException) -> pb.Error:
    """One stream message's failure, as its response's `error`."""
    error = as_request_error(exc, "stream message")
    return pb.Error(
        code=error.code_number, message=error.message, retry_after_ms=error.retry_after_ms
    )


@dataclass(frozen=True)
class Embedded:
    """Full float32 vectors of a request, and how to answer with them."""

    variant: Variant
    spec: OutputSpec
    vectors: np.ndarray
    cached: np.ndarray


class EmbedderService(embedq_pb2_grpc.EmbedderServicer):
    def __init__(
        self,
        settings: ServerSettings,
        dispatcher: Dispatcher,
        registry: ModelRegistry,
        redis: aioredis.Redis,
        keys: Keys,
    ) -> None:
        self.settings = settings
        self.limits = settings.limits
        self.dispatcher = dispatcher
        self.registry = registry
        self.redis = redis
        self.keys = keys
        self.streams = StreamShares(self._stream_capacity)
        self.shutdown = Shutdown()

    # -- shared steps -----------------------------------------------------------

    def _variant(self, options: pb.EncodeOptions) -> Variant:
        validation.check_options(options)
        model = self.registry.resolve(options.model)
        reg = model.registration
        normalize = options.normalize if options.HasField("normalize") else reg.normalize
        prompt = validation.resolve_prompt(options, reg.prompts, reg.default_prompt_name)
        validation.check_prompt(prompt, self.limits)
        return Variant(model, normalize, validation.truncate_flag(options), prompt)

    def _resolve(self, options: pb.EncodeOptions) -> tuple[Variant, OutputSpec]:
        """The variant to compute or look up, and the shape of the answer."""
        variant = self._variant(options)
        dimension = variant.model.registration.dimension
        return variant, output_spec(options, dimension, variant.normalize)

    def _stream_capacity(self) -> float:
        """The rate streams are timed by: the default model's measured texts/s (with no
        default, the fastest model's: a stream may use any of them; 0: not measured)."""
        models = self.registry.models
        default = models.get(self.registry.default_name)
        rates = [default.capacity] if default else [m.capacity for m in models.values()]
        return max(rates, default=0.0)

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        default = self.settings.default_timeout_s
        return default if remaining is None else max(0.0, min(remaining, default))

    async def _embed(
        self,
        texts: list[str],
        options: pb.EncodeOptions,
        context: grpc.aio.ServicerContext,
        limit_s: float | None = None,
    ) -> Embedded:
        """An Encode request's texts, checked, then encoded."""
        validation.check_texts(texts, self.limits)
        return await self._encode(texts, options, context, default_row_name, limit_s)

    async def _encode(
        self,
        texts: list[str],
        options: pb.EncodeOptions,
        context: grpc.aio.ServicerContext,
        row_name: validation.RowName,
        limit_s: float | None,
    ) -> Embedded:
        """Checked texts as vectors: from the cache, or queued for the workers."""
        variant, spec = self._resolve(options)
        timeout_s = self._timeout(context)
        if limit_s is not None:  # what is left of a stream message's own timeout_ms
            timeout_s = min(timeout_s, limit_s)
        vectors, cached = await self.dispatcher.encode(variant, texts, timeout_s, row_name)
        return Embedded(variant, spec, vectors, cached)

    def _packed(self, done: Embedded) -> dict:
        embeddings = shape(done.vectors, done.spec)
        self._check_answer_size(len(embeddings))
        return {
            "model": done.variant.model.name,
            "dimension": done.spec.dimension,
            "dtype": done.spec.dtype,
            "count": done.vectors.shape[0],
            "embeddings": embeddings,
            "cached": done.cached.tolist(),
        }

    def _check_answer_size(self, vector_bytes: int) -> None:
        """Refuse an answer gRPC could not send: over --max-message-bytes it fails the whole
        call, a stream with every message in flight, and the log blamed the client. (Only
        with a lowered cap: 2,048 texts of 4,096 float32 dimensions are 32 MiB of 64.)"""
        cap = self.limits.max_message_bytes
        if vector_bytes + ANSWER_OVERHEAD_BYTES > cap:
            raise invalid(
                f"the answer would hold {vector_bytes} bytes of vectors, over the server's "
                f"message size limit of {cap} bytes (--max-message-bytes): send fewer texts "
                "per request, or ask for a lower options.dimension or precision"
            )

    # -- Encode -----------------------------------------------------------------

    @unary
    async def Encode(self, request: pb.EncodeRequest, context) -> pb.EncodeResponse:
        done = await self._embed(list(request.texts), request.options, context)
        return pb.EncodeResponse(**self._packed(done))

    async def _answer_encode(
        self, message: pb.EncodeStreamRequest, context, read_at: float
    ) -> pb.EncodeStreamResponse:
        try:
            if isinstance(message, Undecodable):
                raise message.error()
            limit_s = own_limit_s(message.timeout_ms, read_at)
            done = await self._embed(list(message.texts), message.options, context, limit_s)
            packed = self._packed(done)
        except Exception as exc:  # noqa: BLE001 - one message's failure, the stream goes on
            return pb.EncodeStreamResponse(id=message.id, error=as_error(exc))
        return pb.EncodeStreamResponse(id=message.id, **packed)

    async def EncodeStream(self, request_iterator, context) -> None:
        await self._stream(request_iterator, self._answer_encode, context)

    async def _stream(self, request_iterator, answer, context) -> None:
        """Answer a stream; one cut short by shutdown ends UNAVAILABLE once the messages it
        was working on are answered, so that its client resends the rest elsewhere."""
        end = StreamEnd()
        credits = self.streams.credits()
        answers = answer_stream(request_iterator, answer, context, credits, self.shutdown, end)
        await send_all(answers, context)
        if end.cut_short:
            await context.abort(unavailable(SHUTTING_DOWN).code, SHUTTING_DOWN)

    # -- Similarity -------------------------------------------------------------

    async def _similarity(
        self, request: pb.SimilarityRequest, context, limit_s: float | None = None
    ) -> pb.SimilarityResponse:
        texts, names = validation.check_similarity(request, self.limits)
        metric = request.metric or pb.METRIC_COSINE
        done = await self._encode(texts, request.options, context, names, limit_s)
        vectors = ranking_vectors(done.vectors, done.spec)
        if request.WhichOneof("input") == "pairs":
            pairs = len(texts) // 2  # [a of every pair, then b of every pair]
            scores = similarity.pairwise(metric, vectors[:pairs], vectors[pairs:])
            return pb.SimilarityResponse(
                model=done.variant.model.name, metric=metric, scores=scores.tolist()
            )
        scores = similarity.against_query(metric, vectors[0], vectors[1:])
        order, best = similarity.top_k(scores, request.top_k)
        matches = [
            pb.Match(index=i, score=s) for i, s in zip(order.tolist(), best.tolist(), strict=True)
        ]
        return pb.SimilarityResponse(model=done.variant.model.name, metric=metric, matches=matches)

    @unary
    async def Similarity(self, request: pb.SimilarityRequest, context) -> pb.SimilarityResponse:
        return await self._similarity(request, context)

    async def _answer_similarity(
        self, message: pb.SimilarityStreamRequest, context, read_at: float
    ) -> pb.SimilarityStreamResponse:
        try:
            if isinstance(message, Undecodable):
                raise message.error()
            limit_s = own_limit_s(message.timeout_ms, read_at)
            response = await self._similarity(message.request, context, limit_s)
        except Exception as exc:  # noqa: BLE001 - one message's failure, the stream goes on
            return pb.SimilarityStreamResponse(id=message.id, error=as_error(exc))
        return pb.SimilarityStreamResponse(id=message.id, response=response)

    async def SimilarityStream(self, request_iterator, context) -> None:
        await self._stream(request_iterator, self._answer_similarity, context)

    # -- Lookup, Tokenize, Info -------------------------------------------------

    @unary
    async def Lookup(self, request: pb.LookupRequest, context) -> pb.LookupResponse:
        items = len(request.texts) + len(request.sha256)
        if items == 0:
            raise validation.invalid("send at least one text or sha256")
        if items > self.limits.max_batch_texts:
            raise validation.invalid(
                f"{items} items, over the limit of {self.limits.max_batch_texts} per request"
            )
        validation.check_hashes(request.sha256)
        variant, spec = self._resolve(request.options)
        hashes = texts_sha256(request.texts) + [h.hex() for h in request.sha256]
        values = await self.dispatcher.mget(
            [self.keys.cache(variant.fingerprint, h) for h in hashes]
        )
        size = variant.model.registration.dimension * 4
        found = [value is not None and len(value) == size for value in values]
        hits = [value for value, hit in zip(values, found, strict=True) if hit]
        vectors = np.frombuffer(b"".join(hits), dtype="<f4").reshape(len(hits), size // 4)
        embeddings = shape(vectors, spec) if hits else b""
        self._check_answer_size(len(embeddings))
        return pb.LookupResponse(
            model=variant.model.name,
            dimension=spec.dimension,
            dtype=spec.dtype,
            found=found,
            embeddings=embeddings,
            count=len(hits),
        )

    @unary
    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        texts = list(request.texts)
        validation.check_texts(texts, self.limits)
        variant = self._variant(request.options)
        results = await self.dispatcher.tokenize(variant, texts, self._timeout(context))
        return pb.TokenizeResponse(
            model=variant.model.name,
            texts=[
                pb.TokenizedText(
                    ids=t.ids, tokens=t.tokens, truncated=t.truncated, full_length=t.full_length
                )
                for t in results
            ],
        )

    @unary
    async def Info(self, request: pb.InfoRequest, context) -> pb.InfoResponse:
        if not self.registry.redis_ok:
            raise unavailable("redis unavailable")
        models = [
            pb.ModelInfo(
                name=m.name,
                fingerprint=m.registration.fingerprint,
                dimension=m.registration.dimension,
                pooling=m.registration.pooling,
                max_seq_length=m.registration.max_seq_length,
                normalize=m.registration.normalize,
                workers_alive=m.workers_alive,
                source=public_source(m.registration.source),
                capacity_texts_per_s=m.capacity,
                prompts=dict(m.registration.prompts),
                default_prompt_name=m.registration.default_prompt_name,
            )
            for m in self.registry.models.values()
        ]
        return pb.InfoResponse(
            models=models,
            default_model=self.registry.default_name,
            limits=pb.Limits(
                max_batch_texts=self.limits.max_batch_texts,
                max_text_bytes=self.limits.max_text_bytes,
                max_message_bytes=self.limits.max_message_bytes,
                max_candidates=self.limits.max_candidates,
            ),
            version=__version__,
        )


def public_source(source: str) -> str:
    """A model id as it is; a folder by its last part only (`backend:folder` keeps
    its backend): any caller may ask Info, and a worker's file system is not theirs."""
    prefix, sep, rest = source.partition(":")
    if sep and prefix and "/" not in prefix and "\\" not in prefix and _is_path(rest):
        return f"{prefix}:{PurePath(rest).name}"
    return PurePath(source).name if _is_path(source) else source


def _is_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~", "\\")) or ":\\" in source


def message_texts(message: object) -> int:
    """Texts a stream message asks to encode (0 for an undecodable one)."""
    if isinstance(message, pb.EncodeStreamRequest):
        return len(message.texts)
    if isinstance(message, pb.SimilarityStreamRequest):
        request = message.request
        return 2 * len(request.pairs.pairs) + len(request.ranking.candidates) + 1
    return 0


def own_limit_s(timeout_ms: int, read_at: float) -> float | None:
    """What is left of a stream message's own `timeout_ms` (None: it has none). It counts
    from when the server read the message (the proto says so): a wait for the stream's
    window before its answer began is in it."""
    if not timeout_ms:
        return None
    left_s = timeout_ms / 1000 - (time.monotonic() - read_at)
    if left_s <= 0:
        raise deadline(
            f"timeout_ms ({timeout_ms} ms) passed before this message's answer began: it "
            "waited for the stream's window (answers the client has not read yet, or the "
            "texts of other streams)"
        )
    return left_s


# What one message holds of a stream's budget: (texts, bytes).
Cost = tuple[int, int]


class StreamShares:
    """This server's streams, sharing one text window: about STREAM_WINDOW_S of the model's
    work for all of them together, so that another caller waits behind about that much of
    the streams' work however many there are. A busy stream (one holding credits) may always
    fill its even share of it; beyond that it may take what the others leave unused (one
    stream beside idle ones keeps the whole window), never past `most` texts."""

    def __init__(self, capacity: Callable[[], float], most: int = STREAM_TEXT_WINDOW) -> None:
        self._capacity, self._most = capacity, most
        self.busy = 0  # streams holding credits
        self.held = 0  # texts they hold together

    def allows(self, mine: int, texts: int) -> bool:
        """Whether a busy stream holding `mine` texts may take `texts` more."""
        if mine + texts > self._most:
            return False
        together = shared_text_window(self._capacity())
        share = even_share(together, max(1, self.busy))
        return mine + texts <= share or self.held + texts <= together

    def credits(self) -> Credits:
        return Credits(STREAM_WINDOW, self)


class Credits:
    """A stream's budget of messages, texts and bytes; a message holds its share until its
    response has been handed to gRPC (not merely computed), so a client that stops reading
    stops the reading of its requests. Bytes are the request's from when it is read, and
    its response's from when that is computed. Texts are granted by the streams'
    StreamShares."""

    def __init__(self, messages: int, shares: StreamShares, size: int = STREAM_BYTE_WINDOW) -> None:
        self._max_messages, self._shares, self._max_bytes = messages, shares, size
        self._messages = self._texts = self._bytes = 0  # held
        # Set when credits come back. An event, not a lock: a stream's one reader takes
        # credits, its one writer returns them, and the usual case (credits left) then
        # costs no await at all (profiled: per-message overhead of waiting streams).
        self._freed = asyncio.Event()

    def _fits(self, texts: int, size: int) -> bool:
        if self._messages == 0:
            return True  # a message bigger than the whole budget still goes, alone
        return (
            self._messages < self._max_messages
            and self._bytes + size <= self._max_bytes
            and self._shares.allows(self._texts, texts)
        )

    def _hold(self, messages: int, texts: int, size: int) -> None:
        if self._messages == 0 and messages > 0:
            self._shares.busy += 1
        elif self._messages + messages == 0 and messages < 0:
            self._shares.busy -= 1
        self._messages += messages
        self._texts += texts
        self._shares.held += texts
        self._bytes += size

    async def acquire(self, message: object) -> Cost:
        cost = texts, size = (
            max(1, message_texts(message)),
            message.ByteSize() if isinstance(message, Message) else 0,
        )
        while not self._fits(texts, size):
            self._freed.clear()
            await self._freed.wait()
        self._hold(1, texts, size)
        return cost

    def hold_response(self, cost: Cost, response: object) -> Cost:
        """A computed response holds its bytes too until it is sent (it echoes the request's
        `id`, which may be as big as the request): the message's cost, with them."""
        size = response.ByteSize() if isinstance(response, Message) else 0
        self._hold(0, 0, size)
        return cost[0], cost[1] + size

    def release(self, cost: Cost) -> None:
        texts, size = cost
        self._hold(-1, -texts, -size)
        self._freed.set()

    def close(self) -> None:
        """The stream is over: what it still holds goes back to the streams' window."""
        if self._messages:
            self._hold(-self._messages, -self._texts, -self._bytes)


def shared_text_window(capacity: float) -> int:
    """Texts all busy streams together may have in flight, given the model's measured
    texts/s (0: not measured yet, the full window of one stream)."""
    if capacity <= 0:
        return STREAM_TEXT_WINDOW
    return max(STREAM_MIN_TEXT_WINDOW, math.ceil(capacity * STREAM_WINDOW_S))


def stream_text_window(capacity: float, streams: int = 1) -> int:
    """The even share of each of `streams` busy streams in that window (one stream: all of
    it, up to STREAM_TEXT_WINDOW)."""
    return even_share(shared_text_window(capacity), streams)


def even_share(together: int, streams: int) -> int:
    return max(STREAM_MIN_SHARE, min(STREAM_TEXT_WINDOW, math.ceil(together / streams)))


SHUTTING_DOWN = (
    "server shutting down: the messages of this stream without an answer were not processed; "
    "send them again (to another server)"
)


class Shutdown:
    """Stops the streams' reading when the server begins to shut down.

    gRPC's graceful stop lets calls in flight finish within its grace, but a stream need
    never finish: cut at the grace's end ("Cancelling all calls"), the answers in flight
    were lost, the client not told which. Instead each stream's reader is cancelled: it
    answers what it was working on, then the stream ends UNAVAILABLE
    (EmbedderService._stream). A cancel, not a race of each read against an event: that
    cost 20-30 µs a message (measured on the 2-core AMD EPYC; the server spends 160-250 µs
    a stream message in all)."""

    def __init__(self) -> None:
        self.begun = False
        self._readers: set[asyncio.Task] = set()

    def begin(self) -> None:
        self.begun = True
        for reader in list(self._readers):
            reader.cancel()

    def watch(self, reader: asyncio.Task) -> None:
        """A stream's reader, cancelled when the shutdown begins (at once if it has)."""
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)
        if self.begun:
            reader.cancel()

    def read_all(self, reader: asyncio.Task | None) -> None:
        """The client ended its messages: what is left is answering them, not cancelled."""
        self._readers.discard(reader)  # type: ignore[arg-type]


@dataclass
class StreamEnd:
    # The shutdown stopped its reading: the client may have sent messages never read.
    cut_short: bool = False


async def answer_stream(
    request_iterator,
    answer,
    context,
    credits: Credits,
    shutdown: Shutdown,
    end: StreamEnd,
) -> AsyncIterator:
    """Answer each message of a bidirectional stream as soon as it is ready.

    A reader task takes messages as they come and starts one answer per
    message; responses go out in completion order. A message holds `credits`
    (STREAM_WINDOW messages, its share of texts, STREAM_BYTE_WINDOW bytes) from when it is read
    until its response is sent: a client that sends without reading is held
    by HTTP/2 flow control once they run out, so a stream's memory is bounded.
    Every message gets exactly one response, and when the client cancels,
    the outstanding work is cancelled with it.
    """
    # Bounded: every queued response holds credits, so at most STREAM_WINDOW (+ the end).
    responses: asyncio.Queue = asyncio.Queue(STREAM_WINDOW + 1)
    tasks: set[asyncio.Task] = set()

    async def answer_one(message, cost: Cost, read_at: float) -> None:
        response = await answer(message, context, read_at)
        # Never full: every queued response holds one of the STREAM_WINDOW message credits.
        responses.put_nowait((response, credits.hold_response(cost, response)))

    async def read_all() -> None:
        try:
            try:
                async for message in request_iterator:
                    read_at = time.monotonic()
                    cost = await credits.acquire(message)
                    task = asyncio.create_task(answer_one(message, cost, read_at))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                # Not cancelled from here on. (A shutdown that began in the very loop turn
                # the client ended its messages in can still cancel what follows: that
                # stream ends CANCELLED, its answers in flight unsent, as all did before
                # Shutdown; left alone, a race of one event-loop turn.)
                shutdown.read_all(asyncio.current_task())
            except asyncio.CancelledError:
                if not shutdown.begun:
                    raise  # the caller left: its work goes too (below)
                # Shutting down: a message read as the cancel came is dropped unanswered
                # like the unread ones; the client resends every id it has no answer for.
                end.cut_short = True
                uncancel = getattr(asyncio.current_task(), "uncancel", None)  # Python 3.11+
                if uncancel is not None:
                    uncancel()
            while tasks:
                await asyncio.gather(*list(tasks))
        finally:
            responses.put_nowait(None)

    reader = asyncio.create_task(read_all())
    shutdown.watch(reader)
    try:
        while (item := await responses.get()) is not None:
            response, cost = item
            yield response
            # Resumed: gRPC has taken the response, so its credits come back.
            credits.release(cost)
        await reader
    finally:
        reader.cancel()
        for task in list(tasks):
            task.cancel()
        credits.close()
