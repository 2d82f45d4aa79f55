"""scripts/soak.py, briefly: 4 concurrent streams for 8 s against a deployment
it starts itself, every message answered correctly. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parent.parent / "scripts" / "soak.py"


def test_short_soak_has_no_errors(tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(SOAK), "--streams", "4", "--seconds", "5", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["error_count"] == 0 and result["errors"] == {}, result["errors"]
    assert result["messages"] > 0 and result["texts"] == result["messages"]
    assert result["own_deployment"] and set(result["rss_mb"]) == {"server", "worker"}
    assert result["intervals"]


def test_soak_refuses_a_target_off_loopback():
    proc = subprocess.run(
        [sys.executable, str(SOAK), "--target", "192.0.2.1:50051", "--seconds", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "loopback" in proc.stderr
