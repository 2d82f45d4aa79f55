"""Admission by time: the policy, and the state it reads (no Redis of its own).

A call is admitted when its new texts, behind the texts queued for the model, would be
encoded within a share of its time left at the workers' measured rate; otherwise it is
refused with RESOURCE_EXHAUSTED and a hint saying when to come back (see
docs/architecture.md, "Under load").

Refused callers are told staggered times. Every caller refused at one moment used to get
the same hint; they all came back together, one fitted and the rest were refused again
(measured in a burst of 32 clients: about 18 refusals per answered call, each a hash and a
cache look-up of its texts on the CPU the model needs). `RetryLedger` remembers the texts
of callers told to come back until the time they were told, and each new hint counts them
as queued ahead, so refused callers return one after another.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass

from embedq.settings import ServerSettings, setting_field

from . import held
from .errors import RequestError, overloaded
from .registry import ServedModel

# Admit only what the estimate says finishes within this share of the time
# left: the estimate is an average, batches and replies add some latency, and a
# burst's refusals take CPU from the workers on a shared machine.
ADMIT_SHARE = 0.8
# Shortest retry-after hint: sooner would only be refused again.
MIN_RETRY_AFTER_MS = 50
# Texts of one call queued at once; the rest follow as these are answered,
# so a huge request shares the workers with the requests that come after it.
CALL_WINDOW = 256


@dataclass(frozen=True)
class QueueBounds:
    """Past these, new work is refused at once (RESOURCE_EXHAUSTED) rather
    than queued behind a growing latency."""

    # Jobs waiting in one model's stream, all servers together (XLEN).
    max_queued_jobs: int = setting_field("max_queued_jobs")
    # Texts this server waits for.
    max_pending_texts: int = setting_field("max_pending_texts")
    # Characters of those texts: a cheap stand-in for tokens (about 4 per token).
    max_pending_chars: int = setting_field("max_pending_chars")

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> QueueBounds:
        return cls(settings.max_queued_jobs, settings.max_pending_texts, settings.max_pending_chars)


@dataclass
class ModelLoad:
    """Work queued for one model, as one flush sees it."""

    jobs: int  # stream entries (XLEN), all servers
    texts: int  # texts queued or being encoded, all servers (the backlog counter)
    admitted: int = 0  # texts this flush admitted so far (not counted in `texts` yet)

    @property
    def ahead(self) -> int:
        return self.texts + self.admitted


def admit_limit(capacity: float, new: int, seconds_left: float) -> float:
    """The most texts that may be queued ahead of `new` ones for them to be encoded within
    `seconds_left` at `capacity` texts/s (inf: capacity not measured, admit)."""
    if capacity <= 0:
        return math.inf
    return capacity * seconds_left * ADMIT_SHARE - new


def late_refusal(
    model: str,
    capacity: float,
    queued: int,
    new: int,
    seconds_left: float,
    promised: int = 0,
) -> RequestError | None:
    """RESOURCE_EXHAUSTED when `new` texts behind `queued` ones cannot be encoded
    within `seconds_left` at `capacity` texts/s (0: not measured, admit). The hint
    also waits for `promised` texts: those of callers refused earlier and told to
    come back before this one (RetryLedger)."""
    if queued <= admit_limit(capacity, new, seconds_left):
        return None
    budget = seconds_left * ADMIT_SHARE
    if new / capacity > budget:
        return overloaded(
            f"{new} new texts need about {new / capacity:.1f}s at model {model!r}'s measured "
            f"{capacity:.0f} texts/s, more than the {seconds_left:.1f}s left before the "
            "deadline: split the request or allow more time"
        )
    # When enough of the queue will have drained for this request to fit, after the
    # callers already told to come back have taken their turn.
    wait_s = (queued + promised + new) / capacity - budget
    retry_after_ms = max(MIN_RETRY_AFTER_MS, math.ceil(wait_s * 1000))
    return overloaded(
        f"model {model!r} is busy: {queued} texts queued at {capacity:.0f} texts/s would not "
        f"finish within the {seconds_left:.1f}s left before the deadline; retry in "
        f"{retry_after_ms} ms",
        retry_after_ms=retry_after_ms,
    )


def broken_promise_refusal(
    model: str,
    capacity: float,
    queued: int,
    held: list[tuple[int, float]],
    new: int,
    promised: int = 0,
) -> RequestError | None:
    """RESOURCE_EXHAUSTED when `new` texts, taking turns with the texts admitted calls still
    hold back, would make one of those calls late that is on time without them. `held`: per
    such call, (texts held back, seconds left). A call's last text waits for the `queued`
    ones, its own, and each other held call's as far as they take turns (up to its own
    count); the new call takes turns with it likewise. A call already late is not protected:
    turning new callers away would not save it. The hint waits until the last call it would
    break has drained, after the `promised` texts of callers told to come back earlier."""
    if capacity <= 0:
        return None
    broken = [
        (ahead, mine)
        for mine, seconds_left in held
        if (ahead := queued + sum(min(theirs, mine) for theirs, _ in held))
        <= capacity * seconds_left * ADMIT_SHARE
        < ahead + min(new, mine)
    ]
    if not broken:
        return None
    ahead, mine = max(broken)
    retry_after_ms = max(MIN_RETRY_AFTER_MS, math.ceil((ahead + promised) / capacity * 1000))
    return overloaded(
        f"model {model!r} is busy: {new} new texts would take turns with the {mine} still "
        f"to come of an admitted call and make it miss its deadline; retry in "
        f"{retry_after_ms} ms",
        retry_after_ms=retry_after_ms,
    )


class RetryLedger:
    """Per model, the texts of refused callers until the time they were told to come back.
    After that time they are either queued (and counted by the backlog) or gone. One per
    server: callers refused by different servers are staggered per server only."""

    def __init__(self) -> None:
        # Per model: promises as a heap of (retry_at, texts), and the sum of their texts.
        self._promises: dict[str, list[tuple[float, int]]] = {}
        self._texts: dict[str, int] = {}

    def promise(self, model: str, retry_at: float, texts: int) -> None:
        """Record that a caller with `texts` new texts was told to come back at `retry_at`."""
        heapq.heappush(self._promises.setdefault(model, []), (retry_at, texts))
        self._texts[model] = self._texts.get(model, 0) + texts

    def pending(self, model: str, now: float) -> int:
        """Texts promised a later turn than `now` (expired promises are dropped)."""
        promises = self._promises.get(model)
        while promises and promises[0][0] <= now:
            self._texts[model] -= heapq.heappop(promises)[1]
        return self._texts.get(model, 0)


class Admission:
    """One server's admission: its bounds, the texts held back by admitted huge calls (its
    own and the other servers'), and the callers it told to come back."""

    def __init__(self, bounds: QueueBounds, held_back: held.HeldBack) -> None:
        self.bounds = bounds
        self.held_back = held_back
        self._ledger = RetryLedger()

    def refusal(
        self,
        model: ServedModel,
        load: ModelLoad,
        new: int,
        seconds_left: float,
        waiting: tuple[int, int],
    ) -> RequestError | None:
        """Why `new` texts (not cached, not in flight) of a call with `seconds_left` cannot be
        queued now for `model`, if they cannot; `waiting`: the texts this server waits for
        already, and their characters. The more new texts, the likelier a refusal (the
        dispatcher's one-trip routing relies on it)."""
        if new == 0:
            return None  # all already in flight: costs the queue nothing
        texts, chars = waiting
        if load.jobs >= self.bounds.max_queued_jobs:
            return overloaded(
                f"queue for model {model.name!r} is full ({load.jobs} jobs waiting); "
                "retry with backoff",
                retry_after_ms=1000,
            )
        if texts >= self.bounds.max_pending_texts or chars >= self.bounds.max_pending_chars:
            return overloaded(
                f"server is waiting for {texts} texts already; retry with backoff",
                retry_after_ms=1000,
            )
        promised = self._ledger.pending(model.name, time.monotonic())
        ahead = load.ahead + self.held_back.ahead_of(model.name, new, CALL_WINDOW)
        late = late_refusal(model.name, model.capacity, ahead, new, seconds_left, promised)
        return late or self._promise_refusal(model, load.ahead, new, promised)

    def _promise_refusal(
        self, model: ServedModel, queued: int, new: int, promised: int
    ) -> RequestError | None:
        """A call of more than one window takes turns with admitted huge calls' later
        windows: refused where that would make one of them late (a call of one window goes
        in ahead of their later windows, as small calls do: they keep their priority)."""
        if new <= CALL_WINDOW:
            return None
        now_ms = int(time.time() * 1000)
        calls = [
            (texts, held.seconds_left(deadline_ms, now_ms))
            for texts, deadline_ms in self.held_back.calls(model.name)
        ]
        return broken_promise_refusal(model.name, model.capacity, queued, calls, new, promised)

    def refused(self, model: str, refusal: RequestError, new: int) -> None:
        """A caller with `new` texts was refused: if told when to come back, the callers
        refused after it are told a later time (RetryLedger)."""
        if refusal.retry_after_ms:
            retry_at = time.monotonic() + refusal.retry_after_ms / 1000
            self._ledger.promise(model, retry_at, new)
