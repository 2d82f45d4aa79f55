"""`embedq bench --scenario NAME`: the machine header, the fp32 roofline, and the load scenarios.

  burst        N clients loop Encode of new texts with a deadline: goodput / capacity, outcomes,
               time to a refusal, recovery after the burst (worse-burst: 64 x 256, 20 s)
  slow-reader  one EncodeStream that sends and never reads: server RSS growth, fairness
  streams      16 EncodeStreams of waiting consumers (send one text, wait, send the next) vs R,
               and vs the worker's encoder alone in-process at 16 texts a pass
  busy-streams 32 pipelined EncodeStreams (16 one-text messages in flight each) and another
               caller's 1-text Encode with a 2 s deadline: its outcomes, the streams' share
  plumbing     bench-zero workers (no model): uncached / waiting-stream / cached texts/s and
               Redis commands and bytes per text
  scaling      1, 2, 4, 8 bench-sim workers behind 1 and 2 servers: texts/s, CPU per process

Speed is reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import multiprocessing
import os
import random
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from embedq.v1 import embedq_pb2 as pb
from embedq.v1 import embedq_pb2_grpc

CORE = "core"  # R, S1, S2, S3, latency, memory (bench.py)
LOAD_SCENARIOS = (
    "burst",
    "worse-burst",
    "slow-reader",
    "streams",
    "busy-streams",
    "plumbing",
    "scaling",
)
# Each starts a deployment of its own and prints its own table (bench.run_separate).
SEPARATE_SCENARIOS = ("http", "bridge")
SCENARIOS = (CORE, *LOAD_SCENARIOS, *SEPARATE_SCENARIOS)
# Scenarios that use the main private deployment (the real model) / the reference R.
ON_MAIN = {CORE, "burst", "worse-burst", "slow-reader", "streams", "busy-streams"}
NEED_REFERENCE = {CORE, "streams"}
RETRY_AFTER_DEFAULT_S = 0.1
# A stream message's Error.code (a number) as the status it stands for.
STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
CPU_FLAGS = {
    "AVX2": ("avx2",),
    "AVX-512": ("avx512f",),
    "VNNI": ("avx512_vnni", "avx_vnni"),
    "AMX": ("amx_tile",),
}


def selected(names: Sequence[str] | None) -> list[str]:
    """--scenario values -> scenarios to run, in SCENARIOS order (none given: core)."""
    chosen = set(names or [CORE])
    if "all" in chosen:
        return list(SCENARIOS)
    unknown = chosen - set(SCENARIOS)
    if unknown:
        raise ValueError(f"unknown scenario(s) {sorted(unknown)}; choose from {SCENARIOS}, all")
    return [name for name in SCENARIOS if name in chosen]


def add_load_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--scenario",
        action="append",
        metavar="NAME",
        help=f"run this scenario (repeat; 'all'): {', '.join(SCENARIOS)} [core]",
    )
    add(
        "--duration",
        type=float,
        default=20.0,
        help="burst / slow-reader / busy-streams seconds [%(default)s]",
    )
    add("--burst-clients", type=int, default=32, help="burst: clients [%(default)s]")
    add("--burst-texts", type=int, default=128, help="burst: texts per call [%(default)s]")
    add("--burst-deadline", type=float, default=10.0, help="burst: deadline s [%(default)s]")
    add("--slow-messages", type=int, default=50_000, help="slow-reader: messages [%(default)s]")
    add("--stream-texts", type=int, default=0, help="streams: texts [--texts]")
    add("--busy-streams", type=int, default=32, help="busy-streams: streams [%(default)s]")
    add("--busy-depth", type=int, default=16, help="busy-streams: messages in flight [%(default)s]")
    add(
        "--other-deadline",
        type=float,
        default=2.0,
        help="busy-streams: the other caller's deadline s [%(default)s]",
    )
    add("--plumbing-texts", type=int, default=20_000, help="plumbing: texts [%(default)s]")
    add("--plumbing-workers", type=int, default=1, help="plumbing: workers [%(default)s]")
    add("--scaling-workers", default="1,2,4,8", help="scaling: worker counts [%(default)s]")
    add("--scaling-servers", default="1,2", help="scaling: server counts [%(default)s]")
    add("--scaling-seconds", type=float, default=5.0, help="scaling: s per point [%(default)s]")
    add("--sim-forward-ms", type=float, default=4.0, help="bench-sim ms per pass [%(default)s]")
    add("--sim-token-us", type=float, default=1.0, help="bench-sim us per token [%(default)s]")
    add(
        "--redis-cluster",
        action="store_true",
        help="plumbing: also on a private 3-master Redis Cluster",
    )


# -- the machine ----------------------------------------------------------------------------


def cpu_info(path: str = "/proc/cpuinfo") -> dict:
    """CPU model, logical cores and the SIMD features that matter to the encoder."""
    model, flags = "unknown", set()
    try:
        for line in Path(path).read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    features = {name: any(f in flags for f in names) for name, names in CPU_FLAGS.items()}
    return {"model": model, "cores": os.cpu_count(), "flags": features}


def gpu_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except Exception:  # noqa: BLE001 - no torch, no driver: no GPU to name
        return "none"


def machine() -> dict:
    return {"cpu": cpu_info(), "gpu": gpu_name()}


def machine_line(info: dict) -> str:
    cpu = info["cpu"]
    flags = ", ".join(f"{name} {'yes' if on else 'no'}" for name, on in cpu["flags"].items())
    return f"CPU {cpu['model']} ({cpu['cores']} cores; {flags}); GPU {info['gpu']}"


# -- fp32 roofline --------------------------------------------------------------------------

FLOPS_FORMULA = (
    "per token: layers x (2 x (4 h^2 + 2 h ffn) + 2 x 2 x seq x h); h hidden size, ffn "
    "intermediate size, seq mean tokens per text (projections Q K V O, FFN up and down, "
    "attention scores and weighted sum; multiply-add = 2 FLOPs; embeddings, norms, softmax "
    "and pooling left out)"
)


def peak_gflops(n: int = 1024, reps: int = 20) -> float:
    """Measured fp32 matmul GFLOP/s with torch's current threads (the worker's default)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 * reps / best / 1e9


def flops_per_token(config: object, seq: float) -> float:
    h = int(getattr(config, "hidden_size", 0) or config.d_model)
    ffn = int(getattr(config, "intermediate_size", 4 * h))
    layers = int(getattr(config, "num_hidden_layers", 0) or config.num_layers)
    return layers * (2 * (4 * h * h + 2 * h * ffn) + 2 * 2 * seq * h)


def roofline(folder: Path, texts: list[str], throughput: dict[str, float]) -> dict:
    """FLOPs per token from the model config, tokens per text from its tokenizer, achieved
    GFLOP/s of each texts/s figure given and its % of the measured peak."""
    from transformers import AutoConfig, AutoTokenizer

    transformer = _transformer_dir(folder)
    config = AutoConfig.from_pretrained(transformer, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(transformer, local_files_only=True)
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True)["input_ids"]]
    seq = float(np.mean(lengths))
    per_token = flops_per_token(config, seq)
    peak = peak_gflops()
    out = {"peak_gflops": peak, "flops_per_token": per_token, "tokens_per_text": seq}
    out["formula"] = FLOPS_FORMULA
    for name, texts_per_s in throughput.items():
        achieved = texts_per_s * seq * per_token / 1e9
        out[name] = {"gflops": achieved, "percent_of_peak": 100 * achieved / peak}
    return out


def _transformer_dir(folder: Path) -> Path:
    from embedq.workers.backends.layout import read_layout

    return read_layout(folder).transformer_dir


# -- processes ------------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all cores together, from /proc/stat."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return 0, 0
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


class CpuMeter:
    """CPU % of one core per named pid over an interval (200 % = two cores busy), and how
    busy the whole machine was (% of all cores, other people's processes included)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.started = time.monotonic()
        self.before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        self.machine_before = machine_jiffies()

    def percent(self) -> dict[str, float]:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        used = {name: cpu_seconds(pid) - self.before[name] for name, pid in self.pids.items()}
        return {name: round(100 * seconds / elapsed, 1) for name, seconds in used.items()}

    def machine_percent(self) -> float:
        busy, total = machine_jiffies()
        spent = total - self.machine_before[1]
        return round(100 * (busy - self.machine_before[0]) / spent, 1) if spent else 0.0


# -- texts and calls ------------------------------------------------------------------------


class UniqueTexts:
    """STS-like sentences made new by a run nonce and a counter: never cached before."""

    def __init__(self, base: list[str]) -> None:
        self.base = base
        self.nonce = f"{random.getrandbits(32):08x}"
        self.counter = itertools.count()

    def take(self, count: int) -> list[str]:
        out = []
        for _ in range(count):
            i = next(self.counter)
            out.append(f"{self.base[i % len(self.base)]} [{self.nonce}-{i}]")
        return out


def retry_after_s(error: grpc.aio.AioRpcError) -> float:
    """The server's retry-after-ms trailing metadata (integer ms), else 100 ms."""
    for key, value in error.trailing_metadata() or ():
        if key == "retry-after-ms":
            try:
                return max(0, int(value)) / 1000
            except (TypeError, ValueError):
                break
    return RETRY_AFTER_DEFAULT_S


def paired_ratio(runs: Sequence[float], reference_runs: Sequence[float]) -> float:
    """Median of run-by-run ratios (runs[i] was measured right after reference_runs[i])."""
    return statistics.median(s / r for s, r in zip(runs, reference_runs, strict=True))


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


async def encode_window(stub, texts: list[str], batch: int, in_flight: int) -> None:
    """Encode `texts` in calls of `batch`, `in_flight` calls at a time."""
    window = asyncio.Semaphore(in_flight)

    async def one(chunk: list[str]) -> None:
        async with window:
            await stub.Encode(pb.EncodeRequest(texts=chunk), timeout=600)

    await asyncio.gather(*(one(texts[i : i + batch]) for i in range(0, len(texts), batch)))


async def waiting_streams(stub, texts: list[str], streams: int) -> None:
    """Event consumers: each stream sends one text, waits for its answer, sends the next."""

    async def consumer(share: list[str]) -> None:
        call = stub.EncodeStream(timeout=600)
        for i, text in enumerate(share):
            await call.write(pb.EncodeStreamRequest(id=str(i), texts=[text]))
            response = await call.read()
            if response is grpc.aio.EOF or response.HasField("error"):
                raise RuntimeError(f"stream answer: {response}")
        await call.done_writing()

    await asyncio.gather(*(consumer(texts[i::streams]) for i in range(streams)))


async def timed_async(make: Callable[[], Awaitable[None]]) -> float:
    started = time.perf_counter()
    await make()
    return time.perf_counter() - started


# -- burst ----------------------------------------------------------------------------------


@dataclass
class BurstTally:
    calls: Counter = field(default_factory=Counter)
    ok_texts: int = 0
    refusal_ms: list[float] = field(default_factory=list)
    ok_ms: list[float] = field(default_factory=list)
    other_codes: Counter = field(default_factory=Counter)


async def burst_client(stub, source: UniqueTexts, per_call: int, deadline: float, stop_at, tally):
    while time.monotonic() < stop_at:
        request = pb.EncodeRequest(texts=source.take(per_call))
        started = time.perf_counter()
        try:
            await stub.Encode(request, timeout=deadline)
        except grpc.aio.AioRpcError as error:
            code = error.code()
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                tally.calls["refused"] += 1
                tally.refusal_ms.append((time.perf_counter() - started) * 1000)
                pause = retry_after_s(error)
            elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
                tally.calls["deadline_exceeded"] += 1
                pause = 0.0
            else:
                tally.calls["other"] += 1
                tally.other_codes[code.name] += 1
                pause = RETRY_AFTER_DEFAULT_S
            # Never past the burst's end: a client that would call again only after it
            # has stopped, so the goodput's elapsed time is the burst's, not its sleep.
            await asyncio.sleep(max(0.0, min(pause, stop_at - time.monotonic())))
            continue
        tally.calls["ok"] += 1
        tally.ok_texts += per_call
        tally.ok_ms.append((time.perf_counter() - started) * 1000)


async def time_to_recover(stub, source: UniqueTexts, limit_s: float = 60.0) -> float | None:
    """Seconds from now until a 4-text uncached Encode succeeds (None: not within limit_s)."""
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        try:
            await stub.Encode(pb.EncodeRequest(texts=source.take(4)), timeout=2)
            return time.monotonic() - started
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                await asyncio.sleep(min(retry_after_s(error), 0.05))
    return None


async def burst(
    target: str,
    base: list[str],
    clients: int,
    per_call: int,
    deadline: float,
    duration: float,
) -> dict:
    """The burst's outcomes; its capacity is added by run_bursts (see with_capacity)."""
    source, tally = UniqueTexts(base), BurstTally()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = embedq_pb2_grpc.EmbedderStub(channel)
        started = time.monotonic()
        stop_at = started + duration
        await asyncio.gather(
            *(
                burst_client(stub, source, per_call, deadline, stop_at, tally)
                for _ in range(clients)
            )
        )
        elapsed = time.monotonic() - started  # until the last call of the burst ended
        recovery = await time_to_recover(stub, source)
    return burst_summary(tally, clients, per_call, deadline, elapsed, recovery)


def burst_summary(tally, clients, per_call, deadline, elapsed, recovery) -> dict:
    total = max(1, sum(tally.calls.values()))
    goodput = tally.ok_texts / elapsed
    share = {k: 100 * tally.calls[k] / total for k in ("ok", "refused", "deadline_exceeded")}
    return {
        "clients": clients,
        "texts_per_call": per_call,
        "deadline_s": deadline,
        "seconds": elapsed,
        "calls": sum(tally.calls.values()),
        "goodput_texts_per_s": goodput,
        "percent_calls": {**share, "other": 100 * tally.calls["other"] / total},
        "percent_ok_or_fast_refusal": 100
        * (tally.calls["ok"] + sum(1 for ms in tally.refusal_ms if ms <= 100))
        / total,
        "other_codes": dict(tally.other_codes),
        "refusal_ms": {"p50": pct(tally.refusal_ms, 50), "p99": pct(tally.refusal_ms, 99)},
        "ok_ms": {"p50": pct(tally.ok_ms, 50), "p99": pct(tally.ok_ms, 99)},
        "recovery_s": recovery,
    }


# -- slow reader ----------------------------------------------------------------------------


async def slow_reader(
    target: str, base: list[str], messages: int, duration: float, server_pid: int | None
) -> dict:
    """One EncodeStream that sends up to `messages` single-text messages and never reads,
    for `duration` s; meanwhile the server's RSS and a 1-text Encode every 0.5 s from another
    connection."""
    source, sent, stop = UniqueTexts(base), [0], asyncio.Event()

    async def requests():
        for i in range(messages):
            if stop.is_set():
                return
            yield pb.EncodeStreamRequest(id=str(i), texts=source.take(1))
            sent[0] += 1
        await stop.wait()  # keep the stream open, still not reading

    async with grpc.aio.insecure_channel(target) as hog, grpc.aio.insecure_channel(target) as other:
        rss_before = rss_mb(server_pid) if server_pid else None
        call = embedq_pb2_grpc.EmbedderStub(hog).EncodeStream(requests(), timeout=duration + 60)
        samples = await _sample_while_hogging(
            embedq_pb2_grpc.EmbedderStub(other), source, duration, server_pid
        )
        stop.set()
        call.cancel()
    rss = samples["rss"]
    return {
        "messages_sent": sent[0],
        "seconds": duration,
        "server_rss_mb": {"before": rss_before, "max": max(rss) if rss else None},
        "server_rss_growth_mb": max(rss) - rss_before if rss and rss_before else None,
        "other_encode_ms": {
            "p50": pct(samples["ms"], 50),
            "p99": pct(samples["ms"], 99),
            "max": max(samples["ms"], default=None),
        },
        "other_encode_failures": samples["failures"],
    }


async def _sample_while_hogging(
    stub, source, duration: float, server_pid: int | None, deadline_s: float = 30.0
) -> dict:
    samples: dict = {"rss": [], "ms": [], "failures": Counter()}
    stop_at = time.monotonic() + duration
    while time.monotonic() < stop_at:
        tick = time.monotonic()
        if server_pid:
            samples["rss"].append(rss_mb(server_pid))
        try:
            started = time.perf_counter()
            await stub.Encode(pb.EncodeRequest(texts=source.take(1)), timeout=deadline_s)
            samples["ms"].append((time.perf_counter() - started) * 1000)
        except grpc.aio.AioRpcError as error:
            samples["failures"][error.code().name] += 1
        await asyncio.sleep(max(0.0, 0.5 - (time.monotonic() - tick)))
    samples["failures"] = dict(samples["failures"])
    return samples


# -- busy streams and another caller ---------------------------------------------------------


async def pipelined_consumer(stub, source: UniqueTexts, depth: int, stop, answered: list) -> None:
    """One EncodeStream with up to `depth` one-text messages in flight, the next sent as an
    answer comes back (a bridge, a consumer of a busy topic); answers counted in `answered`
    (per-message errors as their code's name)."""
    call = stub.EncodeStream(timeout=3600)
    in_flight = asyncio.Semaphore(depth)

    async def send() -> None:
        for i in itertools.count():
            await in_flight.acquire()
            await call.write(pb.EncodeStreamRequest(id=str(i), texts=source.take(1)))

    sender = asyncio.create_task(send())
    try:
        while not stop.is_set():
            response = await call.read()
            if response is grpc.aio.EOF:
                break
            in_flight.release()
            number = response.error.code if response.HasField("error") else 0
            answered.append(STATUS_BY_NUMBER[number] if number else 0)
    except grpc.aio.AioRpcError as error:
        answered.append(error.code())
    finally:
        sender.cancel()
        call.cancel()


async def busy_streams(
    target: str, base: list[str], args: argparse.Namespace, server_pid: int | None
) -> dict:
    """`--busy-streams` pipelined consumers for `--duration` s, and meanwhile another caller's
    1-text Encode every 0.5 s with a `--other-deadline`: is it served, and how fast?"""
    source, stop = UniqueTexts(base), asyncio.Event()
    answered: list[list] = [[] for _ in range(args.busy_streams)]
    async with (
        grpc.aio.insecure_channel(target) as hogs,
        grpc.aio.insecure_channel(target) as other,
    ):
        stub = embedq_pb2_grpc.EmbedderStub(hogs)
        rss_before = rss_mb(server_pid) if server_pid else None
        tasks = [
            asyncio.create_task(pipelined_consumer(stub, source, args.busy_depth, stop, share))
            for share in answered
        ]
        await asyncio.sleep(2.0)  # past the streams' first windows
        counted = [len(share) for share in answered]
        started = time.monotonic()
        samples = await _sample_while_hogging(
            embedq_pb2_grpc.EmbedderStub(other),
            source,
            args.duration,
            server_pid,
            args.other_deadline,
        )
        elapsed = time.monotonic() - started
        per_stream = [len(share) - before for share, before in zip(answered, counted, strict=True)]
        stop.set()
        await asyncio.wait(tasks, timeout=30)
    errors = Counter(code.name for share in answered for code in share if code)
    rss = samples["rss"]
    return {
        "streams": args.busy_streams,
        "depth": args.busy_depth,
        "seconds": elapsed,
        "streams_texts_per_s": sum(per_stream) / elapsed,
        "per_stream_texts": {"min": min(per_stream), "max": max(per_stream)},
        "stream_errors": dict(errors),
        "server_rss_growth_mb": max(rss) - rss_before if rss and rss_before else None,
        "other_deadline_s": args.other_deadline,
        "other_calls": len(samples["ms"]) + sum(samples["failures"].values()),
        "other_served": len(samples["ms"]),
        "other_encode_ms": {"p50": pct(samples["ms"], 50), "p95": pct(samples["ms"], 95)},
        "other_encode_failures": samples["failures"],
    }


# -- waiting streams vs R -------------------------------------------------------------------


async def streams_vs_r(
    model, deployment, texts: list[str], reps: int, streams: int = 16, encoder=None
) -> dict:
    """Reps interleave R, the waiting consumers (on fresh, uncached texts) and, given the
    worker's `encoder` loaded in-process, that model alone at `streams` texts a pass."""
    r_runs, s_runs, ceiling_runs = [], [], []
    async with grpc.aio.insecure_channel(deployment.target) as channel:
        stub = embedq_pb2_grpc.EmbedderStub(channel)
        for rep in range(reps):
            started = time.perf_counter()
            model.encode(texts, batch_size=32)
            r_runs.append(len(texts) / (time.perf_counter() - started))
            if encoder is not None:
                ceiling_runs.append(batch_ceiling(encoder, texts, streams))
            fresh = deployment.fresh(texts, 5000 + rep)
            elapsed = await timed_async(lambda f=fresh: waiting_streams(stub, f, streams))
            s_runs.append(len(texts) / elapsed)
    r, s = statistics.median(r_runs), statistics.median(s_runs)
    out = {
        "streams": streams,
        "texts": len(texts),
        "R_runs": r_runs,
        "runs": s_runs,
        "texts_per_s": s,
        "R_texts_per_s": r,
        "ratio_to_R": s / r,
        "paired_ratio_to_R": paired_ratio(s_runs, r_runs),
    }
    if ceiling_runs:
        ceiling = statistics.median(ceiling_runs)
        out["ceiling_runs"] = ceiling_runs
        out["ceiling_texts_per_s"] = ceiling
        out["ceiling_ratio_to_R"] = ceiling / r
        out["share_of_ceiling"] = s / ceiling
    return out


def batch_ceiling(encoder, texts: list[str], batch: int) -> float:
    """Texts/s of the worker's model alone, in-process, tokenizing and encoding `batch` texts a
    pass in arrival order: the most that `batch` consumers each waiting for their one text can
    get from it (a pass never holds more), so that the streams' figure splits into what the
    batch size costs against R and what the queue path costs (docs/benchmarks.md)."""
    started = time.perf_counter()
    for start in range(0, len(texts), batch):
        chunk = encoder.tokenize(texts[start : start + batch])
        encoder.embed([item.ids for item in chunk])
    return len(texts) / (time.perf_counter() - started)


def load_encoder(args: argparse.Namespace, model):
    """The worker's encoder in this process, as the bench's own deployment runs it, on R's
    device (None for a deployment of --target, whose model is not ours)."""
    if args.target:
        return None
    from embedq.workers.backends import PooledEncoder

    return PooledEncoder.load(
        args.model,
        device=str(model.device),
        fp16=args.fp16,
        backend=args.backend,
        allow_bench=True,  # the bench's own workers run a bench backend when asked
    )


# -- plumbing: bench-zero workers, Redis traffic per text -----------------------------------


def redis_counters(nodes: list) -> dict:
    """Summed over nodes: calls per command (INFO commandstats) and network bytes (INFO stats)."""
    calls: Counter = Counter()
    net = Counter()
    for node in nodes:
        for key, value in node.info("commandstats").items():
            calls[key.removeprefix("cmdstat_")] += int(value["calls"])
        stats = node.info("stats")
        net["in"] += int(stats["total_net_input_bytes"])
        net["out"] += int(stats["total_net_output_bytes"])
    return {"calls": calls, "net": net, "at": time.monotonic()}


def redis_per_text(before: dict, after: dict, texts: int, idle: dict | None) -> dict:
    """Commands and bytes per text between two counters, less the idle background rate
    (heartbeats, registry refreshes, blocking reads) over the same time."""
    seconds = after["at"] - before["at"]
    calls = after["calls"] - before["calls"]
    calls.pop("info", None)  # our own look-ups
    net = {k: after["net"][k] - before["net"][k] for k in ("in", "out")}
    if idle:
        calls = calls - Counter({k: round(v * seconds) for k, v in idle["calls"].items()})
        net = {k: max(0.0, v - idle["net"][k] * seconds) for k, v in net.items()}
    per_command = {k: round(v / texts, 4) for k, v in calls.most_common() if v / texts >= 1e-3}
    return {
        "commands_per_text": sum(calls.values()) / texts,
        "by_command": per_command,
        "bytes_in_per_text": net["in"] / texts,
        "bytes_out_per_text": net["out"] / texts,
    }


async def idle_rate(nodes: list, seconds: float = 2.0) -> dict:
    before = redis_counters(nodes)
    await asyncio.sleep(seconds)
    after = redis_counters(nodes)
    elapsed = after["at"] - before["at"]
    calls = after["calls"] - before["calls"]
    calls.pop("info", None)
    return {
        "calls": {k: v / elapsed for k, v in calls.items()},
        "net": {k: (after["net"][k] - before["net"][k]) / elapsed for k in ("in", "out")},
    }


def bench_worker_argv(backend: str, args: argparse.Namespace) -> list[str]:
    argv = ["--devices", "cpu", "--backend", backend, "--allow-bench-backend"]
    if backend == "bench-sim":
        argv += ["--sim-forward-ms", str(args.sim_forward_ms)]
        argv += ["--sim-token-us", str(args.sim_token_us)]
    return argv + (["--model", args.model] if args.model else [])


async def plumbing(args: argparse.Namespace, base: list[str], cluster: bool = False) -> dict:
    """A deployment of bench-zero workers (no model): the queue path's own ceiling."""
    from embedq.tools.bench import Deployment

    local = BenchCluster().start() if cluster else None
    try:
        argv = bench_worker_argv("bench-zero", args)
        url = local.url if local else None
        # The servers' own near cache: these texts are new, never flushed (see fresh()).
        workers = [argv] * args.plumbing_workers
        deployment = Deployment.launch(workers, redis_url=url, near_cache_mb=None)
        try:
            nodes = local.clients() if local else [_redis(deployment.redis_url)]
            out = await plumbing_measure(
                deployment.target, nodes, base, args.plumbing_texts, args.reps
            )
        finally:
            deployment.stop()
    finally:
        if local:
            local.stop()
    if not cluster:  # Redis plays no part in it: measured once, with the deployment gone
        streamed = out["waiting_streams_64"]["texts"]
        floors = await grpc_floor(base, streamed, args.plumbing_texts * CACHED_ROUNDS)
        out["waiting_streams_64_grpc_floor"], out["cached_batches_256_grpc_floor"] = floors
    return {
        "workers": args.plumbing_workers,
        "redis": "cluster" if cluster else "standalone",
        **out,
    }


def _redis(url: str):
    import redis

    return redis.Redis.from_url(url)


# The cached phase sends the uncached phase's texts this many times over: one pass of 20,000
# cached texts lasts ~0.15 s, too short to measure on a noisy host (runs spread 108-135k).
CACHED_ROUNDS = 5


async def plumbing_measure(
    target: str, nodes: list, base: list[str], count: int, reps: int = 1
) -> dict:
    """Each phase `reps` times on new texts, interleaved; its median run (a phase lasts about
    a second: one run alone moved 20-26k uncached texts/s between runs on a noisy host)."""
    source = UniqueTexts(base)
    uncached, cached, streamed_runs = [], [], []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = embedq_pb2_grpc.EmbedderStub(channel)
        await encode_window(stub, source.take(1024), 256, 8)  # warm-up
        idle = await idle_rate(nodes)
        for _ in range(max(1, reps)):
            texts = source.take(count)
            uncached.append(
                await _counted(nodes, idle, texts, lambda t=texts: encode_window(stub, t, 256, 8))
            )
            again = texts * CACHED_ROUNDS
            cached.append(
                await _counted(nodes, idle, again, lambda a=again: encode_window(stub, a, 256, 8))
            )
            streamed = source.take(max(64, count // 4))
            run = await _counted(
                nodes, idle, streamed, lambda t=streamed: waiting_streams(stub, t, 64)
            )
            streamed_runs.append({"texts": len(streamed), **run})
    return {
        "texts": count,
        "reps": len(uncached),
        "uncached_batches_256": median_run(uncached),
        "waiting_streams_64": median_run(streamed_runs),
        "cached_batches_256": median_run(cached),
        "idle_redis_commands_per_s": sum(idle["calls"].values()),
    }


def median_run(runs: list[dict]) -> dict:
    """The run of median texts/s (the lower middle one of an even count), with every run's
    texts/s beside it."""
    ranked = sorted(runs, key=lambda run: run["texts_per_s"])
    return {**ranked[(len(ranked) - 1) // 2], "runs": [run["texts_per_s"] for run in runs]}


class EchoEmbedder(embedq_pb2_grpc.EmbedderServicer):
    """Answers each EncodeStream message at once with a zero vector of the model's shape: no
    Redis, no worker, no validation. What the same waiting streams reach against it is the
    floor that gRPC's Python server and client alone set on this machine."""

    def __init__(self, dimension: int) -> None:
        self.dimension, self.blob = dimension, bytes(4 * dimension)

    async def Encode(self, request, context):
        # Answers as a cache hit would: every row's vector, flagged cached.
        count = len(request.texts)
        return pb.EncodeResponse(
            model="echo",
            dimension=self.dimension,
            dtype=pb.DTYPE_FLOAT32,
            count=count,
            embeddings=self.blob * count,
            cached=[True] * count,
        )

    async def EncodeStream(self, request_iterator, context):
        async for message in request_iterator:
            yield pb.EncodeStreamResponse(
                id=message.id,
                model="echo",
                dimension=self.dimension,
                dtype=pb.DTYPE_FLOAT32,
                count=1,
                embeddings=self.blob,
                cached=[False],
            )


def serve_echo(port: int, dimension: int) -> None:
    """A bare grpc.aio server with EchoEmbedder, in its own process (see grpc_floor)."""

    async def main() -> None:
        server = grpc.aio.server()
        embedq_pb2_grpc.add_EmbedderServicer_to_server(EchoEmbedder(dimension), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


async def grpc_floor(
    base: list[str], count: int, batched: int, streams: int = 64, dimension: int = 384
) -> tuple[dict, dict]:
    """gRPC's own ceilings, against EchoEmbedder in another process: `count` texts over 64
    waiting streams, then `batched` texts in Encode calls of 256, 8 in flight (what the
    cached phase sends, minus Redis, hashing and the dispatcher)."""
    from embedq.apps.embedded import free_port

    port = free_port()
    process = multiprocessing.get_context("spawn").Process(
        target=serve_echo, args=(port, dimension), daemon=True
    )
    process.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), timeout=60)
            stub = embedq_pb2_grpc.EmbedderStub(channel)
            source, pids = UniqueTexts(base), {"echo server": process.pid, "bench": os.getpid()}
            texts = source.take(count)
            streamed = await _floor_run(pids, count, lambda: waiting_streams(stub, texts, streams))
            more = source.take(batched)
            calls = await _floor_run(pids, batched, lambda: encode_window(stub, more, 256, 8))
    finally:
        process.terminate()
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
            process.join()
    return streamed, calls


async def _floor_run(pids: dict[str, int], texts: int, make) -> dict:
    """Texts/s of one timed run against the echo server, and its processes' CPU."""
    meter = CpuMeter(pids)
    elapsed = await timed_async(make)
    return {"texts": texts, "texts_per_s": texts / elapsed, "cpu_percent": meter.percent()}


async def _counted(nodes: list, idle: dict, texts: list[str], make) -> dict:
    before, meter = redis_counters(nodes), CpuMeter({})
    elapsed = await timed_async(make)
    after = redis_counters(nodes)
    per_text = redis_per_text(before, after, len(texts), idle)
    busy = meter.machine_percent()  # other people's load shows here
    return {"texts_per_s": len(texts) / elapsed, "machine_busy_percent": busy, **per_text}


class BenchCluster:
    """A private 3-master Redis Cluster on loopback (as tests/test_cluster.py starts one)."""

    SLOTS = 16384

    def __init__(self, masters: int = 3) -> None:
        import tempfile

        from embedq.apps.embedded import find_redis_binary

        self.binary = find_redis_binary()
        self.ports = [self._port() for _ in range(masters)]
        self.dir = tempfile.mkdtemp(prefix="embedq-bench-cluster-")
        self.procs: list = []

    @staticmethod
    def _port() -> int:
        """A free port whose cluster bus port (+10000) is free too."""
        import socket

        while True:
            port = random.randint(20000, 45000)
            try:
                for candidate in (port, port + 10000):
                    with socket.socket() as sock:
                        sock.bind(("127.0.0.1", candidate))
                return port
            except OSError:
                continue

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}"

    def clients(self) -> list:
        import redis

        return [redis.Redis(port=port) for port in self.ports]

    def start(self) -> BenchCluster:
        import subprocess

        for port in self.ports:
            conf = ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"]
            argv = [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
            argv += ["--appendonly", "no", "--dir", self.dir, *conf]
            self.procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL))
        try:
            self._form()
        except BaseException:
            self.stop()
            raise
        return self

    def _form(self) -> None:
        clients = self.clients()
        deadline = time.monotonic() + 30
        while not all(_pings(c) for c in clients):
            if time.monotonic() > deadline:
                raise RuntimeError("cluster nodes did not start")
            time.sleep(0.05)
        share = self.SLOTS // len(clients)
        for index, client in enumerate(clients):
            last = self.SLOTS - 1 if index == len(clients) - 1 else (index + 1) * share - 1
            client.execute_command("CLUSTER ADDSLOTSRANGE", index * share, last)
        for port in self.ports[1:]:
            clients[0].execute_command("CLUSTER MEET", "127.0.0.1", port)
        while not all(c.cluster("info")["cluster_state"] == "ok" for c in clients):
            if time.monotonic() > deadline:
                raise RuntimeError("cluster did not form")
            time.sleep(0.2)

    def stop(self) -> None:
        import shutil

        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _pings(client) -> bool:
    import redis

    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


# -- scaling: bench-sim workers behind 1 and 2 servers --------------------------------------


def _ints(spec: str) -> list[int]:
    return sorted({int(part) for part in spec.split(",") if part.strip()})


async def scaling(args: argparse.Namespace, base: list[str]) -> dict:
    from embedq.tools.bench import Deployment

    workers, servers = _ints(args.scaling_workers), _ints(args.scaling_servers)
    argv = bench_worker_argv("bench-sim", args)
    deployment = Deployment.launch([argv], servers=max(servers), near_cache_mb=None)
    points, source = [], UniqueTexts(base)
    try:
        for count in workers:
            while sum(1 for n in deployment.procs if n.startswith("worker")) < count:
                deployment.add_worker(argv)
            deployment.wait_ready(workers=count)
            for server_count in servers:
                point = await scaling_point(deployment, server_count, source, args.scaling_seconds)
                points.append({"workers": count, "servers": server_count, **point})
    finally:
        deployment.stop()
    sim = {"forward_ms": args.sim_forward_ms, "token_us": args.sim_token_us}
    return {"sim": sim, "seconds_per_point": args.scaling_seconds, "points": points}


async def scaling_point(deployment, servers: int, source: UniqueTexts, seconds: float) -> dict:
    """Uncached batches of 256, 8 in flight per server, for `seconds`; CPU of each process."""
    pids = {n: p.pid for n, p in deployment.procs.items() if not n.startswith("server")}
    pids |= {f"server-{i + 1}": deployment.procs[_server_name(i)].pid for i in range(servers)}
    redis_proc = getattr(deployment._redis, "_proc", None)
    if redis_proc is not None:
        pids["redis"] = redis_proc.pid
    pids["bench clients"] = os.getpid()
    meter = CpuMeter(pids)
    stop_at = time.monotonic() + seconds
    channels = [grpc.aio.insecure_channel(t) for t in deployment.targets[:servers]]
    try:
        pumps = [
            pump(embedq_pb2_grpc.EmbedderStub(channel), source, stop_at)
            for channel in channels
            for _ in range(8)
        ]
        started = time.monotonic()
        done = sum(await asyncio.gather(*pumps))
        elapsed = time.monotonic() - started
    finally:
        for channel in channels:
            await channel.close()
    cpu, busy = meter.percent(), meter.machine_percent()
    return {
        "texts_per_s": done / elapsed,
        "cpu_percent": cpu,
        "machine_busy_percent": busy,
        "saturated": saturated(cpu, busy),
    }


def _server_name(index: int) -> str:
    return "server" if index == 0 else f"server-{index + 1}"


async def pump(stub, source: UniqueTexts, stop_at: float, batch: int = 256) -> int:
    done = 0
    while time.monotonic() < stop_at:
        await stub.Encode(pb.EncodeRequest(texts=source.take(batch)), timeout=60)
        done += batch
    return done


def saturated(cpu: dict[str, float], machine_busy: float = 0.0, threshold: float = 85.0) -> str:
    """The component that ran out of CPU: one process near a full core (Python processes are
    bound to one), else the whole machine (`machine_busy`: % of all cores, anyone's), else
    none (latency-bound)."""
    cores = os.cpu_count() or 1
    busiest = max(cpu, key=cpu.get)
    ours = sum(cpu.values()) / cores  # % of all cores
    if cpu[busiest] >= threshold:
        return f"{busiest} ({cpu[busiest]:.0f} % of a core)"
    if max(machine_busy, ours) >= threshold:
        return (
            f"all {cores} cores ({max(machine_busy, ours):.0f} % busy, this bench's processes "
            f"{ours:.0f} %; busiest {busiest} {cpu[busiest]:.0f} % of a core)"
        )
    return f"none >= {threshold:.0f} % (busiest {busiest} {cpu[busiest]:.0f} %)"


def draw_scaling(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6, 4))
    for servers in sorted({p["servers"] for p in result["points"]}):
        points = [p for p in result["points"] if p["servers"] == servers]
        xs = [p["workers"] for p in points]
        axis.plot(xs, [p["texts_per_s"] for p in points], marker="o", label=f"{servers} server(s)")
    sim = result["sim"]
    axis.set_title(f"bench-sim workers ({sim['forward_ms']} ms + {sim['token_us']} us/token)")
    axis.set_xlabel("simulated accelerators (workers)")
    axis.set_ylabel("uncached texts/s")
    axis.set_xscale("log", base=2)
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- running and reporting ------------------------------------------------------------------

WORSE_BURST = {"clients": 64, "per_call": 256, "deadline": 20.0}


async def run_load(
    args: argparse.Namespace, scenarios: list[str], deployment, model, texts: list[str], s1=None
) -> dict:
    """The selected load scenarios, one after another; `s1`: S1 texts/s if core measured it
    (reported beside the bursts' capacity, never used as it: see measure_capacity)."""
    out: dict = {}
    if {"burst", "worse-burst"} & set(scenarios):
        out.update(await run_bursts(args, scenarios, deployment, texts, s1))
    if "slow-reader" in scenarios:
        pid = deployment.procs["server"].pid if "server" in deployment.procs else None
        out["slow-reader"] = await slow_reader(
            deployment.target, texts, args.slow_messages, args.duration, pid
        )
        await settle(deployment.target)
    if "streams" in scenarios:
        share = texts[: args.stream_texts] if args.stream_texts else texts
        encoder = load_encoder(args, model)
        out["streams"] = await streams_vs_r(model, deployment, share, args.reps, encoder=encoder)
        del encoder  # its memory (a GPU's, too) goes back before the next scenarios
    if "busy-streams" in scenarios:
        pid = deployment.procs["server"].pid if "server" in deployment.procs else None
        capacity = await measure_capacity(deployment, texts)
        out["busy-streams"] = await busy_streams(deployment.target, texts, args, pid)
        out["busy-streams"]["capacity_texts_per_s"] = capacity
        await settle(deployment.target)
    if "plumbing" in scenarios:
        out["plumbing"] = await plumbing(args, texts)
        if args.redis_cluster:
            out["plumbing-cluster"] = await plumbing(args, texts, cluster=True)
    if "scaling" in scenarios:
        out["scaling"] = await scaling(args, texts)
        args.out.mkdir(parents=True, exist_ok=True)
        draw_scaling(out["scaling"], args.out / "scaling.png")
    return out


async def run_bursts(
    args: argparse.Namespace, scenarios: list[str], deployment, texts: list[str], s1
) -> dict:
    """Each selected burst between two measurements of the capacity (see measure_capacity);
    one between two bursts serves both."""
    out: dict = {}
    before = await measure_capacity(deployment, texts)
    for name in ("burst", "worse-burst"):
        if name not in scenarios:
            continue
        result = await burst(deployment.target, texts, **_burst(args, name))
        await settle(deployment.target)
        after = await measure_capacity(deployment, texts)
        out[name] = {**with_capacity(result, before, after), "s1_core_texts_per_s": s1}
        before = after
    return out


def with_capacity(result: dict, before: float, after: float) -> dict:
    """A burst's result with its capacity: the mean of the capacity measured just before and
    just after it. This host's speed drifts by a quarter within a minute; one measurement
    before the burst's half minute set the goodput ratio alone (measured: capacity 294.7
    texts/s before one burst, 210-246 before four others, goodput 189-220 in all five)."""
    capacity = (before + after) / 2
    return {
        **result,
        "capacity_texts_per_s": capacity,
        "capacity_before_after": [before, after],
        "goodput_over_capacity": result["goodput_texts_per_s"] / capacity if capacity else None,
    }


def _burst(args: argparse.Namespace, name: str) -> dict:
    if name == "worse-burst":
        return {**WORSE_BURST, "duration": args.duration}
    return {
        "clients": args.burst_clients,
        "per_call": args.burst_texts,
        "deadline": args.burst_deadline,
        "duration": args.duration,
    }


async def measure_capacity(deployment, texts: list[str]) -> float:
    """The burst's capacity: S1's shape (uncached Encode calls of 64 texts, 8 in flight) on
    the burst's own kind of texts, warm, texts/s. Not core's S1 figure: its texts are the
    plain ones (the cache flushed between reps), while every burst text carries a nonce and
    a counter (UniqueTexts), ~10 more tokens: 29-30 a text against 19 with the bundled
    model, so S1 overstated the capacity for these texts by about half."""
    async with grpc.aio.insecure_channel(deployment.target) as channel:
        stub = embedq_pb2_grpc.EmbedderStub(channel)
        source = UniqueTexts(texts)
        await encode_window(stub, source.take(256), 64, 8)  # warm-up, not timed
        fresh = source.take(len(texts))
        return len(fresh) / await timed_async(lambda: encode_window(stub, fresh, 64, 8))


async def settle(target: str, limit_s: float = 60.0) -> None:
    """Wait until a 1-text uncached call is quick again, so the next scenario starts clean."""
    source = UniqueTexts(["settle"])
    async with grpc.aio.insecure_channel(target) as channel:
        stub = embedq_pb2_grpc.EmbedderStub(channel)
        stop_at = time.monotonic() + limit_s
        while time.monotonic() < stop_at:
            started = time.monotonic()
            try:
                await stub.Encode(pb.EncodeRequest(texts=source.take(1)), timeout=5)
                if time.monotonic() - started < 0.2:
                    return
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.2)


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def roofline_report(roof: dict) -> list[str]:
    lines = [
        f"fp32 roofline: peak {_f(roof['peak_gflops'])} GFLOP/s (1024x1024 matmul), "
        f"{roof['flops_per_token'] / 1e6:.1f} MFLOP/token at {roof['tokens_per_text']:.1f} "
        "tokens/text"
    ]
    for name in ("R", "S1"):
        if name in roof:
            got = roof[name]
            lines.append(
                f"  {name:<3} {_f(got['gflops'])} GFLOP/s = {got['percent_of_peak']:.0f} % of peak"
            )
    return lines


def burst_report(name: str, b: dict) -> list[str]:
    share = b["percent_calls"]
    s1 = b.get("s1_core_texts_per_s")
    before, after = b["capacity_before_after"]
    return [
        f"{name}: {b['clients']} clients x {b['texts_per_call']} texts, {b['deadline_s']:g} s "
        f"deadline, {b['seconds']:.1f} s, {b['calls']} calls",
        f"  goodput {_f(b['goodput_texts_per_s'])} texts/s = "
        f"{_f(b['goodput_over_capacity'], 2)} x capacity ({_f(b['capacity_texts_per_s'])}: "
        f"S1's calls of these texts, mean of {_f(before)} before and {_f(after)} after)"
        "   target >= 0.8" + (f"; S1 on core's shorter texts {_f(s1)}" if s1 else ""),
        f"  ok {share['ok']:.1f} %, refused {share['refused']:.1f} % (p50/p99 "
        f"{_f(b['refusal_ms']['p50'])}/{_f(b['refusal_ms']['p99'])} ms; target <= 100), "
        f"deadline {share['deadline_exceeded']:.1f} %, other {share['other']:.1f} % "
        f"{b['other_codes'] or ''}",
        f"  ok or refused within 100 ms: {b['percent_ok_or_fast_refusal']:.1f} %   target >= 95",
        f"  4-text call OK again {_f(b['recovery_s'], 2)} s after the burst   target <= 1",
    ]


def slow_reader_report(s: dict) -> list[str]:
    other = s["other_encode_ms"]
    return [
        f"slow-reader: {s['messages_sent']} messages sent in {s['seconds']:g} s, never read",
        f"  server RSS {_f(s['server_rss_mb']['before'])} -> max "
        f"{_f(s['server_rss_mb']['max'])} MB: +{_f(s['server_rss_growth_mb'])} MB   target <= 30",
        f"  other client's 1-text Encode p50/p99/max {_f(other['p50'])}/{_f(other['p99'])}/"
        f"{_f(other['max'])} ms, failures {s['other_encode_failures'] or 0}",
    ]


def streams_report(s: dict) -> list[str]:
    lines = [
        f"streams: {s['streams']} waiting consumers, 1 text/msg: {_f(s['texts_per_s'])} texts/s "
        f"= {s['ratio_to_R']:.2f} x R ({_f(s['R_texts_per_s'])}; paired per rep "
        f"{s['paired_ratio_to_R']:.2f})   target >= 0.9"
    ]
    if "ceiling_texts_per_s" in s:
        lines.append(
            f"  the model alone in-process, {s['streams']} texts a pass in arrival order: "
            f"{_f(s['ceiling_texts_per_s'])} texts/s = {s['ceiling_ratio_to_R']:.2f} x R; "
            f"the streams reach {s['share_of_ceiling']:.2f} of it"
        )
    return lines


def busy_streams_report(b: dict) -> list[str]:
    other, share = b["other_encode_ms"], b["per_stream_texts"]
    capacity = b["capacity_texts_per_s"]
    return [
        f"busy-streams: {b['streams']} pipelined streams x {b['depth']} one-text messages in "
        f"flight, {b['seconds']:.0f} s: {_f(b['streams_texts_per_s'])} texts/s = "
        f"{b['streams_texts_per_s'] / capacity:.2f} x capacity ({_f(capacity)}); per stream "
        f"{share['min']}-{share['max']} texts, errors {b['stream_errors'] or 0}",
        f"  other caller's 1-text Encode ({b['other_deadline_s']:g} s deadline): served "
        f"{b['other_served']} of {b['other_calls']}, p50/p95 {_f(other['p50'])}/"
        f"{_f(other['p95'])} ms, failures {b['other_encode_failures'] or 0}; server RSS "
        f"+{_f(b['server_rss_growth_mb'])} MB",
    ]


def plumbing_report(name: str, p: dict) -> list[str]:
    u, c = p["uncached_batches_256"], p["cached_batches_256"]
    # The gRPC floors are measured with standalone Redis only.
    floor_line = _floor_line(
        p.get("waiting_streams_64_grpc_floor"),
        "the same streams against a bare grpc.aio echo server (no Redis, no worker)",
        "messages/s",
    )
    cached_floor_line = _floor_line(
        p.get("cached_batches_256_grpc_floor"),
        "the same calls against the bare echo server (answers as a cache hit would)",
        "texts/s",
    )
    streams = p["waiting_streams_64"]
    return [
        f"{name}: {p['workers']} bench-zero worker(s), {p['redis']} Redis, {p['texts']} texts"
        f" a run, medians of {p.get('reps', 1)} runs",
        f"  uncached batches of 256: {_f(u['texts_per_s'])} texts/s   target >= 25,000"
        f"   (machine {u['machine_busy_percent']:.0f} % busy){_runs(u)}",
        f"  64 waiting streams: {_f(streams['texts_per_s'])} texts/s   target >= 10,000"
        f"{_busy(streams)}{_runs(streams)}",
        *floor_line,
        f"  cached batches of 256 (those texts {CACHED_ROUNDS} times over): "
        f"{_f(c['texts_per_s'])} texts/s   target >= 150,000{_runs(c)}",
        *cached_floor_line,
        f"  Redis per uncached text: {u['commands_per_text']:.3f} commands, "
        f"{u['bytes_in_per_text']:.0f} B in, {u['bytes_out_per_text']:.0f} B out",
        f"  Redis per cached text: {c['commands_per_text']:.3f} commands, "
        f"{c['bytes_in_per_text']:.0f} B in, {c['bytes_out_per_text']:.0f} B out",
        *_redis_line("Redis per waiting-stream text", streams),
    ]


def _busy(phase: dict) -> str:
    busy = phase.get("machine_busy_percent")
    return "" if busy is None else f"   (machine {busy:.0f} % busy)"


def _redis_line(what: str, phase: dict) -> list[str]:
    """Commands (the most frequent named) and bytes per text, where the phase counted them."""
    if "commands_per_text" not in phase:
        return []
    top = ", ".join(f"{name} {n:.2f}" for name, n in list(phase["by_command"].items())[:4])
    return [
        f"  {what}: {phase['commands_per_text']:.3f} commands ({top}), "
        f"{phase['bytes_in_per_text']:.0f} B in, {phase['bytes_out_per_text']:.0f} B out"
    ]


def _runs(phase: dict) -> str:
    runs = phase.get("runs", [])
    return "   runs: " + " / ".join(_f(run, 0) for run in runs) if len(runs) > 1 else ""


def _floor_line(floor: dict | None, what: str, unit: str) -> list[str]:
    if not floor:
        return []
    return [f"    {what}: {_f(floor['texts_per_s'])} {unit}, {_cpu(floor['cpu_percent'])}"]


def _cpu(percent: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.0f} % of a core" for name, value in percent.items())


def scaling_report(s: dict) -> list[str]:
    sim = s["sim"]
    lines = [
        f"scaling: bench-sim ({sim['forward_ms']:g} ms/pass + {sim['token_us']:g} us/token), "
        f"{s['seconds_per_point']:g} s per point",
        f"  {'workers':>7} {'servers':>7} {'texts/s':>10}  saturated",
    ]
    for p in s["points"]:
        lines.append(
            f"  {p['workers']:>7} {p['servers']:>7} {_f(p['texts_per_s']):>10}  {p['saturated']}"
        )
    return lines


def load_report(load: dict, header: str) -> str:
    if not load:
        return ""
    lines = [f"embedq bench load scenarios; {header}"]
    for name, result in load.items():
        if name in ("burst", "worse-burst"):
            lines += burst_report(name, result)
        elif name == "slow-reader":
            lines += slow_reader_report(result)
        elif name == "streams":
            lines += streams_report(result)
        elif name == "busy-streams":
            lines += busy_streams_report(result)
        elif name.startswith("plumbing"):
            lines += plumbing_report(name, result)
        elif name == "scaling":
            lines += scaling_report(result)
    return "\n".join(lines)
