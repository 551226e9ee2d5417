"""MLflow as the run's telemetry: a store that goes down mid-run costs the run nothing but the dropped calls, and one
that cannot start the run is a clear error with its password masked. A real sqlite store; the outage is a URI on
a loopback port nothing listens on."""

import os
import time

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


def test_the_configured_store_wins_over_the_environment_and_the_fallback_is_beside_the_working_directory(
        tmp_path, monkeypatch):
    """mlflow.tracking_uri, else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here (what a bare `mlflow ui` reads).
    Would catch the environment overriding the config."""
    from learner.tracking import resolve_tracking_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri("sqlite:///configured.db") == "sqlite:///configured.db"
    assert resolve_tracking_uri(None) == "sqlite:///env.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_the_url_is_kept_out_of_mlflows_end_of_run_line_only_when_it_holds_a_password(monkeypatch):
    from learner.tracking import quiet_if_secret

    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "false")  # (restored after the test)
    quiet_if_secret("sqlite:///plain.db")
    assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "false"
    quiet_if_secret(DEAD)
    assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"


def test_a_run_records_its_modes_params_the_checkpoint_it_started_from_and_no_password(tmp_path):
    """The params are the config without the other modes' sections (never read by this one), every key of it (they
    go in batches under MLflow's cap), the checkpoint actually started from, URL passwords masked and long values
    cut; the run is named after run_dir (without doubling the mode prefix), tagged with its mode and run_dir, and
    its experiment keeps artifacts beside the sqlite store. Would catch each of these lost."""
    from learner.tracking import _flatten, mode_params

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = RunConfig.model_validate({
        "mlflow": {"tracking_uri": store, "experiment": "params-test", "system_metrics": False},
        "redis": {"url": "redis://:hunter2@cache:6379/0"},
        "grpo": {"check_rewards": ["compositional_strict"] * 400}})  # a value of 10,000+ characters
    runs = {}
    for folder in ("grpo-20260101-000000", "mine"):
        tracker = Tracker(cfg, "grpo", tmp_path / folder, init_from=tmp_path / "ckpt")
        tracker.finish()
        runs[folder] = mlflow.MlflowClient(store).get_run(tracker.run_id)
    run = runs["mine"]
    params, tags = run.data.params, run.data.tags
    assert run.info.run_name == "grpo-mine" and runs["grpo-20260101-000000"].info.run_name == "grpo-20260101-000000"
    assert tags["mode"] == "grpo" and tags["run_dir"] == str(tmp_path / "mine")
    assert params["init_from"] == str(tmp_path / "ckpt") and params["redis.url"] == "redis://:***@cache:6379/0"
    assert not any(key.startswith(("pretrain.", "sample.")) for key in params) and "grpo.iterations" in params
    assert len(params["grpo.check_rewards"]) == 500
    assert set(params) == set(_flatten(mode_params(cfg, "grpo", tmp_path / "ckpt")))  # every one, in all batches
    experiment = mlflow.MlflowClient(store).get_experiment(run.info.experiment_id)
    assert experiment.artifact_location == (tmp_path / "mlartifacts").as_uri()


def test_the_end_of_a_run_is_recorded_even_during_the_cool_down(tmp_path):
    """After a failed call the next ones are skipped for a while, but not the run's end: its status would stay
    RUNNING for good. Would catch finish() subject to the cool-down."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(config(store), "grpo", tmp_path / "grpo-run")
    tracker.down_until = time.monotonic() + 60  # as after a failed call
    tracker.finish()
    assert mlflow.MlflowClient(store).get_run(tracker.run_id).info.status == "FINISHED"


def test_after_a_failed_call_the_next_ones_are_skipped_not_tried(tmp_path, capsys):
    """A store that failed once is not asked again for a while (each call could block on its retries), even if it
    answers again. Would catch the cool-down never started; and an OSError (a file the artifact store cannot
    copy) is a dropped call too, not the run's end."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(config(store), "grpo", tmp_path / "grpo-run")
    try:
        tracker.artifact(tmp_path / "gone.png")  # FileNotFoundError from the artifact store
        assert tracker.dropped == 1 and "did not take gone.png" in capsys.readouterr().err
        tracker.metrics({"reward": 0.5}, step=0)  # the store would take it: not asked
        assert tracker.dropped == 2
    finally:
        tracker.finish()
    assert mlflow.MlflowClient(store).get_metric_history(tracker.run_id, "reward") == []


def test_a_resumed_run_reopens_the_saved_store_and_records_the_config_it_continues_with(tmp_path):
    """--resume reopens the run in the store it was started in (whatever the config or environment say now) and
    logs config.yaml again: a resume may change resumable keys (grpo.iterations). Would catch the config's store
    used (here a dead one) or the first config.yaml left in place."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = Tracker(config(store), "grpo", tmp_path / "grpo-run")
    first.finish("KILLED")
    cfg = config(DEAD).model_copy(update={"grpo": config(DEAD).grpo.model_copy(update={"iterations": 7})})
    again = Tracker(cfg, "grpo", tmp_path / "grpo-run", resume=(first.run_id, store))
    again.finish()
    assert again.uri == store and again.run_id == first.run_id
    text = mlflow.artifacts.load_text(f"runs:/{first.run_id}/config.yaml")
    assert "iterations: 7" in text


def test_system_metrics_are_sampled_only_when_asked_for(tmp_path):
    """mlflow.system_metrics false: no sampling thread and no system/* metrics (on a shared or metered store they
    are the bulk of a run's metrics). Would catch the setting ignored."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logged = {}
    for on in (True, False):
        cfg = RunConfig.model_validate({"mlflow": {"tracking_uri": store, "experiment": "system-test",
                                                   "system_metrics": on, "system_metrics_interval_s": 0.2}})
        tracker = Tracker(cfg, "grpo", tmp_path / f"grpo-{on}")
        deadline = time.monotonic() + (30 if on else 1.0)  # sampled: wait for the first sample, however loaded the
        while time.monotonic() < deadline:               # machine; not sampled: give a sampler time to show
            metrics = mlflow.MlflowClient(store).get_run(tracker.run_id).data.metrics
            if any(name.startswith("system/") for name in metrics):
                break
            time.sleep(0.2)
        tracker.finish()
        metrics = mlflow.MlflowClient(store).get_run(tracker.run_id).data.metrics
        logged[on] = {name for name in metrics if name.startswith("system/")}
    assert logged[True] and not logged[False]
