"""Fault injection for the reliability tests, kept out of the product.

`FaultyEncoder` wraps a worker's encoder. EMBEDQ_FAULT_INJECT="raise:<marker>"
makes the forward pass over a batch holding a text that contains <marker>
raise; "crash:<marker>" kills the process there instead (as an out-of-memory
kill or a segfault in a native kernel would). Tests use it to prove that callers
get an error, not silence.

Run as a program, it is `embedq worker` with its encoder wrapped:
``python tests/fault_worker.py worker --redis-url … [worker flags]``.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Sequence

ENV = "EMBEDQ_FAULT_INJECT"
CRASH_EXIT_CODE = 70


class FaultyEncoder:
    """Delegates to `inner`; embed() fails as `spec` ("raise:M" / "crash:M") says
    on a batch with a text containing M. The forward pass gets token ids, not
    texts, so tokenize() remembers the ids of the marked texts it saw."""

    def __init__(self, inner: object, spec: str) -> None:
        self._inner = inner
        self.mode, _, self.marker = spec.partition(":")
        self._marked: set[tuple[int, ...]] = set()
        # tokenize() runs on the worker's reader thread, embed() on its main one.
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def tokenize(self, texts: Sequence[str]) -> list:
        tokenized = self._inner.tokenize(texts)
        if self.marker:
            with self._lock:
                for text, tokens in zip(texts, tokenized, strict=True):
                    if self.marker in text:
                        self._marked.add(tuple(tokens.ids))
        return tokenized

    def embed(self, batch: Sequence[Sequence[int]], *args: object, **kwargs: object):
        with self._lock:
            hit = any(tuple(ids) in self._marked for ids in batch)
        if hit and self.mode == "crash":
            os._exit(CRASH_EXIT_CODE)
        if hit and self.mode == "raise":
            raise RuntimeError(f"injected fault on a text containing {self.marker!r}")
        return self._inner.embed(batch, *args, **kwargs)


def install() -> None:
    """Make every Worker built from now on wrap its encoder (when ENV is set)."""
    spec = os.environ.get(ENV, "")
    if not spec:
        return
    from embedq.workers import worker

    class FaultyWorker(worker.Worker):
        def __init__(self, settings, encoder=None) -> None:
            super().__init__(settings, encoder)
            self.encoder = FaultyEncoder(self.encoder, spec)

    # workers/cli.py imports Worker when the command runs, so it gets this one.
    worker.Worker = FaultyWorker


def main(argv: list[str] | None = None) -> int:
    install()
    from embedq.cli import main as embedq_main

    return embedq_main(argv)


if __name__ == "__main__":
    sys.exit(main())
