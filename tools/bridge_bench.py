"""Bridge throughput against `embedq encode`, side by side in one run.

    python -m embedq.tools.bridge_bench [--texts 10000] [--runs 3]
        [--target HOST:PORT --redis-url URL]

Starts a private deployment (Redis-compatible server, one worker, one server)
unless --target is given, then, per run, on fresh (uncached) texts of the same
kind:
  encode  `embedq encode --input FILE --output FILE.npy`, process start to exit
  bridge  the texts already in a Redis stream; `embedq bridge` from that stream
          to another, process start until the last result is in the output stream
The broker is the deployment's own Redis (or --broker-url). The order of the
two alternates between runs; medians are reported with the ratio
bridge / encode (the issue's target: >= 0.9). The CPU model and its vector
extensions are printed: speed depends on them, and on what else the machine
is doing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

CLI = [sys.executable, "-m", "embedq.cli", "--log-level", "WARNING"]
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_line() -> str:
    """CPU model, logical CPUs and the vector extensions the encoder can use."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    have = [f for f in FLAGS if f in flags] or ["none of " + "/".join(FLAGS)]
    return f"CPU: {model}, {os.cpu_count()} logical CPUs, flags: {' '.join(have)}"


def texts_for(count: int, run: int) -> list[str]:
    from embedq.tools.bench import generated_texts

    # A run tag keeps every run's texts out of the cache of earlier runs.
    return [f"{text} [{run}]" for text in generated_texts(count, seed=run)]


class Private:
    """A private deployment: Redis-compatible server, one worker, one server."""

    def __init__(self) -> None:
        from embedq.apps.embedded import EmbeddedRedis, free_port

        self.redis = EmbeddedRedis().start()
        self.port = free_port()
        flag = ["--redis-url", self.redis.url]
        self.procs = [
            subprocess.Popen([*CLI, "worker", *flag]),
            subprocess.Popen([*CLI, "server", *flag, "--port", str(self.port)]),
        ]
        self.target = f"127.0.0.1:{self.port}"
        self.redis_url = self.redis.url

    def wait_ready(self, timeout: float = 180) -> None:
        from embedq.client import Client

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with Client(self.target, timeout=10) as client:
                    info = client.info()
                    if info.models and info.models[0].workers_alive:
                        client.encode(["warm up"])
                        return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.3)
        raise RuntimeError("embedq did not become ready")

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(timeout=30)
        self.redis.stop()


def run_encode(target: str, texts: list[str], folder: Path) -> float:
    source = folder / "texts.txt"
    source.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    out = folder / "vectors.npy"
    started = time.perf_counter()
    subprocess.run(
        [*CLI, "encode", "--target", target, "--input", str(source), "--output", str(out)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    elapsed = time.perf_counter() - started
    out.unlink()
    return elapsed


def run_bridge(target: str, broker_url: str, texts: list[str], max_in_flight: int) -> float:
    client = redis.Redis.from_url(broker_url)
    name = f"embedq-bench-{uuid.uuid4().hex[:8]}"
    source, sink = f"{name}-in", f"{name}-out"
    try:
        pipe = client.pipeline(transaction=False)
        for index, text in enumerate(texts):
            pipe.xadd(source, {"id": str(index), "text": text})
        pipe.execute()
        base = broker_url.split("?")[0]
        started = time.perf_counter()
        proc = subprocess.Popen(
            [
                *CLI,
                "bridge",
                "--target",
                target,
                "--from",
                f"{base}?stream={source}&group=bench",
                "--to",
                f"{base}?stream={sink}",
                "--max-in-flight",
                str(max_in_flight),
            ],
            stdin=subprocess.DEVNULL,
        )
        try:
            while client.xlen(sink) < len(texts):
                if proc.poll() is not None:
                    raise RuntimeError(f"the bridge exited with status {proc.returncode}")
                time.sleep(0.02)
            elapsed = time.perf_counter() - started
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        return elapsed
    finally:
        client.delete(source, sink)
        client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m embedq.tools.bridge_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--texts", type=int, default=10_000, help="texts per run (%(default)s)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each (%(default)s)")
    parser.add_argument("--target", help="an embedq server already running (else a private one)")
    parser.add_argument(
        "--broker-url",
        help="Redis for the bridge's streams (default: the "
        "private deployment's; required with --target)",
    )
    parser.add_argument("--max-in-flight", type=int, default=512)
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.target and not args.broker_url:
        parser.error("--target needs --broker-url")
    print(cpu_line(), flush=True)
    deployment = None
    if args.target:
        target, broker = args.target, args.broker_url
    else:
        deployment = Private()
        target, broker = deployment.target, args.broker_url or deployment.redis_url
    encode_s: list[float] = []
    bridge_s: list[float] = []
    try:
        if deployment is not None:
            deployment.wait_ready()
        with tempfile.TemporaryDirectory() as folder:
            for run in range(args.runs):
                order = ("encode", "bridge") if run % 2 == 0 else ("bridge", "encode")
                for kind in order:
                    texts = texts_for(args.texts, run * 2 + (kind == "bridge"))
                    if kind == "encode":
                        encode_s.append(run_encode(target, texts, Path(folder)))
                    else:
                        bridge_s.append(run_bridge(target, broker, texts, args.max_in_flight))
                    seconds = (encode_s if kind == "encode" else bridge_s)[-1]
                    rate = args.texts / seconds
                    print(f"run {run + 1} {kind:6s} {rate:8.1f} texts/s", flush=True)
    finally:
        if deployment is not None:
            deployment.stop()
    encode_rate = args.texts / statistics.median(encode_s)
    bridge_rate = args.texts / statistics.median(bridge_s)
    print(f"{args.texts} texts, medians of {args.runs} runs (shared, noisy machines vary):")
    print(f"  embedq encode --input FILE    {encode_rate:8.1f} texts/s")
    print(f"  embedq bridge (Redis Streams) {bridge_rate:8.1f} texts/s")
    pairs = [e / b for e, b in zip(encode_s, bridge_s, strict=False)]
    print(f"  ratio of the medians          {bridge_rate / encode_rate:8.2f}  (target >= 0.90)")
    print(
        f"  ratio run by run              {' '.join(f'{p:.2f}' for p in pairs)}"
        f"  (median {statistics.median(pairs):.2f}; the pair ran back to back)"
    )
    if args.json:
        figures = {
            "machine": cpu_line(),
            "texts": args.texts,
            "encode_texts_per_s": encode_rate,
            "bridge_texts_per_s": bridge_rate,
            "ratio": bridge_rate / encode_rate,
            "ratios_run_by_run": pairs,
        }
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
