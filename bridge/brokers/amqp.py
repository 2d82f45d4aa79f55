"""RabbitMQ (AMQP 0-9-1) through aio-pika (asyncio, on aiormq).

Source: ``amqp://user:pass@host:port/vhost?queue=NAME``. The queue must exist
(declared passively: the bridge never creates or changes it). Consumed with
manual acks and prefetch = --max-in-flight, so the broker keeps the rest;
acknowledged after the result is published; a poison message without
--dead-letter is rejected without requeue (it goes to the queue's own
dead-letter exchange when the queue has one).

Sink: ``amqp://…/vhost?exchange=X&routing_key=K`` (``exchange`` empty or
absent: the default exchange, where ``routing_key`` is a queue name; ``queue=Q``
is short for that). Persistent messages, publisher confirms, ``mandatory``:
a message no queue would take is an error (retried, its input stays
unacknowledged), never a silent loss. Results carry their id as message_id
and, with --output-format binary, id/model/dimension/dtype as headers.

The vhost is the URL's path, percent-encoded (``/`` is ``%2F``; no path: ``/``).

A dropped connection (a RabbitMQ restart, a network cut) is opened again by
``reconnect()`` when a call fails, not by aio-pika's robust connection: the
deliveries of the old channel cannot be acknowledged on a new one (their
delivery tags would name other messages there), so the bridge must know which
messages came over it (Message.connection): their results are published, they
are never acknowledged, and RabbitMQ delivers them again if it kept them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage

from .base import BrokerUrl, ConfigError, Message, Options, OutMessage, Sink, Source, settle_each

SOURCE_PARAMS = ("queue",)
SINK_PARAMS = ("exchange", "routing_key", "queue")


async def _connect(url: BrokerUrl):
    port = 5671 if url.scheme == "amqps" else 5672
    plain = url.without_params(default_port=port)
    return await aio_pika.connect(plain, timeout=10)


def _gone(channel) -> bool:
    """Whether the channel is closed: by the broker, or with its connection (aio-pika's
    Connection.is_closed turns true only on close(); a dropped one shows in its channels)."""
    return channel is None or channel.is_closed


async def _close_quietly(connection) -> None:
    if connection is not None:
        with contextlib.suppress(Exception):  # already dead: closing is best effort
            await connection.close()


async def _reopen(broker: AmqpSource | AmqpSink) -> bool:
    """A new connection for `broker` if its channel is gone (True if it opened one)."""
    if not _gone(broker.channel):
        return False
    await _close_quietly(broker.connection)
    await broker.connect()
    return True


def _not_found(url: BrokerUrl, what: str, error: Exception) -> ConfigError:
    return ConfigError(f"{url.safe}: {what} not found ({error}); declare it first")


class AmqpSource(Source):
    reject_note = "rejected (nack without requeue)"

    def __init__(self, url: BrokerUrl, options: Options) -> None:
        super().__init__(url, options)
        url.check_params(SOURCE_PARAMS)
        self.queue_name = url.params.get("queue", "")
        if not self.queue_name:
            raise ConfigError(f"{url.safe}: say which queue: ?queue=NAME")
        self.connection = None
        self.channel = None
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._tag: str | None = None

    async def connect(self) -> None:
        """Connect and consume; kept only once all of it worked (a failed reconnect leaves
        the dead channel, so the next failure tries again)."""
        connection = await _connect(self.url)
        try:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=min(65535, self.options.max_in_flight))
            try:
                queue = await channel.get_queue(self.queue_name, ensure=True)
            except aiormq.exceptions.ChannelNotFoundEntity as error:
                raise _not_found(self.url, f"queue {self.queue_name!r}", error) from None
            # Each connection its own inbox: a fetch still waiting on the old one never
            # takes the new connection's deliveries as the old one's.
            inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
            tag = await queue.consume(inbox.put, no_ack=False)
        except BaseException:
            await _close_quietly(connection)
            raise
        self.connection, self.channel, self.queue = connection, channel, queue
        self._inbox, self._tag = inbox, tag

    async def fetch(self, max_count: int, timeout: float) -> list[Message]:
        inbox, connection = self._inbox, self.connections
        try:
            first = await asyncio.wait_for(inbox.get(), timeout)
        except asyncio.TimeoutError:
            if _gone(self.channel):
                raise ConnectionError("the AMQP channel is closed") from None
            return []
        batch = [first]
        while len(batch) < max_count and not inbox.empty():
            batch.append(inbox.get_nowait())
        return [self._message(m, connection) for m in batch]

    @staticmethod
    def _message(incoming: AbstractIncomingMessage, connection: int) -> Message:
        headers = {k: str(v) for k, v in (incoming.headers or {}).items()}
        return Message(
            body=incoming.body,
            message_id=incoming.message_id or f"delivery-{incoming.delivery_tag}",
            headers=headers,
            stable_id=bool(incoming.message_id),
            redelivered=bool(incoming.redelivered),
            handle=incoming,
            connection=connection,
        )

    async def reconnect(self) -> bool:
        # Delivered over the dead channel and not taken yet (left in the old inbox):
        # RabbitMQ has them back.
        if not await _reopen(self):
            return False
        self.connections += 1  # with the new inbox, before any fetch can take from it
        return True

    async def ack(self, messages: Sequence[Message]) -> None:
        await settle_each(messages, lambda handle: handle.ack())

    async def reject(self, messages: Sequence[Message]) -> None:
        await settle_each(messages, lambda handle: handle.reject(requeue=False))

    async def stop_consuming(self) -> None:
        if self._tag is not None:
            await self.queue.cancel(self._tag)
            self._tag = None
        # Delivered but not taken: hand back at once rather than on close.
        while not self._inbox.empty():
            await self._inbox.get_nowait().nack(requeue=True)

    async def lag(self) -> int | None:
        declared = await self.channel.declare_queue(self.queue_name, passive=True)
        return declared.declaration_result.message_count

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()


class AmqpSink(Sink):
    def __init__(self, url: BrokerUrl, options: Options) -> None:
        super().__init__(url, options)
        url.check_params(SINK_PARAMS)
        queue = url.params.get("queue")
        self.exchange_name = url.params.get("exchange", "")
        self.routing_key = url.params.get("routing_key", queue or "")
        if queue and (self.exchange_name or "routing_key" in url.params):
            raise ConfigError(f"{url.safe}: give queue=Q, or exchange=X&routing_key=K")
        if not self.exchange_name and not self.routing_key:
            raise ConfigError(
                f"{url.safe}: say where to publish: ?exchange=X&routing_key=K or ?queue=Q"
            )
        self.connection = None
        self.channel = None

    async def connect(self) -> None:
        connection = await _connect(self.url)
        try:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await self._exchange(channel)
        except BaseException:
            await _close_quietly(connection)
            raise
        # Kept only once all of it worked (see AmqpSource.connect).
        self.connection, self.channel, self.exchange = connection, channel, exchange

    async def _exchange(self, channel):
        """The exchange to publish to, checked (the default one: the queue checked)."""
        if self.exchange_name:
            try:
                return await channel.get_exchange(self.exchange_name, ensure=True)
            except aiormq.exceptions.ChannelNotFoundEntity as error:
                raise _not_found(self.url, f"exchange {self.exchange_name!r}", error) from None
        try:
            await channel.get_queue(self.routing_key, ensure=True)
        except aiormq.exceptions.ChannelNotFoundEntity as error:
            raise _not_found(self.url, f"queue {self.routing_key!r}", error) from None
        return channel.default_exchange

    async def publish(self, messages: Sequence[OutMessage]) -> None:
        confirms = []
        for message in messages:
            amqp_message = aio_pika.Message(
                body=message.body,
                headers=dict(message.headers),
                content_type=message.content_type,
                message_id=message.key,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            # publish() writes the frame at once and waits for the confirm: start them
            # all in order, then wait for every confirm.
            confirms.append(
                asyncio.ensure_future(
                    self.exchange.publish(amqp_message, self.routing_key, mandatory=True)
                )
            )
            await asyncio.sleep(0)
        results = await asyncio.gather(*confirms, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
            if not isinstance(result, aiormq.spec.Basic.Ack):
                raise RuntimeError(
                    f"exchange {self.exchange_name!r} returned a message for routing key "
                    f"{self.routing_key!r}: no queue is bound for it"
                )

    async def reconnect(self) -> bool:
        return await _reopen(self)  # a batch whose confirms were lost is published again

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()
