"""Issue 13, item 4: no silent corruption, secrets kept out of every dump, a bounded stream, bounded waits.

Everything runs for real: the CLI in a subprocess, DeepSpeed, the embedded redis-server, MLflow's sqlite store, Ray.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from actors.stream import RedisAddress
from learner.faults import RunFailed, wait_for
from learner.resume import complete_states
from proxmodel.checkpoint import read_state

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
    weights = read_state(run_dir / "checkpoint")
    assert all(bool(t.isfinite().all()) for t in weights.values())  # NaN never reached the exported weights
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("proxrl").experiment_id])[0]
    assert run.info.status == "FAILED"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "nonfinite_updates")][-1] == 2


SECRET = "s3cr3t-pw-4242"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
