"""Issue 13, item 4: no silent corruption, secrets kept out of every dump, a bounded stream, bounded waits.

Everything runs for real: the CLI in a subprocess, DeepSpeed, the embedded redis-server, MLflow's sqlite store, Ray.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from learner.resume import complete_states

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.yaml"


def run_cli(*args: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "learner.main", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_a_diverging_pretraining_run_skips_nonfinite_steps_and_stops_with_its_last_state(tmp_path):
    # lr 1e30: the first step makes the weights huge but finite; every later loss overflows to inf/NaN.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    proc = run_cli("--mode", "pretrain", "--config", str(SMOKE), f"run_dir={run_dir}", f"mlflow.tracking_uri={uri}",
                   "pretrain.lr=1e30", "pretrain.warmup=0", "pretrain.checkpoint_every=1",
                   "pretrain.max_nonfinite_updates=2")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("error: stopped after 2 optimiser steps in a row with a non-finite")
    assert "pretrain.max_nonfinite_updates" in message and "pretrain.lr" in message
    states = complete_states(run_dir)
    assert states and str(states[-1]) in message  # the last run state is named, and kept
    assert not (run_dir / "summary.json").exists()
    weights = load_file(str(run_dir / "checkpoint" / "model.safetensors"))
    assert all(bool(t.isfinite().all()) for t in weights.values())  # NaN never reached the exported weights
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("proxrl").experiment_id])[0]
    assert run.info.status == "FAILED"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "nonfinite_updates")][-1] == 2
