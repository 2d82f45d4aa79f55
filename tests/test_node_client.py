"""The Node.js client (clients/node): `npm ci` when node_modules is missing,
then `npm test`, which builds the TypeScript, starts its own `embedq serve`
(with this Python, via EMBEDQ_PYTHON) and runs the node:test suites."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

NODE_CLIENT = Path(__file__).resolve().parent.parent / "clients" / "node"
TIMEOUT_S = 600

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None,
    reason="node and npm are not on PATH: the Node.js client tests need them",
)


def run_npm(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EMBEDQ_PYTHON": sys.executable, "CI": "1", "NO_COLOR": "1"}
    # Hermetic: the test starts its own private service; no caller settings leak in.
    for name in [n for n in env if n.startswith("EMBEDQ_") and n != "EMBEDQ_PYTHON"]:
        del env[name]
    return subprocess.run(
        [shutil.which("npm") or "npm", *args],
        cwd=NODE_CLIENT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def check(result: subprocess.CompletedProcess[str], what: str) -> None:
    if result.returncode != 0:
        print(result.stdout)
    assert result.returncode == 0, f"{what} exited {result.returncode}:\n{result.stdout[-8000:]}"


@pytest.mark.timeout(TIMEOUT_S * 2)
def test_node_client() -> None:
    if not (NODE_CLIENT / "node_modules").is_dir():
        check(run_npm("ci", "--no-audit", "--no-fund"), "npm ci")
    result = run_npm("test")
    print(result.stdout[-4000:])
    check(result, "npm test")
