"""The operator-facing commands: `embedq serve` (embedded default),
`embedq worker --model` with a model folder, --help everywhere."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import Service, log_tail, stop_process, wait_healthy
from embedq.apps.embedded import free_port
from embedq.workers.cli import (
    OPENMP_SPIN_COUNT,
    limit_openmp_spin,
    lower_cpu_priority,
    parse_devices,
)
from helpers_tiny_model import TINY_TEXTS, write_tiny_bert

from embedq.v1 import embedq_pb2 as pb
from embedq.v1 import embedq_pb2_grpc

COMMANDS = ["serve", "server", "worker", "encode", "similarity", "info"]


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "embedq.cli", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: embedq " + command in result.stdout


def test_top_level_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout


def test_server_without_redis_url_explains():
    env = {k: v for k, v in os.environ.items() if k != "EMBEDQ_REDIS_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "embedq.cli", "server"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2 and "--redis-url" in result.stderr


def test_free_port_never_hands_out_a_port_twice(monkeypatch):
    """Servers started together get distinct ports even where the kernel offers one again
    (here: every bind(0) offers the same two ports until they are used up)."""
    import socket

    from embedq.apps import embedded

    offered = iter([40001, 40001, 40002, 40001, 40002, 40003])

    class OfferingAgain(socket.socket):
        def getsockname(self):
            return ("127.0.0.1", next(offered))

    monkeypatch.setattr(embedded.socket, "socket", OfferingAgain)
    monkeypatch.setattr(embedded, "_HANDED_OUT", set())
    assert [embedded.free_port() for _ in range(3)] == [40001, 40002, 40003]


def test_parse_devices():
    assert parse_devices("cpu") == ["cpu"]
    assert parse_devices("0,1") == ["cuda:0", "cuda:1"]
    assert parse_devices("cuda:3") == ["cuda:3"]
    with pytest.raises(Exception, match="bad device"):
        parse_devices("gpu-zero")


def test_openmp_spin_is_shortened_unless_the_user_chose():
    environ: dict[str, str] = {}
    assert limit_openmp_spin(environ, loaded={})
    assert environ == {"GOMP_SPINCOUNT": OPENMP_SPIN_COUNT}
    for chosen in ({"GOMP_SPINCOUNT": "300000"}, {"OMP_WAIT_POLICY": "ACTIVE"}):
        environ = dict(chosen)
        assert not limit_openmp_spin(environ, loaded={})
        assert environ == chosen
    environ = {}  # too late once torch (and libgomp with it) is loaded
    assert not limit_openmp_spin(environ, loaded={"torch": object()})
    assert environ == {}


def thread_niceness(pid: int) -> list[int]:
    """The niceness of every thread of a process (field 19 of /proc/PID/task/TID/stat)."""
    return [
        int((task / "stat").read_text().rsplit(")", 1)[1].split()[16])
        for task in Path(f"/proc/{pid}/task").iterdir()
    ]


# Threads started before and after lowering the priority, and a no-op increment.
_NICE_PROBE = """
import os, threading
from embedq.workers.cli import lower_cpu_priority
stop = threading.Event()
threading.Thread(target=stop.wait).start()
assert lower_cpu_priority(0) == os.getpriority(os.PRIO_PROCESS, 0)
lower_cpu_priority(3)
threading.Thread(target=stop.wait).start()
print(os.getpid(), flush=True)
input()
stop.set()
"""


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="Linux: per-thread niceness")
def test_lowering_the_cpu_priority_covers_every_thread():
    own = os.getpriority(os.PRIO_PROCESS, 0)
    probe = subprocess.Popen(
        [sys.executable, "-c", _NICE_PROBE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        pid = int(probe.stdout.readline())
        assert thread_niceness(pid) == [min(19, own + 3)] * 3
    finally:
        probe.communicate("\n", timeout=10)
    assert lower_cpu_priority(0) == own  # no-op: this process keeps its priority


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="Linux: per-thread niceness")
def test_a_cpu_worker_yields_the_cpu_to_the_server(service):
    """The shared deployment's CPU worker runs at the default --cpu-nice (10) in all its
    threads, the model's OpenMP threads included; the server keeps the callers' priority."""
    own = os.getpriority(os.PRIO_PROCESS, 0)
    worker = thread_niceness(service.workers[0].pid)
    assert len(worker) > 2 and set(worker) == {min(19, own + 10)}
    assert set(thread_niceness(service.server.pid)) == {own}


# A worker command whose device lookup reports what OpenMP would read and stops there.
_SPIN_PROBE = """
import os, sys
import embedq.workers.cli as cli
def report(spec):
    print(os.environ.get("GOMP_SPINCOUNT"), "torch" in sys.modules)
    raise SystemExit(0)
cli.parse_devices = report
from embedq.cli import main
main(["worker", "--redis-url", "redis://127.0.0.1:1", "--devices", "auto"])
"""


@pytest.mark.parametrize(("chosen", "expected"), [(None, OPENMP_SPIN_COUNT), ("5000", "5000")])
def test_the_worker_command_sets_the_spin_before_torch_loads(chosen, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    if chosen:
        env["GOMP_SPINCOUNT"] = chosen
    result = subprocess.run(
        [sys.executable, "-c", _SPIN_PROBE], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [expected, "False"]


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _processes_mentioning(fragment: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fragment in cmdline and int(proc.name) != os.getpid():
            found.append(int(proc.name))
    return found


def test_serve_embedded_default_then_ctrl_c(tmp_path, reference_model):
    """No configuration: private Redis + worker + server; SIGINT stops all."""
    port = free_port()
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDQ_")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "embedq.cli", "serve", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        target = f"127.0.0.1:{port}"
        wait_healthy(target, proc, "serve", timeout=90)
        with grpc.insecure_channel(target) as channel:
            stub = embedq_pb2_grpc.EmbedderStub(channel)
            _wait_for_worker(stub)
            response = stub.Encode(pb.EncodeRequest(texts=["embedded default"]), timeout=60)
        vector = np.frombuffer(response.embeddings, "<f4")
        assert np.abs(vector - reference_model.encode(["embedded default"])[0]).max() <= 1e-5
        redis_url = re.search(r"on (redis://127\.0\.0\.1:(\d+)/0)", log.read_text()).group(1)
        redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
        assert _port_open(redis_port)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert not _port_open(port) and not _port_open(redis_port)
        _wait_gone(redis_url)
    finally:
        stop_process(proc)
        print(log.read_text()[-3000:])


def _wait_for_worker(stub, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = stub.Info(pb.InfoRequest(), timeout=5)
        if info.models and info.models[0].workers_alive:
            return
        time.sleep(0.2)
    raise AssertionError("no worker registered")


def _wait_gone(fragment: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while _processes_mentioning(fragment):
        assert time.monotonic() < deadline, f"left behind: {_processes_mentioning(fragment)}"
        time.sleep(0.2)


@pytest.mark.parametrize(
    "pooling, expected",
    [
        ({"pooling_mode_cls_token": True}, "cls"),
        ({"pooling_mode": "max"}, "max"),
    ],
)
def test_pooling_is_read_from_the_model_folder(redis_server, tmp_path, pooling, expected):
    """A tiny BERT with CLS (or max) pooling and no Normalize, served end to end."""
    from sentence_transformers import SentenceTransformer

    folder = write_tiny_bert(tmp_path / "tiny", pooling=pooling, normalize=False)
    svc = Service(redis_server.url, namespace=f"tiny-{expected}")
    try:
        svc.start_worker("--model", f"tiny={folder}")
        svc.start_server()
        with grpc.insecure_channel(svc.target) as channel:
            stub = embedq_pb2_grpc.EmbedderStub(channel)
            (model,) = stub.Info(pb.InfoRequest()).models
            assert (model.name, model.pooling, model.normalize) == ("tiny", expected, False)
            response = stub.Encode(pb.EncodeRequest(texts=TINY_TEXTS), timeout=60)
        got = np.frombuffer(response.embeddings, "<f4").reshape(response.count, response.dimension)
        reference = SentenceTransformer(str(folder), device="cpu").encode(TINY_TEXTS)
        assert np.abs(got - reference).max() <= 1e-5
        assert not np.allclose(np.linalg.norm(got, axis=1), 1.0)  # no Normalize module
    except Exception:
        print(log_tail(f"worker-tiny-{expected}-0"))
        raise
    finally:
        svc.stop()


def test_worker_devices_starts_one_process_each(redis_server):
    """`--devices cpu,cpu` takes the one-process-per-device path (as 0,1 does on GPUs)."""
    import redis

    from embedq.keys import Keys

    namespace = "devices"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "embedq.cli",
            "worker",
            "--redis-url",
            redis_server.url,
            "--namespace",
            namespace,
            "--devices",
            "cpu,cpu",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis.from_url(redis_server.url)
    workers_key = Keys(namespace).workers("all-MiniLM-L6-v2")
    try:
        deadline = time.monotonic() + 120
        while client.zcard(workers_key) < 2:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert client.zcard(workers_key) == 0  # both children unregistered on the way out
    finally:
        stop_process(proc)
