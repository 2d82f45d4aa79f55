"""Admitted huge calls' held-back texts, shared between servers.

A call of more than CALL_WINDOW new texts is queued a window at a time, so most of its texts
are in no backlog counter yet: they sit in its server's memory. Its own server counts them
when it admits later calls (HeldBack, for server/admission.py's Admission); every other server
sees them through the model's held hash (`Keys.held`), where each server keeps one field:
HeldCalls, the texts each of its calls still holds back and that call's deadline. A server
publishes at once when it admits such a call and refreshes every second while it holds any;
a field past its expiry (a server that stopped or died) is ignored, and removed once it is
long expired by the next server whose look-up of a huge call reads it. The figures are up to
a second old: texts only leave a held call, so an old figure errs on the side of refusing.
Expiry and deadlines are Unix times from the writer's clock, compared with the reader's:
servers' clocks must agree to well under VALID_S (NTP); a reader 3 s ahead would never count
a live server's calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

import redis.asyncio as aioredis

from embedq.internal.v1 import queue_pb2
from embedq.keys import Keys
from embedq.logs import Throttled
from embedq.trouble import REDIS_TROUBLE

# How often a server refreshes its field while it holds texts back, and how long a field
# stays valid unrefreshed (a few missed refreshes: a busy event loop, a slow Redis).
REFRESH_S = 1.0
VALID_S = 3.0
# A field expired this long ago is removed by whoever reads it: its server is gone (one
# merely stalled for a few seconds, or whose clock is a little behind, is left alone: its
# refresh could land just before the removal).
FORGET_AFTER_S = 30.0
# The hash's TTL, renewed by every refresh: it goes once no server has refreshed it a while.
HASH_TTL_S = 60

# (texts held back, deadline in Unix ms) of one call.
Held = tuple[int, int]


def encode(calls: Iterable[Held], now_ms: int | None = None) -> bytes:
    """This server's field: its held calls, valid for VALID_S."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    return queue_pb2.HeldCalls(
        expires_unix_ms=now_ms + int(VALID_S * 1000),
        calls=[queue_pb2.HeldCall(texts=t, deadline_unix_ms=d) for t, d in calls if t > 0],
    ).SerializeToString()


def others(fields: Mapping[bytes, bytes], own_id: str, now_ms: int | None = None) -> list[Held]:
    """The held calls of every other server whose field is still valid, and whose deadline
    has not passed (their texts will never be queued)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    own = own_id.encode()
    return [
        (call.texts, call.deadline_unix_ms)
        for server, calls in _valid(fields, now_ms).items()
        if server != own
        for call in calls.calls
        if call.deadline_unix_ms > now_ms
    ]


def stale(fields: Mapping[bytes, bytes], own_id: str, now_ms: int | None = None) -> list[bytes]:
    """Other servers' fields expired FORGET_AFTER_S ago or unreadable: servers that stopped
    for good. Removed by whoever sees them, else the hash keeps them while any server holds
    calls."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    recent = _valid(fields, now_ms - int(FORGET_AFTER_S * 1000))
    own = own_id.encode()
    return [server for server in fields if server not in recent and server != own]


def _valid(fields: Mapping[bytes, bytes], now_ms: int) -> dict[bytes, queue_pb2.HeldCalls]:
    """The fields that parse and have not expired. One that does not parse counts as none
    (its server replaces it within a second, or it goes as stale)."""
    valid = {}
    for server, value in fields.items():
        try:
            calls = queue_pb2.HeldCalls.FromString(value)
        except Exception:  # noqa: BLE001 - any bytes: a DecodeError, or worse from upb
            continue
        if calls.expires_unix_ms > now_ms:
            valid[server] = calls
    return valid


def seconds_left(deadline_unix_ms: int, now_ms: int | None = None) -> float:
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    return (deadline_unix_ms - now_ms) / 1000


class SharedHeld:
    """One server's side of the held hashes: its own calls published, the other servers'
    as its look-ups read them. `own()` gives this server's held calls per model (models
    holding none left out); `changed` is set when they gain or lose a call."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        server_id: str,
        own: Callable[[], dict[str, list[Held]]],
    ) -> None:
        self._redis, self._keys, self._server_id, self._own = redis, keys, server_id, own
        self.remote: dict[str, list[Held]] = {}  # per model, as last read
        self.changed = asyncio.Event()
        self._stale: dict[str, list[bytes]] = {}  # long-expired fields seen: to remove
        self._published: set[str] = set()  # models whose hash holds this server's field

    def read(self, model: str, fields: Mapping[bytes, bytes]) -> None:
        """Take in a look-up's HGETALL of the model's hash."""
        now_ms = int(time.time() * 1000)
        self.remote[model] = others(fields, self._server_id, now_ms)
        self._stale[model] = stale(fields, self._server_id, now_ms)

    async def run(self, throttled: Throttled) -> None:
        """Publish at once when `changed`, else every REFRESH_S; forever."""
        while True:
            with contextlib.suppress(asyncio.TimeoutError):  # not TimeoutError before 3.11
                await asyncio.wait_for(self.changed.wait(), REFRESH_S)
            self.changed.clear()
            try:
                await self.publish()
            except REDIS_TROUBLE as exc:
                throttled.warning(
                    "held", "publishing held-back texts failed (%s); retrying", type(exc).__name__
                )

    async def publish(self) -> None:
        own = self._own()
        gone = self._published - own.keys()
        stale_fields, self._stale = self._stale, {}
        if not own and not gone and not any(stale_fields.values()):
            return
        # Before the writes: one that lands even where the pipeline then fails (or stop()
        # cancels it) is still removed later.
        self._published |= own.keys()
        async with self._redis.pipeline(transaction=False) as pipe:
            for model, fields in stale_fields.items():  # else kept while others hold
                if fields:
                    pipe.hdel(self._keys.held(model), *fields)
            for model, calls in own.items():
                pipe.hset(self._keys.held(model), self._server_id, encode(calls))
                pipe.expire(self._keys.held(model), HASH_TTL_S)
            for model in gone:
                pipe.hdel(self._keys.held(model), self._server_id)
            await pipe.execute()
        self._published = set(own)

    async def withdraw(self) -> None:
        """On a clean stop: this server's fields go (else they expire on their own)."""
        for model in self._published:
            await self._redis.hdel(self._keys.held(model), self._server_id)


class Windowed(Protocol):
    """An admitted call queued a window at a time (server/queue.py's Call)."""

    deadline_unix_ms: int
    unrouted: list[int]  # its rows not queued yet


class HeldBack:
    """Per model, the admitted calls of more than one window that still hold texts back:
    this server's, kept here until their last window is queued, and the other servers', as
    `shared` last read them (and publishes this server's)."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, server_id: str) -> None:
        self._calls: dict[str, dict[int, Windowed]] = {}
        self.shared = SharedHeld(redis, keys, server_id, self.all_own)

    def add(self, model: str, call: Windowed) -> None:
        self._calls.setdefault(model, {})[id(call)] = call
        self.shared.changed.set()  # the other servers' admission counts it too

    def discard(self, model: str, call: Windowed) -> None:
        if self._calls.get(model, {}).pop(id(call), None) is not None:
            self.shared.changed.set()  # the other servers stop counting it

    def own(self, model: str) -> list[Held]:
        return [(len(c.unrouted), c.deadline_unix_ms) for c in self._calls.get(model, {}).values()]

    def all_own(self) -> dict[str, list[Held]]:
        return {model: self.own(model) for model, calls in self._calls.items() if calls}

    def calls(self, model: str) -> list[Held]:
        """(texts held back, deadline) of every such call: this server's, then the other
        servers' as last read."""
        return self.own(model) + self.shared.remote.get(model, [])

    def ahead_of(self, model: str, new: int, window: int) -> int:
        """Texts held back that a call of `new` texts would wait for besides the queued ones
        (which the backlog counter counts). A call of at most one `window` is queued at once,
        behind those, and waits for none of them. A bigger one's later windows take turns
        with theirs (each refill of theirs can go in before its next window), so each such
        call's texts count up to `new`: calls of the same size wait for each other's all."""
        if new <= window:
            return 0
        return sum(min(texts, new) for texts, _ in self.calls(model))
