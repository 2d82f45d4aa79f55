"""The `embedq` command: serve, server, worker, and the client commands.

The client commands (encode, similarity, rank, lookup, tokenize, info) are in
the base install; the role commands need an extra (pyproject.toml). So this
module imports a role command's code only when that command runs, and a
missing extra becomes one line naming it and exit code 2, not a traceback.
Nothing here may import redis, torch or transformers at module level: the
client path goes through it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from embedq import __version__
from embedq.flags import add_flags, settings_of
from embedq.logs import configure_logging
from embedq.settings import TOP, SettingsError

# Exit code of a command whose extra is not installed (argparse's usage-error code).
MISSING_EXTRA = 2


@dataclass(frozen=True)
class RoleCommand:
    """A command that needs an extra: where its parser lives and what it must import."""

    module: str
    adder: str
    extra: str
    help: str
    # Checked (find_spec, nothing imported) before the command runs, so that a
    # command that would start other processes first (serve) refuses at once.
    # tests/test_install.py proves each one comes with the named extra.
    needs: tuple[str, ...] = ()


# Top-level import names only; the extras themselves are declared in pyproject.toml.
_SERVER_NEEDS = ("redis", "grpc_health", "grpc_reflection", "prometheus_client", "aiohttp")
_WORKER_NEEDS = ("redis", "prometheus_client", "torch", "transformers", "tokenizers")

ROLE_COMMANDS: dict[str, RoleCommand] = {
    "serve": RoleCommand(
        "embedq.apps.serve",
        "add_serve_command",
        "all",
        "run everything: private Redis, worker(s) and the gRPC server",
        tuple(dict.fromkeys(_SERVER_NEEDS + _WORKER_NEEDS)),
    ),
    "server": RoleCommand(
        "embedq.server.cli",
        "add_server_command",
        "server",
        "run a gRPC server (stateless; pair with `embedq worker`)",
        _SERVER_NEEDS,
    ),
    "worker": RoleCommand(
        "embedq.workers.cli",
        "add_worker_command",
        "worker",
        "run model workers that take jobs from Redis",
        _WORKER_NEEDS,
    ),
    "status": RoleCommand(
        "embedq.apps.status",
        "add_status_command",
        "server",
        "queue depth, pending and dead jobs, live workers and cache size, from Redis",
        ("redis",),
    ),
    "bench": RoleCommand(
        "embedq.tools.bench",
        "add_bench_command",
        "bench",
        "measure embedq against in-process sentence-transformers",
        ("redis", "torch", "transformers"),
    ),
    # Each broker's client library is imported on use and reported per broker
    # (bridge/brokers/__init__.py), so a Redis-only bridge needs no NATS client.
    "bridge": RoleCommand(
        "embedq.bridge.cli",
        "add_bridge_command",
        "bridge",
        "message brokers in, vectors out (Redis Streams, NATS, RabbitMQ, MQTT)",
        ("prometheus_client",),
    ),
}

# Global options that take a value: skipped when looking for the command name.
_VALUE_OPTIONS = tuple(s.flag for s in settings_of(TOP) if s.flag and s.type is not bool)


class MissingExtra(Exception):
    """A role command's third-party module is not installed."""

    def __init__(self, command: str, module: str) -> None:
        extra = ROLE_COMMANDS[command].extra
        super().__init__(
            f"embedq {command} needs the '{extra}' extra (module {module!r} is not installed): "
            f"pip install 'embedq[{extra}]'"
        )


def command_name(argv: Sequence[str]) -> str | None:
    """The subcommand in argv (the first positional token), without parsing the rest."""
    tokens = iter(argv)
    for token in tokens:
        if token == "--":
            return next(tokens, None)
        if token in _VALUE_OPTIONS:
            next(tokens, None)
        elif not token.startswith("-"):
            return token
    return None


def missing_module(error: ImportError) -> str | None:
    """The absent third-party top-level module behind an ImportError, else None.

    None for our own code (an ImportError inside embedq is a bug to show, not an
    extra to install) and for a module that is installed but failed to import.
    """
    if not isinstance(error, ModuleNotFoundError) or not error.name:
        return None
    top = error.name.partition(".")[0]
    if top == "embedq":
        return None
    try:
        installed = importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        installed = False
    return None if installed else top


def _check_needs(command: str) -> None:
    for module in ROLE_COMMANDS[command].needs:
        if importlib.util.find_spec(module) is None:
            raise MissingExtra(command, module)


def _load_adder(command: str) -> Callable[[argparse._SubParsersAction], None]:
    role = ROLE_COMMANDS[command]
    try:
        module = importlib.import_module(role.module)
    except ImportError as error:
        missing = missing_module(error)
        if missing is None:
            raise
        raise MissingExtra(command, missing) from error
    return getattr(module, role.adder)


def _add_placeholder(subparsers: argparse._SubParsersAction, command: str, note: str = "") -> None:
    # Lists the command in `embedq --help` without importing its code; never
    # parsed, since the command that runs always gets its real parser.
    subparsers.add_parser(command, help=ROLE_COMMANDS[command].help + note, add_help=False)


def build_parser(load: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `embedq` parser. Role commands named in `load` (all when None) get their
    real parser; the others are listed only. With load=None a command whose extra
    is missing is listed with the extra to install; a named one raises MissingExtra."""
    from embedq.client.cli import add_client_commands

    parser = argparse.ArgumentParser(
        prog="embedq",
        description="Sentence-BERT embeddings over gRPC, batched through a Redis queue and cache.",
    )
    parser.add_argument("--version", action="version", version=f"embedq {__version__}")
    add_flags(parser, TOP)  # --log-level, --log-format (embedq.settings declares them)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    role_names = list(ROLE_COMMANDS)
    for command in role_names[:3]:  # serve, server, worker; then the client's; then the rest
        _add_role(subparsers, command, load)
    add_client_commands(subparsers)
    for command in role_names[3:]:
        _add_role(subparsers, command, load)
    return parser


def _add_role(
    subparsers: argparse._SubParsersAction, command: str, load: Sequence[str] | None
) -> None:
    if load is not None and command not in load:
        _add_placeholder(subparsers, command)
        return
    try:
        _check_needs(command)
        adder = _load_adder(command)
    except MissingExtra:
        if load is not None:
            raise
        _add_placeholder(
            subparsers, command, f" [needs: pip install 'embedq[{ROLE_COMMANDS[command].extra}]']"
        )
        return
    adder(subparsers)


def main(argv: Sequence[str] | None = None) -> int:
    # Offline by design: model files come from packages or local folders.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    name = command_name(argv)
    # A client command imports no role code at all; bare `embedq` / `--help` lists everything.
    load = None if name is None else [name] if name in ROLE_COMMANDS else []
    try:
        parser = build_parser(load)
    except MissingExtra as missing:
        print(missing, file=sys.stderr)
        return MISSING_EXTRA
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
    except ImportError as error:
        # A module imported on use (torch in a worker started from a server-only install).
        missing = missing_module(error)
        if args.command not in ROLE_COMMANDS or missing is None:
            raise
        print(MissingExtra(args.command, missing), file=sys.stderr)
        return MISSING_EXTRA
    except SettingsError as exc:
        # A setting that cannot work: one line naming it (never a secret), no traceback.
        parser.exit(2, f"embedq {args.command}: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
