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
    connection_id = _pooled_connection_id(client)
    with pytest.raises(redis.ResponseError, match=r"command #2 \(INCR\): .*not an integer"):
        packed.execute(
            client,
            [("SET", f"{p}:before", 1), ("INCR", f"{p}:text"), ("SET", f"{p}:after", 2)],
        )
    assert client.mget(f"{p}:before", f"{p}:after") == [b"1", b"2"]
    # Every reply was read: the same pooled connection (not a new one) answers the next
    # call with its own replies, not the last one's leftovers.
    assert packed.execute(client, [("GET", f"{p}:after"), ("PING",)]) == [b"2", b"PONG"]
    assert _pooled_connection_id(client) == connection_id


@pytest.mark.parametrize("hiredis", [True, False], ids=["packed", "pipeline"])
def test_error_replies_can_be_returned_in_their_places(client, monkeypatch, hiredis) -> None:
    client, p = client
    if not hiredis:
        monkeypatch.setattr(packed, "pack_command", None)
    client.set(f"{p}:text", "not a number")
    replies = packed.execute(
        client, [("INCR", f"{p}:text"), ("INCRBY", f"{p}:n", 3)], raise_on_error=False
    )
    assert isinstance(replies[0], redis.ResponseError)
    assert "not an integer" in str(replies[0])
    assert replies[1] == 3


def test_a_connection_the_server_closed_is_replaced(client, redis_server) -> None:
    client, p = client
    packed.execute(client, [("SET", f"{p}:k", 1)])
    connection_id = _pooled_connection_id(client)
    with redis.Redis.from_url(redis_server.url) as other:
        assert other.client_kill_filter(_id=connection_id) == 1
    assert packed.execute(client, [("GET", f"{p}:k")]) == [b"1"]
    assert _pooled_connection_id(client) != connection_id


def test_an_argument_redis_cannot_take_is_a_redis_error(client) -> None:
    client, p = client
    with pytest.raises(redis.DataError):
        packed.execute(client, [("SET", f"{p}:k", None)])
    assert packed.execute(client, [("PING",)]) == [b"PONG"]


def test_without_hiredis_the_pipeline_gives_the_same_effects(client, monkeypatch) -> None:
    client, p = client
    monkeypatch.setattr(packed, "pack_command", None)
    replies = packed.execute(client, [("SET", f"{p}:x", b"v", "EX", 60), ("INCRBY", f"{p}:n", 4)])
    assert replies == [True, 4]  # redis-py's pipeline applies its response callbacks
    assert client.get(f"{p}:x") == b"v"


def test_nothing_to_run_sends_nothing(client) -> None:
    assert packed.execute(client[0], []) == []


def _pooled_connection_id(client: redis.Redis) -> int:
    """The server-side id of the connection packed.execute uses (the pool's only one)."""
    (reply,) = packed.execute(client, [("CLIENT", "ID")])
    return int(reply)
