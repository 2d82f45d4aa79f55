"""Every setting of the server, the workers and the commands, declared once.

Each :class:`Setting` in :data:`SETTINGS` names its type, default, ``EMBEDQ_*``
environment variable, command-line flag, help and the commands that take the
flag. From that one table come the commands' flags (:mod:`embedq.flags`), the
environment parsing, the defaults of the settings dataclasses below and the
README's configuration table (a test checks it). A flag wins over its
variable, which wins over the default.

Secrets (the Redis password, bearer tokens) are never logged or shown in
``--help``: use :func:`redact_url` for anything that prints a URL.
"""

from __future__ import annotations

import argparse
import functools
import os
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

if TYPE_CHECKING:  # redis is imported where it is used: SettingsError needs no redis
    import redis
    import redis.asyncio as aioredis

# What --log-format takes (embedq.logs has a formatter for each).
LOG_FORMATS = ("text", "json")

DEFAULT_PORT = 50051
DEFAULT_HOST = "127.0.0.1"
# Measured on a 2-core CPU with MiniLM (docs/benchmarks.md): 2048 padded
# tokens per batch beat 4096 and 16384 by 10-25%.
CPU_BATCH_TOKENS = 2048
GPU_BATCH_TOKENS = 16384
# Library default of RedisSettings; the commands never fall back to it (serve
# starts a private Redis, server and worker require a URL).
LOCAL_REDIS_URL = "redis://127.0.0.1:6379/0"
# Values of a boolean variable that mean "on" (anything else is off).
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})

# The commands a flag can belong to ("embedq" is the top-level parser).
SERVER, SERVE, WORKER, STATUS, TOP = "server", "serve", "worker", "status", "embedq"
SERVERS = (SERVER, SERVE)
WORKERS = (WORKER, SERVE)
REDIS_USERS = (SERVE, SERVER, WORKER, STATUS)


class SettingsError(ValueError):
    """A setting that cannot work (a missing file, a contradiction): reported at
    start-up as one line, without the contents of any file."""


@dataclass(frozen=True)
class Setting:
    """One setting. `name` is the key in SETTINGS, the argparse dest and the
    `setting` metadata of the dataclass fields that hold it."""

    name: str
    type: type
    default: Any
    help: str
    env: str | None = None
    flag: str | None = None
    # Commands whose parser has the flag.
    commands: tuple[str, ...] = ()
    # The default as documented, where the literal would mislead ("2048 on CPU, ...").
    shown: str | None = None
    # Never printed: not its value, not even an inherited environment's.
    secret: bool = False
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    # argparse group title (the security flags share one).
    group: str | None = None
    # Commands on which the flag is required unless its variable is set.
    required_for: tuple[str, ...] = ()
    # Commands on which the flag may repeat (a list; the variable: comma-separated).
    repeat_for: tuple[str, ...] = ()
    # Commands on which the flag is None unless given or set: the command picks
    # the value itself (status: the namespace of the serve it finds).
    unset_for: tuple[str, ...] = ()

    def raw(self) -> str | None:
        """The variable's value; unset and empty are the same (no value)."""
        value = os.environ.get(self.env) if self.env else None
        return value if value not in (None, "") else None

    def parse(self, raw: str) -> Any:
        """`raw` (from the environment or the command line) as this setting's type."""
        if self.type is bool:
            return raw.strip().lower() in TRUE_WORDS
        if self.choices:  # names of things (json, torch): any case
            return raw.strip().lower()
        if self.type in (int, float):
            try:
                return self.type(raw)
            except ValueError:
                kind = "an integer" if self.type is int else "a number"
                raise SettingsError(f"{self.source}={raw!r} is not {kind}") from None
        return raw

    def from_env(self) -> Any:
        raw = self.raw()
        return self.default if raw is None else self.parse(raw)

    @property
    def source(self) -> str:
        return self.env or self.flag or self.name

    @property
    def default_text(self) -> str:
        """The default for --help and the README."""
        if self.shown is not None:
            return self.shown
        if self.type is bool:
            return "on" if self.default else "off"
        return "none" if self.default is None else str(self.default)


def _declare(*settings: Setting) -> dict[str, Setting]:
    table: dict[str, Setting] = {}
    for setting in settings:
        if setting.name in table:
            raise ValueError(f"setting {setting.name!r} declared twice")
        table[setting.name] = setting
    return table


# Mirrors embedq.workers.backends.BACKENDS (not imported: that would load torch for --help).
BACKEND_CHOICES = ("torch", "torch-int8", "onnx", "onnx-int8", "bench-zero", "bench-sim")

SECURITY = "security"
SECURITY_NOTE = (
    "TLS and bearer tokens; health checking and reflection need no token. "
    "Never put a token on the command line: use a file or EMBEDQ_AUTH_TOKENS."
)

# fmt: off
SETTINGS: dict[str, Setting] = _declare(
    # --- Redis: every command that talks to it ---
    Setting(
        "redis_url", str, None,
        "redis:// or rediss:// URL; password via EMBEDQ_REDIS_PASSWORD",
        env="EMBEDQ_REDIS_URL", flag="--redis-url", commands=REDIS_USERS,
        shown="serve: a private Redis; status: the running serve's; required for server, worker",
        required_for=(SERVER, WORKER),
    ),
    Setting(
        "redis_password", str, None,
        "Redis password (kept out of the URL and of process listings; the URL's wins)",
        env="EMBEDQ_REDIS_PASSWORD", secret=True, shown="none; never logged",
    ),
    Setting(
        "redis_username", str, None,
        "Redis ACL user (the URL's wins)",
        env="EMBEDQ_REDIS_USERNAME", shown="`default`",
    ),
    Setting(
        "redis_ca_cert", str, None,
        "CA bundle that verifies a rediss:// server",
        env="EMBEDQ_REDIS_CA_CERT", shown="the system's trust store",
    ),
    Setting(
        "redis_cluster", bool, None,
        "1: the Redis is a Redis Cluster; 0: it is not",
        env="EMBEDQ_REDIS_CLUSTER", shown="asked from the server (INFO cluster)",
    ),
    Setting(
        "namespace", str, "embedq",
        "prefix of every Redis key, to share one Redis between deployments",
        env="EMBEDQ_NAMESPACE", flag="--namespace", commands=REDIS_USERS,
        unset_for=(STATUS,),
    ),
    # --- the gRPC server (embedq server, and serve's own) ---
    Setting(
        "host", str, DEFAULT_HOST, "address to listen on",
        env="EMBEDQ_HOST", flag="--host", commands=SERVERS,
    ),
    Setting(
        "port", int, DEFAULT_PORT, "gRPC port",
        env="EMBEDQ_PORT", flag="--port", commands=SERVERS,
    ),
    Setting(
        "default_model", str, "", "model used when a request names none",
        env="EMBEDQ_DEFAULT_MODEL", flag="--default-model", commands=SERVERS,
        shown="the only one served (serve: the first --model)",
    ),
    Setting(
        "max_batch_texts", int, 2048, "most texts per request",
        env="EMBEDQ_MAX_BATCH_TEXTS", flag="--max-batch-texts", commands=SERVERS,
    ),
    Setting(
        "max_text_bytes", int, 65536, "longest text in UTF-8 bytes",
        env="EMBEDQ_MAX_TEXT_BYTES", flag="--max-text-bytes", commands=SERVERS,
    ),
    # 2048 texts x 384 floats x 4 bytes is 3 MiB, far below it.
    Setting(
        "max_message_bytes", int, 64 * 1024 * 1024, "gRPC message cap, both directions",
        env="EMBEDQ_MAX_MESSAGE_BYTES",
    ),
    Setting(
        "max_candidates", int, 10_000,
        "most candidates of one ranking call (scored in one vectorised pass)",
        env="EMBEDQ_MAX_CANDIDATES",
    ),
    Setting(
        "default_timeout_s", float, 120.0,
        "seconds a call waits for workers when the client set no deadline, and the most any "
        "call waits (a longer client deadline is capped to it)",
        env="EMBEDQ_REQUEST_TIMEOUT", flag="--request-timeout", commands=SERVERS,
    ),
    Setting(
        "http_port", int, 0,
        "also serve the HTTP/JSON API (OpenAI-compatible /v1/embeddings) on this port of "
        "--host, with the same TLS, tokens and limits; 0: off",
        env="EMBEDQ_HTTP_PORT", flag="--http-port", commands=SERVERS,
    ),
    Setting(
        "max_queued_jobs", int, 10_000,
        "jobs waiting in one model's stream (all servers) past which new work is refused",
        env="EMBEDQ_MAX_QUEUED_JOBS",
    ),
    Setting(
        "max_pending_texts", int, 100_000,
        "texts one server waits for past which new work is refused",
        env="EMBEDQ_MAX_PENDING_TEXTS",
    ),
    Setting(
        "max_pending_chars", int, 50_000_000,
        "characters of those texts past which new work is refused (about 4 per token)",
        env="EMBEDQ_MAX_PENDING_CHARS",
    ),
    Setting(
        "near_cache_mb", float, 64.0,
        "memory (MB) for the vectors this server read from the Redis cache lately: a call whose "
        "texts are all there is answered without a Redis round trip; 0: off",
        env="EMBEDQ_NEAR_CACHE_MB", flag="--near-cache-mb", commands=SERVERS,
    ),
    Setting(
        "server_id", str, None, "name of the server's reply stream; unique per running server",
        env="EMBEDQ_SERVER_ID", shown="random",
    ),
    # --- metrics: servers and workers alike ---
    Setting(
        "metrics_port", int, 0,
        "serve Prometheus metrics at http://HOST:PORT/metrics; 0: off (serve: the server's, "
        "its workers' on the ports after it; worker with several devices: device i on PORT+i)",
        env="EMBEDQ_METRICS_PORT", flag="--metrics-port", commands=(*SERVERS, WORKER),
    ),
    Setting(
        "metrics_host", str, DEFAULT_HOST, "address the metrics endpoint listens on",
        env="EMBEDQ_METRICS_HOST", flag="--metrics-host", commands=(*SERVERS, WORKER),
    ),
    # --- TLS and bearer tokens (servers) ---
    Setting(
        "tls_cert", str, None, "PEM certificate chain: serve gRPC over TLS",
        env="EMBEDQ_TLS_CERT", flag="--tls-cert", commands=SERVERS,
        metavar="FILE", group=SECURITY, shown="plaintext",
    ),
    Setting(
        "tls_key", str, None, "PEM private key of --tls-cert (unencrypted)",
        env="EMBEDQ_TLS_KEY", flag="--tls-key", commands=SERVERS,
        metavar="FILE", group=SECURITY,
    ),
    Setting(
        "tls_client_ca", str, None,
        "PEM CA bundle: require client certificates signed by it (mutual TLS)",
        env="EMBEDQ_TLS_CLIENT_CA", flag="--tls-client-ca", commands=SERVERS,
        metavar="FILE", group=SECURITY, shown="off",
    ),
    Setting(
        "auth_token_file", str, None,
        "accepted bearer tokens, one per line ('#' comments); re-read when it changes, so "
        "tokens rotate without a restart; EMBEDQ_AUTH_TOKENS adds more",
        env="EMBEDQ_AUTH_TOKEN_FILE", flag="--auth-token-file", commands=SERVERS,
        metavar="FILE", group=SECURITY, shown="none of it or EMBEDQ_AUTH_TOKENS: no auth",
    ),
    Setting(
        "auth_tokens", str, None, "accepted bearer tokens, comma-separated",
        env="EMBEDQ_AUTH_TOKENS", secret=True, shown="none; never logged",
    ),
    # --- serve ---
    Setting(
        "workers", int, 1, "worker processes to start per model (each uses --devices)",
        env="EMBEDQ_WORKERS", flag="--workers", commands=(SERVE,),
    ),
    # --- workers (embedq worker, and serve's) ---
    Setting(
        "model", str, None,
        "model folder, NAME=FOLDER, or a model id in the local Hugging Face cache; serve: "
        "repeat it (or comma-separate the variable) to serve several models, each with its "
        "own --workers workers, the first the default",
        env="EMBEDQ_MODEL", flag="--model", commands=WORKERS,
        shown="the bundled all-MiniLM-L6-v2", repeat_for=(SERVE,),
    ),
    Setting(
        "threads", int, 0,
        "CPU threads per worker process; several CPU workers on one machine should split "
        "the cores between them",
        env="EMBEDQ_THREADS", flag="--threads", commands=WORKERS,
        shown="torch's default; serve --workers N on CPU: cores / N",
    ),
    Setting(
        "cpu_nice", int, 10,
        "niceness a worker on the CPU adds to its process (Linux; 0 or less: none): on a "
        "machine it shares with the server, Redis and the callers, their short tasks (refusals, "
        "cache hits, replies) preempt the model's passes instead of queueing behind them; "
        "workers on a GPU keep theirs",
        env="EMBEDQ_CPU_NICE", flag="--cpu-nice", commands=WORKERS,
    ),
    Setting(
        "devices", str, "auto",
        "'auto' (every GPU, else CPU), 'cpu', or GPU indices like 0,1: one process each",
        env="EMBEDQ_DEVICES", flag="--devices", commands=WORKERS,
    ),
    Setting(
        "fp16", bool, False, "run the encoder in float16 on CUDA",
        env="EMBEDQ_FP16", flag="--fp16", commands=WORKERS,
    ),
    Setting(
        "backend", str, "torch",
        "what runs the encoder: torch (exact float32); or, opt-in and CPU only, faster "
        "torch-int8, onnx or onnx-int8 whose vectors differ slightly (onnx*: pip install "
        "'embedq[fast]'); bench-zero, bench-sim: benchmarks only, no model, meaningless "
        "vectors (need --allow-bench-backend)",
        env="EMBEDQ_BACKEND", flag="--backend", commands=WORKERS, choices=BACKEND_CHOICES,
    ),
    Setting(
        "max_batch_tokens", int, 0, "padded tokens per forward pass; 0: by device",
        env="EMBEDQ_MAX_BATCH_TOKENS", flag="--max-batch-tokens", commands=WORKERS,
        shown=f"{CPU_BATCH_TOKENS} on CPU, {GPU_BATCH_TOKENS} on GPU",
    ),
    Setting(
        "max_batch_size", int, 256, "texts per forward pass",
        env="EMBEDQ_MAX_BATCH_SIZE", flag="--max-batch-size", commands=WORKERS,
    ),
    Setting(
        "cache_ttl_s", int, 7 * 24 * 3600, "seconds a cached vector lives",
        env="EMBEDQ_CACHE_TTL", flag="--cache-ttl", commands=WORKERS,
    ),
    Setting(
        "claim_idle_ms", int, 30000, "claim jobs another worker left pending this long (ms)",
        env="EMBEDQ_CLAIM_IDLE_MS", flag="--claim-idle-ms", commands=(WORKER,),
    ),
    Setting(
        "linger_ms", float, 10.0,
        "at most this long (ms; and a quarter of the last forward pass) a worker with an idle "
        "model waits for more texts when recent batches carried more (0: never waits)",
        env="EMBEDQ_LINGER_MS", flag="--linger-ms", commands=(WORKER,),
    ),
    Setting(
        "max_deliveries", int, 3, "deliveries before a job is dead-lettered",
        env="EMBEDQ_MAX_DELIVERIES", flag="--max-deliveries", commands=(WORKER,),
    ),
    Setting(
        "dead_after_s", float, 3.0,
        "seconds without a heartbeat after which a worker counts as dead and another takes "
        "over its pending jobs at once (at least 2)",
        env="EMBEDQ_DEAD_AFTER_S", flag="--dead-after", commands=(WORKER,),
    ),
    Setting(
        "allow_bench_backend", bool, False,
        "allow --backend bench-zero / bench-sim: no model, vectors from a hash of the token "
        "ids, own fingerprint; for benchmarks only",
        env="EMBEDQ_ALLOW_BENCH_BACKEND", flag="--allow-bench-backend", commands=(WORKER,),
    ),
    Setting(
        "sim_forward_ms", float, 4.0, "bench-sim: sleep per forward pass, ms",
        env="EMBEDQ_SIM_FORWARD_MS", flag="--sim-forward-ms", commands=(WORKER,),
    ),
    Setting(
        "sim_token_us", float, 1.0, "bench-sim: sleep per padded token, us",
        env="EMBEDQ_SIM_TOKEN_US", flag="--sim-token-us", commands=(WORKER,),
    ),
    Setting(
        "worker_id", str, "",
        "a worker's consumer name; serve and worker --devices set one per child process",
        env="EMBEDQ_WORKER_ID", shown="host-pid-random",
    ),
    Setting(
        "cache_dir", str, None, "folder of the ONNX export cache",
        env="EMBEDQ_CACHE_DIR", shown="$XDG_CACHE_HOME/embedq, else ~/.cache/embedq",
    ),
    # --- status, and the state files serve leaves for it ---
    Setting(
        "cache_scan_limit", int, 100_000,
        "stop counting cache keys at N and report '≥N' (SCAN walks the whole keyspace)",
        env="EMBEDQ_STATUS_SCAN_LIMIT", flag="--cache-scan-limit", commands=(STATUS,),
        metavar="N",
    ),
    Setting(
        "serve_port", int, None,
        "with several `embedq serve` running: the one listening on this gRPC port",
        flag="--port", commands=(STATUS,), shown="the only running serve",
    ),
    Setting(
        "interval", float, 0.0,
        "sample twice, S seconds apart: dead letters growing between the samples make the "
        "exit status 1; 0: compare with the previous run's stored count",
        flag="--interval", commands=(STATUS,), metavar="S",
    ),
    Setting(
        "state_dir", str, None, "folder of the state files serve writes for status",
        env="EMBEDQ_STATE_DIR", shown="$XDG_RUNTIME_DIR/embedq, else ~/.cache/embedq",
    ),
    # --- logging: options of `embedq` itself, before the command ---
    Setting(
        "log_level", str, "INFO", "DEBUG, INFO, WARNING or ERROR",
        env="EMBEDQ_LOG_LEVEL", flag="--log-level", commands=(TOP,),
    ),
    Setting(
        "log_format", str, "text",
        "text lines, or JSON lines (time, level, logger, message, request_id, extra fields)",
        env="EMBEDQ_LOG_FORMAT", flag="--log-format", commands=(TOP,), choices=LOG_FORMATS,
    ),
)
# fmt: on

T = TypeVar("T")


def value(name: str, args: argparse.Namespace | None = None) -> Any:
    """Setting `name`: from `args` when its command has the flag (already parsed, the
    variable or default when not given), else from its variable, else its default."""
    if args is not None and hasattr(args, name):
        return getattr(args, name)
    return SETTINGS[name].from_env()


def setting_field(name: str, *, fallback: Any = None, repr: bool = True) -> Any:
    """A dataclass field that holds setting `name` and takes its one default
    (`fallback` where the setting's default is None: "unset")."""
    declared = SETTINGS[name].default
    default = fallback if declared is None and fallback is not None else declared
    return field(default=default, repr=repr, metadata={"setting": name})


def build(cls: type[T], args: argparse.Namespace | None = None, **given: Any) -> T:
    """`cls` with each of its setting fields from `value()`; `given` wins. A value of
    None (unset) leaves the field's default."""
    values: dict[str, Any] = {}
    for item in fields(cls):  # type: ignore[arg-type]
        name = item.metadata.get("setting")
        if name is None or item.name in given:
            continue
        found = value(name, args)
        if found is not None:
            values[item.name] = found
    return cls(**values, **given)


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
    url: str = setting_field("redis_url", fallback=LOCAL_REDIS_URL)
    # Credentials kept out of the URL so they never show up in process
    # listings. Credentials in the URL win over these.
    password: str | None = setting_field("redis_password", repr=False)
    namespace: str = setting_field("namespace")
    username: str | None = setting_field("redis_username")
    # CA bundle that verifies a rediss:// server; None: the system's trust store.
    ca_cert: str | None = setting_field("redis_ca_cert")
    # Redis Cluster? None: ask the server (INFO cluster) when connecting.
    cluster: bool | None = setting_field("redis_cluster")

    def __post_init__(self) -> None:
        if self.ca_cert and urlsplit(self.url).scheme != "rediss":
            raise SettingsError(
                f"EMBEDQ_REDIS_CA_CERT is set but the Redis URL {self.safe_url} is not rediss://"
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace | None = None, **given: Any) -> RedisSettings:
        settings = build(cls, args, **given)
        if settings.ca_cert:  # a missing file fails at start-up, not at the first connection
            readable_file(settings.ca_cert, "EMBEDQ_REDIS_CA_CERT")
        return settings

    @classmethod
    def from_env(cls, url: str | None = None, namespace: str | None = None) -> RedisSettings:
        given = {key: v for key, v in (("url", url), ("namespace", namespace)) if v}
        return cls.from_args(None, **given)

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
        """A SettingsError when `exc` says the configuration is wrong (a password or
        ACL refused, a plain client on a cluster): retrying cannot help, so start-up
        stops with one line."""
        import redis

        text = str(exc)
        if isinstance(exc, redis.ResponseError) and text.startswith(("MOVED ", "ASK ")):
            return self.cluster_error()
        refused = isinstance(exc, redis.exceptions.AuthenticationError) or any(
            marker in text for marker in ("WRONGPASS", "NOAUTH", "NOPERM", "invalid password")
        )
        if not refused:
            return None
        return SettingsError(
            f"redis at {self.safe_url} refused our credentials ({self.describe_error(exc)}); "
            "check EMBEDQ_REDIS_PASSWORD / the URL's user"
        )

    def cluster_error(self) -> SettingsError:
        """The plain client this process chose does not fit a Redis Cluster (it was
        unreachable when asked, or EMBEDQ_REDIS_CLUSTER says it is none)."""
        why = (
            "EMBEDQ_REDIS_CLUSTER is false"
            if self.cluster is False
            else "it could not be asked when this process started"
        )
        return SettingsError(
            f"redis at {self.safe_url} is a Redis Cluster, but this process connected to it "
            f"as a single Redis ({why}); restart it to connect as a cluster client "
            "(EMBEDQ_REDIS_CLUSTER=true skips the question)"
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

    def probe_cluster(self) -> bool | None:
        """Whether the URL points at a Redis Cluster: the setting when given, else asked
        (INFO cluster); None when Redis cannot be asked now (unreachable)."""
        import redis

        if self.cluster is not None:
            return self.cluster
        try:
            probe = redis.Redis.from_url(self.url, **{**self._kwargs(), "socket_timeout": 3})
            with probe:
                return bool(probe.info("cluster").get("cluster_enabled"))
        except (redis.RedisError, OSError):
            return None

    def is_cluster(self) -> bool:
        """Whether the URL points at a Redis Cluster (asked once, at start-up); False
        when it cannot be asked now: a plain client that reconnects later. Who keeps its
        client after start-up asks again once Redis answers (:meth:`probe_cluster`)."""
        return bool(self.probe_cluster())

    def _cluster_url(self) -> str:
        # A cluster has no numbered databases: drop any /N from the URL.
        parts = urlsplit(self.url)
        return urlunsplit((parts.scheme, parts.netloc, "", parts.query, parts.fragment))

    def connect(self, cluster: bool | None = None) -> redis.Redis:
        """A client for the URL: a cluster client when `cluster` (None: ask Redis)."""
        import redis

        if self.is_cluster() if cluster is None else cluster:
            return redis.RedisCluster.from_url(self._cluster_url(), **self._kwargs())
        return redis.Redis.from_url(self.url, **self._kwargs())

    def connect_async(self, cluster: bool | None = None, **extra: object) -> aioredis.Redis:
        """An asyncio client for the URL: a cluster client when `cluster` (None: ask Redis)."""
        import redis
        import redis.asyncio as aioredis

        if self.is_cluster() if cluster is None else cluster:
            return aioredis.RedisCluster.from_url(
                self._cluster_url(), **{**self._kwargs(), **extra}
            )
        # A pooled connection that a Redis restart closed fails once when next used:
        # retry connection errors (not timeouts) briefly, so that a stale connection
        # is not reported as an outage (it made health flap again ~10 s later).
        retry = {"retry": _connection_retry(), "retry_on_error": [redis.ConnectionError]}
        client = aioredis.Redis.from_url(self.url, **{**self._kwargs(), **retry, **extra})
        pool = client.connection_pool
        pool.connection_class = packing_in_c(pool.connection_class)
        return client


@functools.cache
def packing_in_c(connection_class: type) -> type:
    """`connection_class` (plain, TLS or unix socket: what the URL chose) packing its
    commands with hiredis, as redis-py's sync client already does; its asyncio client
    packs them in Python, argument by argument. Measured on the cached path (one MGET
    of 256 keys per call): 0.67 µs of server CPU per key in Python, 0.09 in hiredis,
    and the server's event loop is the serial stage there (docs/benchmarks.md)."""
    from redis.connection import HiredisRespSerializer
    from redis.utils import HIREDIS_AVAILABLE

    if not HIREDIS_AVAILABLE:
        return connection_class
    packer = HiredisRespSerializer()

    def pack_command(self: Any, *args: Any) -> list[bytes]:
        # pack_commands (pipelines) calls this per command, so pipelines pack in C too.
        return packer.pack(*args)

    name = f"HiredisPacking{connection_class.__name__}"
    return type(name, (connection_class,), {"pack_command": pack_command})


def _connection_retry() -> Any:
    import redis
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialWithJitterBackoff

    return Retry(
        ExponentialWithJitterBackoff(base=0.05, cap=0.5),
        2,
        supported_errors=(redis.ConnectionError,),
    )


@dataclass(frozen=True)
class Limits:
    """Request limits the server enforces (reported by Info)."""

    max_batch_texts: int = setting_field("max_batch_texts")
    max_text_bytes: int = setting_field("max_text_bytes")
    max_message_bytes: int = setting_field("max_message_bytes")
    max_candidates: int = setting_field("max_candidates")

    @classmethod
    def from_env(cls) -> Limits:
        return build(cls)


@dataclass(frozen=True)
class ServerSettings:
    host: str = setting_field("host")
    port: int = setting_field("port")
    redis: RedisSettings = field(default_factory=RedisSettings)
    limits: Limits = field(default_factory=Limits)
    # Model used when a request names none; empty: the only registered one.
    default_model: str = setting_field("default_model")
    # Bound on the wait for a worker when the caller set no deadline.
    default_timeout_s: float = setting_field("default_timeout_s")
    # A worker whose heartbeat is older than this counts as gone.
    worker_stale_s: float = 15.0
    # TLS (PEM files): certificate chain and key; with client_ca, clients
    # must present a certificate signed by it (mutual TLS).
    tls_cert: str | None = setting_field("tls_cert")
    tls_key: str | None = setting_field("tls_key")
    tls_client_ca: str | None = setting_field("tls_client_ca")
    # Bearer tokens: a file of one token per line (re-read when it changes)
    # and/or EMBEDQ_AUTH_TOKENS (parsed by embedq.server.auth); none: no authentication.
    auth_token_file: str | None = setting_field("auth_token_file")
    auth_tokens: tuple[str, ...] = field(default=(), repr=False)
    metrics_port: int = setting_field("metrics_port")
    metrics_host: str = setting_field("metrics_host")
    http_port: int = setting_field("http_port")
    # Admission bounds of the dispatcher (embedq.server.admission.QueueBounds).
    max_queued_jobs: int = setting_field("max_queued_jobs")
    max_pending_texts: int = setting_field("max_pending_texts")
    max_pending_chars: int = setting_field("max_pending_chars")
    # The dispatcher's near cache of vectors read from Redis (embedq.server.nearcache).
    near_cache_mb: float = setting_field("near_cache_mb")
    # Name of the reply stream; None: random.
    server_id: str | None = setting_field("server_id")
    # Health "" stays NOT_SERVING until a worker has registered once (embedq serve:
    # its own workers start with it, and "ready" should mean they are there).
    ready_needs_workers: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace | None = None, **given: Any) -> ServerSettings:
        given.setdefault("redis", RedisSettings.from_args(args))
        given.setdefault("limits", build(Limits, args))
        return build(cls, args, **given)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.auth_token_file or self.auth_tokens)


@dataclass(frozen=True)
class WorkerSettings:
    redis: RedisSettings = field(default_factory=RedisSettings)
    model: str | None = setting_field("model")
    # This process's device (`devices` names all of them; one process each).
    device: str = "cpu"
    fp16: bool = setting_field("fp16")
    # What runs the encoder: "torch" (exact) or an opt-in faster CPU backend
    # (torch-int8, onnx, onnx-int8; see workers/backends/runtime.py).
    backend: str = setting_field("backend")
    # bench-zero / bench-sim run no model (benchmarks only): refused unless allowed.
    # bench-sim sleeps per forward pass sim_forward_ms plus sim_token_us per padded
    # token (workers/backends/simulated.py).
    allow_bench_backend: bool = setting_field("allow_bench_backend")
    sim_forward_ms: float = setting_field("sim_forward_ms")
    sim_token_us: float = setting_field("sim_token_us")
    # Padded tokens per forward pass (TEI's max_batch_tokens); 0 picks by device:
    # small batches keep a CPU's caches warm, a GPU wants big ones.
    max_batch_tokens: int = setting_field("max_batch_tokens")
    max_batch_size: int = setting_field("max_batch_size")
    # Jobs taken from the stream per read.
    read_count: int = 64
    cache_ttl_s: int = setting_field("cache_ttl_s")
    # Pending jobs idle this long are claimed from a dead worker.
    claim_idle_ms: int = setting_field("claim_idle_ms")
    # Waiting consumers: the most an idle model waits for the rest of a batch (batching.linger_s).
    linger_ms: float = setting_field("linger_ms")
    # Deliveries after which a job goes to the dead-letter stream.
    max_deliveries: int = setting_field("max_deliveries")
    # A worker whose heartbeat is older than this is dead: another worker takes
    # its pending jobs at once (the claim_idle_ms claim stays as the safety net).
    dead_after_s: float = setting_field("dead_after_s")
    # Fixed consumer name (set by the supervisor, to hand a dead worker's jobs
    # over the moment the process exits); empty: host-pid-random.
    worker_id: str = setting_field("worker_id")

    @classmethod
    def from_args(cls, args: argparse.Namespace | None = None, **given: Any) -> WorkerSettings:
        given.setdefault("redis", RedisSettings.from_args(args))
        return build(cls, args, **given)

    def batch_tokens(self) -> int:
        if self.max_batch_tokens:
            return self.max_batch_tokens
        if self.backend == "bench-sim":  # a simulated accelerator batches like a GPU
            return GPU_BATCH_TOKENS
        return CPU_BATCH_TOKENS if self.device == "cpu" else GPU_BATCH_TOKENS
