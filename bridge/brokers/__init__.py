"""Broker registry: URL scheme -> (module, Source class, Sink class).

Adding a broker (Kafka through aiokafka, say) is one module with a Source and a
Sink (see base.py) and one line here. Modules are imported on use, so a
missing client library is reported for the broker that needs it only.
"""

from __future__ import annotations

import importlib

from .base import BrokerUrl, ConfigError, Options, Sink, Source

# scheme -> (module, source class, sink class, pip package)
_BROKERS = {
    "redis": ("redis_streams", "RedisStreamSource", "RedisStreamSink", "redis"),
    "rediss": ("redis_streams", "RedisStreamSource", "RedisStreamSink", "redis"),
    "nats": ("nats", "NatsSource", "NatsSink", "nats-py"),
    "tls": ("nats", "NatsSource", "NatsSink", "nats-py"),
    "amqp": ("amqp", "AmqpSource", "AmqpSink", "aio-pika"),
    "amqps": ("amqp", "AmqpSource", "AmqpSink", "aio-pika"),
    "mqtt": ("mqtt", "MqttSource", "MqttSink", "aiomqtt"),
    "mqtts": ("mqtt", "MqttSource", "MqttSink", "aiomqtt"),
}
NOT_YET = {"kafka": "Kafka is not supported yet (see docs/bridge.md)"}
SCHEMES = ", ".join(f"{s}://" for s in _BROKERS)


def _load(url: BrokerUrl, index: int) -> type:
    if url.scheme in NOT_YET:
        raise ConfigError(f"{url.safe}: {NOT_YET[url.scheme]}")
    entry = _BROKERS.get(url.scheme)
    if entry is None:
        raise ConfigError(f"{url.safe}: unknown broker scheme {url.scheme!r} (known: {SCHEMES})")
    module_name, package = entry[0], entry[3]
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ImportError as error:
        raise ConfigError(
            f"{url.safe}: the {package!r} library is missing ({error}); "
            "install it with: pip install 'embedq[bridge]'"
        ) from None
    return getattr(module, entry[index])


def make_source(raw: str, options: Options) -> Source:
    url = BrokerUrl.parse(raw)
    return _load(url, 1)(url, options)


def make_sink(raw: str, options: Options) -> Sink:
    url = BrokerUrl.parse(raw)
    return _load(url, 2)(url, options)
