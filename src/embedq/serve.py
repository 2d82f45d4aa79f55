"""`embedq serve`: the embedded default, everything in one command.

Starts a private Redis-compatible server on a free loopback port (unless
--redis-url names one), N worker processes with the bundled model, and the
gRPC server in this process. Ctrl-C or SIGTERM stops all of it. A worker
that dies is restarted, so a crash never leaves the service without one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import subprocess
import sys

from embedq.embedded import EmbeddedRedis
from embedq.server.cli import add_server_options, security_settings, server_settings
from embedq.settings import ServerSettings, redact_url
from embedq.workers.cli import add_worker_options

log = logging.getLogger("embedq.serve")


def add_serve_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run everything: private Redis, worker(s) and the gRPC server",
        description="Run a complete embedq on this machine with no configuration: a private "
        "Redis-compatible server on a free loopback port (or --redis-url), worker processes "
        "and the gRPC server. Ctrl-C stops all of it.",
    )
    add_server_options(parser)
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes to start (each uses --devices) [%(default)s]",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("EMBEDQ_REDIS_URL"),
        help="use this Redis instead of starting a private one [EMBEDQ_REDIS_URL]",
    )
    add_worker_options(parser)
    parser.set_defaults(func=run_serve_command)


def worker_argv(args: argparse.Namespace, redis_url: str) -> list[str]:
    """The worker command line; a URL with a password goes in worker_env() instead,
    out of process listings."""
    url_flag = ["--redis-url", redis_url] if redact_url(redis_url) == redis_url else []
    argv = [
        sys.executable,
        "-m",
        "embedq.cli",
        "worker",
        *url_flag,
        "--devices",
        args.devices,
        "--max-batch-tokens",
        str(args.max_batch_tokens),
        "--max-batch-size",
        str(args.max_batch_size),
        "--cache-ttl",
        str(args.cache_ttl),
    ]
    if args.namespace:
        argv += ["--namespace", args.namespace]
    if args.model:
        argv += ["--model", args.model]
    if args.fp16:
        argv.append("--fp16")
    return argv


def worker_env(redis_url: str) -> dict[str, str]:
    """Our environment for a worker: the Redis URL set, the server's secrets left out."""
    environ = {k: v for k, v in os.environ.items() if k != "EMBEDQ_AUTH_TOKENS"}
    environ["EMBEDQ_REDIS_URL"] = redis_url
    return environ


class WorkerPool:
    """Keeps N worker processes running until stopped."""

    def __init__(self, argv: list[str], count: int, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.env = env
        self.procs: list[subprocess.Popen] = [self._spawn() for _ in range(count)]

    def _spawn(self) -> subprocess.Popen:
        # A worker ignores the terminal's Ctrl-C (own process group); we stop it.
        return subprocess.Popen(self.argv, start_new_session=True, env=self.env)

    async def supervise(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for index, proc in enumerate(self.procs):
                if proc.poll() is not None:
                    log.error("worker pid %d exited with %s; restarting", proc.pid, proc.returncode)
                    self.procs[index] = self._spawn()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def run_serve_command(args: argparse.Namespace) -> int:
    from embedq.server.app import check_security, serve

    # Unusable TLS files or tokens fail before anything starts.
    security = check_security(ServerSettings(**security_settings(args)))
    redis_server = None if args.redis_url else EmbeddedRedis().start()
    redis_url = args.redis_url or redis_server.url
    if redis_server is not None:
        log.info("private redis (%s) on %s", os.path.basename(redis_server.binary), redis_url)
    pool = WorkerPool(worker_argv(args, redis_url), args.workers, worker_env(redis_url))
    settings = server_settings(args, redis_url)

    async def main() -> None:
        supervisor = asyncio.create_task(pool.supervise())
        try:
            await serve(settings, security=security)
        finally:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    finally:
        pool.stop()
        if redis_server is not None:
            redis_server.stop()
        log.info("embedq stopped")
    return 0
