"""What the server knows about the served models, read from Redis.

Workers publish a ModelRegistration per model and a heartbeat per worker;
the server refreshes its view in the background so that requests never pay
a Redis round trip for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError

from embedq.internal.v1 import queue_pb2
from embedq.keys import Keys, decode_registration
from embedq.trouble import REDIS_TROUBLE

from .errors import invalid, not_found, unavailable
from .supervise import Throttled

log = logging.getLogger(__name__)

# How long a model whose registration vanished while it had live workers is still served:
# a Redis that restarted empty holds no registrations until each worker's next heartbeat
# (1 s, after its reconnect) re-publishes its own. Short, because meanwhile the model counts
# its old workers as alive: if they are really gone, calls wait instead of being refused.
REPUBLISH_GRACE_S = 5.0


@dataclass(frozen=True)
class ServedModel:
    registration: queue_pb2.ModelRegistration
    workers_alive: int
    # Texts per second the live workers measured (0: not measured yet).
    capacity: float = 0.0

    @property
    def name(self) -> str:
        return self.registration.name


def _served(reg: queue_pb2.ModelRegistration, live: list, rates: dict) -> ServedModel:
    """A model with its live workers and their measured capacity (workers not
    measured yet, say just started, count as the average of the others)."""
    measured = []
    for worker in live:
        with contextlib.suppress(KeyError, ValueError):
            measured.append(float(rates[worker]))
    capacity = sum(measured) / len(measured) * len(live) if measured else 0.0
    return ServedModel(reg, len(live), capacity)


class ModelRegistry:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        *,
        default_model: str = "",
        worker_stale_s: float = 15.0,
        republish_grace_s: float = REPUBLISH_GRACE_S,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._default = default_model
        self._stale_s = worker_stale_s
        self._models: dict[str, ServedModel] = {}
        self._grace_s = republish_grace_s
        # When the models kept by _keep_vanished were first found missing.
        self._vanished_at: dict[str, float] = {}
        self.redis_ok = False
        self._throttled = Throttled(log)

    @property
    def models(self) -> dict[str, ServedModel]:
        return self._models

    @property
    def default_name(self) -> str:
        if self._default:
            return self._default
        if len(self._models) == 1:
            return next(iter(self._models))
        return ""

    async def refresh(self, now: float | None = None) -> None:
        """Read the registrations and live workers (as of `now`, Unix seconds; tests
        pass their own clock)."""
        now = time.time() if now is None else now
        raw = await self._redis.hgetall(self._keys.models())
        registrations = []
        for name, value in raw.items():
            try:
                registrations.append(decode_registration(value))
            except DecodeError:  # one bad entry must not hide the others
                self._throttled.warning(
                    f"bad-registration-{name!r}",
                    "skipped registration %r: not a ModelRegistration",
                    name,
                )
        since = now - self._stale_s
        async with self._redis.pipeline(transaction=False) as pipe:
            for reg in registrations:
                pipe.zrangebyscore(self._keys.workers(reg.name), since, "+inf")
                pipe.hgetall(self._keys.rates(reg.name))
            results = await pipe.execute()
        models = {
            reg.name: _served(reg, live, rates)
            for reg, live, rates in zip(registrations, results[::2], results[1::2], strict=True)
        }
        self._models = self._keep_vanished(models, now)

    def _keep_vanished(self, models: dict[str, ServedModel], now: float) -> dict[str, ServedModel]:
        """`models` plus those that vanished from Redis while they had live workers, for
        REPUBLISH_GRACE_S from the first refresh that missed them (not from the last that
        saw them: an outage longer than the grace must not use it up), so that calls sent
        before the workers re-publish are queued rather than refused."""
        kept = dict(models)
        vanished_at: dict[str, float] = {}
        for name, model in self._models.items():
            if name in models or not model.workers_alive:
                continue
            since = self._vanished_at.get(name, now)
            if now - since < self._grace_s:
                kept[name] = model
                vanished_at[name] = since
        self._vanished_at = vanished_at
        return kept

    async def run(self, interval_s: float = 1.0) -> None:
        """Refresh forever; a Redis outage only marks the registry stale (logged at
        most once per 10 s). Other exceptions reach the supervisor (server/supervise.py)."""
        while True:
            try:
                await self.refresh()
                if not self.redis_ok:
                    self._throttled.log(logging.INFO, "redis-back", "redis reachable again")
                self.redis_ok = True
            except REDIS_TROUBLE as exc:
                self._throttled.warning(
                    "refresh", "redis unreachable while refreshing models: %s", type(exc).__name__
                )
                self.redis_ok = False
            await asyncio.sleep(interval_s)

    def resolve(self, name: str) -> ServedModel:
        """The served model a request names (or the default), or a clear error."""
        wanted = name or self.default_name
        if not self._models and not self.redis_ok:
            raise unavailable("redis unavailable (the server log says why)")
        if not self._models:
            raise unavailable("no model is registered yet: start a worker (embedq worker)")
        if not wanted:
            served = ", ".join(sorted(self._models))
            raise invalid(f"several models are served ({served}): set options.model")
        model = self._models.get(wanted)
        if model is None:
            served = ", ".join(sorted(self._models))
            raise not_found(f"unknown model {wanted!r}; served: {served}")
        return model
