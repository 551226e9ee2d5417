"""Running the real CLI from tests: `python -m learner.main ...` in a subprocess, and reading what it printed."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.yaml"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "learner.main", *args]


def run_cli(*args: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cli(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def last_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no output; stderr:\n{proc.stderr[-3000:]}"
    return lines[-1]


def summary_of(proc: subprocess.CompletedProcess) -> dict:
    """The summary.json of a successful run (its path is the last line printed)."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(Path(last_line(proc)).read_text())
