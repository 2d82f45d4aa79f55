"""What a refused call costs the server: waves of large calls against a full queue.

Starts a private Redis, one CPU worker (the real model) and one server, fills the model's
queue with a backlog that will not drain before the run ends, then sends waves of `--calls`
concurrent Encode calls of `--texts` new texts each (the worse burst's first wave: 64 x 256).
Every call is refused with RESOURCE_EXHAUSTED; per wave it prints how long the wave took, the
server's CPU per call (from /proc) and the refusal latencies.

Beside embedq's server it can run, in the same deployment and in alternating waves so that a
drifting host hits all alike:

  --compare PATH   a second server from another tree (its PYTHONPATH: a `pip install
                   --target PATH .` of an earlier commit), for a before/after;
  --bare           a gRPC server that refuses every Encode at once (no Redis, no queue):
                   the floor that Python gRPC itself sets on this machine.

  python scripts/refusal_waves.py [--waves 20] [--stop-worker] [--compare /tmp/before] [--bare]

--stop-worker stops the worker (SIGSTOP) during each wave: the server's own cost, without the
model's forward passes on the same cores. CPU time comes in clock ticks (10 ms): compare the
per-wave sums over many waves, not one wave.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from embedq.apps.embedded import free_port
from embedq.tools.bench import Deployment, generated_texts, read_texts
from embedq.tools.bench_load import UniqueTexts, cpu_seconds, encode_window

from embedq.v1 import embedq_pb2 as pb
from embedq.v1 import embedq_pb2_grpc

BARE_SERVER = """
import asyncio, sys, grpc
from embedq.v1 import embedq_pb2_grpc

class Refuse(embedq_pb2_grpc.EmbedderServicer):
    async def Encode(self, request, context):
        list(request.texts)
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy",
                            trailing_metadata=(("retry-after-ms", "100"),))

async def main():
    server = grpc.aio.server()
    embedq_pb2_grpc.add_EmbedderServicer_to_server(Refuse(), server)
    server.add_insecure_port("127.0.0.1:" + sys.argv[1])
    await server.start()
    await server.wait_for_termination()

asyncio.run(main())
"""


@dataclass
class Tally:
    """Per server: each wave's length (ms), the server's CPU in it (ms) and its refusals."""

    wave_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    refusal_ms: list[float] = field(default_factory=list)
    other: int = 0

    def line(self, name: str, calls: int) -> str:
        refusals = sorted(self.refusal_ms) or [0.0]
        fast = sum(ms <= 100 for ms in self.refusal_ms)
        cpu = sum(self.cpu_ms) / max(1, len(self.cpu_ms))
        return (
            f"{name:8s} waves {len(self.wave_ms)}: wave {statistics.median(self.wave_ms):.0f} ms "
            f"(median); server CPU {cpu:.0f} ms a wave = {1000 * cpu / calls:.0f} us a call; "
            f"refusals p50 {statistics.median(refusals):.1f} / p90 "
            f"{refusals[int(0.9 * (len(refusals) - 1))]:.1f} ms, within 100 ms "
            f"{100 * fast / max(1, len(self.refusal_ms)):.1f} %; not refused {self.other}"
        )


def start_server(deployment: Deployment, name: str, pythonpath: str | None, level: str) -> str:
    """One more embedq server in the deployment, from `pythonpath` (None: this tree)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    port = free_port()
    cli = [sys.executable, "-m", "embedq.cli", "--log-level", level, "server"]
    argv = [*cli, "--redis-url", deployment.redis_url, "--port", str(port)]
    deployment.procs[name] = subprocess.Popen(argv, env=env)
    deployment.targets.append(f"127.0.0.1:{port}")
    return deployment.targets[-1]


def start_bare(deployment: Deployment) -> str:
    port = free_port()
    deployment.procs["bare"] = subprocess.Popen([sys.executable, "-c", BARE_SERVER, str(port)])
    return f"127.0.0.1:{port}"


async def call(stub, texts: list[str], tally: Tally) -> None:
    request = pb.EncodeRequest(texts=texts)
    started = time.perf_counter()
    try:
        await stub.Encode(request, timeout=20)
        tally.other += 1
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            tally.other += 1
            return
        tally.refusal_ms.append((time.perf_counter() - started) * 1000)


async def wave(stub, source: UniqueTexts, args, pid: int, worker: int, tally: Tally) -> None:
    batches = [source.take(args.texts) for _ in range(args.calls)]
    if args.stop_worker:
        os.kill(worker, signal.SIGSTOP)
    try:
        cpu = cpu_seconds(pid)
        started = time.perf_counter()
        await asyncio.gather(*(call(stub, batch, tally) for batch in batches))
        tally.wave_ms.append((time.perf_counter() - started) * 1000)
        tally.cpu_ms.append((cpu_seconds(pid) - cpu) * 1000)
    finally:
        if args.stop_worker:
            os.kill(worker, signal.SIGCONT)


async def run(args: argparse.Namespace) -> None:
    deployment = Deployment.launch([["--devices", "cpu"]], near_cache_mb=None)
    try:
        targets = {"embedq": deployment.target}
        # The backlog's calls wait on a server of their own: whatever a server does for the
        # texts it waits for (replies, keep-alive) is then no measured server's cost.
        holder = start_server(deployment, "holder", None, "WARNING")
        if args.compare:
            targets["compare"] = start_server(deployment, "compare", args.compare, "WARNING")
        deployment.wait_ready()
        if args.bare:
            targets["bare"] = start_bare(deployment)
        pids = {"embedq": deployment.procs["server"].pid}
        pids.update({name: deployment.procs[name].pid for name in targets if name != "embedq"})
        await measure(args, deployment, targets, pids, holder)
    finally:
        deployment.stop()


async def measure(args, deployment: Deployment, targets: dict, pids: dict, holder: str) -> None:
    base = read_texts(args.input, args.column, 1024) if args.input else generated_texts(1024)
    source = UniqueTexts(base)
    channels = {name: grpc.aio.insecure_channel(target) for name, target in targets.items()}
    stubs = {name: embedq_pb2_grpc.EmbedderStub(channel) for name, channel in channels.items()}
    await asyncio.gather(*(channel.channel_ready() for channel in channels.values()))
    holder_channel = grpc.aio.insecure_channel(holder)
    holder_stub = embedq_pb2_grpc.EmbedderStub(holder_channel)
    await encode_window(holder_stub, source.take(256), 64, 4)  # the model's capacity measured
    # The backlog: more than the model does before the run ends, with a long deadline.
    backlog = [
        asyncio.ensure_future(
            holder_stub.Encode(pb.EncodeRequest(texts=source.take(256)), timeout=600)
        )
        for _ in range(args.backlog)
    ]
    await asyncio.sleep(1.5)
    tallies = {name: Tally() for name in stubs}
    worker = deployment.procs["worker"].pid
    for number in range(args.waves):
        order = list(stubs) if number % 2 == 0 else list(stubs)[::-1]
        for name in order:
            await wave(stubs[name], source, args, pids[name], worker, tallies[name])
            await asyncio.sleep(0.3)
    for future in backlog:
        future.cancel()
    for channel in [*channels.values(), holder_channel]:
        await channel.close()
    print(f"{args.waves} waves of {args.calls} calls x {args.texts} new texts, alternating:")
    for name, tally in tallies.items():
        print(tally.line(name, args.calls))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--waves", type=int, default=20, help="waves per server [20]")
    parser.add_argument("--calls", type=int, default=64, help="calls in a wave [64]")
    parser.add_argument("--texts", type=int, default=256, help="new texts a call [256]")
    parser.add_argument("--backlog", type=int, default=100, help="calls of 256 queued first [100]")
    parser.add_argument("--stop-worker", action="store_true", help="SIGSTOP it during waves")
    parser.add_argument("--compare", metavar="PATH", help="also a server from this PYTHONPATH")
    parser.add_argument("--bare", action="store_true", help="also a bare refusing gRPC server")
    parser.add_argument("--input", type=Path, help="texts: one per line, or a TSV with --column")
    parser.add_argument("--column", help="TSV column to read from --input (e.g. sentence1)")
    asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
