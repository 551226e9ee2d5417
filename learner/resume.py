"""Whole-run checkpoints ("run states") and `--resume`: what a run needs to continue exactly where it stopped.

A run state is a folder run_dir/resume/it-NNNNNNNN holding the files a mode hands over as {relative path: bytes}:
DeepSpeed's own engine files (model, optimizer, scheduler, ZeRO partitions), run.json (counters, curves, the MLflow
run id, the config fingerprint), safetensors for tensors (RNG states, EMA, held-out score matrices). It is written to
a temporary folder beside it, completed by COMPLETE.json (every file's sha256) written last, and then renamed into
place: a folder without that marker, or whose files do not match it, is never read. The last `keep` are kept.

Nothing is unpickled that this module did not allow: DeepSpeed writes its engine files with torch.save, and they are
read back with torch.load(weights_only=True), allowing the three plain DeepSpeed classes its optimizer files hold.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from actors.redaction import is_redacted, redact
from learner.config import ConfigError, RunConfig, _parse_override, load_config, validate_config
from proxmodel.files import fsync_dir, replace_dir, restore_interrupted, write_files

STATES_DIR = "resume"
MARKER = "COMPLETE.json"
RUN_FILE = "run.json"  # run_dir/run.json: mode and MLflow run, written when the run starts
STATE_PREFIX = "it-"
LOCK_FILE = ".lock"  # run_dir/.lock: held (flock) by the driver using the folder, holding its pid
_held: dict[Path, int] = {}  # run_dir -> the open lock file's descriptor


def hold_run_dir(run_dir: Path) -> None:
    """Lock `run_dir` for this process until release_run_dirs() or its exit (the kernel drops the lock with the
    process, so a killed driver leaves nothing to clean up). A second driver on the same folder (--resume started
    twice, a scheduler's retry while the first still runs) would prune the first's half-written run states and
    overwrite its config; it gets a ConfigError naming the holder instead."""
    import fcntl

    run_dir = Path(run_dir)
    if run_dir in _held:
        return
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(f"run_dir {run_dir} is in use by another ProxRL process (pid {holder}); it is left as it is. "
                          f"Wait for that run to end (or stop it), or choose another run_dir=...") from None
    except OSError as e:  # a filesystem without locks (Lustre without flock, NFS without its lock daemon)
        os.close(fd)
        print(f"warning: run_dir {run_dir} cannot be locked ({e.strerror}): make sure no other ProxRL process "
              f"uses it while this one runs", file=sys.stderr)
        return
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[run_dir] = fd


def release_run_dirs() -> None:
    """Drop every lock hold_run_dir took (the CLI's main() on return, so a test calling it twice in one process can)."""
    while _held:
        os.close(_held.popitem()[1])

# Settings a resumed run may change: where things run and how long, never what is computed. grpo.iterations only
# decides where the loop stops (pretrain.iterations is not here: the loss schedule is a fraction of it).
RESUMABLE_KEYS = (
    "grpo.iterations", "grpo.time_limit_s", "grpo.checkpoint_every", "grpo.keep_checkpoints",
    "pretrain.checkpoint_every", "pretrain.keep_checkpoints", "pretrain.log_every",
    "ray.address", "ray.resource_wait_s", "redis.url", "redis.password_env",
    "actors.reward.timeout_s", "actors.reward.retries",
    # bounds the fault messages tell a user to raise before resuming: when to give up, not what is computed
    "actors.rollout_timeout_s", "actors.learner_timeout_s", "actors.stream_read_timeout_s", "redis.max_memory_mb",
    "grpo.max_nonfinite_updates", "pretrain.max_nonfinite_updates",
)
# The keys fingerprints left out before session 37 added the bounds above: a state saved then hashed those.
RESUMABLE_KEYS_BEFORE_BOUNDS = RESUMABLE_KEYS[:13]


def config_fingerprint(config: RunConfig | dict, resumable: tuple[str, ...] = RESUMABLE_KEYS) -> str:
    """sha256 of a resolved config (or the dict its config.yaml holds) without the keys a resume may change (and
    run_dir, which may move). --resume accepts the saved config.yaml's hash as written or as this version resolves
    it, so a ProxRL upgrade that adds keys (with defaults) blocks neither the first resume after it nor a later one;
    an edit does."""
    data = redact(copy.deepcopy(config if isinstance(config, dict) else config.model_dump(mode="json")))
    for key in (*resumable, "run_dir"):
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def resume_command(run_dir: Path) -> str:
    return f"python -m learner.main --resume {run_dir}"


# Writing and finding run states.

def state_name(iteration: int) -> str:
    return f"{STATE_PREFIX}{iteration:08d}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_state(run_dir: Path, iteration: int, files: dict[str, bytes], keep: int) -> Path:
    """Publish `files` as the run state after `iteration` iterations, atomically; keep the last `keep` states."""
    root = run_dir / STATES_DIR
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{state_name(iteration)}-", dir=root))
    write_files(tmp, files, "run-state file", durable=True)
    marker = {"iteration": iteration, "files": {name: _sha256(data) for name, data in sorted(files.items())}}
    write_files(tmp, {MARKER: (json.dumps(marker, indent=1) + "\n").encode()}, "marker", durable=True)
    final = root / state_name(iteration)
    replace_dir(tmp, final)  # (the same iteration is written again at a resumed run's end)
    fsync_dir(root)
    prune_states(root, keep)
    return final


def prune_states(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete states, and leftovers of writes that never finished."""
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in complete_states(root.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def complete_states(run_dir: Path) -> list[Path]:
    """Run-state folders that carry their completion marker, oldest first (their files are checked on reading)."""
    root = run_dir / STATES_DIR
    if root.is_dir():
        restore_interrupted(root)  # a state being rewritten when the driver died is the old one again
    found = [p for p in root.glob(f"{STATE_PREFIX}*") if p.is_dir() and (p / MARKER).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: p.name)


def read_state(path: Path) -> dict[str, bytes]:
    """Every file of a complete run state, each checked against the sha256 its marker recorded."""
    try:
        marker = json.loads((path / MARKER).read_text())
        files = {name: (path / name).read_bytes() for name in marker["files"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"run state {path} is unreadable ({type(e).__name__}: {e})") from None
    bad = [name for name, data in files.items() if _sha256(data) != marker["files"][name]]
    if bad:
        raise ValueError(f"run state {path}: {len(bad)} file(s) differ from what was written, e.g. {bad[0]}")
    return files


def latest_state(run_dir: Path, warn=print) -> tuple[Optional[Path], Optional[dict[str, bytes]]]:
    """The newest run state whose files all check out, and its files; older ones are tried if a newer one is bad."""
    for path in reversed(complete_states(run_dir)):
        try:
            return path, read_state(path)
        except ValueError as e:
            warn(f"warning: {e}; trying the previous one")
    return None, None


# Serialisation helpers: JSON, safetensors, and DeepSpeed's engine files.

def json_bytes(data) -> bytes:
    return (json.dumps(data, indent=1) + "\n").encode()


def tensor_bytes(tensors: dict) -> bytes:
    """torch tensors -> safetensors bytes (each made contiguous and unshared)."""
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()})


def tensors_from(data: bytes) -> dict:
    from safetensors.torch import load

    return load(data)


def _deepspeed_safe_globals() -> list:
    """The DeepSpeed classes its ZeRO optimizer files hold (plain records: an enum, a dataclass of two ints, a
    static loss scale); torch.load(weights_only=True) refuses every other class."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler]


def _weights_only_checkpoint_engine():
    """DeepSpeed's TorchCheckpointEngine, except that it loads with weights_only=True (its own passes False)."""
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnlyCheckpointEngine()


ENGINE_TAG = "state"


def engine_files(engine) -> dict[str, bytes]:
    """This rank's files of DeepSpeed's own checkpoint (every rank must call it: the save is collective).

    Written to a private temp folder and returned as bytes, so ranks on other nodes need no shared filesystem; the
    recovery scripts DeepSpeed copies beside them (zero_to_fp32.py) are left out.
    """
    with tempfile.TemporaryDirectory(prefix="proxrl-engine-") as tmp:
        engine.save_checkpoint(tmp, tag=ENGINE_TAG, save_latest=False)
        root = Path(tmp)
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file() and p.suffix != ".py"}


def load_engine_files(engine, files: dict[str, bytes]) -> None:
    """Restore model, optimizer, scheduler and ZeRO partitions from the files of every rank's engine_files()."""
    with tempfile.TemporaryDirectory(prefix="proxrl-engine-") as tmp:
        write_files(Path(tmp), files, "run-state engine file")
        previous, engine.checkpoint_engine = engine.checkpoint_engine, _weights_only_checkpoint_engine()
        try:
            loaded, _ = engine.load_checkpoint(tmp, tag=ENGINE_TAG, load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
        finally:
            engine.checkpoint_engine = previous
        if loaded is None:
            raise ValueError("DeepSpeed found no engine checkpoint in the run state")


def merge_rank_files(parts: list[dict[str, bytes]]) -> dict[str, bytes]:
    """The union of every rank's files; a name two ranks wrote with different bytes is an error, not a silent pick."""
    out: dict[str, bytes] = {}
    for part in parts:
        for name, data in part.items():
            if name in out and out[name] != data:
                raise RuntimeError(f"two learner ranks wrote different {name} into the same run state")
            out[name] = data
    return out


# --resume: the saved config, the overrides it allows, the state to continue from.

@dataclass(frozen=True)
class Resume:
    """A run to continue: its mode and MLflow run, and the run state to load (None: restart from its beginning)."""

    run_dir: Path
    mode: str
    mlflow_run_id: str
    tracking_uri: str
    state: Optional[Path]
    files: Optional[dict[str, bytes]]
    # The overrides rewrite_config may write into config.yaml: a state hashed the old way (before the resumable
    # bounds) hashed those bounds too, so a bound written there would make the next resume's check fail.
    persistable: tuple[str, ...] = RESUMABLE_KEYS


def write_run_file(run_dir: Path, mode: str, run_id: str, tracking_uri: str) -> None:
    """What --resume needs before any run state exists: the mode and the MLflow run to continue."""
    tmp = run_dir / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps({"mode": mode, "mlflow_run_id": run_id, "mlflow_tracking_uri": redact(tracking_uri)}) + "\n")
    os.replace(tmp, run_dir / RUN_FILE)


def check_resume_overrides(overrides: list[str]) -> None:
    """Refuse (ConfigError) every override that could change what the resumed run computes."""
    refused = [item for item in overrides if ".".join(_parse_override(item)[0]) not in RESUMABLE_KEYS]
    if refused:
        raise ConfigError(
            f"--resume continues a run with its saved config; {', '.join(repr(r) for r in refused)} would change what "
            f"it computes, so the result would match neither the old settings nor the new ones. Only these may change "
            f"on resume: {', '.join(RESUMABLE_KEYS)}. To train with other settings, start a new run from the last "
            f"checkpoint: --mode MODE init_from=RUN_DIR/checkpoint KEY=VALUE."
        )


def open_resume(path: str, overrides: list[str], mode: Optional[str]) -> tuple[RunConfig, Resume]:
    """The config and state of the run in `path` to continue; ConfigError (with the fix) if it cannot be."""
    run_dir = Path(path).expanduser().resolve()
    if not (run_dir / RUN_FILE).is_file() or not (run_dir / "config.yaml").is_file():
        what = "does not exist" if not run_dir.exists() else "is not a run directory (it lacks run.json or config.yaml)"
        raise ConfigError(f"--resume {path}: {what}. Pass the run_dir of a run this version started (the folder "
                          f"holding config.yaml, run.json and resume/).")
    if (run_dir / "summary.json").exists():
        raise ConfigError(f"--resume {path}: the run has finished (summary.json); nothing to continue. To train "
                          f"further, start a new run with init_from={run_dir / 'checkpoint'}.")
    check_resume_overrides(overrides)
    hold_run_dir(run_dir)  # before reading its state: another driver may be writing it
    try:
        info = json.loads((run_dir / RUN_FILE).read_text())
        saved_mode, run_id, uri = info["mode"], info["mlflow_run_id"], info["mlflow_tracking_uri"]
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"--resume {path}: {run_dir / RUN_FILE} is unreadable ({type(e).__name__}: {e}); "
                          f"it is written when a run starts, restore it.") from None
    if mode is not None and mode != saved_mode:
        raise ConfigError(f"--resume {path}: this is a {saved_mode} run; drop --mode {mode} (the run's mode is kept).")
    cfg = load_config(run_dir / "config.yaml", overrides, resuming=True).model_copy(update={"run_dir": str(run_dir)})
    uri = secrets_again(cfg, uri, path)
    state, files = latest_state(run_dir, warn=lambda m: print(m, file=sys.stderr))
    persistable = RESUMABLE_KEYS
    if files is not None:
        saved = json.loads(files["run.json"])["config_fingerprint"]
        # The file as written (a state saved before a ProxRL upgrade hashed the keys that version had) or as this
        # version resolves it (a state saved after one hashes the keys it added, at their defaults); an edit
        # changes both.
        data = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        written = config_fingerprint(data)
        old_way = (config_fingerprint(data, RESUMABLE_KEYS_BEFORE_BOUNDS),
                   config_fingerprint(validate_config(data, run_dir / "config.yaml", resuming=True),
                                      RESUMABLE_KEYS_BEFORE_BOUNDS))
        if saved in old_way and saved not in (written, config_fingerprint(cfg)):
            persistable = RESUMABLE_KEYS_BEFORE_BOUNDS
        elif saved not in (written, config_fingerprint(cfg)):
            raise ConfigError(
                f"--resume {path}: {run_dir / 'config.yaml'} no longer matches the config the run state {state.name} "
                f"was written with (fingerprint {saved[:12]}... vs {written[:12]}...): it was edited. Restore it (the "
                f"run's MLflow artifact config.yaml holds the original), or start a new run."
            )
    return cfg, Resume(run_dir, saved_mode, run_id, uri, state, files, persistable)


def secrets_again(cfg: RunConfig, uri: str, path: str) -> str:
    """The passwords a run's files never hold, given again: redis.url as an override, the MLflow URI through
    MLFLOW_TRACKING_URI. Returns the tracking URI to reopen; ConfigError saying how to give a missing one."""
    if is_redacted(cfg.redis.url):
        raise ConfigError(
            f"--resume {path}: the password in redis.url ({cfg.redis.url}) was not saved (secrets never are). Pass "
            f"the full URL again (redis.url=redis://:PASSWORD@host:port/db after the run directory), or use a URL "
            f"without it and put the password in the environment variable named by redis.password_env."
        )
    if not is_redacted(uri):
        return uri
    given = os.environ.get("MLFLOW_TRACKING_URI")
    if given is None or redact(given) != uri:
        raise ConfigError(
            f"--resume {path}: the password in the MLflow tracking URI ({uri}) was not saved (secrets never are). "
            f"Export MLFLOW_TRACKING_URI with the full URI and resume again, or keep credentials out of URIs: "
            f"MLflow reads MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD."
        )
    return given


def rewrite_config(run_dir: Path, overrides: list[str], keys: tuple[str, ...] = RESUMABLE_KEYS) -> None:
    """config.yaml with the (allowed) overrides of `keys` written into it as it is, so a second resume continues
    with them and its fingerprint still matches the run states'."""
    path = run_dir / "config.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    for item in overrides:
        (*parents, leaf), value = _parse_override(item)
        if ".".join([*parents, leaf]) not in keys:
            continue
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = redact(value)
    tmp = run_dir / ".config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)
