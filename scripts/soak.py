"""Soak test: N concurrent EncodeStream calls for T seconds, then a verdict.

    python scripts/soak.py [--target HOST:PORT] [--streams N] [--seconds T]
                           [--texts-per-message K] [--cached-fraction F] [--json OUT]

Without --target it starts its own deployment on free loopback ports (a
private Redis, one `embedq worker`, one `embedq server`) and stops it at the
end. Each stream sends one message at a time and waits for its answer before
sending the next (so at most N messages are in flight). A message carries K
texts; each is, with probability F, one of a small pool of texts encoded
before the clock starts (a cache hit), else a sentence never sent before.

Every ~5 s and at the end it prints messages/s, texts/s, p50/p99 latency per
message (at the end also split: messages answered wholly from the cache, and
the others), errors by status code and, for a deployment it started, the
resident memory of the server and the worker. Traffic goes to loopback only.
Exit status: 0 when every message was answered correctly, 1 if any error
occurred (an error response, a failed call, a wrong id or row count, a
message unanswered within --message-timeout), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from embedq.tools.bench import OBJECTS, SUBJECTS, VERBS, stop_processes

from embedq.v1 import embedq_pb2 as pb
from embedq.v1 import embedq_pb2_grpc

WARM_POOL = 256
CODES = {code.value[0]: code.name for code in grpc.StatusCode}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Soak an embedq deployment with concurrent EncodeStream calls."
    )
    parser.add_argument(
        "--target",
        help="HOST:PORT of a running server on loopback (default: start a private deployment)",
    )
    parser.add_argument("--streams", type=int, default=16, help="concurrent streams (16)")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to send (60)")
    parser.add_argument("--texts-per-message", type=int, default=1, help="texts per message (1)")
    parser.add_argument(
        "--cached-fraction",
        type=float,
        default=0.5,
        help="share of texts drawn from a pre-encoded pool, i.e. cache hits (0.5)",
    )
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    parser.add_argument("--report-every", type=float, default=5.0, help="seconds (5)")
    parser.add_argument(
        "--message-timeout",
        type=float,
        default=60.0,
        help="a message unanswered for this long counts as an error (60)",
    )
    parser.add_argument("--devices", default="auto", help="devices of the worker it starts (auto)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.streams < 1 or args.seconds <= 0 or args.texts_per_message < 1:
        parser.error("--streams, --seconds and --texts-per-message must be positive")
    if not 0.0 <= args.cached_fraction <= 1.0:
        parser.error("--cached-fraction must be between 0 and 1")
    if args.target and not is_loopback(args.target):
        parser.error(f"--target {args.target!r} is not on loopback: the soak stays on this host")
    return args


def is_loopback(target: str) -> bool:
    host = target.rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


# -- traffic ------------------------------------------------------------------------


class Texts:
    """Fresh sentences (never sent before in this run) and a warm pool."""

    def __init__(self, seed: int, cached_fraction: float) -> None:
        self.rng = random.Random(seed)
        self.cached_fraction = cached_fraction
        self.run = f"{time.time_ns():x}"
        self.counter = 0
        self.pool = [self._sentence(f"warm {i}") for i in range(WARM_POOL)]

    def _sentence(self, tag: str) -> str:
        rng = self.rng
        return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} ({tag})."

    def next(self) -> str:
        if self.rng.random() < self.cached_fraction:
            return self.rng.choice(self.pool)
        self.counter += 1
        return self._sentence(f"soak {self.run} {self.counter}")


@dataclass
class Stats:
    started: float = field(default_factory=time.monotonic)
    messages: int = 0
    texts: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    # Messages answered entirely from the cache, and the others.
    cached_ms: list[float] = field(default_factory=list)
    computed_ms: list[float] = field(default_factory=list)
    errors: collections.Counter = field(default_factory=collections.Counter)
    # Since the last report.
    window_messages: int = 0
    window_texts: int = 0
    window_latencies_ms: list[float] = field(default_factory=list)
    window_started: float = field(default_factory=time.monotonic)
    stop_at: float = float("inf")
    interrupted_by: int | None = None

    def interrupt(self, signum: int) -> None:
        """Streams stop after their current message."""
        if self.interrupted_by is None:
            print(f"signal {signum}: stopping after the messages in flight", flush=True)
        self.interrupted_by = signum
        self.stop_at = min(self.stop_at, time.monotonic())

    def answered(self, texts: int, latency_ms: float, all_cached: bool) -> None:
        self.messages += 1
        self.texts += texts
        self.latencies_ms.append(latency_ms)
        (self.cached_ms if all_cached else self.computed_ms).append(latency_ms)
        self.window_messages += 1
        self.window_texts += texts
        self.window_latencies_ms.append(latency_ms)

    def error(self, code: str, detail: str = "") -> None:
        if not self.errors:
            print(f"first error: {code} {detail}", flush=True)
        self.errors[code] += 1


def percentiles(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    p50, p99 = np.percentile(np.asarray(values), [50, 99])
    return float(p50), float(p99)


async def one_stream(
    stub: embedq_pb2_grpc.EmbedderStub,
    number: int,
    texts: Texts,
    per_message: int,
    stats: Stats,
    message_timeout: float,
) -> None:
    """Send one message, wait for its answer, repeat until stats.stop_at. A
    failed call is counted and a new one opened."""
    attempt = 0
    while time.monotonic() < stats.stop_at:
        attempt += 1
        remaining = max(1.0, stats.stop_at - time.monotonic())
        call = stub.EncodeStream(timeout=remaining + message_timeout)
        try:
            prefix = f"{number}.{attempt}"  # ids unique across this stream's calls
            if await exchange(call, prefix, texts, per_message, stats, message_timeout):
                await call.done_writing()
                extra = await asyncio.wait_for(call.read(), message_timeout)
                if extra is not grpc.aio.EOF:
                    stats.error("UNASKED_RESPONSE", f"id {extra.id}")
                return
        except grpc.aio.AioRpcError as exc:
            stats.error(exc.code().name, exc.details() or "")
        except Exception as exc:  # noqa: BLE001 - counted; the soak goes on
            stats.error(f"CLIENT_{type(exc).__name__}", str(exc)[:200])
        call.cancel()
        await asyncio.sleep(0.2)


async def exchange(
    call,
    prefix: str,
    texts: Texts,
    per_message: int,
    stats: Stats,
    message_timeout: float,
) -> bool:
    """One message at a time on `call` until stats.stop_at (True), or until a
    message goes wrong in a way that leaves the call unusable (False)."""
    sequence = 0
    while time.monotonic() < stats.stop_at:
        sequence += 1
        message_id = f"{prefix}-{sequence}"
        batch = [texts.next() for _ in range(per_message)]
        started = time.perf_counter()
        await call.write(pb.EncodeStreamRequest(id=message_id, texts=batch))
        try:
            response = await asyncio.wait_for(call.read(), message_timeout)
        except asyncio.TimeoutError:
            stats.error("MESSAGE_TIMEOUT", f"{message_id} unanswered in {message_timeout}s")
            return False
        latency_ms = (time.perf_counter() - started) * 1000
        if response is grpc.aio.EOF:
            stats.error("STREAM_ENDED", f"{message_id} unanswered")
            return False
        if response.HasField("error"):
            code = CODES.get(response.error.code, f"CODE_{response.error.code}")
            stats.error(code, response.error.message)
        elif response.id != message_id:
            stats.error("WRONG_ID", f"sent {message_id}, got {response.id}")
            return False
        elif (
            response.count != per_message
            or not response.dimension
            or len(response.embeddings) != per_message * response.dimension * 4
        ):
            stats.error("WRONG_ROWS", f"{message_id}: {response.count} rows")
        else:
            stats.answered(per_message, latency_ms, all(response.cached))
    return True


# -- memory ---------------------------------------------------------------------------


def rss_mb(pid: int, field_name: str = "VmRSS") -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def memory(deployment: Deployment | None) -> dict[str, float | None]:
    if deployment is None:
        return {}
    return {name: rss_mb(proc.pid) for name, proc in deployment.procs.items()}


# -- the run ---------------------------------------------------------------------------


async def soak(args: argparse.Namespace, target: str, deployment: Deployment | None) -> dict:
    texts = Texts(args.seed, args.cached_fraction)
    intervals: list[dict] = []
    rss_start = memory(deployment)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = embedq_pb2_grpc.EmbedderStub(channel)
        for start in range(0, len(texts.pool), 64):  # the pool becomes cache hits
            await stub.Encode(pb.EncodeRequest(texts=texts.pool[start : start + 64]), timeout=120)
        rss_warm = memory(deployment)
        stats = Stats()
        stats.stop_at = stats.started + args.seconds
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):  # stop early, still report
            loop.add_signal_handler(sig, stats.interrupt, sig)
        tasks = [
            asyncio.create_task(
                one_stream(
                    stub,
                    number,
                    texts,
                    args.texts_per_message,
                    stats,
                    args.message_timeout,
                )
            )
            for number in range(args.streams)
        ]
        everything = asyncio.gather(*tasks)
        while not everything.done():
            await asyncio.wait([everything], timeout=args.report_every)
            intervals.append(report(stats, deployment))
        await everything
        elapsed = time.monotonic() - stats.started
    p50, p99 = percentiles(stats.latencies_ms)
    rss_end = memory(deployment)
    result = {
        "target": target,
        "own_deployment": deployment is not None,
        "streams": args.streams,
        "seconds": args.seconds,
        "texts_per_message": args.texts_per_message,
        "cached_fraction": args.cached_fraction,
        "elapsed_s": round(elapsed, 2),
        "messages": stats.messages,
        "texts": stats.texts,
        "messages_per_s": round(stats.messages / elapsed, 1),
        "texts_per_s": round(stats.texts / elapsed, 1),
        "latency_ms": {
            "p50": round(p50, 2),
            "p99": round(p99, 2),
            "max": round(max(stats.latencies_ms, default=float("nan")), 2),
        },
        "latency_ms_all_cached": latency_summary(stats.cached_ms),
        "latency_ms_computed": latency_summary(stats.computed_ms),
        "interrupted_by_signal": stats.interrupted_by,
        "errors": dict(stats.errors),
        "error_count": sum(stats.errors.values()),
        "fresh_texts_sent": texts.counter,
        "intervals": intervals,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
    }
    if deployment is not None:
        result["rss_mb"] = {
            name: {
                "start": _round(rss_start.get(name)),
                "after_warm_up": _round(rss_warm.get(name)),
                "end": _round(rss_end.get(name)),
                "peak": _round(rss_mb(proc.pid, "VmHWM")),
            }
            for name, proc in deployment.procs.items()
        }
    return result


def latency_summary(values: list[float]) -> dict:
    p50, p99 = percentiles(values)
    return {"messages": len(values), "p50": round(p50, 2), "p99": round(p99, 2)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def report(stats: Stats, deployment: Deployment | None) -> dict:
    now = time.monotonic()
    span = max(now - stats.window_started, 1e-9)
    p50, p99 = percentiles(stats.window_latencies_ms)
    rss = memory(deployment)
    interval = {
        "t_s": round(now - stats.started, 1),
        "messages_per_s": round(stats.window_messages / span, 1),
        "texts_per_s": round(stats.window_texts / span, 1),
        "p50_ms": round(p50, 2),
        "p99_ms": round(p99, 2),
        "errors_so_far": sum(stats.errors.values()),
        "rss_mb": {name: _round(value) for name, value in rss.items()},
    }
    memory_text = "".join(
        f"  {name} {value:.0f} MB" for name, value in rss.items() if value is not None
    )
    print(
        f"[{interval['t_s']:6.1f}s] {interval['messages_per_s']:7.1f} msg/s "
        f"{interval['texts_per_s']:7.1f} texts/s  p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  "
        f"errors {interval['errors_so_far']}{memory_text}",
        flush=True,
    )
    stats.window_messages = stats.window_texts = 0
    stats.window_latencies_ms = []
    stats.window_started = now
    return interval


def summary(result: dict) -> str:
    lines = [
        f"soak: {result['streams']} streams x {result['elapsed_s']} s against "
        f"{result['target']} ({result['texts_per_message']} text(s)/message, "
        f"{result['cached_fraction']:.0%} from the warm pool)",
        f"  {result['messages']} messages, {result['texts']} texts: "
        f"{result['messages_per_s']} msg/s, {result['texts_per_s']} texts/s",
        f"  latency per message: p50 {result['latency_ms']['p50']} ms, "
        f"p99 {result['latency_ms']['p99']} ms, max {result['latency_ms']['max']} ms",
        f"    answered from the cache: p50 {result['latency_ms_all_cached']['p50']} ms, "
        f"p99 {result['latency_ms_all_cached']['p99']} ms "
        f"({result['latency_ms_all_cached']['messages']} messages); "
        f"computed: p50 {result['latency_ms_computed']['p50']} ms, "
        f"p99 {result['latency_ms_computed']['p99']} ms",
        f"  errors: {result['error_count']} {result['errors'] or ''}".rstrip(),
    ]
    for name, rss in result.get("rss_mb", {}).items():
        lines.append(
            f"  {name} RSS: start {rss['start']} MB, after warm-up {rss['after_warm_up']} MB, "
            f"end {rss['end']} MB, peak {rss['peak']} MB"
        )
    return "\n".join(lines)


@dataclass
class Deployment:
    """A private Redis, one worker and one server on free loopback ports."""

    target: str
    redis: object
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @classmethod
    def start(cls, devices: str, timeout: float = 180.0) -> Deployment:
        from embedq.apps.embedded import EmbeddedRedis, free_port

        redis_server = EmbeddedRedis().start()
        port = free_port()
        deployment = cls(f"127.0.0.1:{port}", redis_server)
        cli = [sys.executable, "-m", "embedq.cli", "--log-level", "WARNING"]
        redis_flag = ["--redis-url", redis_server.url]
        try:
            deployment.procs["worker"] = subprocess.Popen(
                [*cli, "worker", *redis_flag, "--devices", devices]
            )
            deployment.procs["server"] = subprocess.Popen(
                [*cli, "server", *redis_flag, "--host", "127.0.0.1", "--port", str(port)]
            )
            deployment.wait_ready(timeout)
        except BaseException:
            deployment.stop()
            raise
        return deployment

    def wait_ready(self, timeout: float) -> None:
        """Until the server answers Info with a live worker."""
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            stub = embedq_pb2_grpc.EmbedderStub(channel)
            while time.monotonic() < deadline:
                for name, proc in self.procs.items():
                    if proc.poll() is not None:
                        raise RuntimeError(f"{name} exited with status {proc.returncode}")
                try:
                    info = stub.Info(pb.InfoRequest(), timeout=2)
                    if info.models and info.models[0].workers_alive:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise RuntimeError(f"deployment not ready after {timeout:.0f}s")

    def stop(self) -> None:
        stop_processes(self.procs.values())
        self.redis.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def terminate(signum: int, _frame: object) -> None:
        # Before the run (while the deployment starts): unwind through its
        # cleanup. During the run the event loop handles the signal instead.
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    deployment = None
    try:
        if args.target:
            target = args.target
        else:
            print("starting a private deployment (redis, 1 worker, 1 server)...", flush=True)
            deployment = Deployment.start(args.devices)
            target = deployment.target
        result = asyncio.run(soak(args, target, deployment))
    finally:
        if deployment is not None:
            deployment.stop()
    print(summary(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if result["error_count"] or not result["messages"]:
        return 1
    if result["interrupted_by_signal"]:
        return 128 + result["interrupted_by_signal"]
    return 0


if __name__ == "__main__":
    sys.exit(main())
