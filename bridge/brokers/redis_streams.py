"""Redis Streams through redis-py's asyncio client (redis.asyncio).

Source: ``redis://[user:pass@]host:port/db?stream=NAME&group=GROUP``. A
consumer group (created from the start of the stream with MKSTREAM when it
does not exist), read with XREADGROUP; each entry is XACKed after its result
is published. Every bridge instance is its own consumer (``--consumer``, else
a name unique to the process); entries another consumer has held for longer
than ``claim_idle_ms`` (its bridge is gone) are taken over with XAUTOCLAIM,
while a live bridge keeps resetting the idle time of what it holds (XCLAIM
JUSTID to itself), so a slow but live bridge is not robbed. A consumer
started with a fixed --consumer name first re-reads its own pending entries.

Sink: ``redis://…?stream=OUT[&maxlen=N]``: XADD (MAXLEN ~ N when given) in
one pipeline per batch; the reply of XADD is the confirmation.

Redis has no "reject": a poison message without --dead-letter is logged and
XACKed; it stays readable in the stream (XRANGE), it is not deleted.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from .base import BrokerUrl, ConfigError, Message, Options, OutMessage, Sink, Source

SOURCE_PARAMS = ("stream", "group", "claim_idle_ms", "start")
SINK_PARAMS = ("stream", "maxlen")


def _client(url: BrokerUrl) -> aioredis.Redis:
    path = url.path.strip("/") or "0"
    if not path.isdigit():
        raise ConfigError(f"{url.safe}: the path is the database number, not {path!r}")
    return aioredis.Redis.from_url(
        url.without_params(), socket_connect_timeout=10, health_check_interval=30
    )


def _stream(url: BrokerUrl) -> str:
    stream = url.params.get("stream", "")
    if not stream:
        raise ConfigError(f"{url.safe}: say which stream: ?stream=NAME")
    return stream


def default_consumer() -> str:
    return f"bridge-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class RedisStreamSource(Source):
    reject_note = "acknowledged (kept in the stream; Redis has no reject)"

    def __init__(self, url: BrokerUrl, options: Options) -> None:
        super().__init__(url, options)
        url.check_params(SOURCE_PARAMS)
        self.stream = _stream(url)
        self.group = url.params.get("group", "")
        if not self.group:
            raise ConfigError(f"{url.safe}: a source needs a consumer group: &group=NAME")
        self.claim_idle_ms = url.int_param("claim_idle_ms", options.claim_idle_ms, 1)
        self.start = url.params.get("start", "0")
        if self.start not in ("0", "$"):
            raise ConfigError(f"{url.safe}: start must be 0 (whole stream) or $ (new entries)")
        self.consumer = options.consumer or default_consumer()
        # Reset the idle time of held entries well before another bridge may claim them.
        self.touch_interval = max(0.2, min(10.0, self.claim_idle_ms / 3000))
        self.redis = _client(url)
        self._own_pending = options.consumer is not None
        self._own_cursor = "0"
        self._claim_cursor = "0-0"
        self._next_claim = 0.0

    async def connect(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, self.group, id=self.start, mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise ConfigError(f"{self.url.safe}: {error}") from None

    async def fetch(self, max_count: int, timeout: float) -> list[Message]:
        if self._own_pending:
            # Our own unacknowledged entries (a restart under the same --consumer name).
            entries = await self.redis.xreadgroup(
                self.group, self.consumer, {self.stream: self._own_cursor}, count=max_count
            )
            messages = self._messages(entries, redelivered=True)
            if messages:
                self._own_cursor = messages[-1].message_id
                return messages
            self._own_pending = False
        now = time.monotonic()
        if now >= self._next_claim:
            claimed = await self._claim(max_count)
            if claimed:
                return claimed
            self._next_claim = now + min(5.0, self.claim_idle_ms / 2000)
        entries = await self.redis.xreadgroup(
            self.group,
            self.consumer,
            {self.stream: ">"},
            count=max_count,
            block=max(1, int(timeout * 1000)),
        )
        return self._messages(entries)

    async def _claim(self, max_count: int) -> list[Message]:
        """Entries of dead consumers (idle past claim_idle_ms), oldest first."""
        reply = await self.redis.xautoclaim(
            self.stream,
            self.group,
            self.consumer,
            min_idle_time=self.claim_idle_ms,
            start_id=self._claim_cursor,
            count=max_count,
        )
        cursor, entries = reply[0], reply[1]
        deleted = reply[2] if len(reply) > 2 else []
        self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        if deleted:
            # Trimmed away while pending: nothing left to process.
            await self.redis.xack(self.stream, self.group, *deleted)
        messages = []
        for entry_id, fields in entries:
            if fields is None:
                continue
            messages.append(self._message(entry_id, fields, redelivered=True))
        if self._claim_cursor != "0-0":
            self._next_claim = 0.0  # more to scan right away
        return messages

    def _messages(self, reply, redelivered: bool = False) -> list[Message]:
        messages = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                if fields is None:  # deleted while pending
                    continue
                messages.append(self._message(entry_id, fields, redelivered))
        return messages

    @staticmethod
    def _message(entry_id, fields, redelivered: bool) -> Message:
        ident = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        return Message(
            body=None,
            message_id=ident,
            fields=dict(fields),
            stable_id=True,
            redelivered=redelivered,
            handle=ident,
        )

    async def ack(self, messages: Sequence[Message]) -> None:
        if messages:
            await self.redis.xack(self.stream, self.group, *[m.handle for m in messages])

    async def reject(self, messages: Sequence[Message]) -> None:
        await self.ack(messages)

    async def touch(self, messages: Sequence[Message]) -> None:
        ids = [m.handle for m in messages]
        for start in range(0, len(ids), 1000):
            await self.redis.xclaim(
                self.stream,
                self.group,
                self.consumer,
                min_idle_time=0,
                message_ids=ids[start : start + 1000],
                justid=True,
            )

    async def lag(self) -> int | None:
        for group in await self.redis.xinfo_groups(self.stream):
            name = group.get("name")
            if (name.decode() if isinstance(name, bytes) else name) == self.group:
                lag = group.get("lag")
                pending = group.get("pending") or 0
                return None if lag is None else int(lag) + int(pending)
        return None

    async def close(self) -> None:
        try:
            # A clean stop leaves no consumer behind (only when it holds nothing).
            for consumer in await self.redis.xinfo_consumers(self.stream, self.group):
                name = consumer.get("name")
                name = name.decode() if isinstance(name, bytes) else name
                if name == self.consumer and not consumer.get("pending"):
                    await self.redis.xgroup_delconsumer(self.stream, self.group, self.consumer)
        except Exception:  # noqa: BLE001, S110 - best effort on the way out
            pass
        await self.redis.aclose()


class RedisStreamSink(Sink):
    def __init__(self, url: BrokerUrl, options: Options) -> None:
        super().__init__(url, options)
        url.check_params(SINK_PARAMS)
        self.stream = _stream(url)
        self.maxlen = url.int_param("maxlen", None, 1)
        self.redis = _client(url)

    async def connect(self) -> None:
        await self.redis.ping()

    async def publish(self, messages: Sequence[OutMessage]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for message in messages:
            pipe.xadd(
                self.stream,
                message.fields,
                maxlen=self.maxlen,
                approximate=True,
            )
        await pipe.execute()

    async def close(self) -> None:
        await self.redis.aclose()
