"""The one worker supervisor (embedq.workerpool): its restart policy on stand-in
children, and on `embedq worker --devices cpu,cpu` (one child per device)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import stop_process

from embedq import workerpool
from embedq.settings import SettingsError
from embedq.workerpool import WorkerPool, restart_delay


def child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def wait_for(condition, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {timeout}s"
        time.sleep(0.05)


def test_restart_delays_grow_while_a_child_keeps_dying() -> None:
    assert [restart_delay(n) for n in range(1, 9)] == [0, 1, 2, 4, 8, 16, 30, 30]


def test_a_dead_child_is_restarted_with_one_line_and_its_id_forgotten(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    starts = tmp_path / "starts"
    code = (
        "import os, sys\n"
        f"open({str(starts)!r}, 'a').write(os.environ['EMBEDQ_WORKER_ID'] + '\\n')\n"
        "sys.exit(3)"
    )
    forgotten: list[str] = []
    caplog.set_level(logging.INFO, "embedq.workerpool")
    pool = WorkerPool([child(code)], on_exit=forgotten.append, labels=["worker on cpu"])
    try:
        pool_check_until(pool, lambda: len(forgotten) >= 2)
    finally:
        pool.stop()
    ids = starts.read_text().split()
    assert len(ids) >= 2 and len(set(ids)) == len(ids)  # a fresh consumer name each start
    assert forgotten == ids[: len(forgotten)]
    exits = [r.getMessage() for r in caplog.records if "exited with 3" in r.getMessage()]
    assert exits[0].startswith("worker on cpu (pid ") and exits[0].endswith("restarting in 0.0s")
    assert exits[1].endswith("restarting in 1.0s")  # the second quick exit waits


def pool_check_until(pool: WorkerPool, condition) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline
        pool.check()
        time.sleep(0.05)


def test_exit_2_stops_the_pool_with_one_line() -> None:
    pool = WorkerPool([child("import sys; sys.exit(2)"), child("import time; time.sleep(60)")])
    try:
        with pytest.raises(SettingsError, match=r"worker 0 \(pid \d+\) refused its configuration"):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                pool.check()
                time.sleep(0.05)
    finally:
        codes = pool.stop()
    assert codes[0] == 2 and codes[1] == -signal.SIGTERM  # the other child stopped too


def test_run_returns_when_stopped_and_stop_reports_exit_codes() -> None:
    stop = threading.Event()
    pool = WorkerPool([child("import time; time.sleep(60)")] * 2)
    threading.Timer(0.3, stop.set).start()
    pool.run(stop, period_s=0.05)
    assert pool.stop() == [-signal.SIGTERM, -signal.SIGTERM]


def test_a_child_that_ran_a_while_restarts_at_once_again(monkeypatch) -> None:
    monkeypatch.setattr(workerpool, "STABLE_AFTER_S", 0.2)
    pool = WorkerPool([child("import time, sys; time.sleep(0.3); sys.exit(1)")])
    try:
        for _ in range(3):
            first = pool.children[0].proc
            pool_check_until(pool, lambda first=first: pool.children[0].proc is not first)
            assert pool.children[0].quick_exits == 1
    finally:
        pool.stop()


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def test_worker_devices_restarts_a_killed_child_and_stops_on_sigterm(
    redis_server, tmp_path
) -> None:
    """`worker --devices cpu,cpu`: the same policy as serve (a killed child comes back with
    a new consumer name; its old heartbeat is removed at once); SIGTERM stops all, exit 0."""
    import redis

    from embedq.keys import Keys

    namespace = "pool-devices"
    env = {**os.environ, "EMBEDQ_ALLOW_BENCH_BACKEND": "1"}
    # A file, not a pipe: the children inherit it, and a full pipe nobody reads until the
    # end would block their logging (and the test).
    stderr = (tmp_path / "stderr.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedq.cli", "worker", "--redis-url", redis_server.url,
         "--namespace", namespace, "--devices", "cpu,cpu", "--backend", "bench-zero"],
        env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True,
    )  # fmt: skip
    client = redis.Redis.from_url(redis_server.url)
    workers_key = Keys(namespace).workers("all-MiniLM-L6-v2")
    try:
        wait_for(lambda: client.zcard(workers_key) == 2, 120, "two workers")
        before = {m.decode() for m in client.zrange(workers_key, 0, -1)}
        os.kill(_children_of(proc.pid)[0], signal.SIGKILL)
        wait_for(lambda: client.zcard(workers_key) == 1, 10, "the dead one forgotten")
        wait_for(lambda: client.zcard(workers_key) == 2, 120, "a replacement")
        after = {m.decode() for m in client.zrange(workers_key, 0, -1)}
        assert len(after - before) == 1 and proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0  # the replacement stopped cleanly
        assert client.zcard(workers_key) == 0
        assert "exited with -9" in (tmp_path / "stderr.log").read_text()
    finally:
        stop_process(proc)
        stderr.close()


def test_worker_devices_stops_everything_when_a_child_refuses_its_configuration() -> None:
    from embedq.apps.embedded import EmbeddedRedis

    with EmbeddedRedis(password="right-secret") as guarded:
        url = guarded.url.replace("right-secret", "")
        env = {**os.environ, "EMBEDQ_REDIS_PASSWORD": "wrong-secret"}
        env["EMBEDQ_ALLOW_BENCH_BACKEND"] = "1"
        argv = ["worker", "--redis-url", url, "--devices", "cpu,cpu", "--backend", "bench-zero"]
        done = subprocess.run(
            [sys.executable, "-m", "embedq.cli", *argv],
            env=env, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "refused its configuration" in done.stderr and "restarting" not in done.stderr
    assert "wrong-secret" not in done.stderr and "Traceback" not in done.stderr
