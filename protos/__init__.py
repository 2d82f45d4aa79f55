"""The embedq .proto files, installed as the package ``embedq.protos``.

This folder is the single source of truth for the API; pyproject.toml maps it
to ``embedq.protos`` so that a plain ``pip install embedq`` carries the files
and other languages' stubs can be generated from an install, not only from a
checkout::

    python -m grpc_tools.protoc -I "$(python -c 'import embedq.protos as p; print(p.root())')" \\
        --python_out=. embedq/v1/embedq.proto

Only this file is Python; the .proto files are package data.
"""

from __future__ import annotations

from pathlib import Path

# The public API (package embedq.v1): what other languages' clients need.
PUBLIC_PROTO = "embedq/v1/embedq.proto"
# Server <-> worker messages through Redis (package embedq.internal.v1).
QUEUE_PROTO = "embedq/internal/v1/queue.proto"


def root() -> Path:
    """The include root to hand to protoc as ``-I``: the folder holding ``embedq/``.

    The files are on disk in every supported install (a wheel installs into a
    folder, an editable install maps to protos/ itself), so a plain path works
    where protoc and other tools need one.
    """
    return Path(__file__).resolve().parent


def path(name: str = PUBLIC_PROTO) -> Path:
    """One .proto file by its import name (as written in an ``import`` line)."""
    found = root() / name
    if not found.is_file():
        raise FileNotFoundError(f"{found}: no such .proto in embedq.protos (known: {files()})")
    return found


def files() -> list[str]:
    """Every .proto file, by import name, sorted."""
    base = root()
    return sorted(p.relative_to(base).as_posix() for p in base.rglob("*.proto"))
