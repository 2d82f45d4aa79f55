"""`embedq server`: one stateless gRPC server pointed at a Redis."""

from __future__ import annotations

import argparse
import asyncio

from embedq.settings import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    Limits,
    RedisSettings,
    ServerSettings,
    env,
    env_int,
)


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `embedq server` and `embedq serve`."""
    parser.add_argument(
        "--host",
        default=env("HOST", DEFAULT_HOST),
        help="address to listen on [EMBEDQ_HOST; %(default)s]",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=env_int("PORT", DEFAULT_PORT),
        help="gRPC port [EMBEDQ_PORT; %(default)s]",
    )
    parser.add_argument(
        "--namespace",
        default=None,
        help="prefix of every Redis key, to share one Redis between deployments "
        "[EMBEDQ_NAMESPACE; embedq]",
    )
    parser.add_argument(
        "--default-model",
        default=env("DEFAULT_MODEL", ""),
        help="model used when a request names none [EMBEDQ_DEFAULT_MODEL; the only one served]",
    )
    parser.add_argument(
        "--max-batch-texts",
        type=int,
        default=Limits.from_env().max_batch_texts,
        help="most texts per request [EMBEDQ_MAX_BATCH_TEXTS; %(default)s]",
    )
    parser.add_argument(
        "--max-text-bytes",
        type=int,
        default=Limits.from_env().max_text_bytes,
        help="longest text in UTF-8 bytes [EMBEDQ_MAX_TEXT_BYTES; %(default)s]",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=float(env("REQUEST_TIMEOUT", "120")),
        help="seconds a call waits for workers when the client set no deadline "
        "[EMBEDQ_REQUEST_TIMEOUT; %(default)s]",
    )


def server_settings(args: argparse.Namespace, redis_url: str | None) -> ServerSettings:
    return ServerSettings(
        host=args.host,
        port=args.port,
        redis=RedisSettings.from_env(url=redis_url, namespace=args.namespace),
        limits=Limits(
            max_batch_texts=args.max_batch_texts,
            max_text_bytes=args.max_text_bytes,
            max_message_bytes=Limits.from_env().max_message_bytes,
        ),
        default_model=args.default_model,
        default_timeout_s=args.request_timeout,
    )


def add_server_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "server",
        help="run a gRPC server (stateless; pair with `embedq worker`)",
        description="Run one embedq gRPC server. It never loads the model: it answers from the "
        "Redis cache and queues misses for `embedq worker` processes on the same Redis.",
    )
    add_server_options(parser)
    parser.add_argument(
        "--redis-url",
        default=env("REDIS_URL"),
        required=env("REDIS_URL") is None,
        help="redis:// or rediss:// URL; password via EMBEDQ_REDIS_PASSWORD [EMBEDQ_REDIS_URL]",
    )
    parser.set_defaults(func=run_server_command)


def run_server_command(args: argparse.Namespace) -> int:
    from .app import serve

    asyncio.run(serve(server_settings(args, args.redis_url)))
    return 0
