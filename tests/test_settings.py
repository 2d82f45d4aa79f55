"""Each setting is declared once (embedq.settings.SETTINGS): the commands' flags,
the environment parsing, the dataclass defaults and the README's table all
come from that declaration, and agree with it."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
from dataclasses import fields
from pathlib import Path

import pytest

from embedq import flags
from embedq.cli import build_parser
from embedq.settings import (
    SERVE,
    SETTINGS,
    STATUS,
    TOP,
    WORKER,
    Limits,
    RedisSettings,
    ServerSettings,
    Setting,
    WorkerSettings,
    value,
)

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["server", "serve", "worker", "status"]
# Flags a command needs before it parses at all.
REQUIRED = {"server": ["--redis-url", "redis://x:1/0"], "worker": ["--redis-url", "redis://x:1/0"]}
# EMBEDQ_* names in the service's code that are not settings: test-only fault hooks.
NOT_SETTINGS = {"EMBEDQ_FAULT_INJECT", "EMBEDQ_FAULT_INJECT_TASK"}
SAMPLE = {int: ("7", 7), float: ("2.5", 2.5), str: ("some-value", "some-value")}


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def help_of(command: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parse(command, "--help")
    return out.getvalue()


def flagged(command: str) -> list[Setting]:
    return [s for s in flags.settings_of(command) if not s.choices and s.type is not bool]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No inherited EMBEDQ_* variable changes what these tests see."""
    for setting in SETTINGS.values():
        if setting.env:
            monkeypatch.delenv(setting.env, raising=False)


def test_the_readme_table_is_generated_from_the_declarations() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert flags.with_table(readme) == readme, (
        "README's configuration table is stale: python -m embedq.flags README.md --write"
    )
    for setting in SETTINGS.values():
        assert f"`{setting.env or setting.flag}`" in readme


def test_every_variable_the_code_reads_is_declared() -> None:
    declared = {s.env for s in SETTINGS.values() if s.env}
    found: set[str] = set()
    for folder in ("server", "workers", "src/embedq"):
        for path in (ROOT / folder).rglob("*.py"):
            found |= set(re.findall(r"EMBEDQ_[A-Z0-9_]*[A-Z0-9]", path.read_text("utf-8")))
    assert found - NOT_SETTINGS - declared == set()


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_every_flag_and_variable_of_the_command(command: str) -> None:
    text = help_of(command)
    for setting in flags.settings_of(command):
        assert setting.flag in text, setting.name
        if setting.env:
            assert setting.env in " ".join(text.split()), setting.name


@pytest.mark.parametrize("command", COMMANDS)
def test_a_variable_sets_a_flag_default_and_the_flag_wins(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    required = REQUIRED.get(command, [])
    for setting in flagged(command):
        if not setting.env or command in setting.repeat_for or setting.flag in required:
            continue
        raw, parsed = SAMPLE[setting.type]
        monkeypatch.setenv(setting.env, raw)
        args = parse(command, *REQUIRED.get(command, []))
        assert getattr(args, setting.name) == parsed, setting.name
        given = parse(command, *REQUIRED.get(command, []), setting.flag, "9")
        assert str(getattr(given, setting.name)) in ("9", "9.0"), setting.name
        monkeypatch.delenv(setting.env)
        assert getattr(parse(command, *REQUIRED.get(command, [])), setting.name) == (
            None if command in setting.unset_for else setting.default
        ), setting.name


def test_boolean_variables_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse("worker", *REQUIRED["worker"]).fp16 is False
    assert parse("worker", *REQUIRED["worker"], "--fp16").fp16 is True
    for word, expected in (("1", True), ("true", True), ("0", False), ("", False)):
        monkeypatch.setenv("EMBEDQ_FP16", word)
        assert parse("worker", *REQUIRED["worker"]).fp16 is expected, word


def test_a_choice_is_read_in_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDQ_BACKEND", "ONNX")
    assert parse("worker", *REQUIRED["worker"]).backend == "onnx"
    assert parse("serve", "--backend", "Torch-INT8").backend == "torch-int8"
    assert SETTINGS["log_format"].parse("JSON") == "json"


def test_a_bad_number_is_one_usage_line_and_only_where_it_is_used(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EMBEDQ_PORT", "fifty")
    with pytest.raises(SystemExit) as stopped:
        parse("server", *REQUIRED["server"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "--port" in error and "EMBEDQ_PORT" in error and "'fifty'" in error
    assert parse("status").serve_port is None  # status has its own --port, no variable


def test_required_redis_url_is_satisfied_by_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        parse("worker")
    monkeypatch.setenv("EMBEDQ_REDIS_URL", "redis://example:6379/2")
    assert parse("worker").redis_url == "redis://example:6379/2"
    assert parse("serve").redis_url == "redis://example:6379/2"


@pytest.mark.parametrize("cls", [RedisSettings, Limits, ServerSettings, WorkerSettings])
def test_dataclass_defaults_are_the_declared_ones(cls: type) -> None:
    instance = cls()
    for item in fields(cls):
        name = item.metadata.get("setting")
        if name and SETTINGS[name].default is not None:
            assert getattr(instance, item.name) == SETTINGS[name].default, item.name


def test_queue_bounds_agree_with_the_declarations() -> None:
    """QueueBounds (server/admission.py) takes its defaults and values from the declarations."""
    from embedq.server.admission import QueueBounds

    for item in fields(QueueBounds):
        assert getattr(QueueBounds(), item.name) == SETTINGS[item.name].default


def test_server_settings_from_flags_and_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    from embedq.server.cli import server_settings

    monkeypatch.setenv("EMBEDQ_MAX_CANDIDATES", "5")
    monkeypatch.setenv("EMBEDQ_MAX_MESSAGE_BYTES", "1048576")
    monkeypatch.setenv("EMBEDQ_AUTH_TOKENS", "tok-a, tok-b")
    monkeypatch.setenv("EMBEDQ_NAMESPACE", "from-env")
    args = parse("server", *REQUIRED["server"], "--max-batch-texts", "16", "--port", "1234")
    settings = server_settings(args)
    assert settings.port == 1234 and settings.redis.url == "redis://x:1/0"
    assert settings.redis.namespace == "from-env"
    assert settings.limits == Limits(16, 65536, 1048576, 5)
    assert settings.auth_tokens == ("tok-a", "tok-b")
    assert server_settings(args, "redis://private:2/0").redis.url == "redis://private:2/0"


def test_worker_settings_from_flags_and_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDQ_WORKER_ID", "w-1")
    args = parse("worker", *REQUIRED["worker"], "--dead-after", "4", "--cache-ttl", "60")
    settings = WorkerSettings.from_args(args, device="cuda:1")
    assert (settings.dead_after_s, settings.cache_ttl_s, settings.worker_id) == (4.0, 60, "w-1")
    assert settings.device == "cuda:1" and settings.batch_tokens() == 16384


def test_status_namespace_is_unset_unless_given(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse("status").namespace is None  # the running serve's, found at run time
    monkeypatch.setenv("EMBEDQ_NAMESPACE", "mine")
    assert parse("status").namespace == "mine"
    assert parse("server", *REQUIRED["server"]).namespace == "mine"


def test_serve_gives_its_workers_the_shared_flags() -> None:
    from embedq.apps.serve import worker_argv

    args = parse("serve", "--fp16", "--max-batch-size", "8", "--namespace", "ns", "--threads", "1")
    argv = worker_argv(args, "redis://127.0.0.1:1/0", "m")
    assert argv[argv.index("worker") :] == [
        "worker", "--redis-url", "redis://127.0.0.1:1/0", "--threads", "1",
        "--namespace", "ns", "--cpu-nice", "10", "--devices", "auto", "--fp16",
        "--backend", "torch",
        "--max-batch-tokens", "0", "--max-batch-size", "8", "--cache-ttl", "604800",
        "--model", "m",
    ]  # fmt: skip
    # A URL with a password stays out of the command line (worker_env carries it).
    assert "--redis-url" not in worker_argv(args, "redis://:pw@127.0.0.1:1/0", None)


def test_serve_models_repeat_or_come_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse("serve", "--model", "a", "--model", "b").model == ["a", "b"]
    monkeypatch.setenv("EMBEDQ_MODEL", "x")
    assert parse("serve").model is None  # serve splits the variable itself
    assert parse("worker", *REQUIRED["worker"]).model == "x"


def test_secrets_never_show_in_help(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDQ_REDIS_PASSWORD", "pw-secret-1")
    monkeypatch.setenv("EMBEDQ_REDIS_URL", "redis://u:pw-secret-2@host:6379/0")
    monkeypatch.setenv("EMBEDQ_AUTH_TOKENS", "token-secret-3")
    for command in COMMANDS:
        text = help_of(command)
        assert "secret" not in text, command
    for setting in SETTINGS.values():
        if setting.secret:
            assert setting.flag is None  # a secret on a command line shows in `ps`
    assert "pw-secret" not in repr(RedisSettings.from_env())


def test_value_prefers_args_then_variable_then_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert value("max_candidates") == 10_000
    monkeypatch.setenv("EMBEDQ_MAX_CANDIDATES", "12")
    assert value("max_candidates") == 12
    assert value("max_candidates", argparse.Namespace(max_candidates=3)) == 3
    monkeypatch.setenv("EMBEDQ_MAX_CANDIDATES", "many")
    with pytest.raises(ValueError, match="EMBEDQ_MAX_CANDIDATES"):
        value("max_candidates")


def test_each_flag_belongs_to_known_commands_and_is_unique_per_command() -> None:
    for command in (SERVE, "server", WORKER, STATUS, TOP):
        names = [s.flag for s in flags.settings_of(command)]
        assert len(names) == len(set(names)), command
    for setting in SETTINGS.values():
        assert set(setting.commands) <= {SERVE, "server", WORKER, STATUS, TOP}
        assert bool(setting.flag) == bool(setting.commands), setting.name


def test_the_async_client_packs_in_c_exactly_as_redis_py_packs_in_python(redis_server) -> None:
    """connect_async's connections pack commands with hiredis: the same bytes as redis-py's own
    asyncio packer for every kind of argument the service sends, and the commands work."""
    import asyncio

    from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection

    from embedq.settings import packing_in_c

    commands = [
        ("MGET", "k1", "k:{slot}:é"),
        ("SET", b"key", b"\x00\xff" * 300, "EX", 300),
        ("XADD", "stream", "MAXLEN", "~", 1000, "*", "m", memoryview(b"payload")),
        ("CONFIG GET", "maxmemory"),
        ("ZADD", "z", 1.5, "member", 1700000000.123456, "now", 1e-07, "tiny", 10**20, "big"),
    ]
    stock, fast = Connection(), packing_in_c(Connection)()
    for command in commands:
        assert b"".join(fast.pack_command(*command)) == b"".join(stock.pack_command(*command))
    assert b"".join(fast.pack_commands(commands)) == b"".join(stock.pack_commands(commands))
    for base in (Connection, SSLConnection, UnixDomainSocketConnection):
        assert issubclass(packing_in_c(base), base)

    settings = RedisSettings(url=redis_server.url, namespace="packing-test")

    async def round_trip() -> None:
        client = settings.connect_async()
        assert client.connection_pool.connection_class.__name__ == "HiredisPackingConnection"
        key = f"packing-test:{id(client)}"
        try:
            async with client.pipeline(transaction=False) as pipe:
                pipe.set(key, b"\x00\x01" * 1000, ex=60)
                pipe.mget([key, f"{key}:missing"])
                results = await pipe.execute()
            assert results == [True, [b"\x00\x01" * 1000, None]]
            assert await client.ttl(key) > 0
        finally:
            await client.delete(key)
            await client.aclose()

    asyncio.run(round_trip())


def test_a_plain_client_sent_elsewhere_by_a_cluster_is_a_configuration_error() -> None:
    """MOVED (or ASK) reaches only a single Redis's client talking to a cluster: no retry
    mends it, so it stops start-up with one line naming the remedy and no secret."""
    from redis.exceptions import ResponseError

    settings = RedisSettings(url="redis://:hunter2@127.0.0.1:7000/0")
    moved = settings.fatal_error(ResponseError("MOVED 3999 127.0.0.1:7001"))
    assert moved is not None and "is a Redis Cluster" in str(moved)
    assert "EMBEDQ_REDIS_CLUSTER=true" in str(moved) and "hunter2" not in str(moved)
    assert settings.fatal_error(ResponseError("ASK 3999 127.0.0.1:7001")) is not None
    assert settings.fatal_error(ResponseError("ERR unknown command")) is None
    told = RedisSettings(url="redis://127.0.0.1:7000", cluster=False).cluster_error()
    assert "EMBEDQ_REDIS_CLUSTER is false" in str(told)
