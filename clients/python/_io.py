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
    """A (rows, width) .npy file of `dtype` (float32 by default; float16, int8,
    uint8 for the other precisions) without holding all rows in memory.

    Rows go to a spool file next to the output; the .npy header needs the row
    count, so the real file is written (header, then the spooled rows) at the
    end, and not at all when the command fails.
    """

    def __init__(self, path: str, dtype: np.dtype | str = "<f4") -> None:
        self._path = Path(path)
        self._dtype = np.dtype(dtype).newbyteorder("<")
        self._spool = tempfile.TemporaryFile(dir=self._path.parent)  # noqa: SIM115
        self._rows = 0
        self._dim: int | None = None

    def write(self, start: int, texts: list[str], vectors: np.ndarray) -> None:
        self._spool.write(np.ascontiguousarray(vectors, dtype=self._dtype).tobytes())
        self._rows += vectors.shape[0]
        self._dim = vectors.shape[1]

    def finish(self, dimension: Callable[[], int]) -> None:
        # No input rows means no vector told us the width: ask the server.
        dim = self._dim if self._dim is not None else dimension()
        descr = np.lib.format.dtype_to_descr(self._dtype)
        header = {"descr": descr, "fortran_order": False, "shape": (self._rows, dim)}
        self._spool.seek(0)
        with open(self._path, "wb") as out:
            np.lib.format.write_array_header_1_0(out, header)
            shutil.copyfileobj(self._spool, out, 1 << 20)

    def close(self) -> None:
        self._spool.close()


class CalibratingWriter:
    """INT8/UINT8 calibrated on the whole input, for a file read in blocks.

    Without ranges, int8/uint8 codes depend on the per-dimension minimum and
    maximum over all rows (quantize_embeddings' rule), which are known only at
    the end: float32 rows (and their texts) are spooled to temporary files
    while the running minimum and maximum are kept, then quantised block by
    block into the real writer. The output equals quantize_embeddings over all
    of the input's vectors, whatever the batch size.
    """

    BLOCK = 4096

    def __init__(self, inner: Writer, quantize: Callable[..., np.ndarray]) -> None:
        self._inner = inner
        self._quantize = quantize  # (float32 rows, minimums, maximums) -> codes
        self._vectors = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self._texts = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115
        self._rows = 0
        self._min: np.ndarray | None = None
        self._max: np.ndarray | None = None

    def write(self, start: int, texts: list[str], vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        self._vectors.write(vectors.tobytes())
        for text in texts:
            self._texts.write(json.dumps(text, ensure_ascii=False) + "\n")
        self._rows += len(vectors)
        low, high = vectors.min(axis=0), vectors.max(axis=0)
        self._min = low if self._min is None else np.minimum(self._min, low)
        self._max = high if self._max is None else np.maximum(self._max, high)

    def finish(self, dimension: Callable[[], int]) -> None:
        if self._rows == 1:
            raise ValueError(
                "int8/uint8 calibrates on the input's own vectors and needs at least 2 lines"
            )
        if self._rows:
            assert self._min is not None and self._max is not None
            width = len(self._min)
            self._vectors.seek(0)
            self._texts.seek(0)
            done = 0
            while done < self._rows:
                count = min(self.BLOCK, self._rows - done)
                block = np.frombuffer(self._vectors.read(count * width * 4), dtype="<f4")
                texts = [json.loads(self._texts.readline()) for _ in range(count)]
                codes = self._quantize(block.reshape(count, width), self._min, self._max)
                self._inner.write(done, texts, codes)
                done += count
        self._inner.finish(dimension)

    def close(self) -> None:
        self._vectors.close()
        self._texts.close()
        self._inner.close()


def open_output(path: str, dtype: np.dtype | str = "<f4") -> Writer:
    """A writer for the path's format; `dtype` is the .npy element type."""
    return NpyWriter(path, dtype) if path.lower().endswith(".npy") else JsonlWriter(path)
