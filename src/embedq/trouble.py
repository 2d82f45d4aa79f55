"""Redis trouble, told apart from Redis refusing: one definition for the server, the workers
and the tools, so that what one retries another does not report as a bug.

Trouble (Redis out of reach, or a cluster between states) passes: retry, or tell the caller
UNAVAILABLE. A refusal (a wrong argument, a missing group, a full Redis: handled apart) would
be refused again.
"""

from __future__ import annotations

from redis.exceptions import (
    ClusterDownError,
    ReadOnlyError,
    RedisClusterUnreachableError,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)

# What a client raises when Redis cannot be reached or answer: redis-py's errors, the socket's,
# and a cluster's outage errors (no node answers; a slot without a master), which redis-py
# derives from RedisClusterException, not RedisError. Caught as (RedisError, OSError) alone, a
# whole cluster restarting was a bug to the worker's writer (its results dropped) and INTERNAL
# to callers.
REDIS_TROUBLE = (RedisError, OSError, RedisClusterUnreachableError, SlotNotCoveredError)

# Error replies that say Redis is between states, not that the command is wrong: a cluster
# master failing over (CLUSTERDOWN, MASTERDOWN), slots moving (TRYAGAIN), a master demoted
# under its clients (READONLY). The same command takes effect once it settles. (MOVED and ASK
# never reach us from a cluster client, which follows them; from a plain client they mean a
# cluster taken for a standalone Redis, which no retry mends.)
SETTLING = (ClusterDownError, TryAgainError, ReadOnlyError)


def unsent(reply: object) -> bool:
    """Whether a reply in place of a command's (a pipeline run without raising) says the
    command did not take effect and may when sent again: trouble, or Redis settling."""
    if isinstance(reply, ResponseError):
        return isinstance(reply, SETTLING)
    return isinstance(reply, REDIS_TROUBLE)
