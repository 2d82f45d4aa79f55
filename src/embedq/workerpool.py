"""One supervisor for worker processes, used by `embedq serve` (its N workers)
and `embedq worker --devices a,b` (one child per device).

Policy, the same for both:
- a child that exits is restarted: at once the first time, then after 1, 2,
  4 ... 30 s while it keeps exiting within a minute of its start (a crash
  loop costs little); one log line per exit;
- a child that exits with 2 (CONFIG_ERROR_EXIT: bad model, refused backend,
  wrong Redis password) would only fail again: the supervisor raises
  SettingsError, its caller stops every child and exits 2 with one line;
- each child gets its own consumer name (EMBEDQ_WORKER_ID): when one exits,
  `on_exit` (see forget_worker) removes its heartbeat, so the others take its
  pending jobs over within a second;
- children run in their own session: a terminal's Ctrl-C reaches only the
  supervisor, which stops them (SIGTERM, then SIGKILL after 30 s).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from embedq.settings import RedisSettings, SettingsError

log = logging.getLogger("embedq.workerpool")

# `embedq worker` exits with this when its configuration cannot work.
CONFIG_ERROR_EXIT = 2
# Restart delays of a child that keeps exiting: 0, then FIRST doubling up to MAX.
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
# A child that ran this long before exiting starts its backoff afresh.
STABLE_AFTER_S = 60.0
STOP_TIMEOUT_S = 30.0


@dataclass
class Child:
    argv: list[str]
    label: str
    proc: subprocess.Popen | None = None
    worker_id: str = ""
    started: float = 0.0
    # Exits in a row, each soon after its start.
    quick_exits: int = 0
    # monotonic time of the pending restart; None: running.
    restart_at: float | None = None


class WorkerPool:
    """Keeps one process per command line running until stopped."""

    def __init__(
        self,
        argvs: list[list[str]],
        env: dict[str, str] | None = None,
        on_exit: Callable[[str], None] | None = None,
        labels: list[str] | None = None,
        id_prefix: str = "serve",
    ) -> None:
        self.env = env
        self.on_exit = on_exit
        self.id_prefix = id_prefix
        names = labels or [f"worker {i}" for i in range(len(argvs))]
        self.children = [Child(argv, label) for argv, label in zip(argvs, names, strict=True)]
        self.stopping = False
        for index in range(len(self.children)):
            self._spawn(index)

    @property
    def procs(self) -> list[subprocess.Popen]:
        return [child.proc for child in self.children if child.proc is not None]

    @property
    def ids(self) -> list[str]:
        return [child.worker_id for child in self.children]

    def _spawn(self, index: int) -> None:
        child = self.children[index]
        child.worker_id = f"{socket.gethostname()}-{self.id_prefix}{index}-{uuid.uuid4().hex[:6]}"
        env = {**(self.env if self.env is not None else os.environ)}
        env["EMBEDQ_WORKER_ID"] = child.worker_id
        # Own session: the terminal's Ctrl-C is ours to handle; we stop the children.
        child.proc = subprocess.Popen(child.argv, start_new_session=True, env=env)
        child.started, child.restart_at = time.monotonic(), None
        log.info("started %s (pid %d)", child.label, child.proc.pid)

    def check(self) -> None:
        """One round: note exits, restart the children whose delay is over.
        SettingsError when a child refused its configuration."""
        now = time.monotonic()
        for index, child in enumerate(self.children):
            if child.restart_at is None and child.proc and child.proc.poll() is not None:
                self._exited(child, now)
            if child.restart_at is not None and child.restart_at <= now and not self.stopping:
                self._spawn(index)

    def _exited(self, child: Child, now: float) -> None:
        proc = child.proc
        assert proc is not None
        if proc.returncode == CONFIG_ERROR_EXIT:
            raise SettingsError(
                f"{child.label} (pid {proc.pid}) refused its configuration (exit 2; its error "
                "is printed above)"
            )
        ran = now - child.started
        child.quick_exits = 1 if ran >= STABLE_AFTER_S else child.quick_exits + 1
        delay = restart_delay(child.quick_exits)
        child.restart_at = now + delay
        log.error(
            "%s (pid %d) exited with %s after %.1fs; restarting in %.1fs",
            child.label,
            proc.pid,
            proc.returncode,
            ran,
            delay,
        )
        if self.on_exit is not None:
            self.on_exit(child.worker_id)

    async def supervise(self, period_s: float = 0.2) -> None:
        """check() every period_s until cancelled (embedq serve's event loop)."""
        while True:
            await asyncio.sleep(period_s)
            self.check()

    def run(self, stop: threading.Event, period_s: float = 0.2) -> None:
        """check() every period_s until `stop` is set (a blocking supervisor)."""
        while not stop.wait(period_s):
            self.check()

    def stop(self) -> list[int | None]:
        """SIGTERM every child, SIGKILL those still there after STOP_TIMEOUT_S;
        their exit codes."""
        self.stopping = True
        running = [p for p in self.procs if p.poll() is None]
        for proc in running:
            proc.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in running:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return [proc.returncode for proc in self.procs]


def restart_delay(quick_exits: int) -> float:
    """0 s after a first exit, then 1, 2, 4 ... up to MAX_BACKOFF_S."""
    if quick_exits <= 1:
        return 0.0
    return min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (quick_exits - 2))


def forget_worker(redis_settings: RedisSettings, worker_id: str) -> None:
    """Remove an exited worker's heartbeat, so that its jobs are taken over now."""
    from embedq.keys import Keys

    keys = Keys(redis_settings.namespace)
    try:
        client = redis_settings.connect()
        for model in client.hkeys(keys.models()):
            client.zrem(keys.workers(model.decode()), worker_id)
    except Exception as exc:  # noqa: BLE001 - the stale heartbeat does the same, later
        log.warning("could not mark worker %s gone (%s)", worker_id, type(exc).__name__)
