"""Every Redis key name and message format embedq uses, in one place.

Servers and workers only talk through these keys; the payloads are the
protobuf messages of protos/embedq/internal/v1/queue.proto (never pickle).

Keys of one model share the hash tag ``{<model>}`` so that the job stream,
its dead-letter stream and the worker heartbeats live in one Redis Cluster
slot. Cache keys carry no tag: the cache spreads over the cluster.
"""

from __future__ import annotations

import enum
import functools
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from embedq.internal.v1 import queue_pb2

DEFAULT_NAMESPACE = "embedq"
CONSUMER_GROUP = "workers"
# Field name of the single protobuf payload inside a stream entry.
PAYLOAD_FIELD = b"m"

# A server's reply stream, its cancelled set and its write markers outlive the
# server by this much (renewed while it runs), then Redis drops them.
REPLY_TTL_S = 300
# Bound on a reply stream whose server stopped reading (XADD MAXLEN ~).
REPLY_MAXLEN = 100_000
# Bound on a model's dead-letter stream (XADD MAXLEN).
DEAD_LETTER_MAXLEN = 10_000

# Why an item or a request failed (queue.proto's ErrorKind, without the
# ERROR_KIND_ prefix): built from the .proto so the set is declared once. Workers
# put it in Failure.kind; server/errors.py maps it to gRPC and HTTP statuses.
ErrorKind = enum.IntEnum(
    "ErrorKind",
    {
        name.removeprefix("ERROR_KIND_"): number
        for name, number in queue_pb2.ErrorKind.items()
        if number != queue_pb2.ERROR_KIND_UNSPECIFIED
    },
    module=__name__,
)


def text_sha256(text: str) -> str:
    """Hex SHA-256 of the text's UTF-8 bytes: the public cache hash rule."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def texts_sha256(texts: Iterable[str]) -> list[str]:
    """text_sha256 of each text, without a Python call per text (a server hashes every text
    of every call, refused ones included: measured, 94 -> 80 us for 256 texts)."""
    sha256 = hashlib.sha256
    return [sha256(text.encode("utf-8")).hexdigest() for text in texts]


# Cached: servers and workers ask for it per message or per text, with few option sets.
@functools.lru_cache(maxsize=1024)
def variant_fingerprint(
    model_fingerprint: str, *, normalize: bool, truncate: bool, prompt: str = ""
) -> str:
    """Fingerprint of one output variant of a model (see the .proto hash rule)."""
    material = f"{model_fingerprint}|normalize={int(normalize)}|truncate={int(truncate)}"
    if prompt:
        material += f"|prompt={text_sha256(prompt)}"
    return hashlib.sha256(material.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Keys:
    """Key names under one namespace."""

    namespace: str = DEFAULT_NAMESPACE

    def models(self) -> str:
        """Hash: model name -> ModelRegistration bytes."""
        return f"{self.namespace}:v1:models"

    def jobs(self, model: str) -> str:
        """Stream of Job messages for one model, read by the worker group."""
        return f"{self.namespace}:v1:{{{model}}}:jobs"

    def dead_letters(self, model: str) -> str:
        """Stream of jobs that failed too often."""
        return f"{self.namespace}:v1:{{{model}}}:dead"

    def workers(self, model: str) -> str:
        """Sorted set: worker id -> last heartbeat (Unix seconds)."""
        return f"{self.namespace}:v1:{{{model}}}:workers"

    def held(self, model: str) -> str:
        """Hash: server id -> HeldCalls, the admitted calls that server still holds texts
        back for (refreshed every second while it has any; stale past its expiry)."""
        return f"{self.namespace}:v1:{{{model}}}:held"

    def backlog(self, model: str) -> str:
        """Counter: texts queued or being encoded for one model, all servers together
        (INCRBY by servers with each XADD, DECRBY by workers with each XACK; reset to 0
        by an idle worker when the stream is empty, so that a crash cannot skew it)."""
        return f"{self.namespace}:v1:{{{model}}}:backlog"

    def rates(self, model: str) -> str:
        """Hash: worker id -> measured capacity in texts per second (ASCII float)."""
        return f"{self.namespace}:v1:{{{model}}}:rates"

    def replies(self, server_id: str) -> str:
        """Stream of Reply messages for one server instance; expires with it."""
        return f"{self.namespace}:v1:{{reply-{server_id}}}:replies"

    def job_marker(self, model: str, server_id: str) -> str:
        """One server's write marker beside (same slot as) a model's job stream: the
        sequence number of its last flush there. Gone or behind after a failover or
        restart means jobs that server queued were lost (server/queue.py)."""
        return f"{self.namespace}:v1:{{{model}}}:marker:{server_id}"

    @staticmethod
    def reply_marker(reply_key: str) -> str:
        """The same marker beside a server's reply stream (replies lost when it is)."""
        return f"{reply_key}:marker"

    @staticmethod
    def cancelled(reply_key: str) -> str:
        """Set of ticket ids whose callers gave up; beside (same slot as) the
        reply stream they would have been answered on, and expiring with it."""
        return f"{reply_key}:cancelled"

    def cache(self, variant: str, sha256_hex: str) -> str:
        """Cache entry: raw little-endian float32 vector bytes."""
        return self.cache_prefix(variant) + sha256_hex

    def cache_prefix(self, variant: str) -> str:
        """What every cache key of `variant` starts with (the text's hash follows): built
        once per call, not once per text, on the servers' look-up path."""
        return f"{self.namespace}:v1:emb:{variant}:"

    def cache_pattern(self) -> str:
        """SCAN MATCH pattern of every cache entry of this namespace (all variants)."""
        return f"{_glob_escape(self.namespace)}:v1:emb:*"


# KEYS[1] = jobs stream, KEYS[2] = backlog counter: zero the counter when nothing
# is queued or being encoded (entries are deleted on acknowledgement), atomically.
RESET_IDLE_BACKLOG_LUA = """
if redis.call('XLEN', KEYS[1]) == 0 then
  redis.call('SET', KEYS[2], 0)
  return 1
end
return 0
"""

# Trailing metadata of a RESOURCE_EXHAUSTED refusal: when to try again (ASCII ms).
RETRY_AFTER_MS_KEY = "retry-after-ms"


def _glob_escape(text: str) -> str:
    """`text` matched literally in a Redis glob pattern."""
    return "".join(f"\\{ch}" if ch in "*?[]\\" else ch for ch in text)


def encode_message(message: object) -> dict[bytes, bytes]:
    """Stream entry fields for a protobuf message."""
    return {PAYLOAD_FIELD: message.SerializeToString()}  # type: ignore[attr-defined]


def decode_job(fields: dict[bytes, bytes]) -> queue_pb2.Job:
    return queue_pb2.Job.FromString(fields[PAYLOAD_FIELD])


def decode_reply(fields: dict[bytes, bytes]) -> queue_pb2.Reply:
    return queue_pb2.Reply.FromString(fields[PAYLOAD_FIELD])


def decode_registration(raw: bytes) -> queue_pb2.ModelRegistration:
    return queue_pb2.ModelRegistration.FromString(raw)
