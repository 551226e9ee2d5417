"""MLflow tracking: one run per job, the resolved config as params and as an artifact, metrics, images."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # without it each process hangs ~9 s at exit

import mlflow  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from actors.redaction import redact  # noqa: E402
from learner.config import ConfigError, RunConfig, dump_config  # noqa: E402

# What a tracking store that is down, unreachable or refusing raises (requests' errors are OSErrors).
TRACKING_ERRORS = (MlflowException, OSError)
RETRY_AFTER_S = 60.0  # after a failed call, MLflow calls are skipped this long (each can block on retries)


def resolve_tracking_uri(configured: Optional[str]) -> str:
    """The config's URI, else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here (what a bare `mlflow ui` reads)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _artifact_root(uri: str) -> Optional[str]:
    # Keep artifacts beside a sqlite store instead of in ./mlruns of whatever directory the job started in.
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None


def _flatten(data: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: str(data)[:500]}


def quiet_if_secret(uri: str) -> None:
    """MLflow prints 'View run ... at: <tracking URI>' when a run ends: not when the URI holds a password."""
    if redact(uri) != uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


MODE_SECTIONS = ("pretrain", "grpo", "sample")  # each read only by its own mode


def mode_params(cfg: RunConfig, mode: str, init_from: Optional[Path]) -> dict:
    """The config as MLflow params: without the other modes' sections (a GRPO run's pretrain.* settings are never
    read), with the checkpoint actually started from."""
    params = cfg.model_dump(mode="json")
    for other in MODE_SECTIONS:
        if other != mode:
            params.pop(other, None)
    if init_from is not None:
        params["init_from"] = str(init_from)
    return params


class Tracker:
    """Thin wrapper so the drivers read as the data flow, not as MLflow calls.

    MLflow is the run's telemetry, not its record (summary.json, the run states and the checkpoint are): once the run
    has started, a call the tracking store does not take is dropped with a warning and counted (`dropped`), and the
    run goes on; after a failure calls are skipped for RETRY_AFTER_S, so an outage does not cost minutes of retries
    per iteration. A store that cannot start the run is a ConfigError naming it (password masked)."""

    def __init__(self, cfg: RunConfig, mode: str, run_dir: Path, resume: Optional[tuple[str, str]] = None,
                 init_from: Optional[Path] = None):
        """A new MLflow run; or with resume=(run id, tracking URI), that run reopened so its curves continue (its
        params stay as first logged: MLflow params cannot change, and a resume changes none that matter).
        `init_from`: the checkpoint the run actually starts from (logged instead of the config's null default)."""
        self.dropped, self.down_until = 0, 0.0
        self.uri = resume[1] if resume is not None else resolve_tracking_uri(cfg.mlflow.tracking_uri)
        try:
            self._start(cfg, mode, run_dir, resume, init_from)
        except TRACKING_ERRORS as e:
            raise ConfigError(
                f"MLflow at {redact(self.uri)} could not {'reopen run ' + resume[0] if resume else 'start the run'} "
                f"({type(e).__name__}: {redact(str(e))[:300]}). Start the tracking server (e.g. `mlflow server --host "
                f"127.0.0.1`), set mlflow.tracking_uri (or MLFLOW_TRACKING_URI) to one that answers, or, for a deleted "
                f"experiment, restore it in the MLflow UI or set mlflow.experiment to another name.") from None

    def _start(self, cfg: RunConfig, mode: str, run_dir: Path, resume: Optional[tuple[str, str]],
               init_from: Optional[Path]) -> None:
        mlflow.set_system_metrics_sampling_interval(cfg.mlflow.system_metrics_interval_s)
        system = cfg.mlflow.system_metrics
        if resume is not None:
            self.run_id = resume[0]
            quiet_if_secret(self.uri)
            mlflow.set_tracking_uri(self.uri)
            self.run = mlflow.start_run(run_id=self.run_id, log_system_metrics=system)
            mlflow.log_text(dump_config(cfg), "config.yaml")
            return
        quiet_if_secret(self.uri)
        mlflow.set_tracking_uri(self.uri)
        client = MlflowClient(self.uri)
        exp = client.get_experiment_by_name(cfg.mlflow.experiment)
        if exp is None:
            exp_id = client.create_experiment(cfg.mlflow.experiment, artifact_location=_artifact_root(self.uri))
        else:
            exp_id = exp.experiment_id
        name = run_dir.name if run_dir.name.startswith(f"{mode}-") else f"{mode}-{run_dir.name}"  # not grpo-grpo-...
        self.run = mlflow.start_run(experiment_id=exp_id, run_name=name, log_system_metrics=system)
        self.run_id = self.run.info.run_id
        mlflow.set_tags({"mode": mode, "run_dir": str(run_dir)})
        params = _flatten(redact(mode_params(cfg, mode, init_from)))
        items = list(params.items())
        for i in range(0, len(items), 90):  # MLflow caps a batch at 100 params
            mlflow.log_params(dict(items[i : i + 90]))
        mlflow.log_text(dump_config(cfg), "config.yaml")

    def _call(self, what: str, call: Callable[[], Any]) -> None:
        """Run one MLflow call; if the store does not take it, warn, count it and skip calls for a while."""
        if time.monotonic() < self.down_until:
            self.dropped += 1
            return
        try:
            call()
        except TRACKING_ERRORS as e:
            self.dropped += 1
            self.down_until = time.monotonic() + RETRY_AFTER_S
            print(f"warning: MLflow at {redact(self.uri)} did not take {what} ({type(e).__name__}: "
                  f"{redact(str(e))[:200]}); the run goes on and its own files (summary.json, run states, checkpoint) "
                  f"stay complete; MLflow calls are skipped for {RETRY_AFTER_S:.0f} s ({self.dropped} dropped so far)",
                  file=sys.stderr, flush=True)

    def metrics(self, values: dict[str, float], step: int) -> None:
        self._call(f"metrics at step {step}",
                   lambda: mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step))

    def tag(self, name: str, value: str) -> None:
        self._call(f"tag {name}", lambda: mlflow.set_tag(name, value))

    def image(self, image, name: str) -> None:
        self._call(name, lambda: mlflow.log_image(image, name))

    def artifact(self, path: str | Path) -> None:
        self._call(Path(path).name, lambda: mlflow.log_artifact(str(path)))

    def table(self, columns: dict[str, list], name: str) -> None:
        """A table artifact, one row per entry; PIL images in a column are shown in place by the MLflow UI."""
        from PIL import Image

        self._call(name, lambda: mlflow.log_table(
            {k: [mlflow.Image(v) if isinstance(v, Image.Image) else v for v in values] for k, values in columns.items()},
            artifact_file=name))

    def text(self, text: str, name: str) -> None:
        self._call(name, lambda: mlflow.log_text(text, name))

    def folder(self, path: str | Path, name: str) -> None:
        """Every file under `path`, as artifacts under `name` (e.g. the exported checkpoint)."""
        self._call(f"the folder {name}", lambda: mlflow.log_artifacts(str(path), artifact_path=name))

    def finish(self, status: str = "FINISHED") -> None:
        """End the MLflow run (always tried: the run's status matters more than the cool-down)."""
        self.down_until = 0.0
        self._call(f"the run's end ({status})", lambda: mlflow.end_run(status=status))
