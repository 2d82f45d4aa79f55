"""TLS, mutual TLS, bearer tokens and Redis credentials, with real processes.

A throwaway PKI (CA, server certificate for 127.0.0.1/localhost, client
certificates) is made in a temporary folder with `cryptography`. One worker
on the session Redis serves every TLS/auth server here; a private
password-protected Redis (plus an ACL user) serves the credential cases.
No secret may ever show up in a log line or in an error a client sees.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import LOG_DIR, Service, _spawn, log_tail, stop_process
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from embedq.apps.embedded import EmbeddedRedis, EmbeddedRedisError, free_port
from embedq.client import AsyncClient, Client, EmbedqError
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedq.keys import Keys
from embedq.settings import RedisSettings, SettingsError, redact_url

TOKEN_A = "tok-a-" + uuid.uuid4().hex
TOKEN_B = "tok-b-" + uuid.uuid4().hex
TOKEN_ENV = "tok-env-" + uuid.uuid4().hex
TOKEN_NEW = "tok-new-" + uuid.uuid4().hex
REDIS_PASSWORD = "redis-pw-" + uuid.uuid4().hex
ACL_USER = "embedq-acl"
ACL_PASSWORD = "acl-pw-" + uuid.uuid4().hex
WRONG_PASSWORD = "wrong-pw-" + uuid.uuid4().hex
SECRETS = [TOKEN_A, TOKEN_B, TOKEN_ENV, TOKEN_NEW, REDIS_PASSWORD, ACL_PASSWORD, WRONG_PASSWORD]


# -- a throwaway PKI ------------------------------------------------------------


@dataclass
class Pki:
    folder: Path
    ca: Path = field(init=False)
    server_cert: Path = field(init=False)
    server_key: Path = field(init=False)
    client_cert: Path = field(init=False)
    client_key: Path = field(init=False)
    rogue_cert: Path = field(init=False)  # a client certificate from another CA
    rogue_key: Path = field(init=False)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer_name, issuer_key, *, ca=False, server=False):
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write(path: Path, cert=None, key=None) -> Path:
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return path


def make_pki(folder: Path) -> Pki:
    pki = Pki(folder)
    ca_key, rogue_ca_key = _key(), _key()
    ca = _cert("embedq test CA", ca_key, None, None, ca=True)
    rogue_ca = _cert("rogue CA", rogue_ca_key, None, None, ca=True)
    pki.ca = _write(folder / "ca.pem", cert=ca)
    for label, issuer, issuer_key, server in (
        ("server", ca, ca_key, True),
        ("client", ca, ca_key, False),
        ("rogue", rogue_ca, rogue_ca_key, False),
    ):
        key = _key()
        cert = _cert(f"embedq {label}", key, issuer.subject, issuer_key, server=server)
        setattr(pki, f"{label}_cert", _write(folder / f"{label}.pem", cert=cert))
        setattr(pki, f"{label}_key", _write(folder / f"{label}-key.pem", key=key))
    return pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# -- processes -----------------------------------------------------------------


def credentials(pki: Pki, *, ca=True, client=False, rogue=False) -> grpc.ChannelCredentials:
    cert, key = (pki.rogue_cert, pki.rogue_key) if rogue else (pki.client_cert, pki.client_key)
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes() if ca else None,
        private_key=key.read_bytes() if client or rogue else None,
        certificate_chain=cert.read_bytes() if client or rogue else None,
    )


def health_status(target: str, creds: grpc.ChannelCredentials | None, timeout=2.0) -> int:
    channel = grpc.secure_channel(target, creds) if creds else grpc.insecure_channel(target)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout).status


def log_text(name: str) -> str:
    path = LOG_DIR / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def assert_no_secret(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"a secret leaked into {where}"


@dataclass
class Servers:
    """Servers started by a test module; stopped (and their logs checked) at the end."""

    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)  # target -> log name

    def start(
        self,
        redis_url: str,
        namespace: str,
        *flags: str,
        env: dict[str, str] | None = None,
        creds: grpc.ChannelCredentials | None = None,
        serving: bool = True,
    ) -> str:
        """Start `embedq server`; wait until health answers (SERVING unless `serving` is False)."""
        port = free_port()
        name = f"sec-server-{uuid.uuid4().hex[:6]}"
        args = ["--log-level", "DEBUG", "server", "--port", str(port), "--redis-url", redis_url]
        proc = _spawn([*args, "--namespace", namespace, *flags], name, env)
        self.procs[name] = proc
        target = f"127.0.0.1:{port}"
        self.names[target] = name
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited {proc.returncode}:\n{log_tail(name)}")
            try:
                status = health_status(target, creds, timeout=1)
                if status == health_pb2.HealthCheckResponse.SERVING or not serving:
                    return target
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{name} not up:\n{log_tail(name)}")

    def log(self, target: str) -> str:
        return log_text(self.names[target])

    def stop(self) -> None:
        for name, proc in self.procs.items():
            stop_process(proc)
            assert_no_secret(log_text(name), f"{name}.log")


@pytest.fixture(scope="module")
def worker_service(redis_server) -> Iterator[Service]:
    """One worker on the session Redis that the TLS and auth servers share."""
    svc = Service(redis_server.url, namespace=f"sec{uuid.uuid4().hex[:6]}")
    svc.start_worker()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    started = Servers()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def tls_target(worker_service, servers, pki) -> str:
    return servers.start(
        worker_service.redis_url,
        worker_service.namespace,
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        creds=credentials(pki),
    )


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text(f"# embedq tokens\n\n{TOKEN_A}\n  {TOKEN_B}  \n# old: none\n")
    return path


@pytest.fixture(scope="module")
def auth_target(worker_service, servers, token_file) -> str:
    """Plaintext, tokens from a file and from EMBEDQ_AUTH_TOKENS."""
    return servers.start(
        worker_service.redis_url,
        worker_service.namespace,
        "--auth-token-file",
        str(token_file),
        env={"EMBEDQ_AUTH_TOKENS": f" ,{TOKEN_ENV}, "},
    )


@pytest.fixture(scope="module")
def mtls_target(worker_service, servers, pki) -> str:
    """Mutual TLS and a token, all configured through the environment."""
    env = {
        "EMBEDQ_TLS_CERT": str(pki.server_cert),
        "EMBEDQ_TLS_KEY": str(pki.server_key),
        "EMBEDQ_TLS_CLIENT_CA": str(pki.ca),
        "EMBEDQ_AUTH_TOKENS": TOKEN_ENV,
    }
    return servers.start(
        worker_service.redis_url,
        worker_service.namespace,
        env=env,
        creds=credentials(pki, client=True),
    )


def error_of(call) -> EmbedqError:
    with pytest.raises(EmbedqError) as caught:
        call()
    return caught.value


# -- TLS ---------------------------------------------------------------------------


def test_tls_encode_with_the_ca(tls_target, pki, reference_model):
    with Client(tls_target, tls_ca=pki.ca, timeout=60) as client:
        assert client.secure
        vector = client.encode("over TLS")
    assert np.abs(vector - reference_model.encode(["over TLS"])[0]).max() <= 1e-5
    with Client(f"localhost:{tls_target.rsplit(':', 1)[1]}", tls_ca=pki.ca.read_bytes()) as client:
        assert client.info().models


def test_tls_refused_without_the_ca_or_in_plaintext(tls_target):
    with Client(tls_target, tls=True, timeout=5) as client:  # system roots do not know our CA
        assert error_of(lambda: client.info()).code == grpc.StatusCode.UNAVAILABLE
    with Client(tls_target, timeout=5) as client:
        assert error_of(lambda: client.info()).code == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_client_certificate(mtls_target, pki):
    with Client(mtls_target, tls_ca=pki.ca, token=TOKEN_ENV, timeout=5) as client:
        assert error_of(lambda: client.info()).code == grpc.StatusCode.UNAVAILABLE
    rogue = {"tls_cert": pki.rogue_cert, "tls_key": pki.rogue_key}
    with Client(mtls_target, tls_ca=pki.ca, token=TOKEN_ENV, timeout=5, **rogue) as client:
        assert error_of(lambda: client.info()).code == grpc.StatusCode.UNAVAILABLE
    mine = {"tls_cert": pki.client_cert, "tls_key": pki.client_key}
    with Client(mtls_target, tls_ca=pki.ca, timeout=60, **mine) as client:
        assert error_of(lambda: client.info()).code == grpc.StatusCode.UNAUTHENTICATED
    with Client(mtls_target, tls_ca=pki.ca, token=TOKEN_ENV, timeout=60, **mine) as client:
        assert client.encode(["mutual TLS"]).shape == (1, 384)

    async def use_async() -> np.ndarray:
        async with AsyncClient(mtls_target, tls_ca=pki.ca, token=TOKEN_ENV, **mine) as client:
            return await client.encode("async mutual TLS")

    assert asyncio.run(use_async()).shape == (384,)


# -- bearer tokens -----------------------------------------------------------------


def test_auth_codes_per_token(auth_target):
    with Client(auth_target, timeout=30) as client:
        error = error_of(lambda: client.encode("no token"))
        assert (error.code, error.details) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "missing bearer token",
        )
    with Client(auth_target, timeout=30, metadata=[("authorization", f"Basic {TOKEN_A}")]) as c:
        assert error_of(lambda: c.info()).code == grpc.StatusCode.UNAUTHENTICATED
    with Client(auth_target, timeout=30, token="not-" + TOKEN_A) as client:
        error = error_of(lambda: client.encode("wrong token"))
        assert (error.code, error.details) == (grpc.StatusCode.PERMISSION_DENIED, "invalid token")
    for token in (TOKEN_A, TOKEN_B, TOKEN_ENV):
        with Client(auth_target, timeout=60, token=token) as client:
            assert client.encode(["right token"]).shape == (1, 384)
            assert client.similarity("a cat", "a kitten") > 0.5


def test_auth_leaves_health_and_reflection_open(auth_target):
    assert health_status(auth_target, None) == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(auth_target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        names = {s.name for s in reply.list_services_response.service}
        assert "embedq.v1.Embedder" in names
        # An unknown method is refused like a known one, without a token.
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/embedq.v1.Embedder/Nope")(b"", timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_auth_applies_to_streams(auth_target):
    with Client(auth_target, timeout=30) as client:
        error = error_of(lambda: list(client.encode_stream(iter(["a", "b"]))))
        assert error.code == grpc.StatusCode.UNAUTHENTICATED
    with Client(auth_target, timeout=30, token="nope-" + TOKEN_B) as client:
        error = error_of(lambda: list(client.encode_stream(iter(["a"]))))
        assert error.code == grpc.StatusCode.PERMISSION_DENIED
    with Client(auth_target, token=TOKEN_B) as client:
        got = dict(client.encode_stream(iter(["one", "two"]), timeout=60))
    assert sorted(got) == ["0", "1"] and got["0"].shape == (384,)

    async def stream(token: str | None) -> list:
        async with AsyncClient(auth_target, token=token) as client:
            return [item async for item in client.encode_stream(["x", "y"], timeout=60)]

    assert len(asyncio.run(stream(TOKEN_A))) == 2
    with pytest.raises(EmbedqError) as caught:
        asyncio.run(stream(None))
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_token_file_rotates_without_restart(auth_target, token_file):
    with Client(auth_target, timeout=30, token=TOKEN_NEW) as client:
        assert error_of(lambda: client.info()).code == grpc.StatusCode.PERMISSION_DENIED
    original = token_file.read_text()
    token_file.write_text(f"{TOKEN_NEW}\n{TOKEN_B}\n")
    try:
        deadline = time.monotonic() + 10
        with (
            Client(auth_target, timeout=30, token=TOKEN_NEW) as new,
            Client(auth_target, timeout=30, token=TOKEN_A) as old,
        ):
            while error_of_or_none(new.info) is not None:
                assert time.monotonic() < deadline, "token file not re-read"
                time.sleep(0.2)
            assert error_of(lambda: old.info()).code == grpc.StatusCode.PERMISSION_DENIED
    finally:
        token_file.write_text(original)
        with Client(auth_target, timeout=30, token=TOKEN_A) as client:  # back for later tests
            deadline = time.monotonic() + 10
            while error_of_or_none(client.info) is not None:
                assert time.monotonic() < deadline, "token file not re-read"
                time.sleep(0.2)


def error_of_or_none(call) -> EmbedqError | None:
    try:
        call()
    except EmbedqError as error:
        return error
    return None


def test_client_cli_with_tls_and_token(tls_target, auth_target, pki, tmp_path):
    def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        import os

        return subprocess.run(
            [sys.executable, "-m", "embedq.cli", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **(env or {})},
        )

    done = cli("info", "--json", "--target", tls_target, "--tls-ca", str(pki.ca))
    assert done.returncode == 0, done.stderr
    done = cli("info", "--target", auth_target, env={"EMBEDQ_TOKEN": TOKEN_A})
    assert done.returncode == 0, done.stderr
    token_path = tmp_path / "token"
    token_path.write_text(f"# mine\n{TOKEN_B}\n")
    done = cli("tokenize", "hi", "--target", auth_target, "--token-file", str(token_path))
    assert done.returncode == 0, done.stderr
    done = cli("info", "--target", auth_target, "--token", "bad-" + TOKEN_A)
    assert done.returncode == 1
    assert "PERMISSION_DENIED: invalid token" in done.stderr
    assert_no_secret(done.stderr + done.stdout, "the client CLI's output")


# -- start-up errors -----------------------------------------------------------------


def run_server(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "embedq.cli", "server", "--redis-url", "redis://127.0.0.1:9/0"]
        + list(args),
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


def test_startup_errors_name_the_file_not_its_contents(pki, tmp_path):
    missing = tmp_path / "missing.pem"
    done = run_server("--tls-cert", str(missing), "--tls-key", str(pki.server_key))
    assert done.returncode == 2
    assert f"'{missing}': No such file or directory" in done.stderr
    assert "Traceback" not in done.stderr
    # The client's key does not belong to the server's certificate.
    done = run_server("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.client_key))
    assert done.returncode == 2 and "unusable" in done.stderr
    key_body = pki.client_key.read_text().splitlines()[1]
    assert key_body not in done.stderr and "PRIVATE KEY" not in done.stderr
    done = run_server("--tls-cert", str(pki.server_cert))
    assert done.returncode == 2 and "--tls-cert and --tls-key go together" in done.stderr
    done = run_server("--tls-client-ca", str(pki.ca))
    assert done.returncode == 2 and "--tls-client-ca needs" in done.stderr
    empty = tmp_path / "tokens"
    empty.write_text("# nothing yet\n\n")
    done = run_server("--auth-token-file", str(empty))
    assert done.returncode == 2 and "holds no token" in done.stderr
    empty.write_text(f"{TOKEN_A} {TOKEN_B}\n")
    done = run_server("--auth-token-file", str(empty))
    assert done.returncode == 2 and "line 1: a token must not contain whitespace" in done.stderr
    assert_no_secret(done.stderr, "a start-up error")


def test_client_refuses_bad_security_arguments(pki):
    with pytest.raises(ValueError, match="whitespace"):
        Client("127.0.0.1:1", token=f"{TOKEN_A}\nx")
    with pytest.raises(ValueError, match="go together"):
        Client("127.0.0.1:1", tls_cert=pki.client_cert)
    with pytest.raises(ValueError, match="not both"):
        Client("127.0.0.1:1", token=TOKEN_A, metadata=[("authorization", "Bearer x")])
    assert TOKEN_A not in repr(Client("127.0.0.1:1", token=TOKEN_A))


# -- Redis credentials ----------------------------------------------------------------


def test_redact_url_and_settings_never_show_a_password():
    url = f"redis://{ACL_USER}:{REDIS_PASSWORD}@[::1]:6380/2?password={ACL_PASSWORD}&db=2"
    safe = redact_url(url)
    assert ACL_USER in safe and "[::1]:6380/2" in safe and "db=2" in safe
    assert_no_secret(safe, "redact_url")
    assert redact_url("redis://h:1/0") == "redis://h:1/0"
    assert redact_url(f"rediss://:{REDIS_PASSWORD}@h/0") == "rediss://:***@h/0"
    settings = RedisSettings(url=url, password=WRONG_PASSWORD)
    assert_no_secret(repr(settings), "repr(RedisSettings)")
    message = settings.describe_error(RuntimeError(f"bad {url} {WRONG_PASSWORD}"))
    assert message.startswith("RuntimeError: bad ") and "***" in message
    assert_no_secret(message, "describe_error")
    with pytest.raises(SettingsError, match="not rediss://"):
        RedisSettings(url=url, ca_cert="/ca.pem")


@pytest.fixture(scope="module")
def private_redis() -> Iterator[EmbeddedRedis]:
    """requirepass for the default user, plus an ACL user with its own password."""
    with EmbeddedRedis(password=REDIS_PASSWORD) as server:
        server.client().execute_command(
            "ACL", "SETUSER", ACL_USER, "on", f">{ACL_PASSWORD}", "~*", "&*", "+@all"
        )
        yield server


def _wait_registered(redis_client, namespace: str, proc, name: str, timeout=90.0) -> None:
    keys = Keys(namespace)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log_tail(name)
        for model in redis_client.hkeys(keys.models()):
            if redis_client.zcard(keys.workers(model.decode())) > 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"{name} did not register:\n{log_tail(name)}")


def test_redis_password_and_acl_user(private_redis, servers):
    host = f"127.0.0.1:{private_redis.port}"
    namespace = f"pw{uuid.uuid4().hex[:6]}"
    # A worker with a wrong password in its URL: a configuration error, not a transient one:
    # it stops with one line (exit 2) that names the refusal but not the password.
    wrong_name = f"sec-worker-wrong-{namespace}"
    wrong = _spawn(
        ["worker", "--redis-url", f"redis://:{WRONG_PASSWORD}@{host}/0", "--namespace", namespace],
        wrong_name,
    )
    # The real worker: the password from EMBEDQ_REDIS_PASSWORD.
    name = f"sec-worker-{namespace}"
    worker = _spawn(
        ["worker", "--redis-url", private_redis.url, "--namespace", namespace],
        name,
        env={"EMBEDQ_REDIS_PASSWORD": REDIS_PASSWORD},
    )
    try:
        _wait_registered(private_redis.client(), namespace, worker, name)
        # A server as the ACL user, credentials in the URL ...
        by_url = servers.start(f"redis://{ACL_USER}:{ACL_PASSWORD}@{host}/0", namespace)
        # ... and one with them in EMBEDQ_REDIS_USERNAME / EMBEDQ_REDIS_PASSWORD.
        user_env = {"EMBEDQ_REDIS_USERNAME": ACL_USER, "EMBEDQ_REDIS_PASSWORD": ACL_PASSWORD}
        by_env = servers.start(private_redis.url, namespace, env=user_env)
        for target in (by_url, by_env):
            with Client(target, timeout=60) as client:
                assert client.encode(["behind a password"]).shape == (1, 384)
        assert "redis://embedq-acl:***@" in servers.log(by_url)

        bad = subprocess.run(
            [sys.executable, "-m", "embedq.cli", "server", "--port", str(free_port())]
            + ["--redis-url", f"redis://:{WRONG_PASSWORD}@{host}/0", "--namespace", namespace],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode == 2, bad.stderr[-2000:]
        assert "redis://:***@" in bad.stderr and "refused our credentials" in bad.stderr
        assert_no_secret(bad.stdout + bad.stderr, "the server's output")
        assert wrong.wait(timeout=60) == 2, log_tail(wrong_name)
        assert f"redis at redis://:***@{host}/0 refused our credentials" in log_text(wrong_name)
    finally:
        for proc in (worker, wrong):
            stop_process(proc)
        for log in (name, wrong_name):
            assert_no_secret(log_text(log), f"{log}.log")


def test_rediss_with_ca_and_password(pki, servers):
    try:
        redis_tls = EmbeddedRedis(
            password=REDIS_PASSWORD,
            tls_cert=str(pki.server_cert),
            tls_key=str(pki.server_key),
            tls_ca=str(pki.ca),
        ).start()
    except EmbeddedRedisError as exc:
        pytest.skip(f"this Redis has no TLS: {exc}")
    try:
        assert redis_tls.url.startswith("rediss://")
        namespace = f"tls{uuid.uuid4().hex[:6]}"
        env = {"EMBEDQ_REDIS_PASSWORD": REDIS_PASSWORD}
        # SERVING: the server read the registry over TLS, verified with the CA.
        target = servers.start(
            redis_tls.url, namespace, env={**env, "EMBEDQ_REDIS_CA_CERT": str(pki.ca)}
        )
        assert health_status(target, None) == health_pb2.HealthCheckResponse.SERVING
        # Without the CA the certificate is not trusted: NOT_SERVING, and said why.
        untrusted = servers.start(redis_tls.url, namespace, env=env, serving=False)
        assert health_status(untrusted, None) == health_pb2.HealthCheckResponse.NOT_SERVING
        untrusted_log = servers.log(untrusted)
        assert "redis at rediss://127.0.0.1" in untrusted_log and "not usable yet" in untrusted_log
    finally:
        redis_tls.stop()
