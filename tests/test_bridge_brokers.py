"""`embedq bridge` against the real brokers: Redis Streams, NATS JetStream,
RabbitMQ and MQTT (Mosquitto), with the real model behind a real server.

Each broker gets: a 1,000-message round trip equal to sentence-transformers,
poison messages dead-lettered, SIGKILL of the bridge and a restart with
nothing lost, and the embedq server stopped and restarted mid-run with nothing
lost. Broker URLs come from EMBEDQ_TEST_{REDIS_BROKER,NATS,AMQP,MQTT}_URL;
an unreachable broker skips its tests, except with CI=true, where it fails.
Every stream, subject, queue and topic is named for this run and deleted
afterwards; nothing on the shared brokers is flushed or reconfigured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from urllib.parse import urlsplit

import numpy as np
import pytest
from conftest import _spawn, log_tail, new_service, stop_process, wait_healthy
from embedq.apps.embedded import free_port

TOLERANCE = 1e-5
ROUND_TRIP = 1000
RUN = uuid.uuid4().hex[:8]

DEFAULT_PORTS = {"redis": 6379, "nats": 4222, "amqp": 5672, "mqtt": 1883}
URLS = {
    "redis": os.environ.get("EMBEDQ_TEST_REDIS_BROKER_URL", "redis://127.0.0.1:6379/0"),
    "nats": os.environ.get("EMBEDQ_TEST_NATS_URL", "nats://127.0.0.1:4222"),
    "amqp": os.environ.get("EMBEDQ_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"),
    "mqtt": os.environ.get("EMBEDQ_TEST_MQTT_URL", "mqtt://127.0.0.1:1883"),
}
BROKERS = list(URLS)


def require_broker(kind: str) -> None:
    """Skip (fail under CI=true) when the broker's port does not answer."""
    parts = urlsplit(URLS[kind])
    default = DEFAULT_PORTS[kind]
    try:
        with socket.create_connection((parts.hostname, parts.port or default), timeout=2):
            return
    except OSError as error:
        reason = f"{kind} broker at {parts.hostname}:{parts.port or default} unreachable: {error}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + " (CI=true: brokers are required)")
    pytest.skip(reason)


class Loop:
    """An event loop in a thread, for the brokers' asyncio client libraries."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


# -- one harness per broker: names, publishing, reading results, cleaning up ----


class Harness:
    kind = ""

    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        self.uid = f"{RUN}{uuid.uuid4().hex[:6]}"
        self.results: list[dict] = []
        self.dead: list[tuple[bytes, dict]] = []

    # URLs the bridge gets.
    source: str
    sink: str
    dead_letter: str

    async def prepare(self) -> None: ...
    async def send(self, items: list) -> None: ...
    async def collect(self) -> None: ...
    async def cleanup(self) -> None: ...

    def publish(self, items: list) -> None:
        self.loop.run(self.send(items), timeout=120)

    def read(self) -> list[dict]:
        self.loop.run(self.collect())
        return self.results

    @staticmethod
    def body(item) -> bytes:
        """An input item (dict, str or raw bytes) as a message body."""
        if isinstance(item, bytes):
            return item
        return json.dumps(item).encode()


class RedisHarness(Harness):
    kind = "redis"

    async def prepare(self) -> None:
        import redis.asyncio as aioredis

        self.r = aioredis.Redis.from_url(URLS["redis"])
        base = URLS["redis"]
        self.names = [f"embedq-test-{self.uid}-{x}" for x in ("in", "out", "dead")]
        self.source = f"{base}?stream={self.names[0]}&group=bridge&claim_idle_ms=1500"
        self.sink = f"{base}?stream={self.names[1]}"
        self.dead_letter = f"{base}?stream={self.names[2]}"
        self.cursor = {self.names[1]: "0", self.names[2]: "0"}

    async def send(self, items: list) -> None:
        pipe = self.r.pipeline(transaction=False)
        for item in items:
            if isinstance(item, dict):
                fields = {
                    k: v if isinstance(v, str | bytes) else json.dumps(v) for k, v in item.items()
                }
            else:  # a raw body: the field map can only carry it as a field
                fields = {"body": item}
            pipe.xadd(self.names[0], fields)
        await pipe.execute()

    async def collect(self) -> None:
        for name in self.names[1:]:
            entries = await self.r.xrange(
                name, min=f"({self.cursor[name]}" if self.cursor[name] != "0" else "-"
            )
            for entry_id, fields in entries:
                self.cursor[name] = entry_id.decode()
                decoded = {k.decode(): v for k, v in fields.items()}
                if name == self.names[1]:
                    obj = {k: v.decode() for k, v in decoded.items()}
                    obj["embedding"] = json.loads(obj["embedding"])
                    self.results.append(obj)
                else:
                    self.dead.append(
                        (
                            decoded.get("body", b""),
                            {k: v.decode("utf-8", "replace") for k, v in decoded.items()},
                        )
                    )

    async def cleanup(self) -> None:
        await self.r.delete(*self.names)
        await self.r.aclose()


class NatsHarness(Harness):
    kind = "nats"

    async def prepare(self) -> None:
        import nats

        self.nc = await nats.connect(URLS["nats"])
        self.js = self.nc.jetstream()
        self.stream = f"EMBEDQ_TEST_{self.uid}"
        subject = f"embedq-test.{self.uid}"
        # The streams are the user's: the test creates one, as a user would.
        await self.js.add_stream(name=self.stream, subjects=[f"{subject}.>"])
        base = URLS["nats"]
        self.source = f"{base}/{subject}.in?durable=bridge{self.uid}&ack_wait=3"
        self.sink = f"{base}/{subject}.out"
        self.dead_letter = f"{base}/{subject}.dead"
        self.subject = subject
        self.subs = {
            "out": await self.js.pull_subscribe(
                f"{subject}.out", durable=f"out{self.uid}", stream=self.stream
            ),
            "dead": await self.js.pull_subscribe(
                f"{subject}.dead", durable=f"dead{self.uid}", stream=self.stream
            ),
        }

    async def send(self, items: list) -> None:
        futures = [await self.js.publish_async(f"{self.subject}.in", self.body(i)) for i in items]
        await asyncio.gather(*futures)

    async def collect(self) -> None:
        import nats.errors

        for name, sub in self.subs.items():
            # One fetch a call: the tests poll, and a mid-run kill must not wait for the end.
            for _ in range(1):
                try:
                    msgs = await sub.fetch(500, timeout=0.2)
                except (nats.errors.TimeoutError, asyncio.TimeoutError):
                    break
                for msg in msgs:
                    await msg.ack()
                    if name == "out":
                        self.results.append(json.loads(msg.data))
                    else:
                        self.dead.append((msg.data, dict(msg.headers or {})))

    async def cleanup(self) -> None:
        await self.js.delete_stream(self.stream)
        await self.nc.close()


class AmqpHarness(Harness):
    kind = "amqp"

    async def prepare(self) -> None:
        import aio_pika

        self.conn = await aio_pika.connect(URLS["amqp"])
        self.channel = await self.conn.channel()
        self.queues = {}
        for name in ("in", "out", "dead"):
            self.queues[name] = await self.channel.declare_queue(f"embedq-test-{self.uid}-{name}")
        base = URLS["amqp"]
        self.source = f"{base}?queue=embedq-test-{self.uid}-in"
        self.sink = f"{base}?queue=embedq-test-{self.uid}-out"
        self.dead_letter = f"{base}?exchange=&routing_key=embedq-test-{self.uid}-dead"
        self.dead_letter = f"{base}?queue=embedq-test-{self.uid}-dead"

    async def send(self, items: list) -> None:
        import aio_pika

        for item in items:
            await self.channel.default_exchange.publish(
                aio_pika.Message(self.body(item)), routing_key=f"embedq-test-{self.uid}-in"
            )

    async def collect(self) -> None:
        for name in ("out", "dead"):
            while True:
                msg = await self.queues[name].get(no_ack=True, fail=False)
                if msg is None:
                    break
                if name == "out":
                    self.results.append(json.loads(msg.body))
                else:
                    self.dead.append(
                        (msg.body, {k: str(v) for k, v in (msg.headers or {}).items()})
                    )

    async def cleanup(self) -> None:
        for queue in self.queues.values():
            await queue.delete(if_unused=False, if_empty=False)
        await self.conn.close()


class MqttHarness(Harness):
    kind = "mqtt"

    async def prepare(self) -> None:
        import aiomqtt

        parts = urlsplit(URLS["mqtt"])
        self.host, self.port = parts.hostname, parts.port or 1883
        topic = f"embedq-test/{self.uid}"
        self.topic = topic
        base = URLS["mqtt"]
        self.client_id = f"embedq-test-bridge-{self.uid}"
        self.source = f"{base}/{topic}/in?client_id={self.client_id}&session_expiry=300"
        self.sink = f"{base}/{topic}/out"
        self.dead_letter = f"{base}/{topic}/dead"
        # The bridge's session, subscribed before anything is published (as the
        # bridge itself would have done on its first start).
        await self._make_session()
        self.collector = aiomqtt.Client(
            self.host,
            self.port,
            identifier=f"embedq-test-c-{self.uid}",
            protocol=aiomqtt.ProtocolVersion.V5,
        )
        await self.collector.__aenter__()
        await self.collector.subscribe(f"{topic}/out", qos=1)
        await self.collector.subscribe(f"{topic}/dead", qos=1)
        self.pump = asyncio.create_task(self._pump())
        self.publisher = aiomqtt.Client(
            self.host, self.port, protocol=aiomqtt.ProtocolVersion.V5, max_inflight_messages=200
        )
        await self.publisher.__aenter__()

    async def _make_session(self) -> None:
        import aiomqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 300
        async with aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=properties,
        ) as client:
            await client.subscribe(f"{self.topic}/in", qos=1)

    async def _pump(self) -> None:
        async for message in self.collector.messages:
            headers = dict(getattr(message.properties, "UserProperty", None) or [])
            if message.topic.value.endswith("/out"):
                self.results.append(json.loads(message.payload))
            else:
                self.dead.append((bytes(message.payload), headers))

    async def send(self, items: list) -> None:
        await asyncio.gather(
            *(self.publisher.publish(f"{self.topic}/in", self.body(i), qos=1) for i in items)
        )

    async def collect(self) -> None:
        await asyncio.sleep(0.05)

    async def cleanup(self) -> None:
        import aiomqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.pump.cancel()
        for client in (self.collector, self.publisher):
            with contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)
        # End the bridge's persistent session (expiry 0 on a clean start).
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 0
        async with aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=True,
            properties=properties,
        ):
            pass


HARNESSES: dict[str, Callable[[Loop], Harness]] = {
    "redis": RedisHarness,
    "nats": NatsHarness,
    "amqp": AmqpHarness,
    "mqtt": MqttHarness,
}


@pytest.fixture(scope="module")
def loop():
    background = Loop()
    yield background
    background.close()


@pytest.fixture(params=BROKERS)
def broker(request, loop):
    require_broker(request.param)
    harness = HARNESSES[request.param](loop)
    loop.run(harness.prepare())
    yield harness
    try:
        loop.run(harness.cleanup())
    except Exception as error:  # noqa: BLE001 - report, do not mask the test's own outcome
        print(f"cleanup of {request.param}: {error}")


# -- the bridge process -----------------------------------------------------------


def start_bridge(
    name: str,
    target: str,
    harness: Harness,
    *extra: str,
    dead: bool = True,
    source: str | None = None,
    sink: str | None = None,
):
    """`embedq bridge` from the harness's source to its sink (or the URLs given)."""
    args = [
        "bridge",
        "--target",
        target,
        "--from",
        source or harness.source,
        "--to",
        sink or harness.sink,
        "--max-backoff",
        "1",
        "--drain-timeout",
        "20",
        *extra,
    ]
    if dead:
        args += ["--dead-letter", harness.dead_letter]
    proc = _spawn(args, name)
    return proc


def wait_for(predicate, timeout: float, what: str, procs=(), poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for proc, name in procs:
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited {proc.returncode}:\n{log_tail(name)}")
        time.sleep(poll)
    logs = "\n".join(log_tail(name) for _, name in procs)
    raise AssertionError(f"{what} not reached in {timeout}s\n{logs}")


def stop_bridge(proc, name: str) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"{name} did not stop on SIGTERM:\n{log_tail(name)}") from None
    assert code == 0, f"{name} exited {code}:\n{log_tail(name)}"


def ids_of(results: list[dict]) -> list[str]:
    return [str(r["id"]) for r in results]


def fresh_texts(count: int, tag: str) -> list[str]:
    """Short texts no other test has cached (so the model really runs mid-test)."""
    subjects = ["A man", "The child", "Two dogs", "A cat", "Our team", "The chef"]
    verbs = ["is reading", "watches", "paints", "talks about", "is cooking"]
    objects = ["a guitar", "the newspaper", "a quiet beach", "hot soup", "a red bicycle"]
    return [f"{subjects[i % 6]} {verbs[i % 5]} {objects[i % 4]} ({tag} {i})." for i in range(count)]


@pytest.fixture(scope="module")
def round_trip_texts(reference_model):
    from texts import varied_texts

    # Each distinct text four times over: 1,000 messages, a quarter of the model's work (a
    # sixth of varied texts are 256 tokens long; the reference encodes them here too).
    distinct = [f"{t} #{i}" for i, t in enumerate(varied_texts(ROUND_TRIP // 4))]
    vectors = reference_model.encode(distinct, batch_size=64, convert_to_numpy=True)
    order = [i % len(distinct) for i in range(ROUND_TRIP)]
    return [distinct[i] for i in order], vectors[order]


# -- the tests -----------------------------------------------------------------------


def test_round_trip_equals_sentence_transformers(broker, service, round_trip_texts):
    """1,000 messages in, 1,000 results out, in input order, equal to the reference."""
    texts, expected = round_trip_texts
    items = [{"id": f"m{i}", "text": t, "meta": {"n": i}} for i, t in enumerate(texts)]
    name = f"bridge-rt-{broker.kind}-{broker.uid}"
    proc = start_bridge(name, service.target, broker)
    try:
        broker.publish(items)
        wait_for(lambda: len(broker.read()) >= len(items), 300, "all results", [(proc, name)])
    finally:
        stop_bridge(proc, name)
    results = broker.read()
    assert ids_of(results) == [item["id"] for item in items]  # once each, in input order
    got = np.array([r["embedding"] for r in results], dtype=np.float32)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOLERANCE
    first = results[0]
    assert first["text"] == texts[0] and first["model"] == "all-MiniLM-L6-v2"
    assert int(first["dimension"]) == 384
    if broker.kind != "redis":  # nested input fields survive (Redis fields are flat strings)
        assert first["meta"] == {"n": 0}
    assert broker.dead == []


def test_poison_messages_are_dead_lettered(broker, service):
    """Not JSON, not UTF-8, no text, over the server's limit, refused by the server:
    each goes to the dead-letter destination with the reason; the good ones go on."""
    good = [
        {"id": f"ok{i}", "text": f"a perfectly fine sentence {broker.uid} {i}"} for i in range(4)
    ]
    long_text = " ".join(["overlong"] * 600)  # > 256 tokens: refused with --no-truncate
    if broker.kind == "redis":
        poison = [
            {"id": "p-nofield", "body": "no text field"},
            {"id": "p-utf8", "text": b"\xff\xfe not utf-8"},
            {"id": "p-huge", "text": "x" * 70_000},
            {"id": "p-long", "text": long_text},
        ]
    else:
        poison = [
            b"this is not JSON",
            b"\xff\xfe\x00 not utf-8",
            {"id": "p-nofield", "body": "no text field"},
            {"id": "p-number", "text": 42},
            {"id": "p-huge", "text": "x" * 70_000},
            {"id": "p-long", "text": long_text},
        ]
    items = [good[0], *poison[:3], good[1], *poison[3:], good[2], good[3]]
    name = f"bridge-poison-{broker.kind}-{broker.uid}"
    proc = start_bridge(name, service.target, broker, "--no-truncate")
    try:
        broker.publish(items)
        wait_for(
            lambda: len(broker.read()) >= len(good) and len(broker.dead) >= len(poison),
            120,
            "results and dead letters",
            [(proc, name)],
        )
    finally:
        stop_bridge(proc, name)
    assert ids_of(broker.read()) == [g["id"] for g in good]
    assert len(broker.dead) == len(poison)
    reasons = [headers["embedq-reason"] for _, headers in broker.dead]
    assert any("INVALID_ARGUMENT" in r for r in reasons), reasons
    assert any("over the server's limit" in r for r in reasons), reasons
    assert any("no field 'text'" in r for r in reasons), reasons
    if broker.kind != "redis":
        assert any("not JSON" in r for r in reasons) and any("not UTF-8" in r for r in reasons)
        bodies = [body for body, _ in broker.dead]
        assert b"this is not JSON" in bodies and b"\xff\xfe\x00 not utf-8" in bodies
    else:
        assert any("not UTF-8" in r for r in reasons)
    assert "poison message" in log_tail(name, 1_000_000)


def test_sigkill_and_restart_loses_nothing(broker, service):
    """SIGKILL mid-run, start again: every input gets a result (duplicates allowed)."""
    texts = fresh_texts(800, f"kill-{broker.uid}")
    items = [{"id": f"k{i}", "text": t} for i, t in enumerate(texts)]
    broker.publish(items)
    name = f"bridge-kill-{broker.kind}-{broker.uid}"
    proc = start_bridge(name, service.target, broker, "--max-in-flight", "64")
    wait_for(lambda: len(broker.read()) >= 1, 120, "first results", [(proc, name)], poll=0.02)
    proc.kill()
    proc.wait()
    before = len(set(ids_of(broker.read())))
    assert before < len(items), "the bridge finished before the kill: nothing tested"
    name2 = name + "-again"
    proc = start_bridge(name2, service.target, broker, "--max-in-flight", "64")
    try:
        wanted = {item["id"] for item in items}
        wait_for(
            lambda: wanted <= set(ids_of(broker.read())),
            240,
            "every input's result",
            [(proc, name2)],
        )
    finally:
        stop_bridge(proc, name2)
    assert set(ids_of(broker.read())) == {item["id"] for item in items}


def test_server_restart_mid_run_loses_nothing(broker, service, reference_model):
    """The embedq server stopped and started again mid-run: the bridge waits, retries,
    and every input gets its (correct) result."""
    port = free_port()
    target = f"127.0.0.1:{port}"
    server_args = [
        "server",
        "--port",
        str(port),
        "--redis-url",
        service.redis_url,
        "--namespace",
        service.namespace,
    ]
    server_name = f"server-bridge-{broker.kind}-{broker.uid}"
    server = _spawn(server_args, server_name)
    wait_healthy(target, server, server_name)
    texts = fresh_texts(800, f"restart-{broker.uid}")
    items = [{"id": f"s{i}", "text": t} for i, t in enumerate(texts)]
    broker.publish(items)
    name = f"bridge-restart-{broker.kind}-{broker.uid}"
    proc = start_bridge(name, target, broker, "--max-in-flight", "64")
    try:
        wait_for(lambda: len(broker.read()) >= 1, 120, "first results", [(proc, name)], poll=0.02)
        server.kill()
        server.wait()
        time.sleep(1.5)
        assert proc.poll() is None, log_tail(name)
        server = _spawn(server_args, server_name + "-again")
        wait_healthy(target, server, server_name + "-again")
        wanted = [item["id"] for item in items]
        wait_for(
            lambda: set(wanted) <= set(ids_of(broker.read())), 240, "every result", [(proc, name)]
        )
        stop_bridge(proc, name)
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_process(server)
    results = broker.read()
    assert ids_of(results) == wanted  # in order, none lost, none twice (one instance)
    got = np.array([r["embedding"] for r in results], dtype=np.float32)
    expected = reference_model.encode(texts, batch_size=64, convert_to_numpy=True)
    assert np.abs(got - expected).max() <= TOLERANCE
    assert "retrying" in log_tail(name, 1_000_000)


# -- broker connections cut: a relay the test can cut ------------------------------------


def port_outside_ephemeral_range() -> int:
    """A free loopback port below the kernel's ephemeral range: while the relay is "down",
    no outgoing connection can take its port, and a client retrying it cannot connect to
    itself (TCP simultaneous open), as a port from bind(0) could."""
    low = 32768
    ranges = "/proc/sys/net/ipv4/ip_local_port_range"
    with contextlib.suppress(OSError, ValueError), open(ranges) as ports:
        low = int(ports.read().split()[0])
    for port in random.sample(range(max(1024, low - 8000), low), 200):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


class CuttableRelay:
    """A TCP relay in front of a broker whose connections the test cuts, as a broker restart
    would: every open connection is shut at once, and for `down_s` after that the port
    refuses connections (the broker is down), then listens again."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.accepted = 0
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.port = port_outside_ephemeral_range()
        self._listen()

    def _listen(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def via(self, url: str) -> str:
        """`url` with its host and port replaced by the relay's."""
        parts = urlsplit(url)
        userinfo, _, _ = parts.netloc.rpartition("@")
        netloc = f"{userinfo}@" if userinfo else ""
        return parts._replace(netloc=f"{netloc}127.0.0.1:{self.port}").geturl()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # shut by cut() or close()
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if listener is not self.listener:  # cut while connecting upstream
                    client.close()
                    upstream.close()
                    continue
                self._open |= {client, upstream}
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, destination: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                destination.sendall(data)
        except OSError:
            pass
        for end in (source, destination):  # one side gone: the pair is gone
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
        source.close()  # the other direction's pump closes the other end

    def _shut_all(self) -> None:
        # Shut down, which wakes the threads blocked on them; each pump closes its end.
        with self._lock:
            for end in (self.listener, *self._open):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
            self.listener.close()
            self._open.clear()

    def cut(self, down_s: float) -> None:
        self._shut_all()
        time.sleep(down_s)
        self._listen()

    def close(self) -> None:
        self._shut_all()


def test_broker_connections_cut_mid_run_lose_nothing(broker, service):
    """The bridge's connections to its broker (source and sink) are cut mid-run and refused
    for 2 s: the bridge connects again by itself, long before --broker-grace runs out (AMQP
    and MQTT by reconnecting in place, Redis and NATS through their own clients), and every
    input gets its result (duplicates allowed: at least once). Half the inputs are published
    only after the cut, so the source must take messages over a new connection."""
    parts = urlsplit(URLS[broker.kind])
    relay = CuttableRelay(parts.hostname, parts.port or DEFAULT_PORTS[broker.kind])
    texts = fresh_texts(800, f"cut-{broker.uid}")
    items = [{"id": f"c{i}", "text": t} for i, t in enumerate(texts)]
    broker.publish(items[:400])
    name = f"bridge-cut-{broker.kind}-{broker.uid}"
    grace = ("--broker-grace", "60", "--max-in-flight", "64")
    source, sink = relay.via(broker.source), relay.via(broker.sink)
    proc = start_bridge(name, service.target, broker, *grace, source=source, sink=sink)
    try:
        wait_for(lambda: len(broker.read()) >= 1, 120, "first results", [(proc, name)], poll=0.02)
        relay.cut(down_s=2.0)
        connected_before = relay.accepted
        broker.publish(items[400:])
        wanted = {item["id"] for item in items}
        # The bridge exiting (status 1 after --broker-grace) fails this wait at once.
        wait_for(
            lambda: wanted <= set(ids_of(broker.read())),
            240,
            "every input's result after the cut",
            [(proc, name)],
        )
        stop_bridge(proc, name)
    finally:
        if proc.poll() is None:
            proc.kill()
        relay.close()
    assert set(ids_of(broker.read())) == wanted
    assert relay.accepted > connected_before, "the bridge never connected again"
    if broker.kind in ("amqp", "mqtt"):  # the source's own reconnect, not only the sink's
        log = log_tail(name, 1_000_000)
        assert "held from the old connection" in log, log[-3000:]


# -- an MQTT broker that refuses: its own Mosquitto, with an ACL -------------------------


@pytest.fixture
def refusing_mosquitto(tmp_path):
    """A private Mosquitto on a free loopback port whose ACL lets anyone publish to
    `open/#` but not to `closed/#` (the machine's own broker is not ours to reconfigure)."""
    import getpass
    import shutil

    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(binary):
        pytest.skip("no mosquitto binary to start a private broker with an ACL")
    port = free_port()
    (tmp_path / "acl").write_text("topic readwrite open/#\ntopic read closed/#\n")
    (tmp_path / "mosquitto.conf").write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nacl_file {tmp_path / 'acl'}\n"
        "persistence false\n"
        # Run as root, Mosquitto drops to its own user, which cannot read pytest's tmp dir.
        f"user {getpass.getuser()}\n"
    )
    proc = subprocess.Popen(
        [binary, "-c", str(tmp_path / "mosquitto.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            break
        assert time.monotonic() < deadline and proc.poll() is None, "mosquitto did not start"
        time.sleep(0.05)
    yield f"mqtt://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


def test_an_mqtt_result_the_broker_refuses_is_not_taken_as_published(refusing_mosquitto):
    """Mosquitto answers a publish its ACL denies with a PUBACK whose reason code says so:
    the sink raises (the inputs stay unacknowledged, the batch is retried), where it used to
    count every PUBACK as published and the results were lost."""
    from embedq.bridge.brokers.base import BrokerUrl, Options, OutMessage
    from embedq.bridge.brokers.mqtt import MqttSink

    async def publish(topic: str) -> None:
        sink = MqttSink(BrokerUrl.parse(f"{refusing_mosquitto}/{topic}"), Options())
        await sink.connect()
        try:
            message = OutMessage(b"{}", {"id": "1"}, {}, "1", "application/json")
            await sink.publish([message, message])
        finally:
            await sink.close()

    asyncio.run(publish("open/vectors"))
    with pytest.raises(ConnectionError, match="refused 2 of 2 results on 'closed/vectors'"):
        asyncio.run(publish("closed/vectors"))


def test_an_mqtt_subscription_refused_or_at_most_once_stops_the_bridge():
    """A SUBACK that refuses the topic, or grants QoS 0 only (no acknowledgements: a crash
    would lose messages), is a clear error at start, not a bridge that sits idle or loses.
    (Mosquitto grants any subscription and applies its ACL per message: the reason codes
    here are paho's own, as aiomqtt hands them over.)"""
    from embedq.bridge.brokers.base import ConfigError
    from embedq.bridge.brokers.mqtt import _check_subscription
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    def suback(value: int) -> list:
        return [ReasonCode(PacketTypes.SUBACK, identifier=value)]

    _check_subscription(suback(1), "in/texts")  # QoS 1 granted
    with pytest.raises(ConfigError, match="refused the subscription to 'in/texts'"):
        _check_subscription(suback(0x87), "in/texts")  # not authorized
    with pytest.raises(ConfigError, match="granted only QoS 0"):
        _check_subscription(suback(0), "in/texts")
    with pytest.raises(ConfigError, match="granted only QoS 0"):
        _check_subscription((0,), "in/texts")  # MQTT 3.1.1: granted QoS numbers


def test_an_existing_nats_consumer_is_checked_and_its_ack_wait_followed():
    """A consumer the user made: one that does not acknowledge (messages lost on a crash) or
    filters another subject is refused at start; a shorter ack_wait than the bridge's default
    is followed (held messages touched often enough, not redelivered to others meanwhile)."""
    require_broker("nats")
    import nats
    from embedq.bridge.brokers.base import BrokerUrl, ConfigError, Options
    from embedq.bridge.brokers.nats import NatsSource
    from nats.js import api

    uid = uuid.uuid4().hex[:8]
    stream, subject = f"EMBEDQ_TEST_{uid}", f"embedq-test.{uid}.in"

    async def main() -> None:
        nc = await nats.connect(URLS["nats"])
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[f"embedq-test.{uid}.>"])
        try:
            for durable, config in {
                "noack": {"ack_policy": api.AckPolicy.NONE, "filter_subject": subject},
                "other": {"ack_policy": api.AckPolicy.EXPLICIT, "filter_subject": f"{subject}.x"},
                "quick": {"ack_policy": api.AckPolicy.EXPLICIT, "filter_subject": subject,
                          "ack_wait": 4.0},
            }.items():  # fmt: skip
                await js.add_consumer(stream, api.ConsumerConfig(durable_name=durable, **config))
            sources = {}
            for durable in ("noack", "other", "quick"):
                url = BrokerUrl.parse(f"{URLS['nats']}/{subject}?durable={durable}")
                source = sources[durable] = NatsSource(url, Options())
                try:
                    await source.connect()
                except ConfigError as error:
                    sources[durable] = str(error)
                finally:
                    if source.nc is not None:
                        await source.nc.close()
            assert "ack policy 'none'" in sources["noack"]
            assert f"filters '{subject}.x'" in sources["other"]
            quick = sources["quick"]
            assert quick.ack_wait == 4.0 and quick.touch_interval <= 4.0 / 3
        finally:
            await js.delete_stream(stream)
            await nc.close()

    asyncio.run(main())


def test_mqtt_qos0_messages_past_the_buffer_are_dropped_and_counted(loop, redis_server):
    """A QoS 0 publish reaches the bridge at QoS 0, outside the Receive Maximum that bounds
    the QoS 1 deliveries: while embedq cannot keep up (here its only worker is stopped), the
    bridge keeps at most `qos0_buffer` of them waiting and drops the rest, counted in
    `embedq_bridge_source_dropped_total` and its final line, instead of holding every one
    in memory. Each message kept gets its result; none disappears uncounted."""
    require_broker("mqtt")
    harness = MqttHarness(loop)
    loop.run(harness.prepare())
    svc = new_service(redis_server)
    name = f"bridge-qos0-{harness.uid}"
    metrics_port = free_port()
    source = f"{harness.source}&qos0_buffer=200"
    proc = start_bridge(
        name, svc.target, harness, "--max-in-flight", "16",
        "--metrics-port", str(metrics_port), source=source,
    )  # fmt: skip
    try:
        harness.publish([{"id": "first", "text": "the bridge is up"}])
        wait_for(lambda: len(harness.read()) == 1, 120, "the first result", [(proc, name)])
        os.kill(svc.workers[0].pid, signal.SIGSTOP)
        items = [{"id": f"q{i}", "text": t} for i, t in enumerate(fresh_texts(1000, "qos0"))]

        async def publish_at_most_once() -> None:
            topic = f"{harness.topic}/in"
            for item in items:
                await harness.publisher.publish(topic, harness.body(item), qos=0)

        loop.run(publish_at_most_once(), timeout=120)

        # Everything arrived: what the window holds, 200 waiting, the rest dropped.
        def arrived() -> bool:
            dropped = bridge_metric(metrics_port, "embedq_bridge_source_dropped_total")
            held = bridge_metric(metrics_port, "embedq_bridge_in_flight")
            return dropped + held + 200 == len(items)

        wait_for(arrived, 60, "the QoS 0 overflow dropped", [(proc, name)])
        dropped = int(bridge_metric(metrics_port, "embedq_bridge_source_dropped_total"))
        os.kill(svc.workers[0].pid, signal.SIGCONT)
        kept = len(items) - dropped
        wait_for(
            lambda: len(harness.read()) >= 1 + kept, 120, "every kept message's result",
            [(proc, name)],
        )  # fmt: skip
    finally:
        if svc.workers and svc.workers[0].poll() is None:
            os.kill(svc.workers[0].pid, signal.SIGCONT)
        stop_bridge(proc, name)
        svc.stop()
        loop.run(harness.cleanup())
    results = ids_of(harness.read())[1:]
    assert dropped >= len(items) - 200 - 16 and len(results) == kept
    assert len(set(results)) == kept and set(results) <= {item["id"] for item in items}
    assert f"dropped by the source (QoS 0) {dropped}" in log_tail(name, 20)


def bridge_metric(port: int, name: str) -> float:
    """A metric's value from a bridge's --metrics-port (0 until it is exported)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
    return 0.0
