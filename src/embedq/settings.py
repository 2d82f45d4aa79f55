"""Connection settings and limits shared by the server, the workers and the CLI.

Each setting has a default here, an ``EMBEDQ_*`` environment variable and a
command-line flag (the flag wins). Secrets (the Redis password) are never
logged: use :func:`redact_url` for anything that prints a URL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

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


class SettingsError(ValueError):
    """A setting that cannot work (a missing file, a contradiction): reported at
    start-up as one line, without the contents of any file."""


# Query parameters redis-py accepts that carry a secret.
SECRET_QUERY_KEYS = frozenset({"password", "ssl_password"})


def redact_url(url: str) -> str:
    """The URL with any password (userinfo or query) replaced, safe for logs and errors."""
    parts = urlsplit(url)
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(key in SECRET_QUERY_KEYS for key, _ in pairs):
            query = urlencode([(k, "***" if k in SECRET_QUERY_KEYS else v) for k, v in pairs])
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def readable_file(path: str, what: str) -> str:
    """`path` if it names a readable file, else a SettingsError naming it (never its contents)."""
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise SettingsError(f"{what} {path!r}: {exc.strerror or exc}") from None
    return path


@dataclass(frozen=True)
class RedisSettings:
    url: str = "redis://127.0.0.1:6379/0"
    # Credentials kept out of the URL (EMBEDQ_REDIS_PASSWORD, and the ACL
    # user EMBEDQ_REDIS_USERNAME) so they never show up in process listings.
    # Credentials in the URL win over these.
    password: str | None = field(default=None, repr=False)
    namespace: str = "embedq"
    username: str | None = None
    # CA bundle that verifies a rediss:// server (EMBEDQ_REDIS_CA_CERT);
    # None: the system's trust store.
    ca_cert: str | None = None
    # Redis Cluster? None: ask the server (INFO cluster) when connecting;
    # EMBEDQ_REDIS_CLUSTER=1/0 says so up front.
    cluster: bool | None = None

    def __post_init__(self) -> None:
        if self.ca_cert and urlsplit(self.url).scheme != "rediss":
            raise SettingsError(
                f"EMBEDQ_REDIS_CA_CERT is set but the Redis URL {self.safe_url} is not rediss://"
            )

    @classmethod
    def from_env(cls, url: str | None = None, namespace: str | None = None) -> RedisSettings:
        ca_cert = env("REDIS_CA_CERT") or None
        return cls(
            url=url or env("REDIS_URL") or cls.url,
            password=env("REDIS_PASSWORD") or None,
            namespace=namespace or env("NAMESPACE") or cls.namespace,
            username=env("REDIS_USERNAME") or None,
            ca_cert=readable_file(ca_cert, "EMBEDQ_REDIS_CA_CERT") if ca_cert else None,
            cluster=_tri_state(env("REDIS_CLUSTER")),
        )

    def __repr__(self) -> str:
        return (
            f"RedisSettings(url={self.safe_url!r}, namespace={self.namespace!r}, "
            f"username={self.username!r}, password={'***' if self.password else None}, "
            f"ca_cert={self.ca_cert!r})"
        )

    @property
    def safe_url(self) -> str:
        return redact_url(self.url)

    def fatal_error(self, exc: BaseException) -> SettingsError | None:
        """A SettingsError when `exc` says the configuration is wrong (a password
        or ACL refused): retrying cannot help, so start-up stops with one line."""
        text = str(exc)
        refused = isinstance(exc, redis.exceptions.AuthenticationError) or any(
            marker in text for marker in ("WRONGPASS", "NOAUTH", "NOPERM", "invalid password")
        )
        if not refused:
            return None
        return SettingsError(
            f"redis at {self.safe_url} refused our credentials ({self.describe_error(exc)}); "
            "check EMBEDQ_REDIS_PASSWORD / the URL's user"
        )

    def describe_error(self, exc: BaseException) -> str:
        """`ClassName: message` of a Redis error with any secret blanked out."""
        message = str(exc)
        in_url = urlsplit(self.url).password
        secrets = [self.url, self.password, in_url, unquote(in_url or "")]
        for secret in filter(None, secrets):
            message = message.replace(secret, "***")
        return f"{type(exc).__name__}: {message}" if message else type(exc).__name__

    def _kwargs(self) -> dict[str, object]:
        kwargs: dict[str, object] = {
            "health_check_interval": 15,
            "socket_keepalive": True,
            # Every call has a timeout (blocking reads block for 1 s at most), so a
            # node that vanishes mid-call is an error to handle, not a hang.
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
        }
        if self.password:
            kwargs["password"] = self.password
        if self.username:
            kwargs["username"] = self.username
        if self.ca_cert:
            kwargs["ssl_ca_certs"] = self.ca_cert
        return kwargs

    def is_cluster(self) -> bool:
        """Whether the URL points at a Redis Cluster (asked once, at start-up)."""
        if self.cluster is not None:
            return self.cluster
        try:
            probe = redis.Redis.from_url(self.url, **{**self._kwargs(), "socket_timeout": 3})
            with probe:
                return bool(probe.info("cluster").get("cluster_enabled"))
        except (redis.RedisError, OSError):
            return False  # unreachable now: a plain client that reconnects later

    def _cluster_url(self) -> str:
        # A cluster has no numbered databases: drop any /N from the URL.
        parts = urlsplit(self.url)
        return urlunsplit((parts.scheme, parts.netloc, "", parts.query, parts.fragment))

    def connect(self) -> redis.Redis:
        if self.is_cluster():
            return redis.RedisCluster.from_url(self._cluster_url(), **self._kwargs())
        return redis.Redis.from_url(self.url, **self._kwargs())

    def connect_async(self, **extra: object) -> aioredis.Redis:
        if self.is_cluster():
            return aioredis.RedisCluster.from_url(
                self._cluster_url(), **{**self._kwargs(), **extra}
            )
        # A pooled connection that a Redis restart closed fails once when next used:
        # retry connection errors (not timeouts) briefly, so that a stale connection
        # is not reported as an outage (it made health flap again ~10 s later).
        retry = {"retry": _connection_retry(), "retry_on_error": [redis.ConnectionError]}
        return aioredis.Redis.from_url(self.url, **{**self._kwargs(), **retry, **extra})


def _connection_retry():
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialWithJitterBackoff

    return Retry(
        ExponentialWithJitterBackoff(base=0.05, cap=0.5),
        2,
        supported_errors=(redis.ConnectionError,),
    )


def _tri_state(raw: str | None) -> bool | None:
    if raw in (None, ""):
        return None
    return raw.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Limits:
    """Request limits the server enforces (reported by Info)."""

    max_batch_texts: int = 2048
    max_text_bytes: int = 65536
    # gRPC message cap, both directions: 2048 texts x 384 floats x 4 bytes
    # is 3 MiB, far below it.
    max_message_bytes: int = 64 * 1024 * 1024
    # Candidates of one ranking call: scored in one vectorised pass.
    max_candidates: int = 10_000

    @classmethod
    def from_env(cls) -> Limits:
        return cls(
            max_batch_texts=env_int("MAX_BATCH_TEXTS", cls.max_batch_texts),
            max_text_bytes=env_int("MAX_TEXT_BYTES", cls.max_text_bytes),
            max_message_bytes=env_int("MAX_MESSAGE_BYTES", cls.max_message_bytes),
            max_candidates=env_int("MAX_CANDIDATES", cls.max_candidates),
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
    # TLS (PEM files): certificate chain and key; with client_ca, clients
    # must present a certificate signed by it (mutual TLS).
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    # Bearer tokens: a file of one token per line (re-read when it changes)
    # and/or EMBEDQ_AUTH_TOKENS; none of either: no authentication.
    auth_token_file: str | None = None
    auth_tokens: tuple[str, ...] = field(default=(), repr=False)
    # Prometheus /metrics over HTTP on metrics_host:metrics_port; 0: off.
    metrics_port: int = 0
    metrics_host: str = DEFAULT_HOST
    # HTTP/JSON API (OpenAI-compatible /v1/embeddings) on host:http_port; 0: off.
    http_port: int = 0
    # Health "" stays NOT_SERVING until a worker has registered once (embedq serve:
    # its own workers start with it, and "ready" should mean they are there).
    ready_needs_workers: bool = False

    @property
    def auth_enabled(self) -> bool:
        return bool(self.auth_token_file or self.auth_tokens)


@dataclass(frozen=True)
class WorkerSettings:
    redis: RedisSettings = field(default_factory=RedisSettings)
    model: str | None = None
    device: str = "cpu"
    fp16: bool = False
    # What runs the encoder: "torch" (exact) or an opt-in faster CPU backend
    # (torch-int8, onnx, onnx-int8; see workers/backends/runtime.py).
    backend: str = "torch"
    # bench-zero / bench-sim run no model (benchmarks only): refused unless allowed
    # (--allow-bench-backend, EMBEDQ_ALLOW_BENCH_BACKEND=1). bench-sim sleeps per forward
    # pass sim_forward_ms plus sim_token_us per padded token (workers/backends/simulated.py).
    allow_bench_backend: bool = False
    sim_forward_ms: float = 4.0
    sim_token_us: float = 1.0
    # Padded tokens per forward pass (TEI's max_batch_tokens); None picks
    # by device: small batches keep a CPU's caches warm, a GPU wants big ones.
    max_batch_tokens: int | None = None
    max_batch_size: int = 256
    # Jobs taken from the stream per read.
    read_count: int = 64
    cache_ttl_s: int = 7 * 24 * 3600
    # Pending jobs idle this long are claimed from a dead worker.
    claim_idle_ms: int = 30000
    # Deliveries after which a job goes to the dead-letter stream.
    max_deliveries: int = 3
    # A worker whose heartbeat is older than this is dead: another worker takes
    # its pending jobs at once (the claim_idle_ms claim stays as the safety net).
    dead_after_s: float = 3.0
    # Fixed consumer name (serve's supervisor sets it, to hand a dead worker's jobs
    # over the moment the process exits); empty: host-pid-random.
    worker_id: str = ""

    def batch_tokens(self) -> int:
        if self.max_batch_tokens:
            return self.max_batch_tokens
        if self.backend == "bench-sim":  # a simulated accelerator batches like a GPU
            return GPU_BATCH_TOKENS
        return CPU_BATCH_TOKENS if self.device == "cpu" else GPU_BATCH_TOKENS
