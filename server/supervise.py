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
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

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
# cancel_all(): how long to wait before cancelling a task again.
RECANCEL_S = 0.2


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
        while True:
            started = time.monotonic()
            try:
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
        await cancel_all(self._tasks.values())
        self._tasks.clear()


async def cancel_all(tasks: Iterable[asyncio.Task]) -> None:
    """Cancel `tasks` and wait until every one has ended."""
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        # A cancel that lands while redis-py starts a command can be swallowed
        # (redis 8.1 on Python 3.11: the XREAD goes on blocking), so a task still
        # running after a while is cancelled again.
        _done, pending = await asyncio.wait(pending, timeout=RECANCEL_S)
