"""How long a SIGKILLed worker stalls its jobs: from the kill until another worker
has claimed every job the dead one held (its pending list is empty).

Two set-ups, each a few rounds, 600 new texts in 4 calls per round:
  standalone  two `embedq worker` processes (the victim and a survivor), default
              --dead-after: the survivor notices the stale heartbeat;
  serve       `embedq serve --workers 2`: serve removes the dead worker's heartbeat
              the moment its process exits, the other worker takes over.

    python scripts/takeover_stall.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import redis
from embedq.apps.embedded import EmbeddedRedis, free_port
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedq.keys import Keys
from embedq.v1 import embedq_pb2 as pb
from embedq.v1 import embedq_pb2_grpc

MODEL = "all-MiniLM-L6-v2"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def consumers(client: redis.Redis, keys: Keys) -> dict[str, int]:
    """Consumer name -> pending jobs."""
    found = client.xinfo_consumers(keys.jobs(MODEL), "workers")
    return {c["name"].decode(): c["pending"] for c in found}


def start_calls(stub) -> list:
    texts = [f"takeover {uuid.uuid4().hex} sentence {i}" for i in range(600)]
    request = pb.EncodeRequest
    return [
        stub.Encode.future(request(texts=texts[i : i + 150]), timeout=120)
        for i in range(0, 600, 150)
    ]


def kill_and_time(client, keys, victim: str, pid: int, futures) -> float:
    started = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    while consumers(client, keys).get(victim, 0) > 0:
        time.sleep(0.02)
    stall = time.monotonic() - started
    assert sum(f.result().count for f in futures) == 600  # nothing lost
    return stall


def standalone_round(redis_url: str) -> float:
    from conftest import Service  # the tests' process helpers

    svc = Service(redis_url, namespace=f"m{uuid.uuid4().hex[:6]}")
    try:
        victim = svc.start_worker()
        svc.start_server()
        svc.start_worker()
        client, keys = redis.Redis.from_url(redis_url), Keys(svc.namespace)
        with grpc.insecure_channel(svc.target) as channel:
            futures = start_calls(embedq_pb2_grpc.EmbedderStub(channel))
            name = ""
            while not name:
                held = consumers(client, keys)
                name = next((n for n, p in held.items() if f"-{victim.pid}-" in n and p), "")
            return kill_and_time(client, keys, name, victim.pid, futures)
    finally:
        svc.stop()


def pid_of_worker(worker_id: str) -> int:
    """The serve worker process whose EMBEDQ_WORKER_ID is worker_id."""
    wanted = f"EMBEDQ_WORKER_ID={worker_id}".encode()
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and wanted in Path(f"/proc/{entry}/environ").read_bytes():
                return int(entry)
        except OSError:
            continue
    raise LookupError(worker_id)


def serve_rounds(rounds: int) -> list[float]:
    port = free_port()
    state = f"/tmp/embedq-takeover-{port}"
    env = {**os.environ, "EMBEDQ_STATE_DIR": state}
    argv = [sys.executable, "-m", "embedq.cli", "serve", "--port", str(port), "--workers", "2"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stalls = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wait_serving(channel)
            info = json.loads(Path(glob.glob(f"{state}/serve-*.json")[0]).read_text())
            client, keys = redis.Redis.from_url(info["redis_url"]), Keys(info["namespace"])
            stub = embedq_pb2_grpc.EmbedderStub(channel)
            for _ in range(rounds):
                time.sleep(8)  # both workers (the replacement too) registered
                futures = start_calls(stub)
                victim = ""
                while not victim:
                    victim = next((n for n, p in consumers(client, keys).items() if p), "")
                stalls.append(kill_and_time(client, keys, victim, pid_of_worker(victim), futures))
    finally:
        proc.terminate()
        proc.wait()
    return stalls


def wait_serving(channel, timeout: float = 180) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            request = health_pb2.HealthCheckRequest(service="embedq.v1.Embedder")
            if health.Check(request, timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise TimeoutError("serve not ready")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with EmbeddedRedis() as server:
        for _ in range(args.rounds):
            stall = standalone_round(server.url)
            print(f"standalone workers (--dead-after 3): jobs claimed {stall:.2f} s after SIGKILL")
    for stall in serve_rounds(args.rounds):
        print(f"embedq serve --workers 2: jobs claimed {stall:.2f} s after SIGKILL")
    return 0


if __name__ == "__main__":
    sys.exit(main())
