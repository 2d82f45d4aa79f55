"""Look-up, admission and enqueue of a flush in one Redis round trip, when its texts are new.

A flush usually takes two round trips: `MGET` the cache (with the queue's length, for
admission), then `XADD` the misses. For a lone request, or a waiting consumer's next text,
that second trip was half a millisecond of its latency on a 2-core host (`MGET` 0.50 ms,
`XADD` 0.52 ms; docs/benchmarks.md, 2026-12-06, seventh session). So while most recent
look-ups found nothing cached, the dispatcher routes the flush as if nothing were cached and
sends this script: it looks the texts up and reads each model's queue, and only if no text
was cached and every model's backlog is still within the limit the dispatcher computed (the
admission test, inverted) does it queue the jobs, exactly as the two-trip path would (marker
`GET`s, `XADD` and `INCRBY` per job, marker `SET`s). Otherwise it writes nothing and returns
what it read, and the flush goes on the usual way from there: no round trip is lost.

Standalone Redis only: a cluster's cache keys and streams live in different slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# KEYS: the cache keys; then each model's job stream and backlog counter; then the markers.
# ARGV: cache keys, models, max jobs, seq, marker TTL, payload field, each model's backlog
# limit, then per job: its model (1-based), its texts, its payload.
SCRIPT = """
local n, m = tonumber(ARGV[1]), tonumber(ARGV[2])
local max_jobs, seq, ttl, field = tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6]
local values = {}
if n > 0 then values = redis.call('MGET', unpack(KEYS, 1, n)) end
local write = true
for i = 1, n do
  if values[i] then write = false end
end
local counts = {}
for j = 1, m do
  local jobs = redis.call('XLEN', KEYS[n + 2 * j - 1])
  local backlog = tonumber(redis.call('GET', KEYS[n + 2 * j]) or '0') or 0
  counts[2 * j - 1], counts[2 * j] = jobs, backlog
  if jobs >= max_jobs or backlog > tonumber(ARGV[6 + j]) then write = false end
end
if not write then return {values, counts} end
local markers = {}
for i = n + 2 * m + 1, #KEYS do markers[#markers + 1] = redis.call('GET', KEYS[i]) end
for a = 7 + m, #ARGV, 3 do
  local j = tonumber(ARGV[a])
  redis.call('XADD', KEYS[n + 2 * j - 1], '*', field, ARGV[a + 2])
  redis.call('INCRBY', KEYS[n + 2 * j], ARGV[a + 1])
end
for i = n + 2 * m + 1, #KEYS do redis.call('SET', KEYS[i], seq, 'EX', ttl) end
return {values, counts, markers}
"""

# A backlog limit that never binds (capacity not measured): Lua numbers are doubles.
NO_LIMIT = 2**52


@dataclass(frozen=True)
class ModelQueue:
    """One model's keys and the backlog (texts) under which the flush is still admitted."""

    name: str
    jobs_key: str
    backlog_key: str
    limit: float  # inf: no limit (capacity not measured)

    def limit_arg(self) -> int:
        """The limit for the script: an integer (backlogs are), -1 where even none fits."""
        return NO_LIMIT if math.isinf(self.limit) else max(-1, math.floor(self.limit))


@dataclass(frozen=True)
class Job:
    model: str
    texts: int
    payload: bytes


@dataclass(frozen=True)
class Trip:
    cache_keys: list[str]
    models: list[ModelQueue]
    max_jobs: int
    jobs: list[Job]
    markers: list[str]
    seq: int
    ttl_s: int
    field: bytes

    def keys(self) -> list[str]:
        queues = [key for model in self.models for key in (model.jobs_key, model.backlog_key)]
        return [*self.cache_keys, *queues, *self.markers]

    def args(self) -> list[object]:
        limits = [model.limit_arg() for model in self.models]
        number = {model.name: index for index, model in enumerate(self.models, start=1)}
        head = [len(self.cache_keys), len(self.models), self.max_jobs, self.seq, self.ttl_s]
        jobs = [(number[job.model], job.texts, job.payload) for job in self.jobs]
        return [*head, self.field, *limits, *(arg for job in jobs for arg in job)]


@dataclass(frozen=True)
class TripReply:
    values: list[bytes | None]  # the cache's value per cache key
    counts: list[int]  # per model: jobs queued (XLEN), then texts queued (backlog)
    markers: list | None  # the markers' values before the writes; None: nothing written

    @classmethod
    def parse(cls, reply: list) -> TripReply:
        values, counts, *written = reply
        return cls(list(values), [int(count) for count in counts], written[0] if written else None)
