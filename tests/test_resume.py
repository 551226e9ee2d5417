"""Exact resume and signals, through the real CLI, Ray, Redis, DeepSpeed and MLflow at smoke sizes.

The contract (issue 13): a run stopped after iteration k and resumed with `--resume RUN_DIR` ends with a
checkpoint whose weight files are byte-identical to an uninterrupted run's (tensor bytes and headers; see weights_file), and the same
per-iteration metrics. GRPO is stopped
for real (SIGKILL under ZeRO-2, SIGTERM under ZeRO-3); pretraining is resumed from a copy of a run directory whose
later run states were removed (and a half-written one planted), which is what a kill after step k leaves.
"""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from learner.resume import MARKER, complete_states, latest_state, state_name, write_state
from tests.cli import ROOT, SMOKE, cli, run_cli, summary_of

TIMING = ("_s", "samples_per_s")  # wall-clock metrics: the only ones a resume may change


def metrics_by_step(uri: str, run_id: str) -> dict[str, dict[int, set[float]]]:
    """Every value logged per (metric, step), timing and MLflow's system metrics (machine load) left out: a step
    logged twice (before a kill and again after the resume) must have logged the same value both times."""
    client = MlflowClient(uri)
    out: dict[str, dict[int, set[float]]] = {}
    for name in client.get_run(run_id).data.metrics:
        if name.endswith(TIMING) or name.startswith("system/"):
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


def test_pretraining_resumes_exactly_and_ignores_a_half_written_state(pretrained, store):
    """Would catch: the optimizer, lr schedule, EMA or pair generator not restored (weights differ); the L1/zeta
    stage or data cursor restarting (loss curve differs); a state folder without its marker being read."""
    root, uri = store
    run = root / "pretrain"
    copy = root / "pretrain-stopped"
    shutil.copytree(run, copy)
    for name in ("summary.json", "samples.png", "checkpoint", "resume/" + state_name(6)):
        target = copy / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    half = copy / "resume" / state_name(5)  # what a kill in the middle of writing would leave, under its final name
    shutil.copytree(copy / "resume" / state_name(3), half)
    (half / MARKER).unlink()
    (half / "engine" / "state" / "mp_rank_00_model_states.pt").write_bytes(b"truncated")

    resumed = summary_of(run_cli("--resume", str(copy)))
    assert resumed["resumed_at"] == [3] and pretrained["resumed_at"] == []
    assert resumed["mlflow_run_id"] == pretrained["mlflow_run_id"]  # the same MLflow run, its curves continued
    assert_same_run(uri, pretrained, resumed)


def test_grpo_zero2_killed_with_sigkill_resumes_exactly(pretrained, store):
    """SIGKILL after iteration 1's run state, then --resume. Would catch: Adam moments, the step RNG, the policy
    version or PromptStats not restored, the rollouts not given the trained weights, 'before' re-evaluated on the
    trained model, the redis-server or Ray outliving a killed driver."""
    root, uri = store
    first = summary_of(run_cli(*grpo_args(root, uri, pretrained, "g2-full")))
    args = grpo_args(root, uri, pretrained, "g2-killed")
    proc = start_until_state(args, root / "g2-killed", 1)
    children = descendants(proc.pid)
    assert any("redis-server" in " ".join(c.cmdline()) for c in children)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The redis-server and Ray's raylet, GCS and workers die with their driver. Ray's two node agents do not (not
    # fixed yet, README "Resuming and faults"): they are killed here and must be the only leftovers.
    assert set(leftovers(children)) <= {"ray::RuntimeEnvAgent", "ray::DashboardAgent"}
    assert not (root / "g2-killed" / "summary.json").exists()

    resumed = summary_of(run_cli("--resume", str(root / "g2-killed")))
    assert resumed["resumed_at"] and resumed["resumed_at"][0] >= 1
    assert_same_run(uri, first, resumed)
    assert first["resumed_at"] == []


def test_grpo_zero3_sigterm_checkpoints_stops_everything_and_resumes_exactly(pretrained, store):
    """SIGTERM mid-run: a run state, every child stopped, exit within 60 s with one line naming the resume command;
    then --resume matches an uninterrupted ZeRO-3 run. Would catch: no handler (exit without a state), a
    KeyboardInterrupt-style traceback, a leftover redis-server or Ray process, ZeRO-3 partitions not reloaded."""
    root, uri = store
    zero3 = ("deepspeed.zero_stage=3",)
    first = summary_of(run_cli(*grpo_args(root, uri, pretrained, "g3-full", *zero3)))
    run_dir = root / "g3-stopped"
    proc = start_until_state(grpo_args(root, uri, pretrained, "g3-stopped", *zero3), run_dir, 1)
    children = descendants(proc.pid)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    took = time.monotonic() - sent
    print(f"SIGTERM to exit: {took:.1f} s")
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert took < 60
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted by SIGTERM") and f"--resume {run_dir}" in last, last
    assert "Traceback" not in stderr
    assert leftovers(children, wait_s=10) == []
    assert complete_states(run_dir)
    assert MlflowClient(uri).get_run(json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]).info.status == "KILLED"

    resumed = summary_of(run_cli("--resume", str(run_dir)))
    assert_same_run(uri, first, resumed)


def test_resume_refuses_overrides_that_change_the_result_and_an_edited_config(pretrained, store):
    """Would catch: a resume silently training with another learning rate, or with a hand-edited config.yaml."""
    root, _ = store
    copy = root / "pretrain-refusals"
    shutil.copytree(root / "pretrain", copy)
    (copy / "summary.json").unlink()
    proc = run_cli("--resume", str(copy), "pretrain.lr=1e-2", timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "pretrain.lr=1e-2" in proc.stderr and "grpo.iterations" in proc.stderr  # names the key and what is allowed
    config = copy / "config.yaml"
    config.write_text(config.read_text().replace("seed: 0", "seed: 1", 1))
    proc = run_cli("--resume", str(copy), timeout=120)
    assert proc.returncode == 2 and "no longer matches" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("--resume", str(root / "pretrain"), timeout=120)  # finished: nothing to continue
    assert proc.returncode == 2 and "has finished" in proc.stderr


def test_a_state_is_read_only_when_complete_and_intact(tmp_path, monkeypatch):
    """Would catch: reading a folder without its marker, or one whose files changed after the marker was written;
    keeping more than `keep` states; a failed write leaving a readable state."""
    for it in (1, 2, 3):
        write_state(tmp_path, it, {"run.json": json.dumps({"it": it}).encode(), "a/b.bin": bytes([it]) * 10}, keep=2)
    assert [p.name for p in complete_states(tmp_path)] == [state_name(2), state_name(3)]
    (tmp_path / "resume" / state_name(4)).mkdir()  # no marker: never read
    (tmp_path / "resume" / state_name(4) / "run.json").write_text("{}")
    (tmp_path / "resume" / state_name(3) / "a" / "b.bin").write_bytes(b"\x03" * 5)  # truncated after completion
    warnings = []
    path, files = latest_state(tmp_path, warn=warnings.append)
    assert path.name == state_name(2) and files["a/b.bin"] == b"\x02" * 10 and len(warnings) == 1

    class Boom(Exception):
        pass

    def fail(*_):
        raise Boom

    with monkeypatch.context() as m:
        m.setattr(os, "rename", fail)  # killed between writing the files and publishing them
        with pytest.raises(Boom):
            write_state(tmp_path, 5, {"run.json": b"{}"}, keep=2)
    assert latest_state(tmp_path, warn=warnings.append)[0].name == state_name(2)


def test_first_signal_waits_for_a_safe_point_the_second_does_not():
    from learner.signals import GracefulStop, Interrupted

    stop = GracefulStop()
    stop.install()
    try:
        with stop.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs: only recorded
            assert stop.requested
            with pytest.raises(Interrupted):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
        with pytest.raises(Interrupted):
            stop.check()
    finally:
        stop.uninstall()
