"""The Source / Sink interface every broker implements, and broker URLs.

A broker module (redis_streams, nats, amqp, mqtt; kafka would be one more)
provides a Source and/or a Sink class and registers them in
``brokers/__init__.py``. The core loop only ever calls the methods below.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit


class BridgeError(Exception):
    """A problem the bridge reports as one line and stops for (exit status `code`)."""

    code = 1


class ConfigError(BridgeError, ValueError):
    """A setting that cannot work: a bad URL, a missing stream/queue/exchange (exit 2)."""

    code = 2


@dataclass(frozen=True)
class BrokerUrl:
    """A parsed broker URL: scheme, endpoint, credentials, path and query parameters."""

    raw: str
    scheme: str
    host: str
    port: int | None
    username: str | None
    password: str | None
    path: str
    params: dict[str, str]

    @classmethod
    def parse(cls, raw: str) -> BrokerUrl:
        text = raw
        if raw.lower().startswith(("mqtt://", "mqtts://")):
            # MQTT's multi-level wildcard is '#', a URL fragment marker: take it literally.
            text = raw.replace("#", "%23")
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as error:
            # The parser's message may quote part of a password (say, the "port" a password
            # with a '/' left): not shown when the URL holds credentials.
            why = (
                "cannot parse it (percent-encode '/', '?', '#' and '@' in a password)"
                if "@" in raw
                else str(error)
            )
            raise ConfigError(f"bad URL {redact(raw)!r}: {why}") from None
        if not parts.scheme or not parts.hostname:
            raise ConfigError(f"bad URL {redact(raw)!r}: expected SCHEME://HOST[:PORT]/...")
        params: dict[str, str] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key in params:
                raise ConfigError(f"bad URL {redact(raw)!r}: parameter {key!r} given twice")
            params[key] = value
        if parts.password:
            _SECRETS.update({parts.password, unquote(parts.password)})
        elif parts.username and parts.scheme.lower() in TOKEN_SCHEMES:
            # nats://TOKEN@host: NATS token authentication, a secret in the user's place.
            _SECRETS.update({parts.username, unquote(parts.username)})
        return cls(
            raw=raw,
            scheme=parts.scheme.lower(),
            host=parts.hostname or "",
            port=port,
            username=unquote(parts.username) if parts.username is not None else None,
            password=unquote(parts.password) if parts.password is not None else None,
            path=unquote(parts.path),
            params=params,
        )

    @property
    def safe(self) -> str:
        """The URL with its password replaced by ***: fit for logs and errors."""
        return redact(self.raw)

    def check_params(self, allowed: Iterable[str]) -> None:
        """ConfigError naming any query parameter this broker does not know (typos)."""
        allowed = set(allowed)
        unknown = sorted(set(self.params) - allowed)
        if unknown:
            known = ", ".join(sorted(allowed)) or "none"
            raise ConfigError(
                f"{self.safe}: unknown parameter {', '.join(map(repr, unknown))} (known: {known})"
            )

    def int_param(self, name: str, default: int | None, minimum: int = 0) -> int | None:
        if name not in self.params:
            return default
        try:
            value = int(self.params[name])
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise ConfigError(f"{self.safe}: {name} must be an integer >= {minimum}")
        return value

    def without_params(
        self, scheme: str | None = None, *, path: bool = True, default_port: int | None = None
    ) -> str:
        """scheme://user:pass@host:port/path without the query: for the client library."""
        userinfo = ""
        if self.username is not None:
            userinfo = quote(self.username, safe="")
            if self.password is not None:
                userinfo += ":" + quote(self.password, safe="")
            userinfo += "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        port_number = self.port if self.port is not None else default_port
        port = f":{port_number}" if port_number is not None else ""
        tail = quote(self.path, safe="/") if path else ""
        return f"{scheme or self.scheme}://{userinfo}{host}{port}{tail}"


# Schemes whose URL user, given without a password, is a token (NATS token auth).
TOKEN_SCHEMES = frozenset({"nats", "tls"})
# Passwords seen in broker URLs: scrubbed from every error and log line (scrub()).
_SECRETS: set[str] = set()


def scrub(text: str) -> str:
    """`text` with every known broker password replaced by ***."""
    for secret in _SECRETS:
        if secret and secret in text:
            text = text.replace(secret, "***")
    return text


def redact(url: str) -> str:
    """`url` with the password (user:PASSWORD@) replaced by ***, and a user with no password
    too (NATS reads it as a token); when a '/', '?' or '#' in a password hides where the
    host starts, everything up to the last '@' is hidden."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    if "@" not in netloc:
        if "@" in tail:  # credentials the URL parser would misread: hide them all
            return f"{scheme}://***@{rest.rpartition('@')[2]}"
        return url
    userinfo, _, hostport = netloc.rpartition("@")
    shown = f"{userinfo.split(':', 1)[0]}:***" if ":" in userinfo else "***"
    return f"{scheme}://{shown}@{hostport}{tail}"


@dataclass(eq=False)
class Message:
    """One message taken from a source.

    ``body`` is the raw payload; for Redis Streams ``fields`` is the entry's
    field map (the body is then None). ``message_id`` is the broker's own id
    (stream entry id, stream sequence, message-id property, ...). ``stable_id``
    says whether a redelivery of the same message carries the same id (used
    for broker-side de-duplication of re-published results). ``handle`` is the
    broker library's own object, kept for ack/reject.
    """

    body: bytes | None
    message_id: str
    headers: Mapping[str, str] = field(default_factory=dict)
    fields: Mapping[bytes, bytes] | None = None
    stable_id: bool = False
    redelivered: bool = False
    handle: Any = None
    # Acknowledged or rejected already (settle_each).
    settled: bool = False
    # Which of the source's connections it came over (Source.connections at the time). Once
    # the source has opened a newer one, it is never settled (its delivery tag or packet id
    # died with the old one; the broker may deliver it again), though its result is published.
    connection: int = 0


async def settle_each(messages: Sequence[Message], settle: Callable[[Any], Awaitable]) -> None:
    """`settle(handle)` (ack, reject, ...) for each message not settled yet: a batch retried
    after it failed part-way does not settle a message twice (nats-py and aio-pika raise)."""
    for message in messages:
        if not message.settled:
            await settle(message.handle)
            message.settled = True


@dataclass(eq=False)
class OutMessage:
    """One message to publish.

    ``body`` and ``headers`` are what brokers with headers send; ``fields`` is
    the field map a Redis stream entry gets. ``key`` is the message's id (used
    as the message-id property where the broker has one).
    """

    body: bytes
    headers: dict[str, str]
    fields: dict[str, bytes | str]
    key: str
    content_type: str = "application/json"
    # An id that is the same when the same input is published again (or None).
    dedup_id: str | None = None


@dataclass(frozen=True)
class Options:
    """Bridge-wide settings a broker may need."""

    max_in_flight: int = 512
    # Consumer / durable / client-id name; None: the broker module's default.
    consumer: str | None = None
    # Redis Streams: claim other consumers' entries idle longer than this (ms).
    claim_idle_ms: int = 60_000


class Source(abc.ABC):
    """Where messages come from. One instance per bridge; used from one event loop.

    The core calls ``fetch`` only with room in its window, acknowledges or
    rejects every fetched message exactly once (in fetch order, per source),
    and calls ``touch`` periodically with the messages it still holds.
    """

    #: Whether reject() keeps the message somewhere (dead-letter exchange, stream history).
    reject_note = "rejected"
    #: How many times reconnect() opened a new connection; messages carry the number
    #: they were taken under (Message.connection).
    connections = 0
    #: Messages the source dropped itself, as their broker's contract allows (MQTT QoS 0
    #: past its buffer); the bridge counts them in its metrics and progress lines.
    dropped = 0

    def __init__(self, url: BrokerUrl, options: Options) -> None:
        self.url = url
        self.options = options

    @abc.abstractmethod
    async def connect(self) -> None:
        """Connect, and check that what the URL names exists (ConfigError if not)."""

    @abc.abstractmethod
    async def fetch(self, max_count: int, timeout: float) -> list[Message]:
        """Up to max_count messages; waits at most `timeout` s for the first one."""

    @abc.abstractmethod
    async def ack(self, messages: Sequence[Message]) -> None:
        """Acknowledge: the broker may forget them."""

    @abc.abstractmethod
    async def reject(self, messages: Sequence[Message]) -> None:
        """Refuse for good, the broker's way (nack without requeue, term, ...)."""

    async def touch(self, messages: Sequence[Message]) -> None:  # noqa: B027 - optional
        """Tell the broker these are still being worked on (before its redelivery timer)."""

    #: Seconds between touch() calls the source needs (None: never).
    touch_interval: float | None = None

    async def stop_consuming(self) -> None:  # noqa: B027 - optional
        """Stop taking new messages (drain starts); what is held can still be acked."""

    async def lag(self) -> int | None:
        """Messages waiting on the broker for this consumer, when the broker says."""
        return None

    async def reconnect(self) -> bool:
        """After a failed call: connect again if the connection is gone. True when a new
        connection replaced a lost one (`connections` counts it); the messages taken over
        the old one can no longer be settled. Brokers whose client reconnects by itself
        with acknowledgements still valid (Redis, NATS) keep this default."""
        return False

    @abc.abstractmethod
    async def close(self) -> None: ...

    @property
    def name(self) -> str:
        return self.url.safe


class Sink(abc.ABC):
    """Where results (or dead letters) go."""

    #: Whether the broker carries headers (else binary output loses id/model/dtype).
    has_headers = True

    def __init__(self, url: BrokerUrl, options: Options) -> None:
        self.url = url
        self.options = options

    @abc.abstractmethod
    async def connect(self) -> None:
        """Connect, and check that the destination exists (ConfigError if not)."""

    @abc.abstractmethod
    async def publish(self, messages: Sequence[OutMessage]) -> None:
        """Publish in this order; return only once the broker has confirmed all of them
        (raise if any was not)."""

    async def reconnect(self) -> bool:
        """After a failed call: connect again if the connection is gone (True if it did)."""
        return False

    @abc.abstractmethod
    async def close(self) -> None: ...

    @property
    def name(self) -> str:
        return self.url.safe
