"""Server observability: Prometheus metrics and request ids.

:class:`ObservabilityInterceptor` wraps every RPC (unary and streaming):

- takes the caller's ``x-request-id`` metadata (or makes one), keeps it in
  :data:`embedq.logs.REQUEST_ID` while the call runs, so every log line
  about the call carries it, and sends it back as trailing metadata;
- counts the call by method and final status code (aborts included) and
  times it; counts the texts it carries;
- logs one INFO line per failed call (method, code, duration, request id;
  never the texts).

Gauges of queue depth and live workers are refreshed by :func:`track_gauges`
in the background; cache hits and misses are counted by the dispatcher
(:func:`record_cache_lookup`). :func:`start_metrics_server` serves them all
over HTTP at ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable

import grpc
import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from embedq.keys import Keys
from embedq.logs import REQUEST_ID, Throttled
from embedq.settings import SettingsError
from embedq.trouble import REDIS_TROUBLE
from embedq.v1 import embedq_pb2 as pb

from .registry import ModelRegistry

log = logging.getLogger(__name__)
_refusals = Throttled(log)  # RESOURCE_EXHAUSTED lines, by method (see _Call._log_failure)

REQUEST_ID_KEY = "x-request-id"
# Caller-chosen ids are kept only if they look like ids (they end up in logs).
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
EMBEDDER = pb.DESCRIPTOR.services_by_name["Embedder"]
# Method paths that get their own label; anything else is "unknown", so that
# callers probing made-up methods cannot grow the label set.
_OTHER_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)
DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0
)  # fmt: skip

REQUESTS = Counter(
    "embedq_requests",
    "Calls finished, by method (gRPC method or HTTP route) and status code",
    ["method", "code"],
)
REQUEST_DURATION = Histogram(
    "embedq_request_duration_seconds",
    "Time from a call's start to its status (a stream: its whole life)",
    ["method"],
    buckets=DURATION_BUCKETS,
)
TEXTS = Counter("embedq_texts", "Texts received (hashes too, for Lookup), by method", ["method"])
CACHE_HITS = Counter("embedq_cache_hits", "Texts answered from the Redis cache")
CACHE_MISSES = Counter("embedq_cache_misses", "Texts not in the cache (queued for a worker)")
NEAR_CACHE_HITS = Counter(
    "embedq_near_cache_hits",
    "Texts answered from the server's near cache, no Redis round trip (in embedq_cache_hits too)",
)
QUEUE_DEPTH = Gauge("embedq_queue_depth", "Jobs in a model's stream (XLEN)", ["model"])
WORKERS_ALIVE = Gauge(
    "embedq_workers_alive", "Workers of a model with a recent heartbeat", ["model"]
)


def record_cache_lookup(hits: int, looked_up: int) -> None:
    """Called by the dispatcher once per cache round trip."""
    if hits:
        CACHE_HITS.inc(hits)
    if looked_up > hits:
        CACHE_MISSES.inc(looked_up - hits)


def record_near_cache_hits(hits: int) -> None:
    """A call answered whole from the near cache (server/nearcache.py)."""
    record_cache_lookup(hits, hits)
    NEAR_CACHE_HITS.inc(hits)


def method_label(path: str) -> str:
    """'/embedq.v1.Embedder/Encode' -> 'Encode'; '/grpc.health.v1.Health/Check' ->
    'Health/Check'; anything unknown -> 'unknown'."""
    service, _, method = path.lstrip("/").rpartition("/")
    if service == EMBEDDER.full_name and method in EMBEDDER.methods_by_name:
        return method
    if service in _OTHER_SERVICES:
        return f"{service.rpartition('.')[2]}/{method}"
    return "unknown"


def texts_in(message: object) -> int:
    """How many texts (or hashes) a request message carries; 0 for anything else."""
    if isinstance(message, (pb.EncodeRequest, pb.EncodeStreamRequest, pb.TokenizeRequest)):
        return len(message.texts)
    if isinstance(message, pb.LookupRequest):
        return len(message.texts) + len(message.sha256)
    if isinstance(message, pb.SimilarityStreamRequest):
        message = message.request
    if isinstance(message, pb.SimilarityRequest):
        if message.WhichOneof("input") == "pairs":
            return 2 * len(message.pairs.pairs)
        if message.WhichOneof("input") == "ranking":
            return 1 + len(message.ranking.candidates)
    return 0


def request_id_from(metadata) -> str:
    """The caller's x-request-id if it is a plausible id, else a fresh one."""
    for key, value in metadata or ():
        if key.lower() == REQUEST_ID_KEY:
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            if _VALID_REQUEST_ID.fullmatch(value):
                return value
            break
    return uuid.uuid4().hex[:16]


def _status_of(exc: BaseException | None, context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The status a call ends with: what the handler set (abort, set_code), else by outcome."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if exc is None:
        return grpc.StatusCode.OK
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class _Call:
    """Bookkeeping of one call: its label, id, clock and texts."""

    def __init__(self, path: str, metadata) -> None:
        self.method = method_label(path)
        self.request_id = request_id_from(metadata)
        self.started = time.perf_counter()
        self._texts = TEXTS.labels(self.method)  # once per call, not per message

    def begin(self, context: grpc.aio.ServicerContext):
        context.set_trailing_metadata(((REQUEST_ID_KEY, self.request_id),))
        return REQUEST_ID.set(self.request_id)

    def count(self, message: object) -> None:
        texts = texts_in(message)
        if texts:
            self._texts.inc(texts)

    def end(self, exc: BaseException | None, context: grpc.aio.ServicerContext, token) -> None:
        elapsed = time.perf_counter() - self.started
        code = _status_of(exc, context)
        REQUESTS.labels(self.method, code.name).inc()
        REQUEST_DURATION.labels(self.method).observe(elapsed)
        if code is not grpc.StatusCode.OK:
            self._log_failure(code, elapsed, context)
        # A stream closed from another context (say, garbage collection) cannot reset:
        # the call's own task ends with it anyway.
        with contextlib.suppress(ValueError):
            REQUEST_ID.reset(token)

    def _log_failure(
        self, code: grpc.StatusCode, elapsed: float, context: grpc.aio.ServicerContext
    ) -> None:
        details = context.details()
        if isinstance(details, bytes):
            details = details.decode("utf-8", "replace")
        args = ("%s failed: %s (%.1f ms)", self.method, code.name, elapsed * 1000)
        extra = {
            "method": self.method,
            "code": code.name,
            "duration_ms": round(elapsed * 1000, 3),
            "details": (details or "")[:200],
        }
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED and not log.isEnabledFor(logging.DEBUG):
            # A refusal is admission doing its job, and a burst brings thousands a second
            # (each counted in embedq_requests_total): a line each flooded the log (1,282
            # lines in 40 waves of 64) and took ~6 % of a refused call's server CPU
            # (docs/benchmarks.md). So one line per method every LOG_EVERY_S, with how
            # many more; every one with --log-level DEBUG.
            _refusals.log(logging.INFO, self.method, *args, extra=extra)
            return
        log.info(*args, extra=extra)

    def counting(self, deserialize: Callable[[bytes], object] | None) -> Callable[[bytes], object]:
        """`deserialize`, counting each request's texts as it is parsed: no async
        generator around the request stream (profiled: a layer per stream message)."""

        def parse(data: bytes) -> object:
            message = deserialize(data) if deserialize is not None else data
            self.count(message)
            return message

        return parse


def _wrap(handler: grpc.RpcMethodHandler, path: str, metadata) -> grpc.RpcMethodHandler:
    """The handler of one call (intercept_service runs per call), with its bookkeeping."""
    call = _Call(path, metadata)
    kwargs = {
        "request_deserializer": call.counting(handler.request_deserializer),
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary or handler.stream_unary:
        behaviour = handler.unary_unary or handler.stream_unary

        async def unary_out(request, context):
            token = call.begin(context)
            try:
                response = await behaviour(request, context)
            except BaseException as exc:
                call.end(exc, context, token)
                raise
            call.end(None, context, token)
            return response

        make = (
            grpc.stream_unary_rpc_method_handler
            if handler.stream_unary
            else grpc.unary_unary_rpc_method_handler
        )
        return make(unary_out, **kwargs)

    behaviour = handler.unary_stream or handler.stream_stream

    async def stream_out(request, context):
        token = call.begin(context)
        try:
            async for response in behaviour(request, context):
                yield response
        except BaseException as exc:
            call.end(exc, context, token)
            raise
        call.end(None, context, token)

    async def stream_written(request, context):
        # A handler that writes with context.write() and returns: wrapped as a coroutine,
        # so that gRPC leaves the writing to it (see router.send_all).
        token = call.begin(context)
        try:
            await behaviour(request, context)
        except BaseException as exc:
            call.end(exc, context, token)
            raise
        call.end(None, context, token)

    wrapped = stream_written if inspect.iscoroutinefunction(behaviour) else stream_out
    make = (
        grpc.stream_stream_rpc_method_handler
        if handler.stream_stream
        else grpc.unary_stream_rpc_method_handler
    )
    return make(wrapped, **kwargs)


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    """Request ids, request metrics and failure logs for every call (put it first,
    so that calls refused by later interceptors are counted too)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return _wrap(handler, handler_call_details.method, handler_call_details.invocation_metadata)


async def track_gauges(
    redis: aioredis.Redis, keys: Keys, registry: ModelRegistry, interval_s: float = 2.0
) -> None:
    """Refresh embedq_queue_depth (XLEN) and embedq_workers_alive forever."""
    shown: set[str] = set()
    while True:
        models = dict(registry.models)
        try:
            async with redis.pipeline(transaction=False) as pipe:
                for name in models:
                    pipe.xlen(keys.jobs(name))
                depths = await pipe.execute() if models else []
        except REDIS_TROUBLE:
            depths = None  # the registry reports Redis trouble; keep the last values
        if depths is not None:
            for (name, model), depth in zip(models.items(), depths, strict=True):
                QUEUE_DEPTH.labels(name).set(depth)
                WORKERS_ALIVE.labels(name).set(model.workers_alive)
            for gone in shown - set(models):
                QUEUE_DEPTH.remove(gone)
                WORKERS_ALIVE.remove(gone)
            shown = set(models)
        await asyncio.sleep(interval_s)


def start_metrics_server(port: int, host: str = "127.0.0.1"):
    """Serve /metrics on host:port from a daemon thread; returns the HTTP server
    (call .shutdown() to stop it). SettingsError if the port cannot be bound."""
    try:
        server, _thread = start_http_server(port, addr=host)
    except OSError as exc:
        raise SettingsError(
            f"cannot serve metrics on {host}:{port} (--metrics-port): {exc.strerror or exc}"
        ) from None
    log.info("prometheus metrics on http://%s:%d/metrics", host, port)
    return server
