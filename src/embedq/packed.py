"""Many Redis commands in one round trip: packed in C, sent in one piece, replies read raw.

A worker writes each forward pass's results as one batch of commands: a cache `SET` per
text, the replies, the acknowledgements. redis-py's pipeline wraps hiredis's packer in
Python per command (its command stack, 6 kB chunking, a response callback per reply); for
256 `SET`s of 1,536-byte vectors and one reply that was 10.8–15.3 µs of worker CPU a text
in user space, against 3.2–5.3 µs packing each command with hiredis and sending them joined
(system time the same, 4–6 µs: the bytes themselves; docs/benchmarks.md, 2026-12-06).
The worker's main loop and reader share its one interpreter, so this is time they get back.

Cluster clients (a batch's keys live on several nodes) and a redis-py without hiredis go
through redis-py's own pipeline, with the same results.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis
from redis.exceptions import DataError, ResponseError

try:
    from hiredis import pack_command
except ImportError:  # an optional speed-up of redis-py: without it, its pipeline does the work
    pack_command = None

Command = Sequence[Any]


def execute(client: Any, commands: Sequence[Command], *, raise_on_error: bool = True) -> list[Any]:
    """Run `commands` on a synchronous client in one round trip, as a non-transactional
    pipeline does: every command is sent and every reply read; the first error reply is
    raised after that (the other commands ran), naming its command; with `raise_on_error`
    false, error replies are returned in their places instead. Replies are raw (`b"OK"`,
    ints, bytes): no response callbacks."""
    if not commands:
        return []
    if pack_command is None or not isinstance(client, redis.Redis):
        return _through_pipeline(client, commands, raise_on_error)
    payload = _packed(commands)
    pool = client.connection_pool
    connection = pool.get_connection()
    try:
        # A list, not bytes: send_packed_command sends each item of a list with sendall.
        connection.send_packed_command([payload])
        replies = [_reply(connection) for _ in commands]
    except BaseException:
        # Replies may still be due on it: never hand it back to the pool half-read.
        connection.disconnect()
        raise
    finally:
        pool.release(connection)
    if not raise_on_error:
        return replies
    for index, reply in enumerate(replies):
        if isinstance(reply, ResponseError):
            # Named as redis-py's pipeline names it (the command, never its arguments).
            reply.args = (f"command #{index + 1} ({commands[index][0]}): {reply}", *reply.args[1:])
            raise reply
    return replies


def _packed(commands: Sequence[Command]) -> bytes:
    try:
        return b"".join(pack_command(tuple(command)) for command in commands)
    except TypeError as exc:  # what redis-py's own encoder raises for such an argument
        raise DataError(f"cannot send this argument to Redis: {exc}") from exc


def _reply(connection: Any) -> Any:
    try:
        return connection.read_response()
    except ResponseError as error:  # read the rest: their replies are on the socket
        return error


def _through_pipeline(client: Any, commands: Sequence[Command], raise_on_error: bool) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    for command in commands:
        pipe.execute_command(*command)
    return pipe.execute(raise_on_error=raise_on_error)
