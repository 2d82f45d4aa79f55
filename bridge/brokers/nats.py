"""NATS JetStream through nats-py (the NATS maintainers' asyncio client).

Source: ``nats://[user:pass@]host:port/SUBJECT[?durable=NAME][&stream=NAME]``.
A durable pull consumer (``?durable=`` or ``--consumer``, default
``embedq-bridge-<subject>``) on the stream that covers SUBJECT, created with
explicit acks and max_ack_pending = --max-in-flight when it does not exist
(an existing consumer is used as it is). Messages are fetched in batches,
acknowledged after their results are published, kept alive with "in
progress" acks while held, and terminated (``term``) when poison and no
--dead-letter is given. Several bridges on the same durable share its
messages.

Sink: ``nats://host:port/SUBJECT``: JetStream publish; each result waits for
the stream's PubAck. Results carry a ``Nats-Msg-Id`` header derived from the
input, so a result re-published after a crash is dropped by the stream's
duplicate window.

The bridge never creates, changes or deletes a stream: a subject no stream
covers is a one-line error.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence

import nats
from nats.errors import TimeoutError as NatsTimeout
from nats.js import api
from nats.js.errors import NotFoundError

from .base import BrokerUrl, ConfigError, Message, Options, OutMessage, Sink, Source, settle_each

SOURCE_PARAMS = ("durable", "stream", "ack_wait")
# close(): how long a drain may take before the connection is simply closed.
DRAIN_S = 2.0
SINK_PARAMS = ("stream",)


def _subject(url: BrokerUrl) -> str:
    subject = url.path.lstrip("/")
    if not subject:
        raise ConfigError(f"{url.safe}: say which subject: nats://HOST:PORT/SUBJECT")
    if "/" in subject or " " in subject:
        raise ConfigError(f"{url.safe}: {subject!r} is not a NATS subject")
    return subject


async def _connect(url: BrokerUrl):
    server = url.without_params(path=False, default_port=4222)

    async def quiet(_error: Exception) -> None:  # nats-py logs reconnects itself
        return None

    return await nats.connect(
        server,
        connect_timeout=10,
        max_reconnect_attempts=-1,
        allow_reconnect=True,
        error_cb=quiet,
    )


async def _stream_of(js, url: BrokerUrl, subject: str) -> str:
    stream = url.params.get("stream")
    try:
        if stream:
            await js.stream_info(stream)
            return stream
        return await js.find_stream_name_by_subject(subject)
    except NotFoundError:
        what = f"stream {stream!r}" if stream else f"no JetStream stream covers subject {subject!r}"
        raise ConfigError(
            f"{url.safe}: {what}{' not found' if stream else ''}; create it "
            f"(e.g. nats stream add) — the bridge never creates streams"
        ) from None


class NatsSource(Source):
    reject_note = "terminated (term)"

    def __init__(self, url: BrokerUrl, options: Options) -> None:
        super().__init__(url, options)
        url.check_params(SOURCE_PARAMS)
        self.subject = _subject(url)
        self.durable = (
            url.params.get("durable")
            or options.consumer
            or ("embedq-bridge-" + re.sub(r"[^A-Za-z0-9_-]", "_", self.subject))
        )
        self.ack_wait = url.int_param("ack_wait", 30, 1)
        self.touch_interval = max(1.0, self.ack_wait / 3)
        self.nc = None
        self.sub = None
        self.stream = ""

    async def connect(self) -> None:
        self.nc = await _connect(self.url)
        js = self.nc.jetstream()
        self.js = js
        self.stream = await _stream_of(js, self.url, self.subject)
        try:
            info = await js.consumer_info(self.stream, self.durable)
        except NotFoundError:
            await js.add_consumer(
                self.stream,
                api.ConsumerConfig(
                    durable_name=self.durable,
                    ack_policy=api.AckPolicy.EXPLICIT,
                    deliver_policy=api.DeliverPolicy.ALL,
                    filter_subject=self.subject,
                    max_ack_pending=self.options.max_in_flight,
                    ack_wait=float(self.ack_wait),
                ),
            )
        else:
            self._adopt(info.config)
        self.sub = await js.pull_subscribe_bind(durable=self.durable, stream=self.stream)

    def _adopt(self, config: api.ConsumerConfig) -> None:
        """An existing consumer (made by its owner, or by an earlier bridge): refuse one that
        would lose or duplicate messages, and touch held ones often enough for its ack_wait."""
        policy = str(getattr(config.ack_policy, "value", config.ack_policy) or "explicit")
        if policy != api.AckPolicy.EXPLICIT.value:  # nats-py leaves the server's string as is
            raise ConfigError(
                f"{self.url.safe}: consumer {self.durable!r} has ack policy {policy!r}: the "
                "bridge needs 'explicit' (acknowledged after the result is published)"
            )
        if config.filter_subject and config.filter_subject != self.subject:
            raise ConfigError(
                f"{self.url.safe}: consumer {self.durable!r} filters {config.filter_subject!r}, "
                f"not {self.subject!r}: name another durable (?durable=)"
            )
        if config.ack_wait:  # seconds (nats-py converts the server's nanoseconds)
            self.ack_wait = config.ack_wait
            self.touch_interval = max(0.5, min(self.touch_interval, config.ack_wait / 3))

    async def fetch(self, max_count: int, timeout: float) -> list[Message]:
        try:
            msgs = await self.sub.fetch(batch=max_count, timeout=timeout)
        except (NatsTimeout, asyncio.TimeoutError):
            return []
        messages = []
        for msg in msgs:
            meta = msg.metadata
            messages.append(
                Message(
                    body=msg.data,
                    message_id=str(meta.sequence.stream),
                    headers=dict(msg.headers or {}),
                    stable_id=True,
                    redelivered=meta.num_delivered > 1,
                    handle=msg,
                )
            )
        return messages

    async def ack(self, messages: Sequence[Message]) -> None:
        await settle_each(messages, lambda handle: handle.ack())

    async def reject(self, messages: Sequence[Message]) -> None:
        await settle_each(messages, lambda handle: handle.term())

    async def touch(self, messages: Sequence[Message]) -> None:
        for message in messages:
            await message.handle.in_progress()

    async def lag(self) -> int | None:
        info = await self.js.consumer_info(self.stream, self.durable)
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    async def stop_consuming(self) -> None:
        return None

    async def close(self) -> None:
        if self.nc is None:
            return
        try:
            # The bridge has settled every message it held by now; what drain still
            # waits for is the pull subscription's open fetch, for nats-py's
            # drain_timeout (30 s: SIGTERM took 30 s to stop the bridge). Anything
            # fetched and not acknowledged is redelivered after ack_wait anyway.
            await asyncio.wait_for(self.nc.drain(), DRAIN_S)
        except Exception:  # noqa: BLE001 - closing anyway
            await self.nc.close()


class NatsSink(Sink):
    def __init__(self, url: BrokerUrl, options: Options) -> None:
        super().__init__(url, options)
        url.check_params(SINK_PARAMS)
        self.subject = _subject(url)
        self.nc = None

    async def connect(self) -> None:
        self.nc = await _connect(self.url)
        self.js = self.nc.jetstream(publish_async_max_pending=max(4000, self.options.max_in_flight))
        self.stream = await _stream_of(self.js, self.url, self.subject)

    async def publish(self, messages: Sequence[OutMessage]) -> None:
        futures = []
        for message in messages:
            headers = {**message.headers, "Content-Type": message.content_type}
            if message.dedup_id:
                headers["Nats-Msg-Id"] = message.dedup_id
            futures.append(
                await self.js.publish_async(
                    self.subject, message.body, headers=headers, stream=self.stream
                )
            )
        results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 30)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()
