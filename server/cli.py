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

from .auth import env_tokens


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
    parser.add_argument(
        "--http-port",
        type=int,
        default=env_int("HTTP_PORT", 0),
        help="also serve the HTTP/JSON API (OpenAI-compatible /v1/embeddings) on this port of "
        "--host, with the same TLS, tokens and limits; 0: off [EMBEDQ_HTTP_PORT; %(default)s]",
    )
    add_metrics_options(parser, "embedq serve: the server's; its workers' on the ports after it")
    add_security_options(parser)


def add_metrics_options(parser: argparse.ArgumentParser, note: str = "") -> None:
    """--metrics-port / --metrics-host (servers and workers alike)."""
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=env_int("METRICS_PORT", 0),
        help="serve Prometheus metrics at http://HOST:PORT/metrics; 0: off "
        f"{'(' + note + ') ' if note else ''}[EMBEDQ_METRICS_PORT; %(default)s]",
    )
    parser.add_argument(
        "--metrics-host",
        default=env("METRICS_HOST", DEFAULT_HOST),
        help="address the metrics endpoint listens on [EMBEDQ_METRICS_HOST; %(default)s]",
    )


def add_security_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "security",
        "TLS and bearer tokens; health checking and reflection need no token. "
        "Never put a token on the command line: use a file or EMBEDQ_AUTH_TOKENS.",
    )
    group.add_argument(
        "--tls-cert",
        metavar="FILE",
        default=env("TLS_CERT") or None,
        help="PEM certificate chain: serve gRPC over TLS [EMBEDQ_TLS_CERT; plaintext]",
    )
    group.add_argument(
        "--tls-key",
        metavar="FILE",
        default=env("TLS_KEY") or None,
        help="PEM private key of --tls-cert (unencrypted) [EMBEDQ_TLS_KEY]",
    )
    group.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        default=env("TLS_CLIENT_CA") or None,
        help="PEM CA bundle: require client certificates signed by it (mutual TLS) "
        "[EMBEDQ_TLS_CLIENT_CA; off]",
    )
    group.add_argument(
        "--auth-token-file",
        metavar="FILE",
        default=env("AUTH_TOKEN_FILE") or None,
        help="accepted bearer tokens, one per line ('#' comments); re-read when it changes, "
        "so tokens rotate without a restart [EMBEDQ_AUTH_TOKEN_FILE; EMBEDQ_AUTH_TOKENS "
        "(comma-separated) adds more; neither: no auth]",
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
            max_candidates=Limits.from_env().max_candidates,
        ),
        default_model=args.default_model,
        default_timeout_s=args.request_timeout,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        http_port=args.http_port,
        **security_settings(args),
    )


def security_settings(args: argparse.Namespace) -> dict[str, object]:
    """The ServerSettings fields of TLS and bearer-token auth."""
    return {
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_client_ca": args.tls_client_ca,
        "auth_token_file": args.auth_token_file,
        "auth_tokens": env_tokens(env("AUTH_TOKENS")),
    }


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

    # Unusable TLS files or tokens raise SettingsError first thing: one line, exit 2.
    asyncio.run(serve(server_settings(args, args.redis_url)))
    return 0
