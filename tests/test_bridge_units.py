"""`embedq bridge` without brokers: URLs, redaction, message formats, backoff,
and the command line's one-line errors."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from embedq.bridge import formats
from embedq.bridge.brokers import make_sink, make_source
from embedq.bridge.brokers.base import (
    BridgeError,
    BrokerUrl,
    ConfigError,
    Message,
    Options,
    redact,
    scrub,
)
from embedq.bridge.core import Backoff, Bridge, Entry, Settings

from embedq.v1 import embedq_pb2 as pb

OPTIONS = Options()


# -- URLs ----------------------------------------------------------------------------


def test_url_parts_and_redaction():
    url = BrokerUrl.parse("amqp://user:s3cr%40t@rabbit:5673/prod?queue=texts")
    assert (url.scheme, url.host, url.port, url.username, url.password) == (
        "amqp",
        "rabbit",
        5673,
        "user",
        "s3cr@t",
    )
    assert url.path == "/prod" and url.params == {"queue": "texts"}
    assert "s3cr" not in url.safe and url.safe.startswith("amqp://user:***@rabbit:5673/prod")
    assert url.without_params() == "amqp://user:s3cr%40t@rabbit:5673/prod"
    assert scrub("failed: s3cr@t here") == "failed: *** here"
    assert redact("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact("nats://h:4222/a.b") == "nats://h:4222/a.b"
    # NATS token authentication: the token stands where a user would.
    token = BrokerUrl.parse("nats://t0ken-xyz@127.0.0.1:4222/jobs")
    assert "t0ken" not in token.safe and token.safe == "nats://***@127.0.0.1:4222/jobs"
    assert (
        scrub("connect failed: nats://t0ken-xyz@127.0.0.1")
        == "connect failed: nats://***@127.0.0.1"
    )
    # A password with a '/' that was not percent-encoded: the parser cannot find the host.
    assert redact("amqp://u:pa/ss@rabbit/q") == "amqp://***@rabbit/q"
    with pytest.raises(ConfigError) as caught:
        BrokerUrl.parse("amqp://u:p4ss:ab/cd@rabbit/q")
    assert "p4ss" not in str(caught.value) and "ab" not in str(caught.value).split(":")[-1]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://127.0.0.1:6379/0?group=g", "say which stream"),
        ("redis://127.0.0.1:6379/0?stream=s", "consumer group"),
        ("redis://127.0.0.1:6379/x?stream=s&group=g", "database number"),
        ("redis://127.0.0.1:6379/0?stream=s&group=g&claim_idle_ms=-1", "claim_idle_ms"),
        ("redis://127.0.0.1:6379/0?stream=s&group=g&stram=x", "unknown parameter 'stram'"),
        ("nats://127.0.0.1:4222", "say which subject"),
        ("amqp://u:pw@127.0.0.1/%2F", "say which queue"),
        ("mqtt://127.0.0.1", "say which topic"),
        ("kafka://127.0.0.1:9092/topic", "Kafka is not supported yet"),
        ("ftp://u:pw@127.0.0.1/x", "unknown broker scheme 'ftp'"),
        ("no url at all", "bad URL"),
        ("redis://h:99999/0?stream=s", "bad URL"),
    ],
)
def test_bad_source_urls_are_one_line_errors(url, message):
    with pytest.raises(ConfigError) as caught:
        make_source(url, OPTIONS)
    text = str(caught.value)
    assert message in text and "\n" not in text and "pw@" not in text


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("amqp://u:pw@127.0.0.1/%2F", "say where to publish"),
        ("amqp://u:pw@127.0.0.1/%2F?queue=q&exchange=x", "give queue=Q, or exchange"),
        ("mqtt://127.0.0.1/a/+/b", "wildcard"),
        ("redis://127.0.0.1/0?stream=s&maxlen=0", "maxlen"),
    ],
)
def test_bad_sink_urls(url, message):
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        make_sink(url, OPTIONS)


def test_good_urls_build_their_brokers():
    assert make_source("redis://h:1/2?stream=s&group=g", OPTIONS).stream == "s"
    assert make_source("nats://h/a.b.>?durable=d", OPTIONS).durable == "d"
    assert make_source("nats://h/a.*", OPTIONS).durable == "embedq-bridge-a__"
    assert make_source("amqp://u:p@h/vh?queue=q", OPTIONS).queue_name == "q"
    sink = make_sink("amqp://u:p@h/vh?queue=q", OPTIONS)
    assert (sink.exchange_name, sink.routing_key) == ("", "q")
    mqtt = make_source("mqtt://h:1883/$share/g/t/#", Options(consumer="me"))
    assert mqtt.topic == "$share/g/t/#" and mqtt.client_id == "me"
    # The default MQTT client id is stable across restarts (it names the session).
    assert (
        make_source("mqtt://h/t", OPTIONS).client_id == make_source("mqtt://h/t", OPTIONS).client_id
    )


# -- formats ---------------------------------------------------------------------------


def message(body: bytes, ident: str = "7") -> Message:
    return Message(body=body, message_id=ident)


JSON = formats.InputFormat()


def test_json_input_with_dotted_paths():
    fmt = formats.InputFormat("json", "payload.body", "meta.key")
    body = json.dumps({"payload": {"body": "héllo"}, "meta": {"key": 12}}).encode()
    parsed = formats.parse(message(body), fmt)
    assert (parsed.id, parsed.text) == ("12", "héllo")
    # No id field: the broker's id.
    assert formats.parse(message(b'{"text": "x"}', "1-0"), JSON).id == "1-0"
    # An exact key with dots wins over the path.
    assert (
        formats.parse(
            message(b'{"a.b": "exact", "a": {"b": "nested"}}'), formats.InputFormat("json", "a.b")
        ).text
        == "exact"
    )


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xff\xfe", "body is not UTF-8"),
        (b"not json", "body is not JSON"),
        (b"[1, 2]", "body is a JSON list, not an object"),
        (b'{"other": 1}', "no field 'text'"),
        (b'{"text": 5}', "field 'text' is a int, not a string"),
        (b'{"text": "' + b"x" * 11 + b'"}', "text is 11 bytes, over the server's limit of 10"),
        # A JSON escape for a lone surrogate: no protobuf string can carry it.
        (b'{"text": "\\ud800"}', "text is not valid Unicode"),
        (b"[" * 5000 + b"]" * 5000, "body is not JSON"),  # nested past the recursion limit
    ],
)
def test_poison_inputs(body, reason):
    with pytest.raises(formats.Poison, match=reason):
        formats.parse(message(body), formats.InputFormat(max_text_bytes=10))


def test_text_input_and_redis_fields():
    parsed = formats.parse(message("raw text ✓".encode()), formats.InputFormat("text"))
    assert (parsed.text, parsed.obj) == ("raw text ✓", {"id": "7", "text": "raw text ✓"})
    entry = Message(body=None, message_id="1-1", fields={b"id": b"a", b"text": b"t"})
    assert formats.parse(entry, JSON).obj == {"id": "a", "text": "t"}
    bad = Message(body=None, message_id="1-2", fields={b"text": b"\xff"})
    with pytest.raises(formats.Poison, match="not UTF-8"):
        formats.parse(bad, JSON)


def test_json_output_keeps_the_input_object():
    parsed = formats.parse(message(b'{"id": "a", "text": "t", "n": {"x": 1}}'), JSON)
    vector = np.array([0.5, -0.25], dtype=np.float32)
    out = formats.render(parsed, vector, "m", 2, pb.DTYPE_FLOAT32, "json")
    obj = json.loads(out.body)
    assert obj == {
        "id": "a",
        "text": "t",
        "n": {"x": 1},
        "embedding": [0.5, -0.25],
        "model": "m",
        "dimension": 2,
    }
    assert json.loads(out.fields["n"]) == {"x": 1}
    assert json.loads(out.fields["embedding"]) == [0.5, -0.25]
    assert out.fields["dimension"] == "2" and out.key == "a"


def test_binary_output_is_packed_little_endian_with_headers():
    parsed = formats.parse(message(b'{"id": "a", "text": "t"}'), JSON)
    vector = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    out = formats.render(parsed, vector, "m", 3, pb.DTYPE_FLOAT32, "binary")
    assert out.body == np.array([1, 2, 3], dtype="<f4").tobytes()
    assert out.headers == {"id": "a", "model": "m", "dimension": "3", "dtype": "float32"}
    assert out.fields["embedding"] == out.body
    bits = formats.render(parsed, np.array([3], dtype=np.uint8), "m", 8, pb.DTYPE_UBINARY, "binary")
    assert bits.body == b"\x03" and bits.headers["dtype"] == "ubinary"


def test_a_result_no_output_can_carry_is_a_dead_letter_not_a_crash():
    """Fields of the input that JSON output cannot write (an integer past 64 bits, a lone
    surrogate) make that message a dead letter; an id no header can carry is not used."""
    big = formats.parse(message(b'{"text": "t", "n": ' + b"9" * 30 + b"}"), JSON)
    with pytest.raises(Exception):  # noqa: B017 - what JSON output raises: orjson's or json's
        formats.render(big, np.zeros(2, np.float32), "m", 2, pb.DTYPE_FLOAT32, "json")
    odd_id = formats.parse(message(b'{"id": "\\udc00", "text": "t"}', "9-9"), JSON)
    assert odd_id.id == "9-9"

    async def body() -> None:
        entry = Entry(1, message(b"{}"), 0.0, parsed=big)
        a_bridge()._answer([entry], answered(1))
        assert entry.done and entry.output is None and "cannot write the result" in entry.reason

    asyncio.run(body())


def test_dead_letters_keep_the_original_body():
    letter = formats.dead_letter(message(b"\xff raw"), "body is not UTF-8", "nats://h/s")
    assert letter.body == b"\xff raw"
    assert letter.headers[formats.REASON] == "body is not UTF-8"
    assert letter.headers[formats.SOURCE] == "nats://h/s"
    assert letter.fields["body"] == b"\xff raw"
    entry = Message(body=None, message_id="9-0", fields={b"id": b"x", b"blob": b"\xff"})
    letter = formats.dead_letter(entry, "why", "redis://h/0?stream=s")
    assert letter.fields["blob"] == b"\xff" and letter.fields[formats.REASON] == "why"
    assert json.loads(letter.body) == {"id": "x", "blob": {"base64": "/w=="}}


# -- backoff -----------------------------------------------------------------------------


def test_backoff_grows_with_jitter_and_caps():
    backoff = Backoff(0.1, 2.0)
    delays = []
    for _ in range(8):
        backoff.not_before = 0.0  # each failure a new episode
        delays.append(backoff.fail())
    assert 0.05 <= delays[0] <= 0.1 and delays[3] > delays[0]
    assert max(delays) <= 2.0 and delays[-1] >= 1.0
    # Failures within one wait do not stack up.
    assert backoff.fail() <= delays[-1]
    backoff.succeed()
    backoff.not_before = 0.0
    assert backoff.fail() <= 0.1
    # The server's retry-after hint: waited at least that long (never past the cap).
    backoff.succeed()
    backoff.not_before = 0.0
    assert 0.9 <= backoff.fail(at_least=1.0) <= 1.0
    assert backoff.fail(at_least=60.0) <= 2.0


# -- command line ------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "embedq.cli", "bridge", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_help_lists_every_broker():
    result = run_cli("--help")
    assert result.returncode == 0
    for word in (
        "redis://",
        "nats://",
        "amqp://",
        "mqtt://",
        "--dead-letter",
        "--max-in-flight",
        "--metrics-port",
        "--text-field",
        "--output-format",
        "--token",
        "--tls-ca",
    ):
        assert word in result.stdout


def test_bad_url_is_one_line_and_never_shows_the_password():
    result = run_cli("--from", "amqp://me:hunter2@127.0.0.1/%2F", "--to", "redis://h/0?stream=o")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "say which queue" in result.stderr and "hunter2" not in result.stderr


def test_calibrated_precision_is_refused():
    result = run_cli(
        "--from",
        "redis://h/0?stream=i&group=g",
        "--to",
        "redis://h/0?stream=o",
        "--precision",
        "int8",
    )
    assert result.returncode == 2 and "one text per request" in result.stderr


def test_an_mqtt_inbox_bounds_qos0_messages_only() -> None:
    """QoS 0 deliveries past the limit are refused (the source drops and counts them); QoS 1
    ones, bounded by the broker's Receive Maximum, always get in; taking a QoS 0 one frees
    its place."""
    import asyncio
    from types import SimpleNamespace

    from embedq.bridge.brokers.mqtt import _Inbox

    inbox = _Inbox(2)
    qos0 = [SimpleNamespace(qos=0, n=i) for i in range(3)]
    qos1 = [SimpleNamespace(qos=1, n=i) for i in range(5)]
    assert [inbox.offer(m) for m in qos0] == [True, True, False]
    assert all(inbox.offer(m) for m in qos1)
    assert inbox.qos0 == 2 and inbox.qsize() == 7
    assert inbox.get_nowait() is qos0[0] and inbox.qos0 == 1
    assert asyncio.run(inbox.get()) is qos0[1] and inbox.qos0 == 0
    assert inbox.offer(qos0[2]) and inbox.qos0 == 1


# -- what the bridge does with the server's answers -------------------------------------


def a_bridge(**settings) -> Bridge:
    """A bridge whose brokers and server are never reached: only its answer policy runs."""
    from embedq.client import AsyncClient

    source = make_source("redis://127.0.0.1:1/0?stream=in&group=g", OPTIONS)
    sink = make_sink("redis://127.0.0.1:1/0?stream=out", OPTIONS)
    return Bridge(source, sink, AsyncClient("127.0.0.1:1"), Settings(**settings))


def entries(count: int, tag: str = "text") -> list[Entry]:
    made = []
    for seq in range(count):
        taken = Entry(seq, message(json.dumps({"text": f"{tag} {seq}"}).encode(), str(seq)), 0.0)
        taken.parsed = formats.parse(taken.message, JSON)
        made.append(taken)
    return made


def refused(code: int, text: str = "refused", retry_after_ms: int = 0) -> pb.EncodeStreamResponse:
    error = pb.Error(code=code, message=text, retry_after_ms=retry_after_ms)
    return pb.EncodeStreamResponse(id="0", error=error)


def answered(count: int) -> pb.EncodeStreamResponse:
    rows = np.ones((count, 2), "<f4")
    return pb.EncodeStreamResponse(
        id="0",
        model="m",
        count=count,
        dimension=2,
        dtype=pb.DTYPE_FLOAT32,
        embeddings=rows.tobytes(),
    )


def test_a_batch_failed_for_any_lasting_reason_is_asked_again_text_by_text():
    """One text a worker cannot encode fails its whole request (INTERNAL): the batch's other
    messages are sent again alone and not charged with it (they were: after --max-attempts
    tries, all of them dead-lettered). Sent alone, the failure counts an attempt."""

    async def body() -> None:
        bridge = a_bridge()
        batch = entries(4)
        bridge._answer(batch, refused(13, "encoder failed: RuntimeError"))
        assert all(e.solo and e.attempts == 0 and not e.done for e in batch)
        assert list(bridge._to_send) == batch
        bridge._to_send.clear()
        bridge._answer(batch[:1], refused(13, "encoder failed: RuntimeError"))
        assert batch[0].attempts == 1 and not batch[0].done

    asyncio.run(body())


def test_a_batch_too_big_for_its_time_limit_is_halved_until_answered():
    """RESOURCE_EXHAUSTED with no retry hint says the texts alone take longer than the
    batch's time limit: the same batch was sent again forever. The batch limit halves, and
    doubles back as batches are answered; a full queue (a refusal with a hint) keeps it."""

    async def body() -> None:
        bridge = a_bridge(batch_texts=8)
        batch = entries(8)
        bridge._answer(batch, refused(8, "split the request or allow more time"))
        assert bridge._batch_limit == 4 and len(bridge._to_send) == 8
        assert not any(e.done for e in batch)  # retried, never dead-lettered for it
        bridge._answer(batch[:4], refused(8, "queue is full", retry_after_ms=500))
        assert bridge._batch_limit == 4
        bridge._answer(batch[:2], refused(4, "no result within 54.0s"))  # DEADLINE_EXCEEDED
        assert bridge._batch_limit == 1
        bridge._answer(batch[:1], answered(1))
        assert bridge._batch_limit == 2 and batch[0].output is not None

    asyncio.run(body())


def test_options_the_server_refuses_stop_the_bridge_rather_than_poison_every_message():
    from embedq.bridge.core import check_options

    info = pb.InfoResponse(
        default_model="m",
        limits=pb.Limits(max_text_bytes=100),
        models=[pb.ModelInfo(name="m", dimension=384, prompts={"query": "query: "})],
    )
    check_options(pb.EncodeOptions(dimension=128, prompt_name="query"), info, "t")
    cases = [
        (pb.EncodeOptions(dimension=100000), "--dimension 100000 is above model 'm''s 384"),
        (pb.EncodeOptions(prompt_name="nope"), "--prompt-name 'nope' is not a prompt"),
        (pb.EncodeOptions(prompt="p" * 101), "--prompt is 101 UTF-8 bytes"),
        (pb.EncodeOptions(model="other"), "--model 'other' is not served"),
    ]
    for options, words in cases:
        with pytest.raises(ConfigError, match=re.escape(words)):
            check_options(options, info, "t")
    check_options(pb.EncodeOptions(dimension=100000), pb.InfoResponse(), "t")  # no model yet

    async def body() -> None:  # changed on the server after start-up: stopped, not poison
        bridge = a_bridge()
        batch = entries(1)
        with pytest.raises(BridgeError, match="refuses this bridge's options"):
            bridge._answer(batch, refused(3, "options.dimension 9999 is above the model's 384"))
        assert not batch[0].done  # nothing dead-lettered or acknowledged
        bridge._answer(batch, refused(3, "texts[0] is 70000 UTF-8 bytes, over the limit"))
        assert batch[0].reason.startswith("INVALID_ARGUMENT")  # the text's own: poison

    asyncio.run(body())


def test_result_ids_for_deduplicating_sinks_cover_what_makes_the_result():
    """NATS JetStream drops a result whose Nats-Msg-Id it saw within its window: the id
    names the input and everything that makes its result (it named the source, the
    message id and the format only: a second bridge's results into another subject of
    the same stream were dropped, their inputs acknowledged)."""

    async def body() -> None:
        first, again = a_bridge(), a_bridge()
        other_options = a_bridge(options=pb.EncodeOptions(dimension=64))
        other_sink = a_bridge()
        other_sink.sink = make_sink("redis://127.0.0.1:1/0?stream=elsewhere", OPTIONS)
        (one,), (reused_id,) = entries(1, "a text"), entries(1, "another text")
        ids = [b._dedup_id(one) for b in (first, again, other_options, other_sink)]
        assert ids[0] == ids[1] and len(set(ids)) == 3
        assert first._dedup_id(reused_id) != ids[0]  # same message id, another text

    asyncio.run(body())


def test_the_drain_ends_at_once_when_a_task_fails_for_good():
    """A task failing during the drain after SIGTERM (the sender refused for good, say)
    ends it with that error (exit 1): the drain waited out its timeout, then exited 0."""

    async def body() -> None:
        bridge = a_bridge(drain_timeout=30.0)
        bridge.held = 1

        async def refused_for_good() -> None:
            await asyncio.sleep(0.05)
            raise BridgeError("embedq t: UNAUTHENTICATED: token revoked")

        failing = asyncio.create_task(refused_for_good())
        with pytest.raises(BridgeError, match="token revoked"):
            await asyncio.wait_for(bridge._drain({failing}), 10)

    asyncio.run(body())
