"""File handling for the `encode` command: line batches in, .npy or JSON lines out."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Protocol

import numpy as np


def open_input(path: str) -> contextlib.AbstractContextManager[IO[str]]:
    """The input as text split on "\\n" only: a lone "\\r" stays inside its line.

    utf-8-sig drops a leading byte-order mark, which no one means as text.
    """
    if path == "-":
        stdin = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig", newline="\n")
        return contextlib.nullcontext(stdin)
    return open(path, encoding="utf-8-sig", newline="\n")  # noqa: SIM115 - caller's `with`


def strip_newline(line: str) -> str:
    """The line without its line ending ("\\n" or "\\r\\n"); nothing else is trimmed."""
    if line.endswith("\r\n"):
        return line[:-2]
    return line[:-1] if line.endswith("\n") else line


def read_batches(stream: IO[str], size: int) -> Iterator[list[str]]:
    """Consecutive lists of at most `size` lines, read lazily (big files stream)."""
    batch: list[str] = []
    for line in stream:
        batch.append(strip_newline(line))
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class Writer(Protocol):
    def write(self, start: int, texts: list[str], vectors: np.ndarray) -> None: ...

    def finish(self, dimension: Callable[[], int]) -> None: ...

    def close(self) -> None: ...


class JsonlWriter:
    """One {"index", "text", "embedding"} object per line."""

    def __init__(self, path: str) -> None:
        self._own = path != "-"
        self._fp: IO[str] = open(path, "w", encoding="utf-8") if self._own else sys.stdout  # noqa: SIM115

    def write(self, start: int, texts: list[str], vectors: np.ndarray) -> None:
        for offset, (text, row) in enumerate(zip(texts, vectors.tolist(), strict=True)):
            record = {"index": start + offset, "text": text, "embedding": row}
            self._fp.write(json.dumps(record, ensure_ascii=False) + "\n")

    def finish(self, dimension: Callable[[], int]) -> None:
        self._fp.flush()

    def close(self) -> None:
        if self._own:
            self._fp.close()


class NpyWriter:
    """A float32 (rows, dim) .npy file without holding all rows in memory.

    Rows go to a spool file next to the output; the .npy header needs the row
    count, so the real file is written (header, then the spooled rows) at the
    end, and not at all when the command fails.
    """

    def __init__(self, path: str) -> None:
        self._path = Path(path)
        self._spool = tempfile.TemporaryFile(dir=self._path.parent)  # noqa: SIM115
        self._rows = 0
        self._dim: int | None = None

    def write(self, start: int, texts: list[str], vectors: np.ndarray) -> None:
        self._spool.write(np.ascontiguousarray(vectors, dtype="<f4").tobytes())
        self._rows += vectors.shape[0]
        self._dim = vectors.shape[1]

    def finish(self, dimension: Callable[[], int]) -> None:
        # No input rows means no vector told us the width: ask the server.
        dim = self._dim if self._dim is not None else dimension()
        header = {"descr": "<f4", "fortran_order": False, "shape": (self._rows, dim)}
        self._spool.seek(0)
        with open(self._path, "wb") as out:
            np.lib.format.write_array_header_1_0(out, header)
            shutil.copyfileobj(self._spool, out, 1 << 20)

    def close(self) -> None:
        self._spool.close()


def open_output(path: str) -> Writer:
    return NpyWriter(path) if path.lower().endswith(".npy") else JsonlWriter(path)
