"""Separate hosts, simulated: Redis, a server, a worker and a client each in
its own network namespace, joined by a bridge on 10.250.0.0/24.

Nothing can then go over loopback: the worker and the server reach Redis at
10.250.0.1, the client reaches the server at 10.250.0.2. Each process also has
its own HOME and TMPDIR, so no state passes through a shared folder. The
namespaces, links and addresses exist only inside namespaces this test creates
(never the machine's own), and are removed at teardown, failure or not.

Needs root and iproute2 (`ip netns`); skipped, with the reason, where
`ip netns add` is unavailable or refused (an unprivileged container, say).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from embedq.apps.embedded import EmbeddedRedisError, find_redis_binary

pytestmark = pytest.mark.timeout(240)

SUBNET = "10.250.0"
HOSTS = {"redis": 1, "server": 2, "worker": 3, "client": 4}
REDIS_PORT = 6379
GRPC_PORT = 50051
TEXTS = ["A man is playing a guitar.", "Namespaces are not loopback.", "東京は日本の首都です。"]

CLIENT = r"""
import json, os, sys, time
import grpc, numpy as np, redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from embedq.v1 import embedq_pb2 as pb, embedq_pb2_grpc

target, redis_url, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
deadline = time.monotonic() + float(sys.argv[4])
with grpc.insecure_channel(target) as channel:
    health = health_pb2_grpc.HealthStub(channel)
    stub = embedq_pb2_grpc.EmbedderStub(channel)
    while True:  # serving, and a worker registered (it loads the model first)
        try:
            serving = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
            if serving == health_pb2.HealthCheckResponse.SERVING and any(
                m.workers_alive for m in stub.Info(pb.InfoRequest(), timeout=2).models
            ):
                break
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            sys.exit("embedq at %s not ready in time" % target)
        time.sleep(0.3)
    response = stub.Encode(pb.EncodeRequest(texts=texts), timeout=60)
vectors = np.frombuffer(response.embeddings, dtype="<f4").reshape(response.count, -1)
peers = redis.Redis.from_url(redis_url, password=os.environ["EMBEDQ_REDIS_PASSWORD"]).client_list()
print(json.dumps({
    "vectors": vectors.tolist(),
    "redis_peers": sorted({peer["addr"].rsplit(":", 1)[0] for peer in peers}),
}))
"""


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=15)


def must(*args: str) -> None:
    result = ip(*args)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


class Network:
    """Namespaces ns-<role> around a bridge in a namespace of its own."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.names = {role: f"eq-{tag}-{role}" for role in (*HOSTS, "switch")}
        self.created: list[str] = []

    def add_namespace(self, name: str) -> None:
        result = ip("netns", "add", name)
        if result.returncode != 0:
            raise RuntimeError(f"`ip netns add` failed: {result.stderr.strip()}")
        self.created.append(name)

    def build(self) -> None:
        switch = self.names["switch"]
        self.add_namespace(switch)
        must("-n", switch, "link", "add", "br0", "type", "bridge")
        must("-n", switch, "link", "set", "br0", "up")
        for role, host in HOSTS.items():
            ns = self.names[role]
            self.add_namespace(ns)
            # Both ends are made inside our namespaces: the machine's own is untouched.
            port = f"p-{role}"
            must(
                "-n",
                switch,
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
            )
            must("-n", switch, "link", "set", port, "master", "br0")
            must("-n", switch, "link", "set", port, "up")
            must("-n", ns, "addr", "add", f"{SUBNET}.{host}/24", "dev", "eth0")
            must("-n", ns, "link", "set", "eth0", "up")
            must("-n", ns, "link", "set", "lo", "up")

    def remove(self) -> None:
        for name in reversed(self.created):  # their veth ends go with them
            ip("netns", "del", name)
        self.created.clear()


def unavailable_reason() -> str | None:
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2 not installed)"
    try:
        find_redis_binary()
    except EmbeddedRedisError as exc:
        return str(exc)
    probe = f"eq-probe-{uuid.uuid4().hex[:6]}"
    result = ip("netns", "add", probe)
    if result.returncode != 0:
        return f"`ip netns add` failed: {result.stderr.strip() or result.returncode}"
    ip("netns", "del", probe)
    return None


@pytest.fixture
def network():
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    net = Network()
    try:
        try:
            net.build()
        except RuntimeError as exc:
            pytest.skip(f"cannot build the test network here: {exc}")
        yield net
    finally:
        net.remove()


class Hosts:
    """Processes started inside the namespaces, each with its own HOME and TMPDIR."""

    def __init__(self, network: Network, root: Path) -> None:
        self.network = network
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}

    def env(self, role: str, **extra: str) -> dict[str, str]:
        home = self.root / role / "home"
        tmp = self.root / role / "tmp"
        home.mkdir(parents=True)
        tmp.mkdir(parents=True)
        keep = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL")}
        return {
            **keep,
            "HOME": str(home),
            "TMPDIR": str(tmp),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **extra,
        }

    def log(self, role: str) -> Path:
        return self.root / role / "out.log"

    def start(self, role: str, argv: list[str], env: dict[str, str], stdin: bytes = b"") -> None:
        log = open(self.log(role), "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.network.names[role], *argv],
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=env["HOME"],
        )
        assert proc.stdin is not None
        proc.stdin.write(stdin)
        proc.stdin.close()
        self.procs[role] = proc

    def run(self, role: str, argv: list[str], env: dict[str, str], timeout: float):
        return subprocess.run(
            ["ip", "netns", "exec", self.network.names[role], *argv],
            capture_output=True,
            text=True,
            env=env,
            cwd=env["HOME"],
            timeout=timeout,
        )

    def logs(self) -> str:
        parts = []
        for role in self.procs:
            text = self.log(role).read_text(errors="replace").splitlines()[-25:]
            parts.append(f"--- {role} (exit {self.procs[role].poll()}) ---\n" + "\n".join(text))
        return "\n".join(parts)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)


def test_redis_server_worker_and_client_on_separate_hosts(network, tmp_path, reference_model):
    password = secrets.token_hex(16)
    redis_ip, server_ip = f"{SUBNET}.{HOSTS['redis']}", f"{SUBNET}.{HOSTS['server']}"
    redis_url = f"redis://{redis_ip}:{REDIS_PORT}/0"
    embedq = [sys.executable, "-m", "embedq.cli"]
    hosts = Hosts(network, tmp_path)
    try:
        redis_env = hosts.env("redis")
        hosts.start(
            "redis",
            # The password goes in on stdin (a config read from "-"), not argv.
            [find_redis_binary(), "-", "--bind", redis_ip, "--port", str(REDIS_PORT)]
            + ["--save", "", "--appendonly", "no", "--dir", redis_env["TMPDIR"]],
            redis_env,
            stdin=f'requirepass "{password}"\n'.encode(),
        )
        hosts.start(
            "worker",
            [*embedq, "worker", "--redis-url", redis_url, "--devices", "cpu"],
            hosts.env("worker", EMBEDQ_REDIS_PASSWORD=password),
        )
        hosts.start(
            "server",
            [*embedq, "server", "--redis-url", redis_url]
            + ["--host", server_ip, "--port", str(GRPC_PORT)],
            hosts.env("server", EMBEDQ_REDIS_PASSWORD=password),
        )
        result = hosts.run(
            "client",
            [sys.executable, "-c", CLIENT, f"{server_ip}:{GRPC_PORT}", redis_url]
            + [json.dumps(TEXTS), "150"],
            hosts.env("client", EMBEDQ_REDIS_PASSWORD=password),
            timeout=200,
        )
        assert result.returncode == 0, f"{result.stderr[-3000:]}\n{hosts.logs()}"
        answer = json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        hosts.stop()

    got = np.asarray(answer["vectors"], dtype=np.float32)
    expected = reference_model.encode(TEXTS, convert_to_numpy=True)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-5
    # Redis saw the server, the worker and the client, each from its own address.
    peers = set(answer["redis_peers"])
    assert {f"{SUBNET}.{HOSTS[role]}" for role in ("server", "worker", "client")} <= peers
    assert not any(peer.startswith("127.") for peer in peers), peers
