"""Issue 13, item 4: no silent corruption, secrets kept out of every dump, a bounded stream, bounded waits.

Everything runs for real: the CLI in a subprocess, DeepSpeed, the embedded redis-server, MLflow's sqlite store, Ray.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from actors.net import free_port
from actors.stream import RedisAddress
from learner.faults import RunFailed, wait_for
from learner.resume import MARKER, complete_states, state_name
from tests.cli import assert_same_run, cli, descendants, grpo_args, leftovers, start_until_state
from proxmodel.checkpoint import read_state

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.yaml"


def run_cli(*args: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "learner.main", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


BROKEN_EVALUATION = """
import sys
import learner.pretrain
from learner.main import main

def broken(*args, **kwargs):
    raise RuntimeError("an error nobody foresaw")

learner.pretrain.reward_matrix = broken
sys.exit(main(sys.argv[1:]))
"""


def test_an_unforeseen_error_keeps_its_traceback_and_names_the_state_to_resume_from(tmp_path):
    """A bug the run does not catch (here: the final evaluation raising) shows its traceback and then the kept run
    state and the command that continues it. Would catch: the advice missing (a user re-ran from scratch and lost
    the training), or the traceback swallowed."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", BROKEN_EVALUATION, "--mode", "pretrain", "--config", str(SMOKE), f"run_dir={run_dir}",
         f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "pretrain.iterations=2"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    err = proc.stderr.strip()
    assert "Traceback" in err and "RuntimeError: an error nobody foresaw" in err
    states = complete_states(run_dir)
    assert states and err.endswith(f"The run's last state ({states[-1]}) is kept in {run_dir}: once the cause is "
                                   f"fixed, continue with `python -m learner.main --resume {run_dir}`.")


@pytest.mark.slow
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
    weights = read_state(run_dir / "checkpoint")
    assert all(bool(t.isfinite().all()) for t in weights.values())  # NaN never reached the exported weights
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("proxrl").experiment_id])[0]
    assert run.info.status == "FAILED"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "nonfinite_updates")][-1] == 2

    # The streak is part of the run state: resumed (after step 2, one non-finite step in a row), the next non-finite
    # step is the second in a row and stops the run at once. A counter restarting at 0 would take (and save) step 3.
    assert states[-1].name == state_name(2)
    resumed = run_cli("--resume", str(run_dir))
    assert resumed.returncode == 1 and "stopped after 2 optimiser steps in a row" in resumed.stderr
    assert complete_states(run_dir)[-1].name == state_name(2)
    history = client.get_metric_history(run.info.run_id, "nonfinite_updates")
    assert max(m.step for m in history) == 2 and max(m.value for m in history) == 2


SECRET = "s3cr3t-pw-4242"


@pytest.fixture()
def mlflow_server(tmp_path, monkeypatch):
    """A real MLflow tracking server (MLflow's own Flask app, serving its store and artifacts from tmp_path/mlflow) in
    a thread of this process: `mlflow server` takes minutes to import on a loaded 2-core machine. Yields its port."""
    import threading

    from werkzeug.serving import make_server

    store = tmp_path / "mlflow"
    for key, value in {"_MLFLOW_SERVER_FILE_STORE": f"sqlite:///{store / 'db.sqlite'}",
                       "_MLFLOW_SERVER_SERVE_ARTIFACTS": "true", "_MLFLOW_SERVER_ARTIFACT_ROOT": "mlflow-artifacts:/",
                       "_MLFLOW_SERVER_ARTIFACT_DESTINATION": str(store / "artifacts")}.items():
        monkeypatch.setenv(key, value)  # how `mlflow server` configures the app
    store.mkdir()
    from mlflow.server import app

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_port
    server.shutdown()
    thread.join()


def client_env(**extra: str) -> dict:
    """The CLI's environment: this one without the server's settings, and no long retries of MLflow requests."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("_MLFLOW_SERVER")}
    return {**env, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", **extra}


def files_holding(root: Path, secret: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.mark.slow
def test_passwords_in_urls_reach_no_file_no_mlflow_param_and_no_message(tmp_path, mlflow_server):
    redis_url = f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"  # pretraining never connects to it
    uri = f"http://proxrl:{SECRET}@127.0.0.1:{mlflow_server}"
    run_dir = tmp_path / "run"
    env = client_env()
    proc = run_cli("--mode", "pretrain", "--config", str(SMOKE), f"run_dir={run_dir}", f"redis.url={redis_url}",
                   f"mlflow.tracking_uri={uri}", "pretrain.iterations=2", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert SECRET not in proc.stdout + proc.stderr
    assert files_holding(tmp_path, SECRET) == []  # run_dir and the MLflow server's store and artifacts
    config = (run_dir / "config.yaml").read_text()
    assert "redis://:***@127.0.0.1" in config and "http://proxrl:***@127.0.0.1" in config  # masked, not dropped
    summary = json.loads((run_dir / "summary.json").read_text())
    client = MlflowClient(f"http://127.0.0.1:{mlflow_server}")
    run = client.get_run(summary["mlflow_run_id"])  # the run was logged through the URI with the password
    assert run.data.params["redis.url"].startswith("redis://:***@") and SECRET not in json.dumps(run.data.params)
    assert not any(SECRET in v for v in run.data.tags.values())

    # Resuming needs the passwords again, and says how to give them; the run's files stay clean.
    (run_dir / "summary.json").unlink()
    refused = run_cli("--resume", str(run_dir), env=env)
    assert refused.returncode == 2 and "redis.url" in refused.stderr and "Traceback" not in refused.stderr
    refused = run_cli("--resume", str(run_dir), f"redis.url={redis_url}", env=env)
    assert refused.returncode == 2 and "MLFLOW_TRACKING_URI" in refused.stderr
    resumed = run_cli("--resume", str(run_dir), f"redis.url={redis_url}", env=client_env(MLFLOW_TRACKING_URI=uri))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert SECRET not in "".join(p.stdout + p.stderr for p in (refused, resumed))
    assert files_holding(tmp_path, SECRET) == []


def test_an_unreachable_redis_is_named_without_its_password():
    with pytest.raises(ConnectionError, match="cannot reach Redis") as info:
        RedisAddress(url=f"redis://:{SECRET}@127.0.0.1:{free_port()}/0").connect()
    assert SECRET not in str(info.value) and "redis://:***@127.0.0.1" in str(info.value)


class Sleeper:
    def nap(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds


def test_a_stuck_actor_becomes_an_error_naming_it_not_a_hang(tmp_path):
    import ray

    names = ["learner rank 0", "learner rank 1"]
    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        ranks = [ray.remote(Sleeper).options(num_cpus=0).remote() for _ in names]
        ray.get([r.nap.remote(0) for r in ranks])  # started (slow on a loaded machine; not what is measured)
        assert wait_for(ray, [r.nap.remote(0.1) for r in ranks], names, 60, "actors.learner_timeout_s", tmp_path) == [0.1, 0.1]
        start = time.monotonic()
        with pytest.raises(RunFailed) as info:
            wait_for(ray, [ranks[0].nap.remote(0), ranks[1].nap.remote(600)], names, 3, "actors.learner_timeout_s",
                     tmp_path)
        waited = time.monotonic() - start
    finally:
        ray.shutdown()
    assert 3 <= waited < 30
    message = str(info.value)
    assert message.startswith("learner rank 1 did not answer within 3 s (the bound actors.learner_timeout_s)")
    assert "learner rank 0" not in message and f"python -m learner.main --resume {tmp_path}" in message


def kill_running(proc: subprocess.Popen, title: str, ready=lambda: True, timeout: float = 300) -> float:
    """SIGKILL the first process of the run `proc` drives whose program name starts with `title` (Ray names a worker
    `ray::<Actor>.<method>` while it runs a call) once `ready()` holds; returns when (time.monotonic()). A smoke
    rollout can last 0.1 s, so the process is found once by its idle name and then only its title is polled, every
    2 ms (a scan of every process of the run each time could miss the call)."""
    deadline, watched, scanned = time.monotonic() + timeout, {}, 0.0
    idle = title.split(".")[0]
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if (not watched and time.monotonic() - scanned > 0.2) or any(not p.is_running() for p in watched.values()):
                watched, scanned = {c.pid: c for c in descendants(proc.pid)
                                    if Path(" ".join(c.cmdline()).split(" ")[0]).name.startswith(idle)}, time.monotonic()
            if watched and ready():
                for child in watched.values():
                    if Path(" ".join(child.cmdline()).split(" ")[0]).name.startswith(title):
                        child.kill()
                        return time.monotonic()
        except psutil.NoSuchProcess:
            watched = {}
        time.sleep(0.002)
    proc.kill()
    raise AssertionError(f"no process {title!r} showed (driver exit status {proc.poll()})")


def finish_watching(proc: subprocess.Popen, timeout: float = 600) -> tuple[str, str, list[psutil.Process]]:
    """Wait for the driver, collecting every process it started meanwhile (restarted actors included)."""
    import threading

    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.communicate(timeout=timeout)))
    reader.start()
    seen: dict[int, psutil.Process] = {}
    while reader.is_alive():
        try:
            seen.update({c.pid: c for c in descendants(proc.pid)})
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.2)
    reader.join()
    return out[0], out[1], list(seen.values())


def stopped_run(stderr: str, proc: subprocess.Popen, run_dir: Path, starts: str) -> str:
    """The checks every fault that stops a run shares: exit status 1, one message (its last line) saying what
    happened and naming the exact resume command, no traceback, the run state after iteration 1 kept."""
    assert proc.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    message = stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: {starts}"), message
    assert f"`python -m learner.main --resume {run_dir}`" in message
    assert [p.name for p in complete_states(run_dir)][-1] == state_name(1) and str(complete_states(run_dir)[-1]) in message
    assert not (run_dir / "summary.json").exists()
    return message


@pytest.mark.parametrize("call, state, says", [
    ("rollout", 1, "sampling iteration 1's prompts [2, 3] again with the same seeds"),
    pytest.param("evaluate", 2, "making its evaluate call again with the same seeds", marks=pytest.mark.slow),
], ids=["sampling", "final-evaluation"])
def test_a_rollout_actor_killed_mid_call_is_restarted_and_the_run_ends_as_if_it_had_not_been(
        pretrained, store, grpo_reference, call, state, says):
    """SIGKILL of the rollout actor's process while it samples iteration 1 (after the first update), or while it
    draws the final held-out evaluation (after the last run state). Would catch: no restart (max_restarts), the lost
    call not made again (the run fails or hangs), the restarted actor sampling or evaluating with its first weights
    or other seeds (the final weights, the metrics or the held-out numbers differ from the uninterrupted run's), a
    group trained twice or lost (stream counts), a process left behind."""
    root, uri = store
    run_dir = root / f"rollout-killed-{call}"
    proc = subprocess.Popen(cli(*grpo_args(root, uri, pretrained, run_dir.name)), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = kill_running(proc, f"ray::RolloutActor.{call}",  # the first such call after run state `state`
                          ready=lambda: (run_dir / "resume" / state_name(state) / MARKER).is_file())
    stdout, stderr, processes = finish_watching(proc)
    took = time.monotonic() - killed
    assert proc.returncode == 0, stderr[-3000:]
    assert f"rollout actor 0 died; restarted by Ray (1 of actors.rollout_restarts=3), {says}" in stdout
    summary = json.loads(Path(stdout.strip().splitlines()[-1]).read_text())
    assert_same_run(uri, grpo_reference, summary)  # same seeds, same weights: the same run
    stream = summary["stream"]
    assert summary["groups_written"] == grpo_reference["groups_written"] == 4 and summary["groups_dropped"] == 0
    assert stream["pending"] == 0 and stream["entries"] == summary["groups_written"] + stream["duplicates"]
    assert leftovers(processes, wait_s=10) == []
    killed_s, reference_s = ([m.value for m in MlflowClient(uri).get_metric_history(s["mlflow_run_id"], "rollout_s")
                              if m.step == 1][-1] for s in (summary, grpo_reference))
    print(f"\nrollout actor killed in {call}: iteration 1's rollout took {killed_s:.1f} s (uninterrupted: {reference_s:.1f} s); "
          f"kill to the run's end {took:.1f} s; entries written twice: {stream['duplicates']}")


@pytest.mark.parametrize("victim, title, starts", [
    ("learner rank", "ray::GrpoLearner.train", "learner rank 0 died: its process ended"),
    pytest.param("redis-server", "redis-server", "the run's Redis stopped answering", marks=pytest.mark.slow),
], ids=["learner-rank", "redis-server"])
def test_a_killed_learner_rank_or_redis_server_stops_the_run_at_once_with_one_message(pretrained, store, victim,
                                                                                       title, starts):
    """SIGKILL of the learner rank's process while it trains iteration 1, or of the run's redis-server as soon as it
    shows after run state 1. Would catch: a raw Ray or redis traceback, a message without the rank or the resume
    command, a wait until actors.learner_timeout_s (3600 s) or a hang (a blocked stream read, a retried command),
    the run state lost, a Ray worker or the redis-server left behind."""
    root, uri = store
    run_dir = root / f"{victim.replace(' ', '-')}-killed"
    # Eight optimiser steps per batch: the smoke model's train call alone lasts ~50 ms, which a poll every 2 ms on a
    # loaded 2-core machine missed once (CI: the run ended first).
    proc = start_until_state(grpo_args(root, uri, pretrained, run_dir.name, "grpo.updates_per_batch=8"), run_dir, 1)
    killed = kill_running(proc, title)
    _, stderr, processes = finish_watching(proc, timeout=300)
    took = time.monotonic() - killed
    stopped_run(stderr, proc, run_dir, starts)
    assert leftovers(processes, wait_s=10) == []
    assert took < 60
    print(f"\n{victim} killed: the driver exited {took:.1f} s later")


@pytest.mark.parametrize("value", ["0", "-5", "soon"])
def test_the_stream_read_bound_is_a_validated_setting(value):
    """Would catch: the learner's stream wait being a constant again, or a bound of 0 / negative accepted."""
    from learner.config import DEFAULT_CONFIG, ConfigError, load_config

    assert load_config(DEFAULT_CONFIG, ["actors.stream_read_timeout_s=30"]).actors.stream_read_timeout_s == 30
    with pytest.raises(ConfigError, match="actors.stream_read_timeout_s"):
        load_config(DEFAULT_CONFIG, [f"actors.stream_read_timeout_s={value}"])


@pytest.mark.slow
def test_a_learner_start_up_past_its_bound_is_one_paragraph_naming_the_setting(pretrained, store):
    """The learner ranks' start-up cannot finish within 1 ms: usually the placement is what runs out, rarely (CI, once)
    the placement is ready at once and the first call to the rank is. Either is the same one paragraph. Would
    catch: a raw GetTimeoutError traceback (the former ray.get(..., timeout=600)), a message without the setting to
    raise or the resume command."""
    root, uri = store
    run_dir = root / "learner-start"
    proc = run_cli(*grpo_args(root, uri, pretrained, "learner-start", "actors.learner_timeout_s=0.001"), timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert re.match(r"error: (the placement of the learner ranks \(1 x \{'CPU': 1\.0\}\)|learner rank 0) did "
                    r"not answer within 0\.001 s \(the bound actors\.learner_timeout_s\)", message), message
    assert "Raise actors.learner_timeout_s" in message and f"--resume {run_dir}" in message
