"""`embedq server`: one stateless gRPC server pointed at a Redis.

Its flags come from the declarations in embedq.settings (embedq.flags makes them).
"""

from __future__ import annotations

import argparse
import asyncio

from embedq.flags import add_flags
from embedq.settings import SERVER, RedisSettings, ServerSettings, value

from .auth import env_tokens


def server_settings(args: argparse.Namespace, redis_url: str | None = None) -> ServerSettings:
    """The server's settings from `args` (a flag given, else its variable, else its
    default); `redis_url` overrides args.redis_url (serve's private Redis)."""
    redis = RedisSettings.from_args(args, **({"url": redis_url} if redis_url else {}))
    return ServerSettings.from_args(args, redis=redis, auth_tokens=auth_tokens())


def auth_tokens() -> tuple[str, ...]:
    return env_tokens(value("auth_tokens"))


def security_settings(args: argparse.Namespace) -> dict[str, object]:
    """The ServerSettings fields of TLS and bearer-token auth (checked before serve
    starts anything)."""
    fields = ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file")
    return {**{name: value(name, args) for name in fields}, "auth_tokens": auth_tokens()}


def add_server_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "server",
        help="run a gRPC server (stateless; pair with `embedq worker`)",
        description="Run one embedq gRPC server. It never loads the model: it answers from the "
        "Redis cache and queues misses for `embedq worker` processes on the same Redis.",
    )
    add_flags(parser, SERVER)
    parser.set_defaults(func=run_server_command)


def run_server_command(args: argparse.Namespace) -> int:
    from .app import serve

    # Unusable TLS files or tokens raise SettingsError first thing: one line, exit 2.
    asyncio.run(serve(server_settings(args)))
    return 0
