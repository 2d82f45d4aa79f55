"""HTTP scenarios of `embedq bench`: the OpenAI-compatible `/v1/embeddings`
against gRPC `Encode`, same deployment, same run.

Scenarios (each repeated, interleaved so that machine noise hits all alike;
medians reported):
  S1   uncached gRPC Encode calls of 64 texts, IN_FLIGHT in flight (as in `embedq bench`)
  H1f  the same over HTTP: POST /v1/embeddings, 64 texts, encoding_format float
  H1b  the same, encoding_format base64 (the OpenAI SDK's default)
  S3, H3f, H3b  the same batches again, all cache hits: the front ends' own cost
  latency: cached single-text p50/p99 over HTTP and over gRPC

Targets (printed, never asserted): H1 ≥ 0.95 × S1; cached HTTP single p50 ≤ 1.5 ms.

Alone: `python -m embedq.tools.bench_http [--texts N] [--reps R]` starts a private
deployment (Redis, one worker, a server with --http-port). From `embedq bench`:
start the server with `--http-port`, then `await run_http(...)` with its
stub, URL and Deployment, and print `report_http(...)`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from embedq.tools import bench

from embedq.v1 import embedq_pb2 as pb
from embedq.v1 import embedq_pb2_grpc

try:
    import orjson

    loads = orjson.loads
except ImportError:  # pragma: no cover
    loads = json.loads

MODEL_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni",
    "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve",
)  # fmt: skip


def cpu_line() -> str:
    """`model name` and the vector ISA flags of /proc/cpuinfo (what inference speed hangs on)."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model name") and model == "unknown CPU":
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    shown = " ".join(flag for flag in MODEL_FLAGS if flag in flags) or "none of note"
    return f"CPU: {model}; {os.cpu_count()} logical cores; flags: {shown}"


# -- scenarios ------------------------------------------------------------------


async def http_batches(
    session,
    url: str,
    texts: list[str],
    encoding: str = "float",
    batch: int = bench.BATCH,
    in_flight: int = bench.IN_FLIGHT,
) -> None:
    """POST /v1/embeddings in batches, `in_flight` at a time; every reply decoded to numpy."""
    window = asyncio.Semaphore(in_flight)

    async def one(chunk: list[str]) -> None:
        body = {"input": chunk, "encoding_format": encoding}
        async with window, session.post(f"{url}/v1/embeddings", json=body) as reply:
            payload = loads(await reply.read())
            if reply.status != 200:
                raise RuntimeError(f"HTTP {reply.status}: {payload}")
        rows = [item["embedding"] for item in payload["data"]]
        if encoding == "base64":
            np.frombuffer(b"".join(base64.b64decode(row) for row in rows), "<f4")
        else:
            np.asarray(rows, dtype=np.float32)

    await asyncio.gather(*(one(texts[i : i + batch]) for i in range(0, len(texts), batch)))


async def http_single(session, url: str, text: str) -> float:
    started = time.perf_counter()
    async with session.post(f"{url}/v1/embeddings", json={"input": text}) as reply:
        loads(await reply.read())
        if reply.status != 200:
            raise RuntimeError(f"HTTP {reply.status}")
    return (time.perf_counter() - started) * 1000


async def grpc_single(stub, text: str) -> float:
    started = time.perf_counter()
    await stub.Encode(pb.EncodeRequest(texts=[text]), timeout=60)
    return (time.perf_counter() - started) * 1000


CACHED = {"S1": "S3", "H1f": "H3f", "H1b": "H3b"}


@dataclass
class HttpResults:
    texts: int
    reps: int
    throughput: dict[str, list[float]] = field(default_factory=dict)
    latency_ms: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.throughput[name])


async def run_http(
    target: str,
    http_url: str,
    deployment: bench.Deployment,
    texts: list[str],
    reps: int,
    singles: int = 200,
) -> HttpResults:
    """S1, H1f and H1b interleaved per rep (fresh texts each), then cached latency."""
    import aiohttp

    results = HttpResults(len(texts), reps)
    for name in ("S1", "H1f", "H1b", *CACHED.values()):
        results.throughput[name] = []
    connector = aiohttp.TCPConnector(limit=bench.IN_FLIGHT)
    async with (
        grpc.aio.insecure_channel(target) as channel,
        aiohttp.ClientSession(connector=connector) as session,
    ):
        stub = embedq_pb2_grpc.EmbedderStub(channel)
        warm = [f"warm-up {t}" for t in texts[:128]]
        await bench.encode_batches(stub, warm)
        await http_batches(session, http_url, [f"http {t}" for t in warm])
        scenarios = (
            ("S1", lambda batch: bench.encode_batches(stub, batch)),
            ("H1f", lambda batch: http_batches(session, http_url, batch, "float")),
            ("H1b", lambda batch: http_batches(session, http_url, batch, "base64")),
        )
        for rep in range(reps):
            # Rotate the order too: no scenario always runs first (or last) in a rep.
            for offset in range(len(scenarios)):
                name, scenario = scenarios[(rep + offset) % len(scenarios)]
                batch = deployment.fresh(texts, rep * 10 + offset)
                started = time.perf_counter()
                await scenario(batch)
                results.throughput[name].append(len(texts) / (time.perf_counter() - started))
            # The last batch again, every text a cache hit: the front ends' own cost.
            for name, scenario in scenarios:
                started = time.perf_counter()
                await scenario(batch)
                elapsed = time.perf_counter() - started
                results.throughput[CACHED[name]].append(len(texts) / elapsed)
        cached = texts[:singles]
        await bench.encode_batches(stub, cached)  # all cached now (same variant for both)
        results.latency_ms["HTTP cached single"] = []
        results.latency_ms["gRPC cached single"] = []
        for text in cached:  # interleaved, one of each per text
            results.latency_ms["HTTP cached single"].append(
                await http_single(session, http_url, text)
            )
            results.latency_ms["gRPC cached single"].append(await grpc_single(stub, text))
    return results


# -- report ---------------------------------------------------------------------


def report_http(results: HttpResults, device: str) -> str:
    lines = [
        cpu_line(),
        f"embedq bench (HTTP): {results.texts} texts, {results.reps} reps, device {device}, "
        "medians",
        f"{'scenario':<36}{'texts/s':>10}{'× S1/S3':>8}   target   per rep",
    ]
    names = {
        "S1": "S1  gRPC Encode ×64 (uncached)",
        "H1f": "H1f HTTP /v1/embeddings ×64 float",
        "H1b": "H1b HTTP /v1/embeddings ×64 base64",
        "S3": "S3  gRPC Encode ×64 (cached)",
        "H3f": "H3f HTTP ×64 float (cached)",
        "H3b": "H3b HTTP ×64 base64 (cached)",
    }
    for key, label in names.items():
        base_key = "S3" if key in CACHED.values() else "S1"
        base = results.median(base_key)
        value = results.median(key)
        per_rep = " ".join(
            f"{run / ref:.3f}"
            for run, ref in zip(results.throughput[key], results.throughput[base_key], strict=True)
        )
        target = "≥ 0.95" if key in ("H1f", "H1b") else ""
        lines.append(f"{label:<36}{value:>10.1f}{value / base:>8.3f}   {target:<8} {per_rep}")
    lines.append(f"{'latency (ms)':<36}{'p50':>10}{'p99':>8}   target")
    for key, values in results.latency_ms.items():
        target = "p50 ≤ 1.5" if key.startswith("HTTP") else ""
        lines.append(
            f"{key:<36}{bench.percentile(values, 50):>10.2f}"
            f"{bench.percentile(values, 99):>8.2f}   {target}"
        )
    return "\n".join(lines)


def summary_http(results: HttpResults, device: str) -> dict:
    def ratio(name: str) -> float:
        return results.median(name) / results.median("S3" if name in CACHED.values() else "S1")

    return {
        "cpu": cpu_line(),
        "device": device,
        "texts": results.texts,
        "reps": results.reps,
        "throughput_texts_per_s": {
            k: {"median": results.median(k), "runs": v, "ratio_to_grpc": ratio(k)}
            for k, v in results.throughput.items()
        },
        "latency_ms": {
            k: {"p50": bench.percentile(v, 50), "p99": bench.percentile(v, 99)}
            for k, v in results.latency_ms.items()
        },
    }


# -- a private deployment -------------------------------------------------------------


def start_deployment(args: argparse.Namespace) -> tuple[bench.Deployment, str]:
    """Redis, one worker and a server with --http-port; (deployment, HTTP base URL)."""
    import subprocess

    from embedq.apps.embedded import EmbeddedRedis, free_port

    redis_server = EmbeddedRedis().start()
    port, http_port = free_port(), free_port()
    cli = [sys.executable, "-m", "embedq.cli", "--log-level", "WARNING"]
    redis_flag = ["--redis-url", redis_server.url]
    worker = [*cli, "worker", *redis_flag, "--devices", args.devices]
    worker += ["--model", args.model] if args.model else []
    server = [*cli, "server", *redis_flag, "--port", str(port), "--http-port", str(http_port)]
    server += ["--near-cache-mb", "0"]  # fresh() deletes texts from Redis: see Deployment
    procs = {"worker": subprocess.Popen(worker), "server": subprocess.Popen(server)}
    deployment = bench.Deployment(f"127.0.0.1:{port}", redis_server.url, procs, redis_server)
    try:
        deployment.wait_ready()
    except BaseException:
        deployment.stop()
        raise
    return deployment, f"http://127.0.0.1:{http_port}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m embedq.tools.bench_http",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--texts", type=int, default=1024, help="how many texts [%(default)s]")
    parser.add_argument("--reps", type=int, default=3, help="repetitions [%(default)s]")
    parser.add_argument("--model", help="model of the private deployment")
    parser.add_argument("--devices", default="cpu", help="worker device [%(default)s]")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    texts = bench.generated_texts(args.texts)
    deployment, http_url = start_deployment(args)
    try:
        results = asyncio.run(run_http(deployment.target, http_url, deployment, texts, args.reps))
    finally:
        deployment.stop()
    print(report_http(results, args.devices))
    if args.out:
        args.out.write_text(json.dumps(summary_http(results, args.devices), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
