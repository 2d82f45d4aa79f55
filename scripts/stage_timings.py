"""Where the time of one uncached text goes: per-stage timings across processes.

Starts a private Redis, one worker and one server (real processes, real model),
each with timing probes wrapped around its stage functions (the production
code is not changed: the probes are installed by this script before the
process runs). Then it sends single-text Encode calls one after another, and
16 waiting EncodeStream consumers (one text per message, each waiting for its
answer), and prints the median time of every stage:

  recv → lookup (MGET) → enqueue (XADD) → worker read → cancel check →
  tokenize → forward → write → reply read → response

and, for the waiting consumers, the model's share of wall time in forward passes,
the gap between passes, and what the reader and writer threads do beside them.

    python scripts/stage_timings.py [--calls 200] [--streams 16] [--seconds 10]

Event times are `time.time()` (one clock for all processes of one machine).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

EVENTS: list[tuple[float, str]] = []


def _probe(cls: type, name: str, tag: str, *, only_if_result: bool = False) -> None:
    """Record `<tag>:start` and `<tag>:end` around cls.name (sync or async)."""
    original = getattr(cls, name)
    if asyncio.iscoroutinefunction(original):

        @functools.wraps(original)
        async def wrapped_async(*args, **kwargs):
            start = time.time()
            result = await original(*args, **kwargs)
            EVENTS.append((start, f"{tag}:start"))
            EVENTS.append((time.time(), f"{tag}:end"))
            return result

        setattr(cls, name, wrapped_async)
        return

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        start = time.time()
        result = original(*args, **kwargs)
        if not only_if_result or result:
            EVENTS.append((start, f"{tag}:start"))
            EVENTS.append((time.time(), f"{tag}:end"))
        return result

    setattr(cls, name, wrapped)


def _point(tag: str) -> None:
    """An instant event of this process (a span of 1 ns: its end sorts after its start)."""
    now = time.time()
    EVENTS.extend(((now, f"{tag}:start"), (now + 1e-9, f"{tag}:end")))


def _dump_on_exit(path: str) -> None:
    import atexit
    import signal

    def dump(*_: object) -> None:
        with open(path, "w") as handle:
            json.dump(EVENTS, handle)

    atexit.register(dump)
    previous = signal.getsignal(signal.SIGUSR1)
    signal.signal(signal.SIGUSR1, lambda *a: dump())
    del previous


def run_server_role(events_path: str, argv: list[str]) -> int:
    from embedq.server.queue import Dispatcher
    from embedq.server.router import EmbedderService

    from embedq.cli import main

    _probe(EmbedderService, "Encode", "rpc")
    _probe(EmbedderService, "_answer_encode", "rpc")
    # The look-up, whichever way it went (one round trip with the enqueue, or MGET alone);
    # code before the one-trip flush (--pythonpath) has only _lookup.
    _probe(Dispatcher, "_look_up" if hasattr(Dispatcher, "_look_up") else "_lookup", "lookup")
    _probe(Dispatcher, "_flush", "flush")
    _probe(Dispatcher, "_on_reply", "reply")
    _dump_on_exit(events_path)
    return main(argv)


def run_worker_role(events_path: str, argv: list[str]) -> int:
    from embedq.workers.backends import PooledEncoder
    from embedq.workers.backends.simulated import BenchEncoder
    from embedq.workers.worker import Worker

    from embedq.cli import main

    _probe(Worker, "_read", "read", only_if_result=True)
    _probe(Worker, "_drop_cancelled", "cancelcheck")
    _probe(PooledEncoder, "tokenize", "tokenize")
    _probe(PooledEncoder, "embed", "forward")
    _probe(BenchEncoder, "embed", "forward")  # bench-zero / bench-sim: no model
    _probe(Worker, "_write", "write")
    _dump_on_exit(events_path)
    return main(argv)


# -- the driver ------------------------------------------------------------------


def _spawn(
    role: str, events: Path, args: list[str], log: Path, pythonpath: str = ""
) -> subprocess.Popen:
    env = {**os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    return subprocess.Popen(
        [sys.executable, __file__, "--role", role, "--events", str(events), "--", *args],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )


def _texts(n: int) -> list[str]:
    tag = uuid.uuid4().hex[:8]
    return [f"A person number {i} is reading a book in the park ({tag})." for i in range(n)]


def single_calls(target: str, n: int) -> list[tuple[float, float]]:
    import grpc

    from embedq.v1 import embedq_pb2 as pb
    from embedq.v1 import embedq_pb2_grpc

    windows = []
    with grpc.insecure_channel(target) as channel:
        stub = embedq_pb2_grpc.EmbedderStub(channel)
        stub.Encode(pb.EncodeRequest(texts=["warm up"]), timeout=30)
        for text in _texts(n):
            start = time.time()
            stub.Encode(pb.EncodeRequest(texts=[text]), timeout=30)
            windows.append((start, time.time()))
            time.sleep(0.01)
    return windows


async def waiting_streams(target: str, streams: int, seconds: float) -> tuple[int, float, float]:
    import grpc

    from embedq.v1 import embedq_pb2 as pb
    from embedq.v1 import embedq_pb2_grpc

    done = 0
    stop_at = time.monotonic() + seconds

    async def consumer(index: int, stub) -> None:
        nonlocal done
        queue: asyncio.Queue = asyncio.Queue()

        async def requests():
            for i in range(10**9):
                text = await queue.get()
                if text is None:
                    return
                _point("ask")  # handed to gRPC to send
                yield pb.EncodeStreamRequest(id=str(i), texts=[text])

        call = stub.EncodeStream(requests())
        tag = uuid.uuid4().hex[:8]
        texts = (f"Consumer {index} reads event {i} on the weather ({tag})." for i in range(10**9))
        await queue.put(next(texts))
        async for _response in call:
            _point("got")
            done += 1
            await queue.put(None if time.monotonic() > stop_at else next(texts))

    async with grpc.aio.insecure_channel(target) as channel:
        stub = embedq_pb2_grpc.EmbedderStub(channel)
        start = time.time()
        await asyncio.gather(*(consumer(i, stub) for i in range(streams)))
        return done, start, time.time()


def _by_window(events: list[tuple[float, str]], windows: list[tuple[float, float]]):
    """For each call window, the first time each event was seen inside it."""
    events = sorted(events)
    for start, end in windows:
        seen: dict[str, float] = {}
        for t, name in events:
            if start <= t <= end and name not in seen:
                seen[name] = t
        yield start, end, seen


STAGES = [
    ("client → server handler", "client", "rpc:start"),
    ("handler → cache look-up sent", "rpc:start", "lookup:start"),
    ("cache look-up (MGET, or one trip with the enqueue)", "lookup:start", "lookup:end"),
    ("enqueue (XADD round trip, if a second one)", "lookup:end", "flush:end"),
    ("XADD → worker read returns", "flush:end", "read:end"),
    # The cancel check (SMISMEMBER) runs in between only for jobs that waited, or a busy model.
    ("read → tokenize done", "read:end", "tokenize:end"),
    ("forward (model)", "forward:start", "forward:end"),
    ("forward → write start", "forward:end", "write:start"),
    ("write (cache SET, XADD reply, XACK)", "write:start", "write:end"),
    ("write → server reads reply", "write:end", "reply:start"),
    ("reply → handler returns", "reply:start", "rpc:end"),
    ("handler returns → client has it", "rpc:end", "client_end"),
]


def stage_table(windows, events) -> list[tuple[str, float]]:
    rows: dict[str, list[float]] = {label: [] for label, _a, _b in STAGES}
    totals = []
    for start, end, seen in _by_window(events, windows):
        seen = {**seen, "client": start, "client_end": end}
        if not all(b in seen and a in seen for _l, a, b in STAGES):
            continue
        totals.append((end - start) * 1000)
        for label, a, b in STAGES:
            rows[label].append((seen[b] - seen[a]) * 1000)
    table = [(label, statistics.median(v)) for label, v in rows.items() if v]
    table.append(("total (client round trip)", statistics.median(totals) if totals else 0.0))
    return table


def _spans(events, start: float, end: float) -> dict[str, list[tuple[float, float]]]:
    """(start, end) of every probed call per tag that began within [start, end]."""
    spans: dict[str, list[tuple[float, float]]] = {}
    opened: dict[str, float] = {}
    for t, name in sorted(events):
        tag, kind = name.split(":")
        if kind == "start" and start <= t <= end:
            opened[tag] = t
        elif kind == "end" and tag in opened:
            spans.setdefault(tag, []).append((opened.pop(tag), t))
    return spans


def worker_split(events, start: float, end: float) -> dict[str, float | None]:
    """The worker during [start, end]. The model thread: its share of wall time in forward
    passes (the rest it waits for a read) and the median gap between two passes. The reader
    and writer threads run beside the passes, so their shares overlap the model's (a read
    that blocks on Redis counts while it blocks)."""
    spans = _spans(events, start, end)
    wall = end - start
    share = {tag: round(100 * sum(b - a for a, b in s) / wall, 1) for tag, s in spans.items()}
    passes = sorted(spans.get("forward", []))
    gaps = [later[0] - earlier[1] for earlier, later in itertools.pairwise(passes)]
    out: dict[str, float | None] = {
        "model: forward %": share.pop("forward", 0.0),
        "model: median gap between passes (ms)": (
            round(1000 * statistics.median(gaps), 2) if gaps else None
        ),
    }
    out.update({f"{tag} % (reader/writer)": value for tag, value in share.items()})
    return out


# The chain of one gap between two passes (waiting consumers), in order: (label, tag, edge,
# until). Each step is the first `edge` ("start" or "end") of a `tag` span that starts after
# the previous step, or for "last" the last end of one before `until` (the first start of that
# tag after the previous step; None: the next pass).
GAP_CHAIN = [
    ("pass ends → its results are written", "write", "end", None),
    ("→ the server has read the reply", "reply", "end", None),
    ("→ the last answer is built", "rpc", "last", "lookup"),
    ("→ the client has the first answer", "got", "start", None),
    ("→ the client sends the first new text", "ask", "start", None),
    ("→ the first new message is looked up", "lookup", "start", None),
    ("→ the last new message is queued", "flush", "last", None),
    ("→ the next pass starts", "forward", "start", None),
]


def _chain_step(spans, tag: str, edge: str, until: str | None, at: float, next_pass: float):
    """When one GAP_CHAIN step happened after `at` (None: not before the next pass)."""
    if edge == "last":
        bound = min((a for a, _b in spans.get(until, []) if a >= at), default=next_pass)
        ends = [b for _a, b in spans.get(tag, []) if at <= b <= min(bound, next_pass)]
        return max(ends, default=None)
    index = 1 if edge == "end" else 0
    found = min((span[index] for span in spans.get(tag, []) if span[0] >= at), default=None)
    return found if found is not None and found <= next_pass else None


def gap_split(events, start: float, end: float) -> list[tuple[str, float]]:
    """Where the model's idle gaps go while consumers wait (medians, ms): the chain from one
    pass's end to the next's start through the writer, the server and the consumers."""
    spans = _spans(events, start, end)
    passes = sorted(spans.get("forward", []))
    rows: dict[str, list[float]] = {label: [] for label, *_rest in GAP_CHAIN}
    for earlier, later in itertools.pairwise(passes):
        at, steps = earlier[1], []
        for label, tag, edge, until in GAP_CHAIN:
            found = _chain_step(spans, tag, edge, until, at, later[0])
            if found is None:
                break
            steps.append((label, (found - at) * 1000))
            at = found
        else:
            for label, ms in steps:
                rows[label].append(ms)
    return [(label, statistics.median(v)) for label, v in rows.items() if v]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["server", "worker"], help=argparse.SUPPRESS)
    parser.add_argument("--events", help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--pythonpath",
        default="",
        help="run the server and worker from this embedq install (a before/after comparison: "
        "pip install --no-deps --target DIR <old checkout>)",
    )
    parser.add_argument(
        "--backend",
        default="torch",
        help="the worker's backend; bench-zero times the plumbing alone (no model)",
    )
    parser.add_argument("rest", nargs="*")
    args = parser.parse_args()
    if args.role == "server":
        return run_server_role(args.events, args.rest)
    if args.role == "worker":
        return run_worker_role(args.events, args.rest)
    return drive(args)


def drive(args: argparse.Namespace) -> int:
    from embedq.apps.embedded import EmbeddedRedis, free_port

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = Path(tempfile.mkdtemp(prefix="embedq-stages-"))
    port = free_port()
    with EmbeddedRedis() as redis:
        common = ["--redis-url", redis.url, "--namespace", "stages"]
        path = args.pythonpath
        backend = ["--backend", args.backend]
        backend += ["--allow-bench-backend"] if args.backend.startswith("bench-") else []
        worker_args = ["worker", *common, *backend]
        worker = _spawn("worker", tmp / "worker.json", worker_args, tmp / "w.log", path)
        serve_args = ["server", "--port", str(port), *common]
        server = _spawn("server", tmp / "server.json", serve_args, tmp / "s.log", path)
        try:
            _wait_ready(f"127.0.0.1:{port}")
            windows = single_calls(f"127.0.0.1:{port}", args.calls)
            done, s_start, s_end = asyncio.run(
                waiting_streams(f"127.0.0.1:{port}", args.streams, args.seconds)
            )
        finally:
            for proc in (worker, server):
                proc.send_signal(10)  # SIGUSR1: dump events
            time.sleep(1.0)
            for proc in (worker, server):
                proc.terminate()
                proc.wait(timeout=30)
        events = [tuple(e) for f in ("worker.json", "server.json") for e in _load(tmp / f)]
        events += EVENTS  # the consumers' own (this process)
    code = args.pythonpath or "this checkout"
    print(cpu_line(), f"; code: {code}; worker backend: {args.backend}")
    print(f"single uncached text, {len(windows)} calls one after another (medians, ms):")
    for label, ms in stage_table(windows, events):
        print(f"  {label:<42} {ms:8.2f}")
    rate = done / (s_end - s_start)
    print(f"\n{args.streams} waiting EncodeStream consumers: {rate:.0f} texts/s")
    worker_events = [e for e in _load(tmp / "worker.json")]
    for label, value in worker_split(worker_events, s_start, s_end).items():
        print(f"  worker {label:<45} {value}")
    print("  the gap, step by step (medians, ms):")
    for label, ms in gap_split(events, s_start, s_end):
        print(f"    {label:<48} {ms:8.2f}")
    return 0


def cpu_line() -> str:
    from embedq.tools.bench_load import machine, machine_line

    return machine_line(machine())


def _load(path: Path) -> list:
    return json.loads(path.read_text()) if path.exists() else []


def _wait_ready(target: str, timeout: float = 120.0) -> None:
    import grpc

    from embedq.v1 import embedq_pb2 as pb
    from embedq.v1 import embedq_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = embedq_pb2_grpc.EmbedderStub(channel)
        while time.monotonic() < deadline:
            try:
                stub.Encode(pb.EncodeRequest(texts=["ready?"]), timeout=5)
                return
            except grpc.RpcError:
                time.sleep(0.5)
    raise RuntimeError("deployment not ready")


if __name__ == "__main__":
    sys.exit(main())
