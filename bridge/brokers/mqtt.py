"""MQTT 5 through aiomqtt (asyncio, on the Eclipse paho-mqtt client).

Source: ``mqtt://[user:pass@]host:port/TOPIC[?client_id=ID&session_expiry=S&qos0_buffer=N]``,
QoS 1. The client id (``?client_id=``, ``--consumer``, default
``embedq-bridge-<hash of the topic>``) names a persistent session (clean
start off, session expiry ``session_expiry`` s, default 1 day): a restarted
bridge gets the messages it had not acknowledged again, and those that
arrived while it was away. The PUBACK of a message is sent only after its
result is published (paho's manual acks), so the broker keeps a message until
then; Receive Maximum = --max-in-flight bounds what it sends us unacknowledged.

Sink: ``mqtt://host:port/TOPIC``: QoS 1 publish, each waits for its PUBACK.
Headers travel as MQTT 5 user properties.

MQTT's limits (see docs/bridge.md): one client id is one session, so two
bridges must not share one (the broker disconnects the older); use a shared
subscription (``$share/GROUP/TOPIC``) with one client id per bridge to spread
a topic. A broker keeps a bounded number of messages for an offline session
(Mosquitto: max_queued_messages, 1000 by default) and drops the rest; there
is no reject, so a poison message without --dead-letter is logged and
acknowledged.

A dropped connection (a broker restart, a network cut) is opened again by
``reconnect()`` when a call fails (aiomqtt does not reconnect by itself). The
source resumes its persistent session: the broker sends again what was not
acknowledged; the messages taken over the old connection are published but not
acknowledged (so a resent one is published twice, at least once).

A message published at QoS 0 reaches the bridge at QoS 0 whatever it subscribed with:
the broker sends those without flow control, so the bridge keeps at most
``qos0_buffer`` (1000) of them waiting and drops the rest, counted and logged (what QoS
0 allows: at most once); QoS 1 deliveries are never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import Sequence

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from embedq.logs import Throttled

from .base import BrokerUrl, ConfigError, Message, Options, OutMessage, Sink, Source

log = logging.getLogger(__name__)

SOURCE_PARAMS = ("client_id", "session_expiry", "qos0_buffer")
# QoS 0 deliveries kept waiting for room in the bridge's window (see _Inbox).
QOS0_BUFFER = 1000
SINK_PARAMS = ("client_id",)


def _topic(url: BrokerUrl, *, wildcards: bool) -> str:
    topic = url.path[1:] if url.path.startswith("/") else url.path
    if not topic:
        raise ConfigError(f"{url.safe}: say which topic: mqtt://HOST:PORT/TOPIC")
    if not wildcards and ("+" in topic or "#" in topic):
        raise ConfigError(f"{url.safe}: cannot publish to a wildcard topic {topic!r}")
    return topic


def _client(url: BrokerUrl, client_id: str, properties: Properties, **kwargs) -> aiomqtt.Client:
    tls = {"tls_params": aiomqtt.TLSParameters()} if url.scheme == "mqtts" else {}
    return aiomqtt.Client(
        url.host,
        url.port or (8883 if url.scheme == "mqtts" else 1883),
        username=url.username,
        password=url.password,
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        properties=properties,
        timeout=10,
        **tls,
        **kwargs,
    )


def _disconnected(client: aiomqtt.Client | None) -> bool:
    """Whether the client's connection has ended (aiomqtt keeps that in a future)."""
    if client is None:
        return True
    ended = client._disconnected
    if not ended.done():
        return False
    if not ended.cancelled():
        ended.exception()  # retrieved, so asyncio does not report it as never retrieved
    return True


async def _close_quietly(client: aiomqtt.Client | None) -> None:
    if client is not None:
        with contextlib.suppress(Exception):  # closing anyway
            await client.__aexit__(None, None, None)


def _check_subscription(granted: object, topic: str) -> None:
    """A SUBACK that refused the topic, or granted QoS 0 (no acknowledgements: a crash would
    lose messages), stops the bridge instead of leaving it idle or at most once."""
    for code in granted if isinstance(granted, list | tuple) else [granted]:
        value = getattr(code, "value", code)
        if getattr(code, "is_failure", False) or (isinstance(value, int) and value >= 0x80):
            raise ConfigError(f"MQTT broker refused the subscription to {topic!r}: {code}")
        if isinstance(value, int) and value == 0:
            raise ConfigError(
                f"MQTT broker granted only QoS 0 on {topic!r}: the bridge needs QoS 1 "
                "(acknowledged delivery)"
            )


class _Inbox(asyncio.Queue):
    """One connection's deliveries, waiting for room in the bridge's window. The QoS 1
    ones are bounded by the Receive Maximum the bridge announces (--max-in-flight); the
    QoS 0 ones, which the broker sends without flow control, by `qos0_limit` here."""

    def __init__(self, qos0_limit: int) -> None:
        super().__init__()
        self.qos0_limit = qos0_limit
        self.qos0 = 0  # QoS 0 messages waiting

    def offer(self, message: aiomqtt.Message) -> bool:
        """Queue `message`; False (not queued) for a QoS 0 one past the limit."""
        if message.qos == 0:
            if self.qos0 >= self.qos0_limit:
                return False
            self.qos0 += 1
        self.put_nowait(message)
        return True

    def _get(self) -> aiomqtt.Message:  # asyncio.Queue's hook, under get() and get_nowait()
        message = super()._get()
        if message.qos == 0:
            self.qos0 -= 1
        return message


class MqttSource(Source):
    reject_note = "acknowledged (MQTT has no reject)"

    def __init__(self, url: BrokerUrl, options: Options) -> None:
        super().__init__(url, options)
        url.check_params(SOURCE_PARAMS)
        self.topic = _topic(url, wildcards=True)
        digest = hashlib.sha256(f"{url.host}:{url.port}/{self.topic}".encode()).hexdigest()[:12]
        self.client_id = (
            url.params.get("client_id") or options.consumer or (f"embedq-bridge-{digest}")
        )
        self.session_expiry = url.int_param("session_expiry", 86400, 1)
        self.qos0_buffer = url.int_param("qos0_buffer", QOS0_BUFFER, 0)
        self.client: aiomqtt.Client | None = None
        self._pump: asyncio.Task | None = None
        self._inbox = _Inbox(self.qos0_buffer)
        self._throttled = Throttled(log)

    async def connect(self) -> None:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = self.session_expiry
        properties.ReceiveMaximum = min(65535, self.options.max_in_flight)
        client = _client(
            self.url, self.client_id, properties, clean_start=False, clean_session=None
        )
        # PUBACK only once the result is published (paho's manual acks).
        client._client.manual_ack_set(True)
        await client.__aenter__()
        try:
            granted = await client.subscribe(self.topic, qos=1)
            _check_subscription(granted, self.topic)
        except BaseException:
            await _close_quietly(client)
            raise
        # Kept only once connected: a failed try leaves the lost client, tried again later.
        # Each connection its own inbox (see AmqpSource.connect).
        self.client, self._inbox = client, _Inbox(self.qos0_buffer)
        self._pump = asyncio.create_task(self._read(client, self._inbox))

    async def _read(self, client: aiomqtt.Client, inbox: _Inbox) -> None:
        async for message in client.messages:
            self._keep(inbox, message)

    def _keep(self, inbox: _Inbox, message: aiomqtt.Message) -> None:
        """Queue `message` in `inbox`, or drop and count it (QoS 0 past the buffer)."""
        if inbox.offer(message):
            return
        self.dropped += 1
        self._throttled.warning(
            "qos0",
            "dropped QoS 0 messages from %s: %d already wait for room in the bridge's "
            "window (qos0_buffer); %d dropped so far",
            self.name, self.qos0_buffer, self.dropped,
        )  # fmt: skip

    async def fetch(self, max_count: int, timeout: float) -> list[Message]:
        inbox, connection = self._inbox, self.connections
        try:
            first = await asyncio.wait_for(inbox.get(), timeout)
        except asyncio.TimeoutError:
            if self._pump is not None and self._pump.done():
                error = self._pump.exception() if not self._pump.cancelled() else None
                raise ConnectionError(f"MQTT connection lost: {error}") from None
            return []
        batch = [first]
        while len(batch) < max_count and not inbox.empty():
            batch.append(inbox.get_nowait())
        return [self._message(m, connection) for m in batch]

    @staticmethod
    def _message(message: aiomqtt.Message, connection: int) -> Message:
        headers = {}
        user = getattr(message.properties, "UserProperty", None) if message.properties else None
        for key, value in user or []:
            headers[key] = value
        payload = message.payload
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        elif payload is None:
            payload = b""
        elif not isinstance(payload, bytes | bytearray):
            payload = str(payload).encode("utf-8")
        return Message(
            body=bytes(payload),
            message_id=f"{message.topic.value}#{message.mid}",
            headers=headers,
            stable_id=False,
            handle=message,
            connection=connection,
        )

    async def reconnect(self) -> bool:
        pump_ended = self._pump is not None and self._pump.done()
        if not pump_ended and not _disconnected(self.client):
            return False
        # Received over the dead connection and not taken yet (left in the old inbox): the
        # session sends the QoS 1 ones again; the QoS 0 ones it never would, so they move
        # to the new inbox (nothing to acknowledge: no connection of their own).
        old = self._inbox
        await self.close()
        await self.connect()
        while not old.empty():
            message = old.get_nowait()
            if message.qos == 0:
                self._keep(self._inbox, message)
        self.connections += 1  # with the new inbox, before any fetch can take from it
        return True

    async def ack(self, messages: Sequence[Message]) -> None:
        for message in messages:
            if message.handle.qos > 0:
                self.client._client.ack(message.handle.mid, message.handle.qos)

    async def reject(self, messages: Sequence[Message]) -> None:
        await self.ack(messages)

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
        await _close_quietly(self.client)


class MqttSink(Sink):
    def __init__(self, url: BrokerUrl, options: Options) -> None:
        super().__init__(url, options)
        url.check_params(SINK_PARAMS)
        self.topic = _topic(url, wildcards=False)
        self.client_id = url.params.get("client_id") or f"embedq-bridge-out-{uuid.uuid4().hex[:12]}"
        self.client: aiomqtt.Client | None = None
        # Reason codes of the PUBACKs that refused this batch's messages.
        self._refused: list[str] = []

    async def connect(self) -> None:
        client = _client(
            self.url,
            self.client_id,
            Properties(PacketTypes.CONNECT),
            max_inflight_messages=max(20, self.options.max_in_flight),
        )
        # A whole batch is published at once: not worth aiomqtt's "pending calls" warning.
        client.pending_calls_threshold = 4 * self.options.max_in_flight + 100
        # aiomqtt takes any PUBACK as success; a broker that refuses a message (an ACL that
        # denies the topic, a quota) says so in its reason code, counted here.
        on_publish = client._client.on_publish

        def check_publish(paho, userdata, mid, reason_code, properties) -> None:
            if getattr(reason_code, "is_failure", False):
                self._refused.append(str(reason_code))
            on_publish(paho, userdata, mid, reason_code, properties)

        client._client.on_publish = check_publish
        await client.__aenter__()
        self.client = client  # only once connected (see MqttSource.connect)

    async def publish(self, messages: Sequence[OutMessage]) -> None:
        sends = []
        for message in messages:
            properties = Properties(PacketTypes.PUBLISH)
            properties.ContentType = message.content_type
            properties.UserProperty = list(message.headers.items())
            sends.append(
                asyncio.ensure_future(
                    self.client.publish(
                        self.topic, message.body, qos=1, properties=properties, timeout=30
                    )
                )
            )
        self._refused.clear()  # one batch at a time: the bridge's publisher is serial
        confirmed = asyncio.gather(*sends, return_exceptions=True)
        # A PUBACK that will never come (the connection dropped) fails the batch now, not
        # after each publish's 30 s timeout.
        ended = self.client._disconnected
        await asyncio.wait({confirmed, ended}, return_when=asyncio.FIRST_COMPLETED)
        if not confirmed.done():
            confirmed.cancel()
            _disconnected(self.client)
            raise ConnectionError(f"MQTT connection lost while publishing to {self.topic!r}")
        for result in confirmed.result():
            if isinstance(result, BaseException):
                raise result
        if self._refused:
            # Not confirmed: the inputs stay unacknowledged and the batch is published again.
            reasons = ", ".join(sorted(set(self._refused)))
            raise ConnectionError(
                f"MQTT broker refused {len(self._refused)} of {len(messages)} results "
                f"on {self.topic!r}: {reasons}"
            )

    async def reconnect(self) -> bool:
        if not _disconnected(self.client):
            return False
        await self.close()
        await self.connect()  # a batch whose PUBACKs were lost is published again
        return True

    async def close(self) -> None:
        await _close_quietly(self.client)
