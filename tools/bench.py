"""`embedq bench`: embedq against in-process sentence-transformers, same run.

Scenarios (each repeated, medians reported):
  R   in-process SentenceTransformer.encode, batch size 32 (the reference)
  S1  uncached Encode calls of 64 texts (a few in flight, as a batch client does)
  S2  16 concurrent EncodeStream calls, one text per message
  S3  the S1 texts again: every one a cache hit
  latency: single-text Encode p50/p99, cached and uncached, and R's single-text encode (R and
           uncached alternate in blocks of the same texts; "uncached − R" is per text)
  memory: peak RSS of the server and worker processes (when bench started them)
  (these are `--scenario core`, the default; with it comes the fp32 roofline)

Load scenarios (--scenario NAME, repeatable, or all; docs/benchmarks.md): burst, worse-burst,
slow-reader, streams (waiting consumers), busy-streams (pipelined streams beside another
caller), plumbing (bench-zero workers: no model), scaling
(1-8 bench-sim workers behind 1-2 servers). Headers name the CPU, its AVX2/AVX-512/VNNI/AMX
and the GPU.

Speed is reported, never asserted: targets are printed beside the figures. "× R" is the
ratio of medians; "paired" is the median of each rep's ratio to the R measured just before it,
steadier on a host whose speed drifts between reps.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import functools
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from embedq.tools.bench_load import (
    CORE,
    NEED_REFERENCE,
    ON_MAIN,
    add_load_options,
    load_report,
    machine,
    machine_line,
    paired_ratio,
    roofline,
    run_load,
    selected,
)

from embedq.v1 import embedq_pb2 as pb
from embedq.v1 import embedq_pb2_grpc

BATCH = 64
STREAMS = 16
# Requests a batch client keeps in flight (the Python client's default is 4).
IN_FLIGHT = 8
# Single-text latency: this many texts, R and embedq alternating in SINGLE_BLOCKS blocks; the
# per-text difference is reported as UNCACHED_OVER_R (see interleaved_singles).
SINGLES = 100
SINGLE_BLOCKS = 5
UNCACHED_OVER_R = "uncached − R single, same text"

SUBJECTS = [
    "A man",
    "A woman",
    "The child",
    "Two dogs",
    "A group of people",
    "The president",
    "A cat",
    "Our team",
]
VERBS = [
    "is playing",
    "is reading",
    "walks along",
    "is cooking",
    "watches",
    "is riding",
    "paints",
    "talks about",
]
OBJECTS = [
    "a guitar on the stage",
    "the morning newspaper",
    "a quiet beach at sunset",
    "a bowl of hot soup",
    "the football match on television",
    "a red bicycle through the park",
    "a large mural on the wall",
    "the new economic policy and its effect on small businesses",
]


def generated_texts(count: int, seed: int = 0) -> list[str]:
    """STS-like sentences of realistic length (default benchmark set)."""
    rng = random.Random(seed)
    texts = []
    for i in range(count):
        sentence = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
        if rng.random() < 0.3:
            sentence += (
                f", while {rng.choice(SUBJECTS).lower()} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
            )
        texts.append(f"{sentence} ({i}).")
    return texts


def read_texts(path: Path, column: str | None, limit: int) -> list[str]:
    """The first `limit` distinct texts: one per line, or one TSV column (by header name).

    Distinct, because embedq answers a repeated text from the cache (or from the first one
    in flight) while the reference encodes every copy: STS-B's first 1,024 `sentence1`
    hold 123 repeats, which made embedq's uncached figures look better than they were
    (measured: S1 1.27 x R with them, 1.05-1.15 x without; docs/benchmarks.md)."""
    with open(path, encoding="utf-8") as handle:
        if column:
            reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            texts = [row[column] for row in reader if row.get(column)]
        else:
            texts = [line.rstrip("\n") for line in handle if line.strip()]
    return list(dict.fromkeys(texts))[:limit]


# -- the deployment under test ------------------------------------------------


@dataclass
class Deployment:
    target: str
    redis_url: str | None = None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    _redis: object = None

    targets: list[str] = field(default_factory=list)  # every server (target is the first)
    # The servers' --near-cache-mb (None: their default). Off where a scenario makes texts
    # uncached again by deleting them from Redis (fresh): a server's near cache would still
    # answer them. External servers (--target) are not ours: fresh() makes texts new there.
    near_cache_mb: float | None = 0.0

    @classmethod
    def start(cls, args: argparse.Namespace) -> Deployment:
        worker = ["--devices", args.devices, "--backend", args.backend]
        if args.backend.startswith("bench-"):
            worker.append("--allow-bench-backend")
        worker += (["--model", args.model] if args.model else []) + (
            ["--fp16"] if args.fp16 else []
        )
        return cls.launch([worker])

    @classmethod
    def launch(
        cls,
        workers: list[list[str]],
        servers: int = 1,
        redis_url: str | None = None,
        near_cache_mb: float | None = 0.0,
    ) -> Deployment:
        """A private Redis (unless redis_url), one worker per argument list, `servers` servers;
        processes named worker, worker-2, ..., server, server-2, ... Stops all on failure."""
        from embedq.apps.embedded import EmbeddedRedis

        redis_server = None if redis_url else EmbeddedRedis().start()
        deployment = cls("", redis_url or redis_server.url, {}, redis_server)
        deployment.near_cache_mb = near_cache_mb
        try:
            for extra in workers:
                deployment.add_worker(extra)
            for _ in range(servers):
                deployment.add_server()
            deployment.target = deployment.targets[0]
            deployment.wait_ready(workers=len(workers))
        except BaseException:
            deployment.stop()
            raise
        return deployment

    def _spawn(self, kind: str, argv: list[str]) -> subprocess.Popen:
        cli = [sys.executable, "-m", "embedq.cli", "--log-level", "WARNING"]
        count = sum(1 for name in self.procs if name.split("-")[0] == kind)
        name = kind if not count else f"{kind}-{count + 1}"
        self.procs[name] = subprocess.Popen([*cli, kind, "--redis-url", self.redis_url, *argv])
        return self.procs[name]

    def add_worker(self, argv: list[str]) -> subprocess.Popen:
        return self._spawn("worker", argv)

    def add_server(self, near_cache: bool = False) -> str:
        """Start one more server (near_cache: with the server's default near cache, else the
        deployment's near_cache_mb); its target."""
        from embedq.apps.embedded import free_port

        port = free_port()
        near = None if near_cache else self.near_cache_mb
        near_flag = [] if near is None else ["--near-cache-mb", str(near)]
        self._spawn("server", ["--port", str(port), *near_flag])
        self.targets.append(f"127.0.0.1:{port}")
        return self.targets[-1]

    def wait_ready(self, timeout: float = 180, workers: int = 1) -> None:
        """Every server answers Info with at least `workers` live workers."""
        deadline = time.monotonic() + timeout
        for target in self.targets or [self.target]:
            with grpc.insecure_channel(target) as channel:
                stub = embedq_pb2_grpc.EmbedderStub(channel)
                while not self._ready(stub, workers):
                    dead = [n for n, p in self.procs.items() if p.poll() is not None]
                    if dead or time.monotonic() > deadline:
                        raise RuntimeError(f"embedq did not become ready (exited: {dead})")
                    time.sleep(0.2)

    @staticmethod
    def _ready(stub, workers: int) -> bool:
        try:
            info = stub.Info(pb.InfoRequest(), timeout=2)
        except grpc.RpcError:
            return False
        return bool(info.models) and info.models[0].workers_alive >= workers

    def fresh(self, texts: list[str], run: int) -> list[str]:
        """Texts no earlier run has cached: flush when we can reach Redis and our servers
        keep no near cache, else make them new by a run prefix."""
        if self.redis_url and self.procs and self.near_cache_mb == 0:
            self.flush_cache()
            return texts
        return [f"[run {run}] {text}" for text in texts]

    def flush_cache(self) -> None:
        import redis

        client = redis.Redis.from_url(self.redis_url)
        keys = list(client.scan_iter(match="*:v1:emb:*", count=10000))
        for start in range(0, len(keys), 10000):
            client.delete(*keys[start : start + 10000])

    def peak_rss_mb(self) -> dict[str, float]:
        peaks = {}
        for name, proc in self.procs.items():
            status = Path(f"/proc/{proc.pid}/status").read_text()
            line = next(x for x in status.splitlines() if x.startswith("VmHWM"))
            peaks[name] = int(line.split()[1]) / 1024
        return peaks

    def stop(self) -> None:
        stop_processes(self.procs.values())
        if self._redis is not None:
            self._redis.stop()


def stop_processes(procs: Iterable[subprocess.Popen], timeout_s: float = 30) -> None:
    """SIGTERM all at once (they drain in parallel), then wait; SIGKILL a laggard."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- scenarios ------------------------------------------------------------------


async def encode_batches(
    stub, texts: list[str], batch: int = BATCH, in_flight: int = IN_FLIGHT
) -> None:
    window = asyncio.Semaphore(in_flight)

    async def one(chunk: list[str]) -> None:
        async with window:
            await stub.Encode(pb.EncodeRequest(texts=chunk), timeout=600)

    await asyncio.gather(*(one(texts[i : i + batch]) for i in range(0, len(texts), batch)))


async def encode_streams(stub, texts: list[str], streams: int = STREAMS) -> None:
    async def one_stream(share: list[str]) -> None:
        def messages():
            for i, text in enumerate(share):
                yield pb.EncodeStreamRequest(id=str(i), texts=[text])

        answered = 0
        async for response in stub.EncodeStream(messages(), timeout=600):
            if response.HasField("error"):
                raise RuntimeError(response.error.message)
            answered += 1
        assert answered == len(share)

    await asyncio.gather(*(one_stream(texts[i::streams]) for i in range(streams)))


async def single_latencies(stub, texts: list[str]) -> list[float]:
    out = []
    for text in texts:
        started = time.perf_counter()
        await stub.Encode(pb.EncodeRequest(texts=[text]), timeout=60)
        out.append((time.perf_counter() - started) * 1000)
    return out


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


@dataclass
class Results:
    texts: int
    reps: int
    throughput: dict[str, list[float]] = field(default_factory=dict)
    latency_ms: dict[str, list[float]] = field(default_factory=dict)
    rss_mb: dict[str, float] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.throughput[name])

    def paired_ratio(self, name: str) -> float:
        """Median over reps of `name` / R of the same rep: each rep measures R and the
        scenarios back to back, so a host that slows down between reps cancels out."""
        return paired_ratio(self.throughput[name], self.throughput["R"])


def reference_latencies(model, texts: list[str]) -> list[float]:
    singles = []
    for text in texts:
        started = time.perf_counter()
        model.encode([text])
        singles.append((time.perf_counter() - started) * 1000)
    return singles


async def run_all(
    model, deployment: Deployment, texts: list[str], reps: int, results: Results
) -> None:
    """Reps interleave R, S1, S2, S3 so that machine noise hits all alike."""
    for name in ("R", "S1", "S2", "S3"):
        results.throughput[name] = []
    async with grpc.aio.insecure_channel(deployment.target) as channel:
        stub = embedq_pb2_grpc.EmbedderStub(channel)
        model.encode(texts[:64], batch_size=32)  # warm-up, both sides
        await encode_batches(stub, [f"warm-up {t}" for t in texts[:128]])
        for rep in range(reps):
            elapsed = timed(lambda: model.encode(texts, batch_size=32))
            results.throughput["R"].append(len(texts) / elapsed)
            for name, scenario in (("S1", encode_batches), ("S2", encode_streams)):
                batch = deployment.fresh(texts, rep * 10 + len(name))
                started = time.perf_counter()
                await scenario(stub, batch)
                results.throughput[name].append(len(texts) / (time.perf_counter() - started))
            started = time.perf_counter()
            await encode_batches(stub, batch)  # every text cached by S2 just now
            results.throughput["S3"].append(len(texts) / (time.perf_counter() - started))
        originals = texts[:SINGLES]
        singles = deployment.fresh(originals, 999)
        reference, uncached = await interleaved_singles(model, stub, originals, singles)
        results.latency_ms["R single"] = reference
        results.latency_ms["uncached single"] = uncached
        pairs = zip(uncached, reference, strict=True)
        results.latency_ms[UNCACHED_OVER_R] = [mine - theirs for mine, theirs in pairs]
        results.latency_ms["cached single"] = await single_latencies(stub, singles)
    if deployment.procs:
        near = await near_cached_latencies(deployment, singles)
        results.latency_ms["cached single, near cache"] = near


async def interleaved_singles(
    model, stub, texts: list[str], uncached: list[str], blocks: int = SINGLE_BLOCKS
) -> tuple[list[float], list[float]]:
    """R's and embedq's uncached single-text latencies, in alternating blocks of the same
    texts (`uncached[i]` is `texts[i]` made new), so that a host whose speed drifts within
    the run slows both alike and each text is compared with itself. (Measured as one block
    each, back to back, embedq came out anywhere from R + 0.5 to R + 3 ms on one noisy host.)"""
    size = max(1, math.ceil(len(texts) / blocks))
    reference: list[float] = []
    answered: list[float] = []
    for start in range(0, len(texts), size):
        reference += reference_latencies(model, texts[start : start + size])
        answered += await single_latencies(stub, uncached[start : start + size])
    return reference, answered


async def near_cached_latencies(deployment: Deployment, singles: list[str]) -> list[float]:
    """Cached single-text latency through one more server that keeps its default near cache
    (the main one runs without: see Deployment.near_cache_mb): a first pass fills it from
    Redis, the second is timed."""
    target = deployment.add_server(near_cache=True)
    deployment.wait_ready()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = embedq_pb2_grpc.EmbedderStub(channel)
        await single_latencies(stub, singles)
        return await single_latencies(stub, singles)


# -- report ---------------------------------------------------------------------

TARGETS = {"S1": "≥ 0.95 × R", "S2": "≥ 0.85 × R", "S3": "≥ 20,000 texts/s"}
LATENCY_TARGETS = {UNCACHED_OVER_R: "p50 ≤ 1.5 ms", "cached single, near cache": "p50 ≤ 0.8 ms"}


def report(results: Results, device: str, header: str = "", roofline: dict | None = None) -> str:
    r = results.median("R")
    lines = [
        f"embedq bench: {results.texts} texts, {results.reps} reps, device {device}, medians",
        *([header] if header else []),
        f"{'scenario':<34}{'texts/s':>10}{'× R':>8}{'paired':>8}   target",
    ]
    names = {
        "R": "R  sentence-transformers (bs 32)",
        "S1": "S1 uncached Encode ×64",
        "S2": f"S2 {STREAMS} streams, 1 text/msg",
        "S3": "S3 cached Encode ×64",
    }
    for key, label in names.items():
        value, paired = results.median(key), results.paired_ratio(key)
        target = TARGETS.get(key, "")
        lines.append(f"{label:<34}{value:>10.1f}{value / r:>8.2f}{paired:>8.2f}   {target}")
    lines.append(f"{'latency (ms)':<34}{'p50':>10}{'p99':>8}   target")
    for key, values in results.latency_ms.items():
        p50, p99, target = percentile(values, 50), percentile(values, 99), LATENCY_TARGETS.get(key)
        lines.append(f"{key:<34}{p50:>10.2f}{p99:>8.2f}" + (f"   {target}" if target else ""))
    for name, mb in results.rss_mb.items():
        lines.append(f"peak RSS {name:<25}{mb:>10.1f} MB")
    if roofline:
        from embedq.tools.bench_load import roofline_report

        lines += roofline_report(roofline)
    return "\n".join(lines)


def summary(results: Results, device: str, command: str) -> dict:
    r = results.median("R")
    return {
        "command": command,
        "device": device,
        "texts": results.texts,
        "reps": results.reps,
        "throughput_texts_per_s": {
            k: {
                "median": results.median(k),
                "runs": v,
                "ratio_to_R": results.median(k) / r,
                "paired_ratio_to_R": results.paired_ratio(k),
            }
            for k, v in results.throughput.items()
        },
        "latency_ms": {
            k: {"p50": percentile(v, 50), "p99": percentile(v, 99)}
            for k, v in results.latency_ms.items()
        },
        "peak_rss_mb": results.rss_mb,
    }


def draw_chart(results: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(results.throughput)
    left.bar(
        names,
        [results.median(n) for n in names],
        color=["#888", "#36c", "#3a6", "#c63"][: len(names)],
    )
    left.set_ylabel("texts/s (median)")
    left.set_yscale("log")
    left.set_title("Throughput")
    labels = list(results.latency_ms)
    x = np.arange(len(labels))
    right.bar(x - 0.2, [percentile(results.latency_ms[k], 50) for k in labels], 0.4, label="p50")
    right.bar(x + 0.2, [percentile(results.latency_ms[k], 99) for k in labels], 0.4, label="p99")
    right.set_xticks(x, labels, rotation=15)
    right.set_ylabel("ms")
    right.set_title("Single-text latency")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# -- CLI ------------------------------------------------------------------------


def add_bench_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure embedq against in-process sentence-transformers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--target", help="bench a running server (default: start a private one)")
    parser.add_argument(
        "--redis-url", help="with --target: the Redis to flush between uncached runs"
    )
    parser.add_argument(
        "--input",
        type=Path,
        help="texts: one per line, or a TSV with --column (repeats dropped: a repeat would "
        "be a cache hit for embedq and another encode for the reference)",
    )
    parser.add_argument("--column", help="TSV column to read from --input (e.g. sentence1)")
    parser.add_argument("--texts", type=int, default=1024, help="how many texts [%(default)s]")
    parser.add_argument(
        "--reps", type=int, default=3, help="repetitions per scenario [%(default)s]"
    )
    parser.add_argument("--model", help="model for the private deployment and the reference")
    parser.add_argument("--devices", default="cpu", help="worker device [%(default)s]")
    parser.add_argument("--fp16", action="store_true", help="fp16 worker and reference (CUDA)")
    parser.add_argument(
        "--backend",
        choices=("torch", "torch-int8", "onnx", "onnx-int8", "bench-zero", "bench-sim"),
        default="torch",
        help="the worker's encoder backend; the reference R stays sentence-transformers "
        "float32; bench-zero / bench-sim run no model (allowed here: it is a bench) "
        "[%(default)s]",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench-out"), help="folder for JSON and PNG"
    )
    add_load_options(parser)
    parser.set_defaults(func=run_bench_command)


def run_bench_command(args: argparse.Namespace) -> int:
    import torch

    try:
        scenarios = selected(args.scenario)
    except ValueError as exc:
        print(f"embedq bench: {exc}", file=sys.stderr)
        return 2
    if set(scenarios) & NEED_REFERENCE and not _has_reference():
        print("embedq bench: the reference needs `pip install 'embedq[bench]'`", file=sys.stderr)
        return 2

    from embedq.workers.backends import BackendUnavailableError, check_backend, resolve_model_source

    texts = (
        read_texts(args.input, args.column, args.texts)
        if args.input
        else generated_texts(args.texts)
    )
    wants_gpu = (
        args.devices not in ("cpu", "auto") or args.devices == "auto" and torch.cuda.is_available()
    )
    device = "cuda" if wants_gpu else "cpu"
    if not args.target:
        try:  # fail now, not after the deployment's 180 s readiness wait
            check_backend(args.backend, device, allow_bench=True)
        except BackendUnavailableError as exc:
            print(f"embedq bench: {exc}", file=sys.stderr)
            return 2
    _, folder = resolve_model_source(args.model)
    model = reference_model(folder, device, args.fp16) if set(scenarios) & NEED_REFERENCE else None
    results = Results(texts=len(texts), reps=args.reps)
    load = run_deployment_scenarios(args, scenarios, model, texts, results)
    if device == "cuda":
        label = torch.cuda.get_device_name(0)
    else:
        label = f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    if args.backend != "torch" and not args.target:
        label += f", worker backend {args.backend}"
    info = machine()
    header = machine_line(info)
    roof = None
    if CORE in scenarios:
        throughput = {"R": results.median("R"), "S1": results.median("S1")}
        roof = roofline(folder, texts, throughput)
        print(report(results, label, header, roof))
    print(load_report(load, header))
    args.out.mkdir(parents=True, exist_ok=True)
    load.update(run_separate(args, scenarios))
    command = "embedq " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:])
    out = summary(results, label, command) if CORE in scenarios else {"command": command}
    out.update({"machine": info, "scenarios": scenarios, "roofline": roof, "load": load})
    (args.out / "bench.json").write_text(json.dumps(out, indent=2))
    if CORE in scenarios:
        draw_chart(results, args.out / "bench.png")
    print(f"wrote {args.out / 'bench.json'}" + (f" and {args.out / 'bench.png'}" if roof else ""))
    return 0


def run_separate(args: argparse.Namespace, scenarios: list[str]) -> dict:
    """`http` (bench_http: HTTP /v1/embeddings beside gRPC) and `bridge` (bridge_bench: a
    Redis Streams bridge against `embedq encode` of a file): each starts its own private
    deployment and prints its own table; their figures join bench.json."""
    out: dict = {}
    if "http" in scenarios:
        from embedq.tools import bench_http

        path = args.out / "http.json"
        argv = ["--texts", str(min(args.texts, 1024)), "--reps", str(args.reps), "--out", str(path)]
        bench_http.main(argv + (["--model", args.model] if args.model else []))
        out["http"] = json.loads(path.read_text())
    if "bridge" in scenarios:
        from embedq.tools import bridge_bench

        path = args.out / "bridge.json"
        bridge_bench.main(["--runs", str(args.reps), "--json", str(path)])
        out["bridge"] = json.loads(path.read_text()) if path.exists() else {}
    return out


def _has_reference() -> bool:
    import importlib.util

    return importlib.util.find_spec("sentence_transformers") is not None


def reference_model(folder: Path, device: str, fp16: bool):
    """In-process sentence-transformers: the reference R."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device=device)
    model.encode = functools.partial(model.encode, show_progress_bar=False)
    if fp16:
        model.half()
    return model


def run_deployment_scenarios(
    args: argparse.Namespace, scenarios: list[str], model, texts: list[str], results: Results
) -> dict:
    """Core and load scenarios on the main deployment (private, or --target), then the ones
    that start their own (plumbing, scaling); every process started is stopped."""
    deployment = None
    try:
        if set(scenarios) & ON_MAIN:
            deployment = (
                Deployment(args.target, args.redis_url) if args.target else Deployment.start(args)
            )
        if CORE in scenarios:
            asyncio.run(run_all(model, deployment, texts, args.reps, results))
            if deployment.procs:
                results.rss_mb = deployment.peak_rss_mb()
        s1 = results.median("S1") if CORE in scenarios else None
        return asyncio.run(run_load(args, scenarios, deployment, model, texts, s1))
    finally:
        if deployment is not None and deployment.procs:
            deployment.stop()
