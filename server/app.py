"""Server bootstrap: wires the stages, health and reflection, TLS and bearer
tokens, runs until SIGTERM/SIGINT, then drains in-flight calls before exiting."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import ssl

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from embedq.keys import Keys
from embedq.settings import RedisSettings, ServerSettings, SettingsError, readable_file
from embedq.v1 import embedq_pb2

from .admission import QueueBounds
from .auth import BearerTokenInterceptor, TokenSet, token_set
from .metrics import ObservabilityInterceptor, start_metrics_server, track_gauges
from .nearcache import NearCache
from .queue import Dispatcher
from .registry import ModelRegistry
from .router import EmbedderService, add_to_server
from .supervise import Supervisor, cancel_all

log = logging.getLogger(__name__)

SERVICE_NAME = embedq_pb2.DESCRIPTOR.services_by_name["Embedder"].full_name
SHUTDOWN_GRACE_S = 10.0
# How often a server that could not ask Redis at start-up whether it is a cluster asks again.
CLUSTER_PROBE_EVERY_S = 1.0


def health_statuses(
    registry: ModelRegistry, workers_seen: bool, tasks_down: bool = False
) -> dict[str, bool]:
    """Service name -> SERVING? (docs/architecture.md, "Health"):
    ""                         this server can talk to Redis (cached answers work);
    embedq.v1.Embedder         uncached work can be computed: a live worker for the default
                               model (for any model when there is no default);
    embedq.v1.Embedder/<model> a live worker for that model.
    All NOT_SERVING while a background task (reply listener, flusher, ...) is down."""
    redis_ok = registry.redis_ok and not tasks_down
    alive = {name: redis_ok and m.workers_alive > 0 for name, m in registry.models.items()}
    default = registry.default_name
    computing = alive.get(default, False) if default else any(alive.values())
    statuses = {"": redis_ok and workers_seen, SERVICE_NAME: computing}
    statuses.update({f"{SERVICE_NAME}/{name}": ok for name, ok in alive.items()})
    return statuses


class HealthTracker:
    """Keeps the health service's statuses current (checked twice a second)."""

    def __init__(
        self,
        health_servicer: health.aio.HealthServicer,
        registry: ModelRegistry,
        needs_workers: bool,
        supervisor: Supervisor,
    ) -> None:
        self.servicer = health_servicer
        self.registry = registry
        self.supervisor = supervisor
        self.workers_seen = not needs_workers
        self.known: dict[str, bool] = {}

    async def task_down(self, name: str) -> None:
        """A background task failed: NOT_SERVING now, not at the next check."""
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME, *self.known):
            await self.servicer.set(service, not_serving)
            self.known[service] = False

    async def run(self) -> None:
        await _track_health(self)


async def _track_health(tracker: HealthTracker) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    registry = tracker.registry
    while True:
        known = tracker.known
        seen = tracker.workers_seen or any(m.workers_alive for m in registry.models.values())
        tracker.workers_seen = seen
        statuses = health_statuses(registry, seen, bool(tracker.supervisor.down))
        for name in known.keys() - statuses.keys():
            statuses[name] = False  # a model that went away
        for name, ok in statuses.items():
            if known.get(name) != ok:
                await tracker.servicer.set(name, serving if ok else not_serving)
        tracker.known = statuses
        await asyncio.sleep(0.5)


def _check_tls_files(settings: ServerSettings) -> None:
    """Missing, unreadable, non-PEM or mismatched files fail here, by name, not at handshake."""
    cert = readable_file(settings.tls_cert, "TLS certificate (--tls-cert)")
    key = readable_file(settings.tls_key, "TLS key (--tls-key)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # An encrypted key gets an empty password (and fails) instead of a prompt.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        raise SettingsError(
            f"TLS certificate {cert!r} / key {key!r} unusable (PEM certificate chain and its "
            f"unencrypted private key expected): {exc.reason or type(exc).__name__}"
        ) from None
    if settings.tls_client_ca:
        ca = readable_file(settings.tls_client_ca, "client CA (--tls-client-ca)")
        try:
            context.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise SettingsError(
                f"client CA {ca!r} unusable (PEM certificates expected): "
                f"{exc.reason or type(exc).__name__}"
            ) from None


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' PEM files, or None for plaintext."""
    if not (settings.tls_cert or settings.tls_key):
        if settings.tls_client_ca:
            raise SettingsError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (settings.tls_cert and settings.tls_key):
        raise SettingsError("--tls-cert and --tls-key go together: set both")
    _check_tls_files(settings)

    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as handle:
            return handle.read()

    client_ca = read(settings.tls_client_ca)
    return grpc.ssl_server_credentials(
        [(read(settings.tls_key), read(settings.tls_cert))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


Security = tuple[grpc.ServerCredentials | None, TokenSet | None]


def check_security(settings: ServerSettings) -> Security:
    """TLS credentials and tokens; SettingsError (naming files, never contents) if unusable."""
    return server_credentials(settings), token_set(settings)


def build_grpc_server(settings: ServerSettings, tokens: TokenSet | None = None) -> grpc.aio.Server:
    size = settings.limits.max_message_bytes
    # Observability first: it sees (counts, logs, tags) calls the token check refuses.
    interceptors: list[grpc.aio.ServerInterceptor] = [ObservabilityInterceptor()]
    if tokens is not None:
        interceptors.append(BearerTokenInterceptor(tokens))
    return grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
            # A second server on a busy port must fail, not quietly share it.
            ("grpc.so_reuseport", 0),
        ],
    )


def _describe_security(settings: ServerSettings, tokens: TokenSet | None) -> str:
    if settings.tls_client_ca:
        transport = "mutual TLS"
    elif settings.tls_cert:
        transport = "TLS"
    else:
        transport = "plaintext"
    if tokens is None:
        return f"{transport}, no auth"
    sources = [s for s in (settings.auth_token_file, settings.auth_tokens and "env") if s]
    return f"{transport}, bearer tokens: {len(tokens)} ({', '.join(sources)})"


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1", "[::1]") or host.startswith("127.")


async def serve(
    settings: ServerSettings, stop: asyncio.Event | None = None, security: Security | None = None
) -> None:
    """Run one server instance until `stop` is set (or a signal arrives).

    `security` is what :func:`check_security` returned, if the caller checked first.
    """
    stop = stop or asyncio.Event()
    credentials, tokens = security or check_security(settings)
    if tokens is not None and credentials is None and not _is_loopback(settings.host):
        log.warning(
            "bearer tokens will cross the network in clear text: add --tls-cert and --tls-key"
        )
    # None: Redis could not be asked whether it is a cluster (see _watch_for_a_cluster).
    cluster = settings.redis.probe_cluster()
    redis = settings.redis.connect_async(cluster=bool(cluster))
    keys = Keys(settings.redis.namespace)
    registry = ModelRegistry(
        redis, keys, default_model=settings.default_model, worker_stale_s=settings.worker_stale_s
    )
    bounds = QueueBounds.from_settings(settings)
    near_cache = NearCache(int(settings.near_cache_mb * 1024 * 1024))
    dispatcher = Dispatcher(
        redis, keys, server_id=settings.server_id, bounds=bounds, near_cache=near_cache
    )
    server = build_grpc_server(settings, tokens)
    service = EmbedderService(settings, dispatcher, registry, redis, keys)
    add_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = f"{settings.host}:{settings.port}"
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    metrics_http = None
    if settings.metrics_port:
        metrics_http = start_metrics_server(settings.metrics_port, settings.metrics_host)
    try:
        await registry.refresh()
        registry.redis_ok = True
    except Exception as exc:  # noqa: BLE001 - reported, retried by registry.run()
        fatal = settings.redis.fatal_error(exc)
        if fatal is not None:
            await redis.aclose()
            raise fatal from None
        log.warning(
            "redis at %s not usable yet (%s); health is NOT_SERVING until it is",
            settings.redis.safe_url,
            settings.redis.describe_error(exc),
        )
    # Every background task is supervised: restarted with backoff on any exception,
    # health NOT_SERVING while one is down (server/supervise.py).
    tracker: HealthTracker | None = None

    async def task_down(name: str) -> None:
        if tracker is not None:
            await tracker.task_down(name)

    supervisor = Supervisor(on_down=task_down)
    tracker = HealthTracker(health_servicer, registry, settings.ready_needs_workers, supervisor)
    await dispatcher.start(supervisor)
    supervisor.spawn("registry", registry.run)
    supervisor.spawn("health", tracker.run)
    supervisor.spawn("gauges", functools.partial(track_gauges, redis, keys, registry))
    await server.start()
    http_runner = None
    if settings.http_port:
        from .http import start_http

        http_runner = await start_http(
            settings, service, health_servicer, tokens, shutdown_timeout=SHUTDOWN_GRACE_S
        )
    log.info(
        "embedq server listening on %s (%s; redis %s, namespace %s)",
        address,
        _describe_security(settings, tokens),
        settings.redis.safe_url,
        settings.redis.namespace,
    )
    _install_signal_handlers(stop)
    misfit: list[SettingsError] = []
    watch = None
    if cluster is None:
        watch = asyncio.create_task(_watch_for_a_cluster(settings.redis, stop, misfit))
    await stop.wait()
    log.info("shutting down: draining in-flight calls (up to %.0fs)", SHUTDOWN_GRACE_S)
    service.shutdown.begin()  # streams stop reading, answer what they read and end
    await health_servicer.enter_graceful_shutdown()
    if http_runner is not None:  # drains in-flight HTTP requests beside the gRPC ones
        await asyncio.gather(server.stop(SHUTDOWN_GRACE_S), http_runner.cleanup())
    else:
        await server.stop(SHUTDOWN_GRACE_S)
    await dispatcher.stop()
    await supervisor.stop()
    if watch is not None:
        await cancel_all([watch])
    await redis.aclose()
    if metrics_http is not None:
        metrics_http.shutdown()
        metrics_http.server_close()
    if misfit:
        raise misfit[0]


async def _watch_for_a_cluster(
    redis_settings: RedisSettings, stop: asyncio.Event, misfit: list[SettingsError]
) -> None:
    """Redis could not be asked at start-up whether it is a cluster, so the server took a
    single Redis's client. Ask again until it answers; a cluster stops the server with one
    line (its client is shared by every part: a restart builds them all anew) within a
    second of answering, rather than serving MOVED refusals as outages until restarted."""
    while True:
        await asyncio.sleep(CLUSTER_PROBE_EVERY_S)
        found = await asyncio.to_thread(redis_settings.probe_cluster)
        if found is None:
            continue
        if found:
            misfit.append(redis_settings.cluster_error())
            log.error("%s", misfit[0])
            stop.set()
        return


def _install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
