"""The bridge loop: source -> EncodeStream -> sink, in order, acknowledged after publish.

Four tasks share one event loop:

  reader     takes messages from the source while fewer than max_in_flight are
             held; parses them (a poison message is marked at once) and queues
             the rest for sending
  sender     one EncodeStream call with every queued text in flight; answers
             come back in completion order and are matched by sequence number.
             Server trouble (UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED,
             a broken stream) puts the affected messages back at the front of
             the queue and waits (exponential backoff with jitter) before
             sending again; nothing is acknowledged meanwhile
  publisher  takes the finished messages at the head of the input order (so
             outputs leave in input order), publishes them (waiting for the
             broker's confirmation), sends poison messages to the dead-letter
             sink (or rejects them), then acknowledges the inputs
  upkeep     progress logs, lag, stall detection, and touching held messages so
             the broker does not hand them to someone else meanwhile

A broker call that fails is retried with backoff for --broker-grace; between tries
the broker is connected again if its connection is gone (AMQP, MQTT: their
clients do not reconnect by themselves). When the source's connection is opened
again, the messages held from the old one can no longer be acknowledged (their
delivery tags or packet ids died with it): their results are still published,
never acknowledged, and the broker may deliver them again (at least once).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from embedq.client import AsyncClient
from embedq.client._convert import unpack
from embedq.client._errors import EmbedqError

from embedq.v1 import embedq_pb2 as pb

from . import formats
from .brokers.base import BridgeError, ConfigError, Message, Sink, Source, scrub
from .metrics import BridgeMetrics, reason_label

log = logging.getLogger("embedq.bridge")
T = TypeVar("T")

Code = grpc.StatusCode
# Server trouble: retried for as long as it lasts, the message stays unacknowledged.
TRANSIENT = frozenset({Code.UNAVAILABLE, Code.RESOURCE_EXHAUSTED, Code.DEADLINE_EXCEEDED})
# The message itself is bad: dead-lettered (or rejected) at once.
POISON = frozenset({Code.INVALID_ARGUMENT, Code.OUT_OF_RANGE, Code.FAILED_PRECONDITION})
# Share of --timeout a batch's own time limit is (EncodeStreamRequest.timeout_ms).
ANSWER_SHARE = 0.9
# The bridge's configuration is wrong for this server: stop, acknowledge nothing.
FATAL = frozenset(
    {Code.NOT_FOUND, Code.UNAUTHENTICATED, Code.PERMISSION_DENIED, Code.UNIMPLEMENTED}
)
# Anything else (INTERNAL, UNKNOWN, ABORTED, ...) is retried max_attempts times, then
# dead-lettered with the last error as the reason.


@dataclass(frozen=True)
class Settings:
    input: formats.InputFormat = field(default_factory=formats.InputFormat)
    output_format: str = "json"
    options: pb.EncodeOptions = field(default_factory=pb.EncodeOptions)
    max_in_flight: int = 512
    # Seconds to finish what is held after SIGTERM / Ctrl-C.
    drain_timeout: float = 30.0
    backoff_base: float = 0.1
    backoff_max: float = 10.0
    # Tries of a message that fails with an unexpected server error.
    max_attempts: int = 5
    # A message with no answer this long: the stream is restarted (DEADLINE_EXCEEDED).
    answer_timeout: float = 60.0
    # A broker call failing for this long stops the bridge (exit 1).
    broker_grace: float = 60.0
    progress_interval: float = 10.0
    fetch_timeout: float = 1.0
    # Most texts in one EncodeStream message (what is queued at the time, up to this).
    batch_texts: int = 256


@dataclass(eq=False)
class Entry:
    seq: int
    message: Message
    taken_at: float
    parsed: formats.Parsed | None = None
    output: Any = None
    reason: str | None = None
    attempts: int = 0
    sent_at: float = 0.0
    # Sent alone: its batch was refused, so it may be the poison one.
    solo: bool = False

    @property
    def done(self) -> bool:
        return self.output is not None or self.reason is not None


class Backoff:
    """Exponential backoff with jitter; one step per episode of trouble."""

    def __init__(self, base: float, cap: float) -> None:
        self.base, self.cap = base, cap
        self.failures = 0
        self.not_before = 0.0

    def delay(self) -> float:
        step = min(self.cap, self.base * (2 ** min(self.failures, 30)))
        return step * random.uniform(0.5, 1.0)

    def fail(self, at_least: float = 0.0) -> float:
        """Register a failure; return the delay before the next try (`at_least`: what the
        server asked for, its retry-after hint)."""
        now = time.monotonic()
        if now >= self.not_before:  # a new failure, not one more of the current wait
            delay = self.delay()
            self.failures += 1
            self.not_before = now + delay
        self.not_before = max(self.not_before, now + min(at_least, self.cap))
        return max(0.0, self.not_before - now)

    def succeed(self) -> None:
        self.failures = 0

    async def wait(self) -> None:
        delay = self.not_before - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


class Bridge:
    def __init__(
        self,
        source: Source,
        sink: Sink,
        client: AsyncClient,
        settings: Settings,
        dead_letter: Sink | None = None,
        metrics: BridgeMetrics | None = None,
    ) -> None:
        self.source = source
        self.sink = sink
        self.dead_letter = dead_letter
        self.client = client
        self.settings = settings
        self.metrics = metrics or BridgeMetrics()
        self.input = settings.input
        self._seq = itertools.count()
        self._order: collections.deque[Entry] = collections.deque()
        self._publishing: list[Entry] = []
        self._to_send: collections.deque[Entry] = collections.deque()
        self._send_ready = asyncio.Event()
        self._finished = asyncio.Event()
        self._space = asyncio.Event()
        self.held = 0
        self.stopping = False
        self._backoff = Backoff(settings.backoff_base, settings.backoff_max)
        self._outstanding: dict[str, list[Entry]] = {}
        self._call: Any = None
        self._stalled = False
        self._last_answer = 0.0
        self._counts = collections.Counter()
        # Most texts per request now: halved while the server refuses batches as too big
        # for their time limit, doubled back (up to batch_texts) as they are answered.
        self._batch_limit = settings.batch_texts
        # The reader and the publisher may both find a connection gone: one reconnects.
        self._reconnecting = asyncio.Lock()

    # -- lifecycle -------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> int:
        """Run until `stop` is set, then drain; 0 when everything held was finished."""
        await self._connect()
        try:
            await self._server_info(stop)
            if stop.is_set():
                return 0
            log.info(
                "bridge running: %s -> embedq %s -> %s%s (max in flight %d)",
                self.source.name,
                self.client.target,
                self.sink.name,
                f", dead letters -> {self.dead_letter.name}" if self.dead_letter else "",
                self.settings.max_in_flight,
            )
            return await self._supervise(stop)
        finally:
            await self._close()

    async def _connect(self) -> None:
        for broker in (self.sink, self.dead_letter, self.source):
            if broker is not None:
                try:
                    await broker.connect()
                except Exception as error:
                    await self._close()
                    if isinstance(error, BridgeError):
                        raise
                    raise BridgeError(
                        f"cannot connect to {broker.name}: {_describe(error)}"
                    ) from None

    async def _close(self) -> None:
        for broker in (self.source, self.sink, self.dead_letter):
            if broker is not None:
                try:
                    await broker.close()
                except Exception as error:  # noqa: BLE001 - closing is best effort
                    log.debug("closing %s: %s", broker.name, error)

    async def _server_info(self, stop: asyncio.Event) -> None:
        """The server's limits (for --max-text-bytes checks); waits for a server to answer."""
        backoff = Backoff(self.settings.backoff_base, self.settings.backoff_max)
        while not stop.is_set():
            try:
                info = await asyncio.wait_for(self.client.info(), self.settings.answer_timeout)
            except EmbedqError as error:
                code, _ = _status(error)
                if code in FATAL:
                    raise BridgeError(f"embedq {self.client.target}: {error}") from None
                delay = backoff.fail()
                log.warning("embedq %s: %s; retrying in %.1fs", self.client.target, error, delay)
                await _sleep_or(stop, delay)
                continue
            except asyncio.TimeoutError:
                continue
            check_options(self.settings.options, info, self.client.target)
            if self.input.max_text_bytes == 0:
                self.input = formats.InputFormat(
                    self.input.kind,
                    self.input.text_field,
                    self.input.id_field,
                    info.limits.max_text_bytes,
                )
            self.metrics.server_up.set(1)
            return

    async def _supervise(self, stop: asyncio.Event) -> int:
        tasks = {
            asyncio.create_task(self._reader(), name="reader"),
            asyncio.create_task(self._sender(), name="sender"),
            asyncio.create_task(self._publisher(), name="publisher"),
            asyncio.create_task(self._upkeep(), name="upkeep"),
        }
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait({*tasks, stopper}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopper and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            return await self._drain(tasks)
        finally:
            stopper.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, stopper, return_exceptions=True)
            if self._call is not None:
                self._call.cancel()

    async def _drain(self, tasks: set[asyncio.Task]) -> int:
        self.stopping = True
        self._space.set()
        log.info("stopping: finishing %d held message(s)", self.held)
        try:
            await self.source.stop_consuming()
        except Exception as error:  # noqa: BLE001 - the drain goes on
            log.warning("stop consuming %s: %s", self.source.name, error)
        deadline = time.monotonic() + self.settings.drain_timeout
        while self.held and time.monotonic() < deadline:
            _raise_first_failure(tasks)
            self._finished.clear()
            # A task that fails (the sender refused for good, say) ends the wait too: the
            # drain would otherwise wait out its timeout and the bridge exit 0.
            finished = asyncio.ensure_future(self._finished.wait())
            running = {task for task in tasks if not task.done()}
            try:
                await asyncio.wait(
                    {finished, *running},
                    timeout=max(0.0, deadline - time.monotonic()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                finished.cancel()
        _raise_first_failure(tasks)
        if self.held:
            log.warning(
                "stopped with %d message(s) unacknowledged after %.0fs; the broker will "
                "deliver them again",
                self.held,
                self.settings.drain_timeout,
            )
        self._log_progress(final=True)
        return 0

    # -- reader ----------------------------------------------------------------

    async def _reader(self) -> None:
        limit = self.settings.max_in_flight
        low_water = max(1, limit // 8)
        trouble = _Trouble("fetch from " + self.source.name, self, self.source)
        while not self.stopping:
            free = limit - self.held
            if free < low_water and self.held:
                self._space.clear()
                await self._space.wait()
                continue
            try:
                messages = await self.source.fetch(free, self.settings.fetch_timeout)
            except BridgeError:
                raise
            except Exception as error:  # noqa: BLE001 - retried, bounded by broker_grace
                await trouble.failed(error)
                continue
            trouble.ok()
            now = time.monotonic()
            for message in messages:
                self._take(message, now)

    def _take(self, message: Message, now: float) -> None:
        entry = Entry(next(self._seq), message, now)
        try:
            entry.parsed = formats.parse(message, self.input)
        except formats.Poison as poison:
            entry.reason = str(poison)
        except Exception as error:  # noqa: BLE001 - one message must not stop the reader
            entry.reason = f"cannot parse the message ({type(error).__name__}: {error})"
        self._order.append(entry)
        self.held += 1
        self.metrics.consumed.inc()
        self.metrics.in_flight.set(self.held)
        self._counts["consumed"] += 1
        if entry.done:
            self._finished.set()
        else:
            self._to_send.append(entry)
            self._send_ready.set()

    # -- sender ----------------------------------------------------------------

    async def _sender(self) -> None:
        stub = self.client.stub
        metadata = self.client._metadata  # the token, as the client sends it
        while True:
            while not self._to_send:
                self._send_ready.clear()
                await self._send_ready.wait()
            await self._backoff.wait()
            code, details = await self._one_stream(stub, metadata)
            self.metrics.server_up.set(0)
            if code in FATAL:
                raise BridgeError(f"embedq {self.client.target}: {code.name}: {details}")
            self.metrics.retried.labels(cause=code.name).inc()
            delay = self._backoff.fail()
            log.warning(
                "EncodeStream to %s failed (%s: %s); %d message(s) back in the queue, "
                "retrying in %.1fs",
                self.client.target,
                code.name,
                details,
                len(self._to_send),
                delay,
            )

    async def _one_stream(self, stub: Any, metadata: Any) -> tuple[grpc.StatusCode, str]:
        """One EncodeStream call, until it breaks; its unanswered messages go back in
        the queue. Returns the status it ended with.

        Each request carries the texts queued at that moment (up to batch_texts; one
        when only one waits, so batching adds no latency): one server round per
        request instead of one per text. A batch the server refuses as INVALID_ARGUMENT
        is sent again one text per request, so only the poison message is refused.
        """
        outstanding: dict[str, list[Entry]] = {}
        self._outstanding = outstanding
        self._stalled = False
        # grpc's task may pull from the request iterator after the call has
        # ended: an ended call's iterator must take nothing more from the queue.
        ended = False
        # Each batch's own time limit, a little inside the stall timeout: the server refuses
        # (with a retry hint) what it could not finish in time, or answers DEADLINE_EXCEEDED,
        # rather than computing what this bridge would give up on and send again.
        timeout_ms = int(self.settings.answer_timeout * 1000 * ANSWER_SHARE)

        async def requests():
            while True:
                while not self._to_send and not ended:
                    self._send_ready.clear()
                    await self._send_ready.wait()
                await self._backoff.wait()
                if ended:
                    return
                if not self._to_send:
                    continue
                batch = [self._to_send.popleft()]
                while (
                    not batch[0].solo
                    and self._to_send
                    and len(batch) < self._batch_limit
                    and not self._to_send[0].solo
                ):
                    batch.append(self._to_send.popleft())
                key = str(batch[0].seq)
                outstanding[key] = batch
                now = time.monotonic()
                for entry in batch:
                    entry.sent_at = now
                yield pb.EncodeStreamRequest(
                    id=key,
                    texts=[e.parsed.text for e in batch],
                    options=self.settings.options,
                    timeout_ms=timeout_ms,
                )

        call = stub.EncodeStream(requests(), metadata=metadata)
        self._call = call
        try:
            async for response in call:
                self._last_answer = time.monotonic()
                batch = outstanding.pop(response.id, None)
                if batch is not None:
                    self._answer(batch, response)
            return Code.UNAVAILABLE, "the server ended the stream"
        except grpc.RpcError as error:
            return _status(error)
        except asyncio.CancelledError:
            if not self._stalled:
                raise
            return Code.DEADLINE_EXCEEDED, f"no answer for {self.settings.answer_timeout:.0f}s"
        finally:
            ended = True
            call.cancel()
            self._call = None
            self._requeue([e for batch in outstanding.values() for e in batch])
            outstanding.clear()

    def _requeue(self, entries) -> None:
        for entry in sorted(entries, key=lambda e: e.seq, reverse=True):
            if not entry.done:
                self._to_send.appendleft(entry)
        if self._to_send:
            self._send_ready.set()

    def _answer(self, batch: list[Entry], response: pb.EncodeStreamResponse) -> None:
        if response.HasField("error") and response.error.code != 0:
            error = EmbedqError.from_status(response.error.code, response.error.message)
            code, details = _status(error)
            if code == Code.INVALID_ARGUMENT and refuses_the_options(details):
                raise BridgeError(
                    f"embedq {self.client.target} refuses this bridge's options ({details}); "
                    "nothing of it acknowledged"
                )
            hint = response.error.retry_after_ms / 1000  # refused with a retry-after hint
            if len(batch) > 1 and code not in TRANSIENT and code not in FATAL:
                # Which text is it? Ask again one by one: the others are not charged with
                # its failure (a text a worker cannot encode fails its whole request).
                for entry in batch:
                    entry.solo = True
                self._requeue(batch)
                return
            if len(batch) > 1 and too_big(code, hint):
                self._batch_limit = max(1, len(batch) // 2)
            for entry in reversed(batch):
                self._failed(entry, code, details, hint)
            return
        try:
            rows = unpack(response.embeddings, response.count, response.dimension, response.dtype)
            if rows.shape[0] != len(batch):
                raise EmbedqError(Code.INTERNAL, f"{rows.shape[0]} vectors for {len(batch)} texts")
        except EmbedqError as error:
            for entry in reversed(batch):
                self._failed(entry, *_status(error))
            return
        self._backoff.succeed()
        self._batch_limit = min(self.settings.batch_texts, 2 * self._batch_limit)
        self.metrics.server_up.set(1)
        for entry, row in zip(batch, rows, strict=True):
            try:
                entry.output = formats.render(
                    entry.parsed,
                    row,
                    response.model,
                    response.dimension,
                    response.dtype,
                    self.settings.output_format,
                )
            except Exception as error:  # noqa: BLE001 - say, a field JSON cannot write
                entry.reason = f"cannot write the result ({type(error).__name__}: {error})"
                continue
            if entry.message.stable_id:
                entry.output.dedup_id = self._dedup_id(entry)
        self._finished.set()

    def _dedup_id(self, entry: Entry) -> str:
        """The same input published again (after a crash) gets the same id, for sinks that
        de-duplicate (NATS JetStream's Nats-Msg-Id). Everything that makes the result is in
        it: two bridges reading one source with other options, or into other subjects of
        one stream, and a publisher's message id reused for another text, are other results
        (the sink dropped them as duplicates, and their inputs were acknowledged)."""
        parts = (
            self.source.name,
            entry.message.message_id,
            self.sink.name,
            self.settings.output_format,
            self.settings.options.SerializeToString(deterministic=True).hex(),
            entry.parsed.text if entry.parsed is not None else "",
        )
        return hashlib.sha256("|".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:32]

    def _failed(
        self, entry: Entry, code: grpc.StatusCode, details: str, retry_after: float = 0.0
    ) -> None:
        if code in FATAL:
            raise BridgeError(f"embedq {self.client.target}: {code.name}: {details}")
        if code in POISON:
            entry.reason = f"{code.name}: {details}"
            self._finished.set()
            return
        entry.attempts += 1
        if code not in TRANSIENT and entry.attempts >= self.settings.max_attempts:
            entry.reason = f"{code.name}: {details} (after {entry.attempts} attempts)"
            self._finished.set()
            return
        self.metrics.retried.labels(cause=code.name).inc()
        delay = self._backoff.fail(retry_after)
        log.debug("message %s: %s: %s; retry in %.1fs", entry.seq, code.name, details, delay)
        self._to_send.appendleft(entry)
        self._send_ready.set()

    # -- publisher ---------------------------------------------------------------

    async def _publisher(self) -> None:
        while True:
            if not (self._order and self._order[0].done):
                self._finished.clear()
                await self._finished.wait()
                continue
            batch = []
            while self._order and self._order[0].done and len(batch) < 1024:
                batch.append(self._order.popleft())
            self._publishing = batch
            await self._complete(batch)
            self._publishing = []
            self.held -= len(batch)
            self.metrics.in_flight.set(self.held)
            self._space.set()
            self._finished.set()  # wakes the drain

    async def _complete(self, batch: list[Entry]) -> None:
        """Publish the batch's results, dead-letter or reject its poison messages, then
        acknowledge (each try skips the messages a reconnect of the source left unsettleable)."""
        results = [e for e in batch if e.output is not None]
        poison = [e for e in batch if e.output is None]
        if results:
            outputs = [e.output for e in results]
            await self._retry("publish to " + self.sink.name, self.sink.publish, outputs, self.sink)
            self.metrics.published.inc(len(results))
            self._counts["published"] += len(results)
        rejected: list[Entry] = []
        if poison:
            for entry in poison:
                where = "dead-lettered" if self.dead_letter else self.source.reject_note
                log.warning(
                    "poison message %s from %s %s: %s",
                    entry.message.message_id,
                    self.source.name,
                    where,
                    entry.reason,
                )
            if self.dead_letter is not None:
                letters = [
                    formats.dead_letter(e.message, e.reason or "", self.source.name) for e in poison
                ]
                where = "publish to " + self.dead_letter.name
                await self._retry(where, self.dead_letter.publish, letters, self.dead_letter)
                for entry in poison:
                    self.metrics.dead_lettered.labels(reason=reason_label(entry.reason)).inc()
                self._counts["dead-lettered"] += len(poison)
            else:
                rejected = poison
        acks = [e for e in batch if e not in rejected]
        if acks:
            await self._retry("acknowledge on " + self.source.name, self._ack, acks, self.source)
            self.metrics.acked.inc(len(self._settleable(acks)))
        if rejected:
            await self._retry("reject on " + self.source.name, self._reject, rejected, self.source)
            for entry in rejected:
                self.metrics.rejected.labels(reason=reason_label(entry.reason)).inc()
            self._counts["rejected"] += len(rejected)

    async def _ack(self, entries: list[Entry]) -> None:
        await self.source.ack([e.message for e in self._settleable(entries)])

    async def _reject(self, entries: list[Entry]) -> None:
        await self.source.reject([e.message for e in self._settleable(entries)])

    def _settleable(self, entries: list[Entry]) -> list[Entry]:
        """The entries whose messages came over the source's current connection."""
        return [e for e in entries if e.message.connection == self.source.connections]

    async def _retry(
        self, what: str, call: Callable[[T], Awaitable[Any]], arg: T, broker: Source | Sink
    ) -> None:
        trouble = _Trouble(what, self, broker)
        while True:
            try:
                await call(arg)
                return
            except BridgeError:
                raise
            except Exception as error:  # noqa: BLE001 - retried, bounded by broker_grace
                await trouble.failed(error)

    # -- broker connections ------------------------------------------------------

    async def _reconnect(self, broker: Source | Sink) -> None:
        """Open `broker`'s connection again if it is gone; a failed try is only logged (the
        caller's grace bounds the trouble)."""
        async with self._reconnecting:
            try:
                if not await broker.reconnect():
                    return
            except BridgeError:
                raise
            except Exception as error:  # noqa: BLE001 - tried again after the next failure
                log.warning("reconnecting to %s: %s", broker.name, _describe(error))
                return
        self.metrics.reconnects.labels(broker=self._role(broker)).inc()
        if broker is not self.source:
            log.warning("reconnected to %s", broker.name)
            return
        lost = self._held_unsettleable()
        self._counts["lost"] += lost
        log.warning(
            "reconnected to %s; %d message(s) held from the old connection will be published "
            "but cannot be acknowledged (the broker may deliver them again)",
            broker.name,
            lost,
        )

    def _held_unsettleable(self) -> int:
        """Held messages of the connection just replaced: their acknowledgement would mean
        nothing now. Their results are still published, so a broker that did not keep them
        (a restart without persistence) loses nothing; one that did delivers them again and
        they are published twice."""
        previous = self.source.connections - 1
        held = (*self._publishing, *self._order)
        return sum(1 for e in held if e.message.connection == previous)

    def _role(self, broker: Source | Sink) -> str:
        if broker is self.source:
            return "source"
        return "sink" if broker is self.sink else "dead_letter"

    # -- upkeep ------------------------------------------------------------------

    async def _upkeep(self) -> None:
        now = time.monotonic()
        next_progress = now + self.settings.progress_interval
        next_lag = now
        touch_every = self.source.touch_interval
        next_touch = now + (touch_every or 0)
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            self._check_stall(now)
            if touch_every and now >= next_touch:
                next_touch = now + touch_every
                held = [
                    e.message
                    for e in (*self._publishing, *self._order)
                    if now - e.taken_at >= touch_every
                ]
                if held:
                    try:
                        await self.source.touch(held)
                    except Exception as error:  # noqa: BLE001 - next time
                        log.warning("touch on %s: %s", self.source.name, error)
            if now >= next_lag:
                next_lag = now + 5.0
                try:
                    lag = await asyncio.wait_for(self.source.lag(), 5.0)
                except Exception:  # noqa: BLE001 - lag is informative only
                    lag = None
                self.metrics.lag.set(-1 if lag is None else lag)
            self._count_dropped()
            if now >= next_progress:
                next_progress = now + self.settings.progress_interval
                self._log_progress()

    def _count_dropped(self) -> None:
        new = self.source.dropped - self._counts["dropped"]
        if new > 0:
            self._counts["dropped"] += new
            self.metrics.source_dropped.inc(new)

    def _check_stall(self, now: float) -> None:
        if self._call is None or not self._outstanding:
            return
        # Stuck, not slow: no answer at all for answer_timeout while messages wait.
        # (Per-message age would restart a healthy stream that is merely behind.)
        oldest = min(b[0].sent_at for b in self._outstanding.values())
        if now - max(oldest, self._last_answer) > self.settings.answer_timeout:
            self._stalled = True
            self._call.cancel()

    def _log_progress(self, final: bool = False) -> None:
        self._count_dropped()
        counts = self._counts
        lost, dropped = counts["lost"], counts["dropped"]
        log.info(
            "%sconsumed %d, published %d, dead-lettered %d, rejected %d, in flight %d%s%s",
            "final: " if final else "",
            counts["consumed"],
            counts["published"],
            counts["dead-lettered"],
            counts["rejected"],
            self.held,
            f", left unacknowledged by a reconnect {lost}" if lost else "",
            f", dropped by the source (QoS 0) {dropped}" if dropped else "",
        )


class _Trouble:
    """Backoff and a time limit for one failing broker call."""

    def __init__(self, what: str, bridge: Bridge, broker: Source | Sink) -> None:
        self.what = what
        self.bridge = bridge
        self.broker = broker
        self.since: float | None = None
        self.backoff = Backoff(bridge.settings.backoff_base, bridge.settings.backoff_max)

    def ok(self) -> None:
        self.since = None
        self.backoff.succeed()

    async def failed(self, error: BaseException) -> None:
        now = time.monotonic()
        if self.since is None:
            self.since = now
        grace = self.bridge.settings.broker_grace
        if now - self.since > grace:
            raise BridgeError(f"{self.what} failing for {grace:.0f}s: {_describe(error)}")
        self.bridge.metrics.retried.labels(cause="broker").inc()
        delay = self.backoff.fail()
        log.warning("%s: %s; retrying in %.1fs", self.what, _describe(error), delay)
        await asyncio.sleep(delay)
        await self.bridge._reconnect(self.broker)


def _raise_first_failure(tasks: set[asyncio.Task]) -> None:
    failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception()]
    if failed:
        raise failed[0].exception()  # type: ignore[misc]


def _status(error: Any) -> tuple[grpc.StatusCode, str]:
    """(code, details) of an EmbedqError or a grpc error, attribute or method style."""
    code = getattr(error, "code", None)
    code = code() if callable(code) else code
    details = getattr(error, "details", "")
    details = details() if callable(details) else details
    return (code if isinstance(code, grpc.StatusCode) else Code.UNKNOWN), str(details or "")


def _describe(error: BaseException) -> str:
    text = str(error)
    return scrub(f"{type(error).__name__}: {text}" if text else type(error).__name__)


async def _sleep_or(event: asyncio.Event, delay: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(event.wait(), delay)


def check_options(options: pb.EncodeOptions, info: pb.InfoResponse, target: str) -> None:
    """Refuse options the server would refuse for every message (a ConfigError: exit 2,
    nothing acknowledged). Refused at run time instead, each message was taken for a
    poison one: the whole backlog dead-lettered (or dropped), no vector made."""
    served = {m.name: m for m in info.models}
    if options.model and options.model not in served:
        names = ", ".join(served) or "none"
        raise ConfigError(f"--model {options.model!r} is not served by {target} (served: {names})")
    name = options.model or info.default_model
    if name not in served:
        return  # no model yet, or several and no default: the server's answers say
    model = served[name]
    if options.dimension > model.dimension:
        raise ConfigError(
            f"--dimension {options.dimension} is above model {name!r}'s {model.dimension}"
        )
    if options.prompt_name and options.prompt_name not in model.prompts:
        known = ", ".join(sorted(model.prompts)) or "none"
        raise ConfigError(
            f"--prompt-name {options.prompt_name!r} is not a prompt of model {name!r} ({known})"
        )
    size = len(options.prompt.encode("utf-8", "surrogatepass"))
    if info.limits.max_text_bytes and size > info.limits.max_text_bytes:
        raise ConfigError(
            f"--prompt is {size} UTF-8 bytes, over {target}'s limit of {info.limits.max_text_bytes}"
        )


def refuses_the_options(details: str) -> bool:
    """Whether an INVALID_ARGUMENT is about the request's options, not its text (the
    server names what it refuses: `options.…`; a text's refusal names the text): every
    message would be refused alike."""
    return details.startswith(("options.", "set options.", "several models are served"))


def too_big(code: grpc.StatusCode, retry_after: float) -> bool:
    """Whether a batch's refusal says it is too big for its time limit: RESOURCE_EXHAUSTED
    with no hint of when to come back (its texts alone take longer than the limit at the
    workers' rate: the same batch is refused forever), or DEADLINE_EXCEEDED."""
    return (code == Code.RESOURCE_EXHAUSTED and not retry_after) or code == Code.DEADLINE_EXCEEDED
