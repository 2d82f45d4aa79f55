"""`embedq status`: its exit status (healthy, no live worker, dead letters growing)
and how it finds the private Redis of a running `embedq serve` (the state file)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid

import grpc
import redis
from conftest import stop_process, wait_healthy
from embedq.apps.embedded import free_port

from embedq.internal.v1 import queue_pb2
from embedq.keys import Keys

MODEL = "all-MiniLM-L6-v2"


def status(state_dir, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDQ_")}
    env["EMBEDQ_STATE_DIR"] = str(state_dir)
    return subprocess.run(
        [sys.executable, "-m", "embedq.cli", "status", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def register(client: redis.Redis, keys: Keys, *, live_worker: bool) -> None:
    reg = queue_pb2.ModelRegistration(name=MODEL, dimension=384, fingerprint="f" * 64)
    client.hset(keys.models(), MODEL, reg.SerializeToString())
    if live_worker:
        client.zadd(keys.workers(MODEL), {"w1": time.time()})


def test_status_exits_1_when_a_model_has_no_live_worker(redis_server, tmp_path):
    keys = Keys(f"st{uuid.uuid4().hex[:8]}")
    client = redis.Redis.from_url(redis_server.url)
    url = ["--redis-url", redis_server.url, "--namespace", keys.namespace]
    result = status(tmp_path, *url)
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == "embedq status: unhealthy: no model registered (no worker has started)"
    )
    register(client, keys, live_worker=False)
    client.zadd(keys.workers(MODEL), {"gone": time.time() - 60})  # a stale heartbeat
    result = status(tmp_path, *url)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "model 'all-MiniLM-L6-v2' has no live worker" in line
    client.zadd(keys.workers(MODEL), {"w1": time.time()})
    result = status(tmp_path, *url)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_status_exits_1_when_dead_letters_grow(redis_server, tmp_path):
    keys = Keys(f"st{uuid.uuid4().hex[:8]}")
    client = redis.Redis.from_url(redis_server.url)
    register(client, keys, live_worker=True)
    client.xadd(keys.dead_letters(MODEL), {"m": b"old"})
    url = ["--redis-url", redis_server.url, "--namespace", keys.namespace]
    # Stored count: the first run has nothing to compare with; the next compares.
    assert status(tmp_path, *url).returncode == 0
    assert status(tmp_path, *url).returncode == 0
    client.xadd(keys.dead_letters(MODEL), {"m": b"new"})
    result = status(tmp_path, *url, "--json")
    assert result.returncode == 1
    assert "dead letters grew from 1 to 2" in result.stderr
    assert json.loads(result.stdout)["unhealthy"] == [
        "model 'all-MiniLM-L6-v2': dead letters grew from 1 to 2"
    ]
    assert status(tmp_path, *url).returncode == 0  # not growing any more
    # --interval: two samples; a dead letter arriving between them counts.
    threading.Timer(1.0, lambda: client.xadd(keys.dead_letters(MODEL), {"m": b"x"})).start()
    result = status(tmp_path, *url, "--interval", "3")
    assert result.returncode == 1 and "grew from 2 to 3" in result.stderr
    assert status(tmp_path, *url, "--interval", "0.5").returncode == 0


def test_status_without_a_url_picks_the_running_serve_or_says_how(redis_server, tmp_path):
    keys = Keys(f"st{uuid.uuid4().hex[:8]}")
    register(redis.Redis.from_url(redis_server.url), keys, live_worker=True)
    result = status(tmp_path)
    assert result.returncode == 2
    assert "no running `embedq serve` found" in result.stderr and "--redis-url" in result.stderr

    def state(port: int, pid: int) -> None:
        tmp_path.mkdir(exist_ok=True)
        (tmp_path / f"serve-{port}.json").write_text(
            json.dumps({"pid": pid, "port": port, "redis_url": redis_server.url,
                        "namespace": keys.namespace})
        )  # fmt: skip

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    state(1111, dead.pid)  # a serve that is gone: ignored
    assert status(tmp_path).returncode == 2
    state(2222, os.getpid())
    result = status(tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"namespace {keys.namespace} on {redis_server.url}" in result.stdout
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        state(3333, sleeper.pid)
        result = status(tmp_path)
        assert result.returncode == 2
        assert "port 2222" in result.stderr and "port 3333" in result.stderr
        assert "--port" in result.stderr
        assert status(tmp_path, "--port", "3333").returncode == 0
        assert status(tmp_path, "--port", "4444").returncode == 2
    finally:
        sleeper.kill()
        sleeper.wait()


def test_serve_writes_its_state_file_and_status_finds_it(tmp_path):
    """A real `embedq serve` (private Redis): status needs no URL; the state file is
    private, holds no password, and is gone after Ctrl-C."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDQ_")}
    env["EMBEDQ_STATE_DIR"] = str(tmp_path)
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "embedq.cli", "serve", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_healthy(f"127.0.0.1:{port}", proc, "serve", timeout=120)
        path = tmp_path / f"serve-{port}.json"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        state = json.loads(path.read_text())
        assert state["pid"] == proc.pid and state["port"] == port
        assert state["redis_url"].startswith("redis://127.0.0.1:") and "@" not in state["redis_url"]
        result = status(tmp_path, "--json")
        assert result.returncode == 0, result.stderr
        (model,) = json.loads(result.stdout)["models"]
        assert model["name"] == MODEL and model["workers_alive"] == 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert not path.exists()
        assert status(tmp_path).returncode == 2
    except (AssertionError, grpc.RpcError, RuntimeError):
        print(log.read_text()[-3000:])
        raise
    finally:
        stop_process(proc)
