"""Background tasks that never die silently, and logs that do not flood.

Every long-running task of the server (reply listener, flusher, keepalive,
registry refresh, health, gauges) runs under a :class:`Supervisor`: an
exception of any kind is logged (at most once per 10 s for the same task)
and the task is restarted with exponential backoff. While a task is down,
and for a second after its restart, :attr:`Supervisor.down` names it; the
health task reports NOT_SERVING meanwhile, so load balancers route around a
server that would otherwise be deaf with health SERVING.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable

from embedq.logs import LOG_EVERY_S, Throttled

log = logging.getLogger(__name__)

__all__ = ["LOG_EVERY_S", "Supervisor", "Throttled"]

# Restart backoff: first wait, doubling up to the cap.
FIRST_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0
# A restarted task counts as up once it has run this long without failing.
SETTLE_S = 1.0
# A task that ran this long before failing starts its backoff afresh.
RESET_BACKOFF_AFTER_S = 30.0


class Supervisor:
    """Runs named coroutine loops; restarts any that fails, with backoff."""

    def __init__(self, on_down: Callable[[str], Awaitable[None]] | None = None) -> None:
        self._tasks: dict[str, asyncio.Task] = {}
        # name -> monotonic time until which the task counts as down
        self._down_until: dict[str, float] = {}
        self._on_down = on_down
        self._throttled = Throttled(log)
        self.restarts: dict[str, int] = {}

    @property
    def down(self) -> list[str]:
        """Names of the tasks that failed and have not run a second since."""
        now = time.monotonic()
        return sorted(name for name, until in self._down_until.items() if until > now)

    def spawn(self, name: str, loop: Callable[[], Awaitable[None]]) -> asyncio.Task:
        task = asyncio.create_task(self._run(name, loop), name=name)
        self._tasks[name] = task
        return task

    async def _run(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        backoff = FIRST_BACKOFF_S
        fault_file = _fault_file(name)
        while True:
            started = time.monotonic()
            try:
                if fault_file:
                    await _failing_while(fault_file, loop())
                else:
                    await loop()
                raise RuntimeError("returned")  # the loops run forever
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: log, restart
                if time.monotonic() - started > RESET_BACKOFF_AFTER_S:
                    backoff = FIRST_BACKOFF_S
                self._down_until[name] = time.monotonic() + backoff + SETTLE_S
                self.restarts[name] = self.restarts.get(name, 0) + 1
                self._throttled.error(
                    name,
                    "background task %r failed (%s: %s); restarting in %.1fs, "
                    "health NOT_SERVING meanwhile",
                    name,
                    type(exc).__name__,
                    exc,
                    backoff,
                    exc_info=True,
                )
                if self._on_down is not None:
                    try:
                        await self._on_down(name)
                    except Exception:  # noqa: BLE001 - best effort; health loop catches up
                        log.debug("on_down hook failed", exc_info=True)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()


# Fault injection for tests (like the workers' EMBEDQ_FAULT_INJECT):
# EMBEDQ_FAULT_INJECT_TASK="replies=/tmp/f" makes the task named "replies" raise
# RuntimeError whenever the file /tmp/f exists (checked every 0.1 s).
FAULT_ENV = "EMBEDQ_FAULT_INJECT_TASK"


def _fault_file(name: str) -> str | None:
    spec = os.environ.get(FAULT_ENV, "")
    task, sep, path = spec.partition("=")
    return path if sep and task == name and path else None


async def _failing_while(path: str, coro: Awaitable[None]) -> None:
    task = asyncio.ensure_future(coro)
    try:
        while not task.done():
            if os.path.exists(path):
                raise RuntimeError(f"injected fault ({FAULT_ENV})")
            await asyncio.wait({task}, timeout=0.1)
        task.result()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
