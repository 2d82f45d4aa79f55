"""The `embedq` command: serve, server, worker, and the client commands."""

from __future__ import annotations

import argparse
import os
import sys

from embedq import __version__
from embedq.logs import FORMATS, configure_logging
from embedq.settings import SettingsError


def build_parser() -> argparse.ArgumentParser:
    from embedq.bench import add_bench_command
    from embedq.bridge.cli import add_bridge_command
    from embedq.client.cli import add_client_commands
    from embedq.serve import add_serve_command
    from embedq.server.cli import add_server_command
    from embedq.status import add_status_command
    from embedq.workers.cli import add_worker_command

    parser = argparse.ArgumentParser(
        prog="embedq",
        description="Sentence-BERT embeddings over gRPC, batched through a Redis queue and cache.",
    )
    parser.add_argument("--version", action="version", version=f"embedq {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("EMBEDQ_LOG_LEVEL", "INFO"),
        help="DEBUG, INFO, WARNING or ERROR [EMBEDQ_LOG_LEVEL; %(default)s]",
    )
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        type=str.lower,
        default=(os.environ.get("EMBEDQ_LOG_FORMAT") or "text").lower(),
        help="text lines, or JSON lines (time, level, logger, message, request_id, extra "
        "fields) [EMBEDQ_LOG_FORMAT; %(default)s]",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_serve_command(subparsers)
    add_server_command(subparsers)
    add_worker_command(subparsers)
    add_client_commands(subparsers)
    add_status_command(subparsers)
    add_bench_command(subparsers)
    add_bridge_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Offline by design: model files come from packages or local folders.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        configure_logging(args.log_level, args.log_format)
    except ValueError as exc:  # a bad EMBEDQ_LOG_LEVEL / EMBEDQ_LOG_FORMAT
        parser.exit(2, f"embedq: error: {exc}\n")
    try:
        return args.func(args)
    except SettingsError as exc:
        # A setting that cannot work: one line naming it (never a secret), no traceback.
        parser.exit(2, f"embedq {args.command}: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
