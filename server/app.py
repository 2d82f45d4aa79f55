"""Server bootstrap: wires the stages, health and reflection, runs until
SIGTERM/SIGINT, then drains in-flight calls before exiting."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from embedq.keys import Keys
from embedq.settings import ServerSettings
from embedq.v1 import embedq_pb2, embedq_pb2_grpc

from .queue import Dispatcher
from .registry import ModelRegistry
from .router import EmbedderService

log = logging.getLogger(__name__)

SERVICE_NAME = embedq_pb2.DESCRIPTOR.services_by_name["Embedder"].full_name
SHUTDOWN_GRACE_S = 10.0


async def _track_health(
    health_servicer: health.aio.HealthServicer, registry: ModelRegistry
) -> None:
    """SERVING while Redis answers; load balancers route around us otherwise."""
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    while True:
        status = serving if registry.redis_ok else not_serving
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, status)
        await asyncio.sleep(0.5)


def build_grpc_server(settings: ServerSettings) -> grpc.aio.Server:
    size = settings.limits.max_message_bytes
    return grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
        ]
    )


async def serve(settings: ServerSettings, stop: asyncio.Event | None = None) -> None:
    """Run one server instance until `stop` is set (or a signal arrives)."""
    stop = stop or asyncio.Event()
    redis = settings.redis.connect_async()
    keys = Keys(settings.redis.namespace)
    registry = ModelRegistry(
        redis, keys, default_model=settings.default_model, worker_stale_s=settings.worker_stale_s
    )
    dispatcher = Dispatcher(redis, keys)
    server = build_grpc_server(settings)
    embedq_pb2_grpc.add_EmbedderServicer_to_server(
        EmbedderService(settings, dispatcher, registry, redis, keys), server
    )
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
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address}")
    with contextlib.suppress(Exception):
        await registry.refresh()
        registry.redis_ok = True
    await dispatcher.start()
    background = [
        asyncio.create_task(registry.run()),
        asyncio.create_task(_track_health(health_servicer, registry)),
    ]
    await server.start()
    log.info(
        "embedq server listening on %s (redis %s, namespace %s)",
        address,
        settings.redis.safe_url,
        settings.redis.namespace,
    )
    _install_signal_handlers(stop)
    await stop.wait()
    log.info("shutting down: draining in-flight calls (up to %.0fs)", SHUTDOWN_GRACE_S)
    await health_servicer.enter_graceful_shutdown()
    await server.stop(SHUTDOWN_GRACE_S)
    for task in background:
        task.cancel()
    await dispatcher.stop()
    await redis.aclose()


def _install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
