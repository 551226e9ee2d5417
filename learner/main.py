"""The command line and the driver: `python -m learner.main --mode {pretrain,grpo} [--config X.yaml] [key=value ...]`.

Every run gets a directory (run_dir) holding its resolved config, checkpoint, sample grid and summary.json; the
summary's path is the last line printed, so scripts can find the results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from learner import env  # noqa: F401  (sets the offline, no-telemetry environment first)
from learner.config import ConfigError, RunConfig, dump_config, load_config
from learner.prompts import prompt_source

BUILTIN_PREFIX = "builtin:"
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "proxmodel" / "weights"
GRPO_DEFAULT_INIT = "builtin:scenes-base"


def resolve_checkpoint(ref: str | None) -> Path | None:
    """A checkpoint folder from a path or `builtin:NAME`; a clear error if it is not there."""
    if ref is None:
        return None
    if ref.startswith(BUILTIN_PREFIX):
        path = BUILTIN_DIR / ref[len(BUILTIN_PREFIX):]
        known = sorted(p.name for p in BUILTIN_DIR.iterdir() if p.is_dir()) if BUILTIN_DIR.is_dir() else []
        if not path.is_dir():
            raise ConfigError(f"init_from={ref!r}: no such built-in checkpoint; the built-in ones are {known}.")
        return path
    path = Path(ref).expanduser()
    if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
        raise ConfigError(
            f"init_from={ref!r} is not a checkpoint folder (it needs model.safetensors and config.json). Use the "
            f"'checkpoint' path from a pretrain run's summary.json, or builtin:scenes-base."
        )
    return path


def check_rewards(cfg: RunConfig) -> None:
    """Every reward's weights and options are checked here, before any actor or model starts."""
    from rewards.base import preflight

    for i, spec in enumerate(cfg.rewards):
        try:
            preflight(spec.name, spec.options)
        except (FileNotFoundError, ValueError, TypeError) as e:
            raise ConfigError(f"rewards[{i}] ({spec.name}): {e}") from None


def check_model_files(cfg: RunConfig, init_from: Path | None) -> None:
    """The local folders the model reads when it is built (VAE, pretrained text encoder), checked before anything is
    written; the torch-heavy modules are imported only when such a folder is configured."""
    from proxmodel.config import ModelConfig

    model = cfg.model
    if init_from is not None:  # a checkpoint's own config.json decides its architecture
        try:
            model = ModelConfig.model_validate_json((init_from / "config.json").read_text())
        except ValueError:
            return  # an unreadable config.json gets load_model's own message when the run loads it
    try:
        if model.vae:
            from proxmodel.latent import require_vae_files

            require_vae_files(model.vae)
        if model.text.pretrained != "none":
            from proxmodel.text import check_text_files

            check_text_files(model.text)
    except FileNotFoundError as e:
        where = f" (from {init_from / 'config.json'})" if init_from is not None else ""
        raise ConfigError(f"{e}{where}") from None


def prepare_run_dir(cfg: RunConfig, mode: str) -> Path:
    run_dir = Path(cfg.run_dir or f"runs/{mode}-{time.strftime('%Y%m%d-%H%M%S')}").expanduser().resolve()
    if (run_dir / "summary.json").exists():
        raise ConfigError(
            f"run_dir {run_dir} already holds a finished run (summary.json); it is left as it is. "
            f"Choose another run_dir=... or omit it to get a fresh one."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return run_dir


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m learner.main",
        description="Pretrain (proximal matching) or reward-fine-tune (GRPO) a proximal text-to-image model.",
    )
    parser.add_argument("--mode", choices=("pretrain", "grpo"), required=True, help="what to run")
    parser.add_argument("--config", default=None, help="YAML config (default: the embedded configs/default.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. grpo.iterations=5")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_rewards(cfg)
        if args.mode == "grpo":
            prompt_source(cfg)  # reads and checks a prompt file before anything starts
        init_ref = cfg.init_from or (GRPO_DEFAULT_INIT if args.mode == "grpo" else None)
        init_from = resolve_checkpoint(init_ref)
        check_model_files(cfg, init_from)
        run_dir = prepare_run_dir(cfg, args.mode)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    # Heavy imports only once the config is known to be good: a typo fails in a second, not after torch loads.
    from learner.tracking import Tracker

    tracker = Tracker(cfg, args.mode, run_dir)
    try:
        if args.mode == "pretrain":
            from learner.pretrain import run_pretrain

            result = run_pretrain(cfg, run_dir, tracker, init_from)
        else:
            from learner.grpo import run_grpo

            result = run_grpo(cfg, run_dir, tracker, init_from)
    except ConfigError as e:  # found once the cluster is known (e.g. not enough GPUs): advice, not a traceback
        tracker.finish("FAILED")
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BaseException:
        tracker.finish("FAILED")
        raise
    summary = {"mode": args.mode, "init_from": str(init_from) if init_from else None, **result,
               "mlflow_run_id": tracker.run_id, "mlflow_tracking_uri": tracker.uri}
    summary_path = run_dir / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    tracker.artifact(summary_path)
    tracker.finish()
    print(summary_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
