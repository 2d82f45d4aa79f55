"""One error taxonomy: ErrorKind (queue.proto) is what server and workers say,
server/errors.py alone turns it into a gRPC status, and the client maps the
public codes back in one place."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest
import redis
from embedq.client._errors import EmbedqError
from embedq.server.errors import (
    INTERNAL_MESSAGE,
    RequestError,
    as_request_error,
    error_of_failure,
    grpc_status,
    http_status,
    kind_of_status,
)

from embedq.internal.v1 import queue_pb2
from embedq.keys import ErrorKind

ROOT = Path(__file__).resolve().parents[1]
# Naming a status member (grpc.StatusCode.X, StatusCode.X) or aliasing the enum.
STATUS_USE = re.compile(r"\bStatusCode\.[A-Z]|=\s*grpc\.StatusCode\b")
# The one mapping, and the files that may still name statuses, with why.
ALLOWED = {
    "server/errors.py": "the one ErrorKind -> gRPC status mapping",
    "server/metrics.py": "labels finished calls with the status they ended with; chooses none",
}


def status_uses() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for folder in ("server", "workers"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            lines = path.read_text(encoding="utf-8").splitlines()
            hits = [
                f"{n}: {line.strip()}" for n, line in enumerate(lines, 1) if STATUS_USE.search(line)
            ]
            if hits:
                found[str(path.relative_to(ROOT))] = hits
    return found


def test_statuses_are_chosen_only_in_server_errors():
    stray = {path: hits for path, hits in status_uses().items() if path not in ALLOWED}
    assert not stray, (
        "name an ErrorKind and let server/errors.py:grpc_status map it, instead of "
        f"choosing a grpc.StatusCode here: {stray}"
    )


def test_every_kind_has_a_status_and_statuses_map_back():
    assert {kind.name for kind in ErrorKind} == {
        name.removeprefix("ERROR_KIND_")
        for name, number in queue_pb2.ErrorKind.items()
        if number != queue_pb2.ERROR_KIND_UNSPECIFIED
    }
    for kind in ErrorKind:
        status = grpc_status(kind)
        assert grpc_status(kind_of_status(status)) is status
    assert kind_of_status(grpc.StatusCode.ABORTED) is ErrorKind.INTERNAL


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        (ErrorKind.INVALID_INPUT, grpc.StatusCode.INVALID_ARGUMENT),
        (ErrorKind.TOO_LONG, grpc.StatusCode.INVALID_ARGUMENT),
        (ErrorKind.OVERLOADED, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (ErrorKind.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE),
        (ErrorKind.DEADLINE, grpc.StatusCode.DEADLINE_EXCEEDED),
        (ErrorKind.UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED),
        (ErrorKind.PERMISSION, grpc.StatusCode.PERMISSION_DENIED),
        (ErrorKind.NOT_FOUND, grpc.StatusCode.NOT_FOUND),
        (ErrorKind.INTERNAL, grpc.StatusCode.INTERNAL),
    ],
)
def test_public_statuses_are_the_ones_documented(kind, status):
    """The statuses callers saw before ErrorKind existed, unchanged."""
    error = RequestError(kind, "why")
    assert (error.code, error.code_number, error.message) == (status, status.value[0], "why")


def test_a_worker_failure_becomes_its_kind():
    failure = queue_pb2.Failure(ticket=1, kind=ErrorKind.TOO_LONG, message="long")
    error = error_of_failure(failure, "texts[0]: long")
    assert (error.kind, error.code, error.message) == (
        ErrorKind.TOO_LONG,
        grpc.StatusCode.INVALID_ARGUMENT,
        "texts[0]: long",
    )


def test_a_failure_from_an_older_worker_still_maps():
    """Workers before ErrorKind sent a google.rpc.Code number in `code`."""
    old = queue_pb2.Failure(ticket=1, code=grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
    assert error_of_failure(old, "m").code is grpc.StatusCode.DEADLINE_EXCEEDED
    # Neither field set (or an unknown number): the work was not done; retry may help.
    assert error_of_failure(queue_pb2.Failure(ticket=1), "m").kind is ErrorKind.UNAVAILABLE
    assert error_of_failure(queue_pb2.Failure(kind=99), "m").kind is ErrorKind.UNAVAILABLE


def test_client_error_is_a_grpc_rpc_error_for_streamed_codes():
    """The client maps public codes back in one place (clients/python/_errors.py)."""
    error = EmbedqError.from_status(RequestError(ErrorKind.NOT_FOUND, "x").code_number, "x", "id")
    assert isinstance(error, grpc.RpcError)
    assert (error.code(), error.details(), error.id) == (grpc.StatusCode.NOT_FOUND, "x", "id")


def test_any_handler_exception_becomes_a_request_error(caplog):
    """What router.py (unary and per stream message) tells the caller."""
    refusal = RequestError(ErrorKind.OVERLOADED, "busy", retry_after_ms=50)
    assert as_request_error(refusal, "Encode") is refusal
    down = as_request_error(redis.ConnectionError("refused"), "Encode")
    assert (down.kind, down.message) == (
        ErrorKind.UNAVAILABLE,
        "redis unavailable: ConnectionError",
    )
    with caplog.at_level("ERROR"):
        bug = as_request_error(KeyError("secret detail"), "Encode")
    # A bug: logged with its traceback, never shown to the caller.
    assert (bug.kind, bug.message) == (ErrorKind.INTERNAL, INTERNAL_MESSAGE)
    assert "Encode failed" in caplog.text and "secret detail" not in bug.message


def test_every_kind_has_an_http_status_and_openai_type():
    statuses = {kind: http_status(kind) for kind in ErrorKind}
    assert statuses[ErrorKind.OVERLOADED] == (429, "rate_limit_error")
    assert statuses[ErrorKind.UNAUTHENTICATED] == (401, "authentication_error")
    assert all(400 <= status < 600 and error_type for status, error_type in statuses.values())


class _Context:
    """The part of grpc.aio.ServicerContext that `unary` uses: a call whose caller may be
    gone and whose status send may fail (as grpc's does when the call ended under it)."""

    def __init__(self, *, cancelled=False, remaining=5.0, send_fails=False) -> None:
        self._cancelled, self._remaining, self._send_fails = cancelled, remaining, send_fails
        self.aborted: list[grpc.StatusCode] = []

    def cancelled(self) -> bool:
        return self._cancelled

    def time_remaining(self) -> float | None:
        return self._remaining

    async def abort(self, code, details, trailing_metadata=()):
        self.aborted.append(code)
        if self._send_fails:
            raise RuntimeError('Failed "execute_batch"')  # what grpc raises, privately typed
        raise grpc.aio.AbortError()


def _handler_failing_with(exc: Exception):
    from embedq.server.router import unary

    class Servicer:
        @unary
        async def Encode(self, request, context):
            raise exc

    return Servicer().Encode


@pytest.mark.parametrize(
    ("context", "sent"),
    [
        (_Context(), True),  # the caller waits: it gets the status
        (_Context(cancelled=True), False),  # hung up
        (_Context(remaining=0.0), False),  # its deadline passed, grpc has not noticed yet
        (_Context(remaining=None), True),  # no deadline at all
    ],
)
def test_a_status_goes_only_to_a_caller_still_there(context, sent, caplog):
    import asyncio

    from embedq.server.errors import deadline

    handler = _handler_failing_with(deadline("no result within 1.0s"))
    expected = grpc.aio.AbortError if sent else asyncio.CancelledError
    with pytest.raises(expected):
        asyncio.run(handler(b"", context))
    assert context.aborted == ([grpc.StatusCode.DEADLINE_EXCEEDED] if sent else [])
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_a_status_send_that_fails_because_the_caller_left_is_not_an_error(caplog):
    """grpc logs an exception out of a handler as ERROR with its traceback (one per call:
    a burst's worth of them when deadlines and our waits end together)."""
    import asyncio

    context = _Context(send_fails=True)
    failure = redis.ConnectionError("redis went away")
    with caplog.at_level("INFO"), pytest.raises(asyncio.CancelledError):
        asyncio.run(_handler_failing_with(failure)(b"", context))
    assert context.aborted == [grpc.StatusCode.UNAVAILABLE]
    assert "caller left before its UNAVAILABLE status could be sent" in caplog.text
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_the_http_fronts_abort_raises_its_status_through(caplog):
    """HttpContext.abort raises the status as a RequestError (the HTTP front turns it into the
    response); that is a status sent, not a failed send to a caller who left."""
    import asyncio

    from embedq.server.errors import deadline
    from embedq.server.http import HttpContext

    handler = _handler_failing_with(deadline("no result within 1.0s"))
    with caplog.at_level("INFO"), pytest.raises(RequestError) as caught:
        asyncio.run(handler(b"", HttpContext("test")))
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "caller left" not in caplog.text


class _Writer:
    """The part of grpc.aio.ServicerContext that `send_all` uses: writes that succeed until
    the call is over, then fail as gRPC's do (privately typed), or with `error`."""

    def __init__(self, fail_after: int, error: Exception) -> None:
        self.fail_after, self.error, self.written = fail_after, error, []

    async def write(self, response) -> None:
        if len(self.written) == self.fail_after:
            raise self.error
        self.written.append(response)


async def _responses(count: int, closed: list[bool]):
    try:
        for i in range(count):
            yield i
    finally:
        closed.append(True)


def test_a_stream_write_that_fails_because_the_call_is_over_ends_it_quietly(caplog):
    """A stream whose caller left with answers unsent: cancelled with one INFO line (gRPC logs
    a failed send of a generator's response as an ERROR with a traceback), and the answers'
    generator is closed at once (it cancels the work still in flight)."""
    import asyncio

    from embedq.server.router import send_all

    writer, closed = _Writer(2, RuntimeError('Failed "execute_batch"')), []
    with caplog.at_level("INFO"), pytest.raises(asyncio.CancelledError):
        asyncio.run(send_all(_responses(5, closed), writer))
    assert writer.written == [0, 1] and closed == [True]
    assert "stream ended by its caller before a response could be sent" in caplog.text
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_a_stream_response_that_cannot_be_sent_is_a_bug_not_a_caller_gone():
    import asyncio

    from embedq.server.router import send_all

    writer, closed = _Writer(0, TypeError("not a message")), []
    with pytest.raises(TypeError):
        asyncio.run(send_all(_responses(3, closed), writer))
    assert closed == [True]
