"""Retries of refused calls: which errors, how long to wait, when to give up.

A call that fails with UNAVAILABLE (no live worker, Redis briefly away, the
server restarting) or RESOURCE_EXHAUSTED (queue full, or work that cannot
finish in time now) is sent again after an exponential backoff with jitter,
or after the server's own ``retry-after-ms`` hint when its trailing metadata
carries one; never past the call's deadline and at most ``max_attempts``
times in all. The unary RPCs are idempotent (vectors are cached by the
text's hash), so sending one again is safe.

This lives in the client rather than in gRPC's service-config
``retryPolicy``: gRPC's retries honour only its own ``grpc-retry-pushback-ms``
and not our ``retry-after-ms`` hint, and the chunks of one call share the
caller's one deadline, which the loop here budgets. gRPC's transparent
retries (of calls that never reached the server) stay on as they are.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import grpc

# Trailing metadata key of the server's hint: ASCII integer milliseconds.
RETRY_AFTER_KEY = "retry-after-ms"
# A hint past this is not believed (a typo or a bug, not a plan).
MAX_HINT_S = 3600.0
# An attempt is not started with less than this left before the call's deadline: on a busy
# machine it could only end in DEADLINE_EXCEEDED, hiding the refusal the caller needs to see
# (a test saw "Deadline Exceeded" instead of "no worker alive" when the fourth attempt of a
# 1.5 s call started with a few ms left).
MIN_ATTEMPT_S = 0.1
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
# RESOURCE_EXHAUSTED that grpc raises on this side for an over-sized message:
# sending the same message again cannot help.
_LOCAL_SIZE_ERRORS = ("Received message larger than max", "Sent message larger than max")


@dataclass(frozen=True)
class RetryPolicy:
    """How a call refused with a retryable status is sent again.

    Attempt ``n`` (n >= 2) follows a pause of ``min(initial_backoff *
    multiplier ** (n - 2), max_backoff)`` seconds, scaled by a random factor
    in ``[1 - jitter, 1 + jitter]`` so that many clients refused at once do
    not come back at once. A ``retry-after-ms`` hint from the server replaces
    that pause (jitter only lengthens it). The call gives up, raising the last
    error at once, after ``max_attempts`` attempts in all, or when the pause
    would end past the call's deadline or less than ``MIN_ATTEMPT_S`` before it.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.2
    multiplier: float = 2.0
    max_backoff: float = 5.0
    jitter: float = 0.2
    codes: frozenset[grpc.StatusCode] = field(default=RETRYABLE_CODES)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1 (1: no retries)")
        if self.initial_backoff < 0 or self.max_backoff < 0:
            raise ValueError("backoffs must be >= 0")
        if self.multiplier < 1:
            raise ValueError("multiplier must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be between 0 and 1")
        object.__setattr__(self, "codes", frozenset(self.codes))

    @property
    def enabled(self) -> bool:
        return self.max_attempts > 1 and bool(self.codes)

    def backoff(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Pause in seconds before attempt ``attempt`` (2, 3, ...) without a hint."""
        nominal = min(self.initial_backoff * self.multiplier ** (attempt - 2), self.max_backoff)
        return nominal * (1 - self.jitter + 2 * self.jitter * rand())

    def pause(
        self,
        attempt: int,
        error: BaseException,
        remaining: float | None,
        rand: Callable[[], float] = random.random,
    ) -> float | None:
        """Seconds to wait before attempt ``attempt`` after ``error``, or None: give up.

        ``remaining``: seconds left until the call's deadline (None: none).
        """
        if attempt > self.max_attempts or not retryable(error, self.codes):
            return None
        hint = retry_after(_trailing_metadata(error))
        # The hint replaces the backoff; jitter only lengthens it.
        delay = self.backoff(attempt, rand) if hint is None else hint * (1 + self.jitter * rand())
        if remaining is not None and delay + MIN_ATTEMPT_S > remaining:
            return None  # the next attempt would start past the deadline, or just before it
        return delay


NO_RETRY = RetryPolicy(max_attempts=1)
DEFAULT_RETRY = RetryPolicy()


def resolve(retry: RetryPolicy | bool | None) -> RetryPolicy:
    """The policy a client uses: True/None the default, False none at all."""
    if retry is None or retry is True:
        return DEFAULT_RETRY
    if retry is False:
        return NO_RETRY
    if isinstance(retry, RetryPolicy):
        return retry
    raise TypeError(f"retry must be a RetryPolicy or a bool, not {type(retry).__name__}")


def retry_after(metadata: Iterable[tuple[str, str | bytes]] | None) -> float | None:
    """The server's ``retry-after-ms`` hint in seconds; None when absent or malformed."""
    for key, value in metadata or ():
        if key.lower() != RETRY_AFTER_KEY:
            continue
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        text = value.strip()
        if not text.isascii() or not text.isdigit():
            return None
        seconds = int(text) / 1000
        return seconds if seconds <= MAX_HINT_S else None
    return None


def retryable(error: BaseException, codes: frozenset[grpc.StatusCode] = RETRYABLE_CODES) -> bool:
    """Whether a failed call may be sent again under a policy retrying ``codes``."""
    code = _code(error)
    if code not in codes:
        return False
    too_big = _details(error).startswith(_LOCAL_SIZE_ERRORS)
    return not (code == grpc.StatusCode.RESOURCE_EXHAUSTED and too_big)


def _code(error: BaseException) -> grpc.StatusCode | None:
    code = getattr(error, "code", None)
    return code() if callable(code) else code


def _details(error: BaseException) -> str:
    details = getattr(error, "details", None)
    details = details() if callable(details) else details
    return str(details or "")


def _trailing_metadata(error: BaseException) -> tuple[tuple[str, str | bytes], ...]:
    getter = getattr(error, "trailing_metadata", None)
    try:
        metadata = getter() if callable(getter) else None
    except Exception:  # a bare RpcError, or a call that has none yet
        metadata = None
    return metadata_pairs(metadata)


def metadata_pairs(metadata: object) -> tuple[tuple[str, str | bytes], ...]:
    """grpc's metadata (tuples of _Metadatum, or grpc.aio.Metadata) as plain pairs."""
    if not metadata or not isinstance(metadata, Iterable):
        return ()
    pairs = []
    for item in metadata:
        try:
            key, value = item
        except (TypeError, ValueError):
            continue
        pairs.append((str(key), value))
    return tuple(pairs)
