"""Fault injection for the reliability tests, kept out of the product.

`FaultyEncoder` wraps a worker's encoder. EMBEDQ_FAULT_INJECT="raise:<marker>"
makes the forward pass over a batch holding a text that contains <marker>
raise; "crash:<marker>" kills the process there instead (as an out-of-memory
kill or a segfault in a native kernel would); "tokenize-raise:<marker>" makes
tokenizing such a text raise (on the worker's reader thread); "write-raise:<marker>"
makes the writer thread's next result write after such a batch raise (a bug in the
write path). Tests use it to prove that callers get an error, not silence.

EMBEDQ_FAULT_INJECT_TASK="replies=/tmp/f" makes the server's background task
named "replies" raise RuntimeError whenever the file /tmp/f exists (checked every
0.1 s): the supervisor must log it, restart the task and report NOT_SERVING.

Run as a program, it is `embedq` with those faults installed:
``python tests/fault_worker.py worker|server … [flags]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
from collections.abc import Sequence

ENV = "EMBEDQ_FAULT_INJECT"
TASK_ENV = "EMBEDQ_FAULT_INJECT_TASK"
CRASH_EXIT_CODE = 70


class FaultyEncoder:
    """Delegates to `inner`; embed() fails as `spec` ("raise:M" / "crash:M") says
    on a batch with a text containing M. The forward pass gets token ids, not
    texts, so tokenize() remembers the ids of the marked texts it saw."""

    def __init__(self, inner: object, spec: str) -> None:
        self._inner = inner
        self.mode, _, self.marker = spec.partition(":")
        self._marked: set[tuple[int, ...]] = set()
        # tokenize() runs on the worker's reader thread, embed() on its main one, and
        # take_write_fault() on its writer.
        self._lock = threading.Lock()
        self._write_faults = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def tokenize(self, texts: Sequence[str]) -> list:
        if self.mode == "tokenize-raise" and any(self.marker in text for text in texts):
            raise RuntimeError(f"injected tokenizer fault on a text containing {self.marker!r}")
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
        if hit and self.mode == "write-raise":
            with self._lock:
                self._write_faults += 1
        return self._inner.embed(batch, *args, **kwargs)

    def take_write_fault(self) -> bool:
        """Whether the next result write is to fail (one per marked batch encoded)."""
        with self._lock:
            due = self._write_faults > 0
            self._write_faults -= due
        return due


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

        def _write_commands(self, write, dead_letter):
            if dead_letter is None and self.encoder.take_write_fault():
                raise RuntimeError(f"injected result-write fault after {spec!r}")
            return super()._write_commands(write, dead_letter)

    # workers/cli.py imports Worker when the command runs, so it gets this one.
    worker.Worker = FaultyWorker


def install_task_faults() -> None:
    """Make the server's Supervisor wrap the task TASK_ENV names (when set)."""
    task_name, sep, path = os.environ.get(TASK_ENV, "").partition("=")
    if not (sep and task_name and path):
        return
    from embedq.server.supervise import Supervisor

    spawn = Supervisor.spawn

    def spawn_with_fault(self, name, loop):
        if name != task_name:
            return spawn(self, name, loop)
        return spawn(self, name, lambda: _failing_while(path, loop()))

    Supervisor.spawn = spawn_with_fault


async def _failing_while(path: str, coro) -> None:
    """Run `coro`; raise while the file at `path` exists."""
    from embedq.server.supervise import cancel_all

    task = asyncio.ensure_future(coro)
    try:
        while not task.done():
            if os.path.exists(path):
                raise RuntimeError(f"injected fault ({TASK_ENV})")
            await asyncio.wait({task}, timeout=0.1)
        task.result()
    finally:
        # Not a bare cancel-and-await: redis-py can swallow a cancel that lands as
        # the XREAD starts, and the loop would then run on with this await stuck
        # behind it forever, so the injected fault never reached the supervisor
        # (a CI run saw health stay SERVING). cancel_all cancels again until it ends.
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await cancel_all([task])


def main(argv: list[str] | None = None) -> int:
    install()
    install_task_faults()
    from embedq.cli import main as embedq_main

    return embedq_main(argv)


if __name__ == "__main__":
    sys.exit(main())
