"""Stream reads (XREAD, XREADGROUP) that keep working through a Redis Cluster failover.

redis-py's cluster clients find the keys of XREAD and XREADGROUP (commands whose keys
move) by asking the cluster's *default node* `COMMAND GETKEYS` before every read. When
that node is the master that died, every read fails with a ConnectionError before it
is sent, and nothing in that path refreshes the topology or picks another default node:
a server stopped hearing its replies, and workers stopped reading jobs, for as long as
no other command happened to fail on the dead node (seen for minutes). Here the node is
found from the client's own slot map instead; a read sent to a node that died fails in
the client's send path, which refreshes the topology, so the next read goes to the
promoted replica. Standalone clients read as usual. (It also saves the GETKEYS round
trip per read.)
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis


def _pieces(
    streams: dict[Any, Any], count: int | None, block_ms: int | None, group: tuple | None
) -> list[Any]:
    pieces: list[Any] = ["GROUP", *group] if group else []
    if count is not None:
        pieces += ["COUNT", str(count)]
    if block_ms is not None:
        pieces += ["BLOCK", str(block_ms)]
    return [*pieces, "STREAMS", *streams.keys(), *streams.values()]


def _node_of(client: Any, streams: dict[Any, Any]) -> Any:
    (key, *others) = streams
    if others:
        raise ValueError("one stream per read in a cluster (keys may live on different nodes)")
    return client.get_node_from_key(key)


def xreadgroup(
    client: redis.Redis,
    group: str,
    consumer: str,
    streams: dict[Any, Any],
    count: int | None = None,
    block_ms: int | None = None,
) -> Any:
    """XREADGROUP, as redis-py's `xreadgroup` returns it."""
    if not isinstance(client, redis.RedisCluster):
        return client.xreadgroup(group, consumer, streams, count=count, block=block_ms)
    pieces = _pieces(streams, count, block_ms, (group, consumer))
    return client.execute_command("XREADGROUP", *pieces, target_nodes=_node_of(client, streams))


async def xread(
    client: aioredis.Redis,
    streams: dict[Any, Any],
    count: int | None = None,
    block_ms: int | None = None,
) -> Any:
    """XREAD, as redis-py's asyncio `xread` returns it."""
    if not isinstance(client, aioredis.RedisCluster):
        return await client.xread(streams, count=count, block=block_ms)
    await client.initialize()  # a no-op once the slot map is loaded
    pieces = _pieces(streams, count, block_ms, None)
    node = _node_of(client, streams)
    return await client.execute_command("XREAD", *pieces, target_nodes=node)
