"""`embedq serve`: the embedded default, everything in one command.

Starts a private Redis-compatible server on a free loopback port (unless
--redis-url names one), N worker processes with the bundled model, and the
gRPC server in this process. Ctrl-C or SIGTERM stops all of it. A worker
that dies is restarted (embedq.workerpool: the policy `embedq worker --devices`
uses too), so a crash never leaves the service without one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import sys
from pathlib import Path

from embedq.apps.embedded import EmbeddedRedis
from embedq.server.cli import security_settings, server_settings

from embedq.flags import add_flags, command_line, shared_flags
from embedq.settings import SERVE, SETTINGS, WORKER, ServerSettings, redact_url

# The one worker supervisor (also `embedq worker --devices`); names kept importable here.
from embedq.workerpool import CONFIG_ERROR_EXIT, WorkerPool, forget_worker

log = logging.getLogger("embedq.serve")

__all__ = ["CONFIG_ERROR_EXIT", "WorkerPool", "add_serve_command", "forget_worker"]

# Worker flags serve gives its workers as they are; the others it sets itself
# (--redis-url out of process listings, one --model each, --threads split, metrics ports).
PASSED_ON = shared_flags(
    SERVE, WORKER, skip=("redis_url", "model", "threads", "metrics_port", "metrics_host")
)


def add_serve_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run everything: private Redis, worker(s) and the gRPC server",
        description="Run a complete embedq on this machine with no configuration: a private "
        "Redis-compatible server on a free loopback port (or --redis-url), worker processes "
        "and the gRPC server. Ctrl-C stops all of it.",
    )
    add_flags(parser, SERVE)
    parser.set_defaults(func=run_serve_command)


def worker_argv(args: argparse.Namespace, redis_url: str, model: str | None) -> list[str]:
    """The worker command line; a URL with a password goes in worker_env() instead,
    out of process listings."""
    url_flag = ["--redis-url", redis_url] if redact_url(redis_url) == redis_url else []
    argv = [sys.executable, "-m", "embedq.cli", "worker", *url_flag]
    argv += ["--threads", str(cpu_threads(args)), *command_line(args, PASSED_ON)]
    return argv + (["--model", model] if model else [])


def worker_env(redis_url: str) -> dict[str, str]:
    """Our environment for a worker: the Redis URL set, the server's secrets left out."""
    environ = {k: v for k, v in os.environ.items() if k != "EMBEDQ_AUTH_TOKENS"}
    environ["EMBEDQ_REDIS_URL"] = redis_url
    return environ


def with_observability(args: argparse.Namespace, argvs: list[list[str]]) -> list[list[str]]:
    """Worker command lines with serve's --log-level/--log-format, and metrics ports:
    with --metrics-port P, worker k serves on P + 1 + k * (devices per worker), so a
    worker running several devices (device i on its port + i) collides with none."""
    stride = 1
    if args.metrics_port:
        from embedq.workers.cli import parse_devices

        stride = len(parse_devices(args.devices))
    logging_flags = []  # top-level options: before the command name
    if getattr(args, "log_level", None):
        logging_flags += ["--log-level", args.log_level]
    if getattr(args, "log_format", None):
        logging_flags += ["--log-format", args.log_format]
    out = []
    for index, argv in enumerate(argvs):
        port = args.metrics_port + 1 + index * stride if args.metrics_port else 0
        at = argv.index("worker")
        metrics = ["--metrics-port", str(port), "--metrics-host", args.metrics_host]
        out.append([*argv[:at], *logging_flags, *argv[at:], *metrics])
    return out


def cpu_threads(args: argparse.Namespace) -> int:
    """Threads per worker: CPU workers on one machine share its cores instead of
    each taking all of them (measured: two 2-thread workers on 2 cores halve
    throughput, docs/deployment.md)."""
    if args.threads:
        return args.threads
    workers = args.workers * max(1, len(args.model or []))
    if args.devices not in ("cpu", "auto") or workers <= 1:
        return 0
    return max(1, (os.cpu_count() or 1) // workers)


BUNDLED_NAME = "all-MiniLM-L6-v2"
BUNDLED_ALIASES = {BUNDLED_NAME.casefold(), f"sentence-transformers/{BUNDLED_NAME}".casefold()}


def default_model_name(spec: str | None) -> str:
    """The name a worker serves the model spec under: the same rules as
    embedq.workers.backends.source.resolve_model_source (tested to agree), without
    importing the worker (torch) into the server process."""
    text = (spec or "").strip()
    if not text or text.casefold() in BUNDLED_ALIASES:
        return BUNDLED_NAME
    folder = Path(text).expanduser()
    if folder.is_dir():
        return folder.resolve().name
    name, sep, _where = text.partition("=")
    if sep:
        return name.strip()
    return text.rstrip("/").rsplit("/", 1)[-1]


def run_serve_command(args: argparse.Namespace) -> int:
    from embedq.server.app import check_security, serve

    # Unusable TLS files or tokens fail before anything starts.
    security = check_security(ServerSettings(**security_settings(args)))
    redis_server = None if args.redis_url else EmbeddedRedis().start()
    redis_url = args.redis_url or redis_server.url
    if redis_server is not None:
        log.info("private redis (%s) on %s", os.path.basename(redis_server.binary), redis_url)
    from_env = [m for m in (SETTINGS["model"].raw() or "").split(",") if m]
    models = args.model or from_env or [None]
    argvs = [worker_argv(args, redis_url, model) for model in models for _ in range(args.workers)]
    labels = [f"worker {i} ({default_model_name(m)})" for m in models for i in range(args.workers)]
    # Ready (health SERVING) only once its own workers have registered.
    settings = dataclasses.replace(server_settings(args, redis_url), ready_needs_workers=True)
    forget = functools.partial(forget_worker, settings.redis)
    pool = WorkerPool(
        with_observability(args, argvs), worker_env(redis_url), on_exit=forget, labels=labels
    )
    if len(models) > 1 and not settings.default_model:
        # The first --model is the default, whatever form it was given in.
        settings = dataclasses.replace(settings, default_model=default_model_name(models[0]))

    async def main() -> None:
        stop = asyncio.Event()
        supervisor = asyncio.create_task(pool.supervise())
        server = asyncio.create_task(serve(settings, stop=stop, security=security))
        await asyncio.wait({supervisor, server}, return_when=asyncio.FIRST_COMPLETED)
        stop.set()  # the server drains and stops on its own
        supervisor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervisor
        await server  # a SettingsError from it ends serve with one line
        if not supervisor.cancelled() and supervisor.exception() is not None:
            raise supervisor.exception()  # a worker's configuration error

    # `embedq status` finds this Redis (no password in it) through this file.
    from embedq.apps.status import write_serve_state

    state_file = None
    try:
        state_file = write_serve_state(
            settings.port,
            redis_url,
            settings.redis.namespace,
            http_port=settings.http_port,
            metrics_port=settings.metrics_port,
            private_redis=redis_server is not None,
        )
    except OSError as exc:
        log.warning("could not write the state file for `embedq status` (%s)", exc)
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    finally:
        if state_file is not None:
            with contextlib.suppress(OSError):
                state_file.unlink()
        pool.stop()
        if redis_server is not None:
            redis_server.stop()
        log.info("embedq stopped")
    return 0
