"""MLflow as the run's telemetry: a store that goes down mid-run costs the run nothing but the dropped calls, and one
that cannot start the run is a clear error with its password masked. A real sqlite store; the outage is a URI on
a loopback port nothing listens on."""

import mlflow
import pytest

from learner.config import ConfigError, RunConfig
from learner.tracking import Tracker

DEAD = "http://alice:s3cret@127.0.0.1:1"


@pytest.fixture(autouse=True)
def no_retries(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


def config(uri: str) -> RunConfig:
    return RunConfig.model_validate({"mlflow": {"tracking_uri": uri, "experiment": "tracking-test",
                                                "system_metrics": False}})


def test_an_outage_mid_run_drops_calls_and_the_run_goes_on(tmp_path, capsys):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(config(store), "grpo", tmp_path / "grpo-run")
    try:
        tracker.metrics({"reward": 0.5}, step=0)
        mlflow.set_tracking_uri(DEAD)  # the server goes away
        tracker.metrics({"reward": 0.6}, step=1)  # raised MlflowException and ended the run before
        tracker.metrics({"reward": 0.7}, step=2)  # inside the cool-down: not even tried
        assert tracker.dropped == 2
        err = capsys.readouterr().err
        assert "did not take metrics at step 1" in err and "127.0.0.1:1" in err and "s3cret" not in err
        mlflow.set_tracking_uri(store)  # back
        tracker.down_until = 0.0  # the cool-down has passed
        tracker.metrics({"reward": 0.8}, step=3)
    finally:
        tracker.finish()
    history = mlflow.MlflowClient(store).get_metric_history(tracker.run_id, "reward")
    assert [(m.step, m.value) for m in history] == [(0, 0.5), (3, 0.8)]
    assert mlflow.MlflowClient(store).get_run(tracker.run_id).info.status == "FINISHED"


def test_a_store_that_cannot_start_the_run_is_named_without_its_password(tmp_path):
    with pytest.raises(ConfigError) as caught:
        Tracker(config(DEAD), "grpo", tmp_path / "grpo-run")
    message = str(caught.value)
    assert "MLflow at http://alice:***@127.0.0.1:1 could not start the run" in message
    assert "s3cret" not in message and "mlflow.tracking_uri" in message


def test_a_failed_end_does_not_hide_the_runs_own_error(tmp_path):
    """main.run calls finish('FAILED') while handling the run's error: it raised from inside that handler, so the
    user saw MLflow's error instead of the advice (e.g. the --resume command)."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(config(store), "grpo", tmp_path / "grpo-run")
    mlflow.set_tracking_uri(DEAD)
    try:
        tracker.finish("FAILED")
        assert tracker.dropped == 1
    finally:
        mlflow.set_tracking_uri(store)
        mlflow.end_run()
