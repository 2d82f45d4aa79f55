"""Connection settings and limits shared by the server, the workers and the CLI.

Each setting has a default here, an ``EMBEDQ_*`` environment variable and a
command-line flag (the flag wins). Secrets (the Redis password) are never
logged: use :func:`redact_url` for anything that prints a URL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis

DEFAULT_PORT = 50051
DEFAULT_HOST = "127.0.0.1"
# Measured on a 2-core CPU with MiniLM (docs/benchmarks.md): 2048 padded
# tokens per batch beat 4096 and 16384 by 10-25%.
CPU_BATCH_TOKENS = 2048
GPU_BATCH_TOKENS = 16384


def env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"EMBEDQ_{name}", default)


def env_int(name: str, default: int) -> int:
    raw = env(name)
    return int(raw) if raw not in (None, "") else default


def redact_url(url: str) -> str:
    """The URL with any password replaced, safe for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    netloc = f"{user}:***@{host}" if user else f":***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@dataclass(frozen=True)
class RedisSettings:
    url: str = "redis://127.0.0.1:6379/0"
    # A password kept out of the URL (EMBEDQ_REDIS_PASSWORD) so it never
    # shows up in process listings.
    password: str | None = None
    namespace: str = "embedq"

    @classmethod
    def from_env(cls, url: str | None = None, namespace: str | None = None) -> RedisSettings:
        return cls(
            url=url or env("REDIS_URL") or cls.url,
            password=env("REDIS_PASSWORD") or None,
            namespace=namespace or env("NAMESPACE") or cls.namespace,
        )

    @property
    def safe_url(self) -> str:
        return redact_url(self.url)

    def _kwargs(self) -> dict[str, object]:
        kwargs: dict[str, object] = {"health_check_interval": 15, "socket_keepalive": True}
        if self.password:
            kwargs["password"] = self.password
        return kwargs

    def connect(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, **self._kwargs())

    def connect_async(self, **extra: object) -> aioredis.Redis:
        return aioredis.Redis.from_url(self.url, **self._kwargs(), **extra)


@dataclass(frozen=True)
class Limits:
    """Request limits the server enforces (reported by Info)."""

    max_batch_texts: int = 2048
    max_text_bytes: int = 65536
    # gRPC message cap, both directions: 2048 texts x 384 floats x 4 bytes
    # is 3 MiB, far below it.
    max_message_bytes: int = 64 * 1024 * 1024

    @classmethod
    def from_env(cls) -> Limits:
        return cls(
            max_batch_texts=env_int("MAX_BATCH_TEXTS", cls.max_batch_texts),
            max_text_bytes=env_int("MAX_TEXT_BYTES", cls.max_text_bytes),
            max_message_bytes=env_int("MAX_MESSAGE_BYTES", cls.max_message_bytes),
        )


@dataclass(frozen=True)
class ServerSettings:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    redis: RedisSettings = field(default_factory=RedisSettings)
    limits: Limits = field(default_factory=Limits)
    # Model used when a request names none; empty: the only registered one.
    default_model: str = ""
    # Bound on the wait for a worker when the caller set no deadline.
    default_timeout_s: float = 120.0
    # A worker whose heartbeat is older than this counts as gone.
    worker_stale_s: float = 15.0


@dataclass(frozen=True)
class WorkerSettings:
    redis: RedisSettings = field(default_factory=RedisSettings)
    model: str | None = None
    device: str = "cpu"
    fp16: bool = False
    # Padded tokens per forward pass (TEI's max_batch_tokens); None picks
    # by device: small batches keep a CPU's caches warm, a GPU wants big ones.
    max_batch_tokens: int | None = None
    max_batch_size: int = 256
    # Jobs taken from the stream per read.
    read_count: int = 64
    cache_ttl_s: int = 7 * 24 * 3600
    # Pending jobs idle this long are claimed from a dead worker.
    claim_idle_ms: int = 30000

    def batch_tokens(self) -> int:
        if self.max_batch_tokens:
            return self.max_batch_tokens
        return CPU_BATCH_TOKENS if self.device == "cpu" else GPU_BATCH_TOKENS

    # Deliveries after which a job goes to the dead-letter stream.
    max_deliveries: int = 3
