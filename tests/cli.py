"""Running the real CLI from tests: `python -m learner.main ...` in a subprocess, and reading what it printed."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
from mlflow.tracking import MlflowClient

from learner.resume import MARKER, state_name

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.yaml"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "learner.main", *args]


def run_cli(*args: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cli(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def modules_loaded_by(module: str, names: tuple[str, ...]) -> list[str]:
    """Which of `names` a fresh interpreter holds after importing `module`: what a Ray worker, which imports its actor's
    or task's module first, pays at start."""
    probe = f"import sys, {module}; print(','.join(m for m in {names!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = "".join(proc.stdout.strip().splitlines()[-1:])  # the probe's line, after anything an import printed
    return [m for m in last.split(",") if m]


def last_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no output; stderr:\n{proc.stderr[-3000:]}"
    return lines[-1]


def summary_of(proc: subprocess.CompletedProcess) -> dict:
    """The summary.json of a successful run (its path is the last line printed)."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(Path(last_line(proc)).read_text())


TIMING = ("_s", "samples_per_s")  # wall-clock metrics: the only ones a resume may change


def metrics_by_step(uri: str, run_id: str) -> dict[str, dict[int, set[float]]]:
    """Every value logged per (metric, step), timing, MLflow's system metrics (machine load) and the processes'
    memory left out: a step logged twice (before a kill and again after the resume) must have logged the same value
    both times."""
    client = MlflowClient(uri)
    out: dict[str, dict[int, set[float]]] = {}
    for name in client.get_run(run_id).data.metrics:
        if name.endswith(TIMING) or name.startswith(("system/", "memory/")):  # (memory: no two processes alike)
            continue
        for m in client.get_metric_history(run_id, name):
            out.setdefault(name, {}).setdefault(m.step, set()).add(m.value)
    return out


def weights_file(checkpoint: str) -> tuple[dict, bytes]:
    """The checkpoint's safetensors files (unet/, text_encoder/, ...) as (their headers, every tensor's bytes). Headers
    are compared as mappings: safetensors writes metadata from a Rust HashMap, so with several metadata keys their
    order may differ between processes even for two uninterrupted runs; everything else must be byte for byte the
    same."""
    from proxmodel.checkpoint import weight_files

    headers, data = {}, b""
    for path in weight_files(checkpoint):
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        headers[path.relative_to(checkpoint).as_posix()] = json.loads(raw[8 : 8 + n])
        data += raw[8 + n :]
    return headers, data


def assert_same_run(uri: str, first: dict, resumed: dict) -> None:
    """Byte-identical final weights, the same curves and the same held-out evaluation (before and after)."""
    (head_a, data_a), (head_b, data_b) = weights_file(first["checkpoint"]), weights_file(resumed["checkpoint"])
    assert head_a == head_b and data_a == data_b, "the resumed run's final weights differ from the uninterrupted run's"
    ma, mb = metrics_by_step(uri, first["mlflow_run_id"]), metrics_by_step(uri, resumed["mlflow_run_id"])
    assert ma.keys() == mb.keys()
    for name in ma:
        assert ma[name].keys() == mb[name].keys(), name
        for step in ma[name]:
            assert len(mb[name][step]) == 1, f"{name} at step {step} logged different values: {mb[name][step]}"
            assert ma[name][step] == mb[name][step], (name, step)
    for key in ("iterations", "eval", "eval_reward_before", "eval_reward_after", "reward_first", "reward_last",
                "loss_final", "data_cursor", "eval_reward", "groups_written", "groups_dropped"):
        assert first.get(key) == resumed.get(key), key
    assert MlflowClient(uri).get_run(resumed["mlflow_run_id"]).info.status == "FINISHED"


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def leftovers(processes: list[psutil.Process], wait_s: float = 30.0) -> list[str]:
    """Which of `processes` are still alive after `wait_s` (they are killed then, so no test leaves them behind)."""
    _, alive = psutil.wait_procs(processes, timeout=wait_s)
    names = []
    for p in alive:
        try:
            names.append(" ".join(p.cmdline())[:120].strip())
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return names


def start_until_state(args: list[str], run_dir: Path, iteration: int, timeout: float = 900) -> subprocess.Popen:
    """Start a driver and return once its run state after `iteration` iterations is complete."""
    proc = subprocess.Popen(cli(*args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not (run_dir / "resume" / state_name(iteration) / MARKER).is_file():
        if proc.poll() is not None:
            raise AssertionError(f"the driver ended before iteration {iteration}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no run state after iteration {iteration} within {timeout} s")
        time.sleep(0.2)
    return proc


def grpo_args(root: Path, uri: str, pretrained: dict, name: str, *extra: str) -> list[str]:
    return ["--mode", "grpo", "--config", str(SMOKE), f"run_dir={root / name}", f"mlflow.tracking_uri={uri}",
            f"init_from={pretrained['checkpoint']}", "grpo.iterations=2", "grpo.eval_every=0",
            "grpo.checkpoint_every=1", *extra]
