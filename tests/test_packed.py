"""embedq.packed: many commands in one round trip, against a real Redis (the session's)."""

from __future__ import annotations

import uuid

import pytest
import redis

from embedq import packed


@pytest.fixture
def client(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    prefix = f"packed-{uuid.uuid4().hex[:8]}"
    yield client, prefix
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


def test_replies_come_in_order_and_every_command_runs(client) -> None:
    client, p = client
    vector = bytes(range(256)) * 6
    replies = packed.execute(
        client,
        [
            ("SET", f"{p}:a", vector, "EX", 60),
            ("XADD", f"{p}:s", "MAXLEN", "~", 100, "*", b"m", b"payload"),
            ("EXPIRE", f"{p}:s", 60),
            ("INCRBY", f"{p}:n", 5),
            ("DECRBY", f"{p}:n", 2),
            ("SMISMEMBER", f"{p}:none", 1, 2),
        ],
    )
    assert replies[0] == b"OK"
    assert isinstance(replies[1], bytes)  # the entry id
    assert replies[2:] == [1, 5, 3, [0, 0]]
    assert client.get(f"{p}:a") == vector
    assert 0 < client.ttl(f"{p}:a") <= 60
    assert client.xrange(f"{p}:s")[0][1] == {b"m": b"payload"}


def test_an_error_reply_is_raised_after_the_other_commands_ran(client) -> None:
    client, p = client
    client.set(f"{p}:text", "not a number")
    with pytest.raises(redis.ResponseError, match="not an integer"):
        packed.execute(
            client,
            [("SET", f"{p}:before", 1), ("INCR", f"{p}:text"), ("SET", f"{p}:after", 2)],
        )
    assert client.mget(f"{p}:before", f"{p}:after") == [b"1", b"2"]
    # Every reply was read: the pooled connection answers the next call, not the last one's.
    assert packed.execute(client, [("GET", f"{p}:after"), ("PING",)]) == [b"2", b"PONG"]


def test_a_connection_the_server_closed_is_replaced(client) -> None:
    client, p = client
    packed.execute(client, [("SET", f"{p}:k", 1)])
    own = client.connection_pool._available_connections[0]  # the one packed.execute used
    client.client_kill_filter(_id=_client_id(client, own))
    assert packed.execute(client, [("GET", f"{p}:k")]) == [b"1"]


def test_without_hiredis_the_pipeline_gives_the_same_effects(client, monkeypatch) -> None:
    client, p = client
    monkeypatch.setattr(packed, "pack_command", None)
    replies = packed.execute(client, [("SET", f"{p}:x", b"v", "EX", 60), ("INCRBY", f"{p}:n", 4)])
    assert replies == [True, 4]  # redis-py's pipeline applies its response callbacks
    assert client.get(f"{p}:x") == b"v"


def test_nothing_to_run_sends_nothing(client) -> None:
    assert packed.execute(client[0], []) == []


def _client_id(client: redis.Redis, connection) -> int:
    """The server-side id of one pooled connection (CLIENT ID sent on it)."""
    connection.send_command("CLIENT", "ID")
    return int(connection.read_response())
