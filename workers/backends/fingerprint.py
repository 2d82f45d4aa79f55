"""A content hash of everything that changes a vector, for cache keys and model identity.

Covers the bytes of the folder's weight, config and tokenizer files (by path relative to the
folder, so a copy elsewhere hashes the same) plus the effective settings. README files,
training logs and the like are left out: they change no vector.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

FINGERPRINT_VERSION = "embedq-fingerprint-v1"
HASHED_SUFFIXES = (".json", ".txt", ".model", ".safetensors", ".bin")
_CHUNK = 1 << 20


def model_fingerprint(folder: Path, settings: Mapping[str, Any]) -> str:
    """Lowercase hex sha256 over the hashed files of ``folder`` and ``settings`` (JSON values)."""
    digest = hashlib.sha256(FINGERPRINT_VERSION.encode())
    for relative, path in _hashed_files(folder):
        # Name and size framing keeps (a.json: "xy") and (a.json: "x", b: "y") distinct.
        digest.update(f"\0file\0{relative}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    digest.update(b"\0settings\0")
    digest.update(json.dumps(dict(settings), sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()


def _hashed_files(folder: Path) -> Iterator[tuple[str, Path]]:
    """(posix path relative to folder, path), sorted; hidden folders (.git, .cache) skipped.
    Follows symlinks: Hub cache snapshots are symlinks into the blob store."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        for name in files:
            if name.endswith(HASHED_SUFFIXES):
                path = Path(root) / name
                found.append((path.relative_to(folder).as_posix(), path))
    return iter(sorted(found))
