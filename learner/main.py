"""The command line and the driver: `python -m learner.main --mode {pretrain,grpo,sample} [--config X.yaml] [key=value ...]`,
or `python -m learner.main --resume RUN_DIR [key=value ...]` to continue a stopped run exactly (learner/resume.py).

Every run gets a directory (run_dir) holding its resolved config, checkpoint, sample grid and summary.json; the
summary's path is the last line printed, so scripts can find the results. SIGINT / SIGTERM write a run state and
stop every process the run started; the one line printed names the resume command. Bad input (config, prompt file, data,
checkpoint, reward options) is found by `preflight` before the run directory or the MLflow run exists: the CLI then
prints one paragraph naming the problem and exits 2, having written nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from learner import env  # noqa: F401  (sets the offline, no-telemetry environment first)
from learner.config import (
    ConfigError, RunConfig, describe_keys, did_you_mean, dump_config, load_config, schema_keys, sections,
)
from actors.redaction import redact
from learner.faults import RunFailed
from learner.signals import STOP, Interrupted
from proxmodel.config import SAMPLERS, ModelConfig, architecture_problem

BUILTIN_PREFIX = "builtin:"
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "proxmodel" / "weights"
GRPO_DEFAULT_INIT = "builtin:scenes-minilm-bind3"  # binds two colours to their places: held-out 0.90 (bind2 0.85)


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
    from proxmodel.checkpoint import INDEX_FILE, missing_files

    path = Path(ref).expanduser()
    missing = missing_files(path) if path.is_dir() else []
    if not path.is_dir() or missing:
        what = "does not exist" if not path.exists() else f"is not a checkpoint folder (it lacks {' and '.join(missing)})"
        if path.is_dir() and not missing_files(path / "checkpoint"):
            raise ConfigError(f"init_from={ref!r} is a run's folder; its checkpoint is "
                              f"init_from={path / 'checkpoint'}.")
        raise ConfigError(
            f"init_from={ref!r} {what}. A checkpoint is a folder with {INDEX_FILE}, unet/, text_encoder/ and "
            f"scheduler/ (or, from earlier versions, model.safetensors and config.json): use the 'checkpoint' path "
            f"from a pretrain run's summary.json, or builtin:scenes-minilm-bind3; copy a checkpoint whole."
        )
    return path


def with_checkpoint_model(cfg: RunConfig, model: ModelConfig, init_from: Path, overrides: list[str]) -> RunConfig:
    """`cfg` with the model the run will use, init_from's own config `model` (every model.* setting of the config is
    then unused), so config.yaml and the MLflow params record the model that trains, not the config file's; model.*
    overrides on the command line are said to be ignored."""
    from proxmodel.checkpoint import config_file

    ignored = [item for item in overrides if item.split("=", 1)[0].startswith("model.")]
    if ignored:
        print(f"warning: {', '.join(ignored)} ignored: the model is init_from's, as {config_file(init_from)} "
              "describes it", file=sys.stderr)
    return cfg.model_copy(update={"model": model})


def checkpoint_config(init_from: Path) -> ModelConfig:
    """The architecture a checkpoint records; a clear error if its JSON is not valid or not a model config."""
    from proxmodel.checkpoint import config_file, read_config

    path = config_file(init_from)
    try:
        return read_config(init_from)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        problem = f"{where + ': ' if where else ''}{first['msg']}"
    except ValueError as e:  # invalid JSON (json.JSONDecodeError)
        problem = f"Invalid JSON: {e}"
    raise ConfigError(
        f"init_from: {path} is not a valid model config ({problem}). "
        f"Restore the file the checkpoint was saved with, or point init_from at another checkpoint."
    )


def check_weights(model: ModelConfig, init_from: Path | None) -> None:
    """Without loading a single weight: the safetensors header opens, and (for architectures with no pretrained
    parts) its tensor names and shapes are those of the model built on the meta device. From scratch, only the build."""
    import torch

    from proxmodel.checkpoint import config_file, tensor_shapes
    from proxmodel.model import ProxT2I

    expected: dict[str, tuple[int, ...]] | None = None
    problem = architecture_problem(model)  # also where the build below would read pretrained parts' files
    if problem:
        where = f"the checkpoint's {config_file(init_from)}" if init_from else "the model section"
        raise ConfigError(f"{where} describes a model that cannot be built: {problem}.")
    if model.vae is None and model.text.pretrained == "none":  # pretrained parts would read their files
        try:
            with torch.device("meta"):
                expected = {k: tuple(v.shape) for k, v in ProxT2I(model).state_dict().items()}
        except (ValueError, RuntimeError, TypeError) as e:
            where = f"the checkpoint's {config_file(init_from)}" if init_from else "the model section"
            raise ConfigError(f"{where} describes a model that cannot be built ({type(e).__name__}: {e}). Change its sizes; "
                              f"`--list-keys model` shows each key's meaning.") from None
    if init_from is None:
        return
    from safetensors import SafetensorError

    try:
        found = tensor_shapes(init_from)  # reads the headers only
    except (SafetensorError, OSError) as e:
        raise ConfigError(
            f"init_from: a weights file of {init_from} is not a readable safetensors file ({type(e).__name__}: "
            f"{str(e)[:200]}); it is truncated or of another format. Copy the checkpoint again, or re-export it with "
            f"--mode pretrain."
        ) from None
    if expected is not None and found != expected:
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        shapes = [f"{k}: file {list(found[k])}, config {list(expected[k])}"
                  for k in sorted(set(found) & set(expected)) if found[k] != expected[k]]
        detail = "; ".join(part for part in (
            f"{len(missing)} tensor(s) missing, e.g. {missing[0]}" if missing else "",
            f"{len(extra)} unexpected, e.g. {extra[0]}" if extra else "",
            f"{len(shapes)} of another shape, e.g. {shapes[0]}" if shapes else "") if part)
        raise ConfigError(
            f"init_from: the weights in {init_from} do not fit the architecture in {config_file(init_from)} ({detail}). "
            f"That file is not the one these weights were saved with; restore it or use another checkpoint."
        )


def check_data(cfg: RunConfig, model: ModelConfig, mode: str) -> None:
    """Training data opened as the run opens it (folder captions read, shards listed), before anything is written:
    pretraining's, or GRPO's data anchor's. Pretraining ends by scoring samples of the data's captions with
    cfg.rewards, so those must read them (a scene verifier on photo captions failed after the whole run); a resumed
    run (mode "resume") is not held to that, as its rewards cannot change."""
    from learner.data import build_source

    try:
        source = build_source(cfg.data, model.image_size, model.channels)
        captions = source.eval_prompts(16) if mode == "pretrain" else None
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{e}") from None
    if captions is not None:
        check_prompts_scoreable(cfg, captions, f"data.kind={cfg.data.kind} (the final samples' captions)")


def check_rewards(cfg: RunConfig, mode: str) -> None:
    """Every reward's weights and options are checked here, before any actor or model starts; in GRPO also the
    held-out checks and the direct objective's reward, which are built by name alone (no options)."""
    from rewards.base import preflight

    for i, spec in enumerate(cfg.rewards):
        try:
            preflight(spec.name, spec.options)
        except (FileNotFoundError, ValueError, TypeError) as e:
            raise ConfigError(f"rewards[{i}] ({spec.name}): {e}") from None
    if mode != "grpo":
        return
    trained = [spec.name for spec in cfg.rewards]
    if cfg.grpo.objective == "direct":  # its gradient is direct_reward's, whatever the rewards mix measures
        trained.append(cfg.grpo.direct_reward)
    for i, name in enumerate(cfg.grpo.check_rewards):
        if name in trained:
            rest = [c for c in cfg.grpo.check_rewards if c not in trained]
            raise ConfigError(f"grpo.check_rewards[{i}]={name!r} is also trained on (rewards: {trained}): a check must "
                              f"be a reward the run does not optimise. Set grpo.check_rewards=[{', '.join(rest)}], or "
                              "train on another reward.")
    for key, name in rewards_built_by_name(cfg):
        try:
            preflight(name, {})
        except (FileNotFoundError, ValueError, TypeError) as e:
            raise ConfigError(f"{key}={name!r} is built by its name alone, without options, and cannot be: {e}. "
                              "Use a reward that needs no options there (e.g. compositional_strict, "
                              "compositional_count, jpeg_compressibility), or remove it.") from None


def rewards_built_by_name(cfg: RunConfig) -> list[tuple[str, str]]:
    """(config key, reward name) of GRPO's rewards built without options: the held-out checks, the direct reward."""
    g = cfg.grpo
    named = [(f"grpo.check_rewards[{i}]", name) for i, name in enumerate(g.check_rewards)]
    return named + ([("grpo.direct_reward", g.direct_reward)] if g.objective == "direct" else [])


def check_prompts_scoreable(cfg: RunConfig, prompts, source: str) -> None:
    """A reward that reads a caption grammar (the scenes' verifiers) must be able to read every prompt it will
    score: a free-text prompt failed inside every reward actor at the first scoring (GRPO), or after the first
    images were written (`--mode sample` with sample.score)."""
    from rewards.base import reward_class

    names = [(f"rewards[{i}]", r.name) for i, r in enumerate(cfg.rewards)]
    if source == "grpo.prompt_file":
        names += rewards_built_by_name(cfg)
    for key, name in names:
        check = getattr(reward_class(name), "check_prompts", None)
        if check is None:
            continue
        try:
            check(prompts)
        except ValueError as e:
            advice = (" and set grpo.check_rewards to [] or to such rewards" if source == "grpo.prompt_file"
                      else ", or sample.score=false" if source.startswith("sample.") else "")
            raise ConfigError(f"{key}={name!r} cannot score the prompts of {source}: {e}. Use rewards that read any "
                              f"text there (e.g. hpsv2, pickscore, clip_score){advice}, or keep to the scene caption "
                              "grammar.") from None


def check_model_files(model: ModelConfig, init_from: Path | None) -> None:
    """The local folders the model reads when it is built (VAE, pretrained text encoder), checked before anything is
    written; the torch-heavy modules are imported only when such a folder is configured."""
    try:
        if model.vae:
            from proxmodel.latent import vae_config

            try:
                vae_channels = vae_config(model.vae).get("in_channels", 3)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            if vae_channels != model.channels:  # else: a raw conv error at the first encoded batch
                raise ConfigError(f"model.channels={model.channels}, but the VAE at model.vae={model.vae!r} encodes "
                                  f"{vae_channels}-channel images: set model.channels={vae_channels}, or use a VAE "
                                  f"made for {model.channels} channel(s).")
        if model.text.pretrained != "none":
            from proxmodel.text import check_text_files

            check_text_files(model.text)
    except FileNotFoundError as e:
        from proxmodel.checkpoint import config_file

        where = f" (from {config_file(init_from)})" if init_from is not None else ""
        raise ConfigError(f"{e}{where}") from None


def prepare_run_dir(cfg: RunConfig, mode: str) -> Path:
    from learner.resume import RUN_FILE, hold_run_dir, resume_command

    run_dir = Path(cfg.run_dir or f"runs/{mode}-{time.strftime('%Y%m%d-%H%M%S')}").expanduser().resolve()

    def holds_no_run() -> None:
        if (run_dir / "summary.json").exists():
            raise ConfigError(
                f"run_dir {run_dir} already holds a finished run (summary.json); it is left as it is. "
                f"Choose another run_dir=... or omit it to get a fresh one."
            )
        if (run_dir / RUN_FILE).exists():  # a new run there would overwrite its config and mix its run states
            raise ConfigError(f"run_dir {run_dir} holds a run that has not finished ({RUN_FILE}); it is left as it "
                              f"is. Continue it with `{resume_command(run_dir)}`, or choose another run_dir=...")

    if cfg.run_dir is not None:  # (a default name is always a new folder: fresh_dir)
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"run_dir {run_dir} is a file, not a folder. Choose another run_dir=... or omit it.")
        holds_no_run()
    try:
        if cfg.run_dir is None:  # two runs started in the same second get two folders
            run_dir = fresh_dir(run_dir)
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
        hold_run_dir(run_dir)  # before writing: two runs started on one run_dir would overwrite each other's files
        holds_no_run()  # again, now that no other driver can be starting or ending there
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    except OSError as e:
        raise ConfigError(f"run_dir {run_dir} cannot be written ({e.strerror or e}). Choose a writable run_dir=...") from None
    return run_dir


def fresh_dir(base: Path) -> Path:
    """`base`, or `base`-2, -3, ... : the first that did not exist, created (atomically, by mkdir)."""
    for n in range(1, 10_000):
        candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            continue
    raise OSError(f"no free folder name next to {base}")


def preflight(cfg: RunConfig, mode: str, resuming: bool = False) -> tuple[Path | None, ModelConfig]:
    """Every file and option the run will read, checked in the order a user would fix them; returns init_from and
    the model's config (init_from's own, which wins over the config's model section).
    `resuming`: a check of the run's rewards against its data is skipped (a started run cannot change them)."""
    check_rewards(cfg, mode)
    if mode == "grpo":
        from learner.prompts import FilePrompts, prompt_source  # imports torch (through rewards): for a good config

        source = prompt_source(cfg)  # reads and checks a prompt file
        if isinstance(source, FilePrompts):
            check_prompts_scoreable(cfg, source.train_set + source.eval_set, "grpo.prompt_file")
    if mode == "sample" and cfg.sample.prompt_file:
        from learner.prompts import read_prompt_file

        prompts = read_prompt_file(cfg.sample.prompt_file, "sample.prompt_file")
        if cfg.sample.score:
            check_prompts_scoreable(cfg, prompts, "sample.prompt_file")
    if mode == "sample" and cfg.sample.score and cfg.sample.prompts:
        check_prompts_scoreable(cfg, cfg.sample.prompts, "sample.prompts")
    init_from = resolve_checkpoint(cfg.init_from or (GRPO_DEFAULT_INIT if mode in ("grpo", "sample") else None))
    model = checkpoint_config(init_from) if init_from is not None else cfg.model  # a checkpoint's config wins
    check_model_files(model, init_from)
    if mode == "pretrain" or (mode == "grpo" and cfg.grpo.data_anchor > 0):
        check_data(cfg, model, mode if not resuming else "resume")
        check_loss_space(cfg, model)  # (the anchor measures its loss in pretraining's loss space)
    check_sampler(cfg, model, mode)
    check_weights(model, init_from)
    if mode == "grpo":
        if cfg.grpo.stop_on_hacking and not cfg.grpo.eval_every and not resuming:
            print("warning: grpo.stop_on_hacking=true with grpo.eval_every=0 evaluates only at the start and the end, "
                  "so the run cannot stop early; it only exports the start's weights if the end looks hacked. Set "
                  "grpo.eval_every (e.g. 10) to stop at the first evaluation that does.", file=sys.stderr)
        check_policy_model(cfg, model)
        check_module_names(cfg, init_from)
        check_redis(cfg)
    return init_from, model


def check_module_names(cfg: RunConfig, init_from: Path | None) -> None:
    """grpo.lora.targets and grpo.train_modules must name U-Net modules (read off the checkpoint's tensor names):
    a misspelt one was found only when the learner actor started, after Ray and the rollouts."""
    from proxmodel.checkpoint import tensor_shapes
    from proxmodel.lora import named_by

    g = cfg.grpo
    keys = {"grpo.lora.targets": g.lora.targets if g.lora.rank else [], "grpo.train_modules": g.train_modules or []}
    if init_from is None or not any(keys.values()):
        return
    owners = {name.removeprefix("unet.").rsplit(".", 1)[0] for name in tensor_shapes(init_from)
              if name.startswith("unet.")}  # the modules holding weights: what LoRA can adapt
    parts = [owner.split(".") for owner in owners]
    containers = owners | {".".join(p[:i]) for p in parts for i in range(1, len(p))}  # train_modules may name these
    for key, targets in keys.items():
        modules = owners if key == "grpo.lora.targets" else containers
        unknown = [t for t in targets if not any(named_by(m, [t]) for m in modules)]
        if unknown:
            raise ConfigError(f"{key}: {unknown} name no module of the U-Net in {init_from}; use the last parts of "
                              "module names such as attn2.to_k, attn2.to_v, to_out.0, conv1.")


def check_redis(cfg: RunConfig) -> None:
    """A configured redis.url must answer (with the password from redis.password_env) before Ray and the actors
    start: unreachable, it surfaced as a traceback from the first stream call."""
    if cfg.redis.url:
        from actors.stream import RedisAddress

        try:
            RedisAddress(url=cfg.redis.url, password=os.environ.get(cfg.redis.password_env)).connect().close()
        except ConnectionError as e:  # its message names the URL (password masked) and the fix
            raise ConfigError(str(e)) from None


def check_sampler(cfg: RunConfig, model: ModelConfig, mode: str) -> None:
    """pretrain.eval_sampler / sample.sampler must be a sampler of the model's kind (known only here, where a
    checkpoint's kind wins over model.kind): found out after training, a wrong one cost the run its summary."""
    key, sampler = {"pretrain": ("pretrain.eval_sampler", cfg.pretrain.eval_sampler),
                    "sample": ("sample.sampler", cfg.sample.sampler)}.get(mode, (None, None))
    if sampler is not None and sampler not in SAMPLERS[model.kind]:
        raise ConfigError(f"{key}={sampler} is not a sampler of a {model.kind} model; use one of "
                          f"{list(SAMPLERS[model.kind])}, or null for the default.")
    if sampler == "backward":  # found out after training (pretrain) or after the run started (sample)
        from proxmodel.sampler import check_backward_grid
        from proxmodel.schedule import VPSchedule

        steps_key, steps = (("pretrain.sample_steps", cfg.pretrain.sample_steps) if mode == "pretrain"
                            else ("sample.steps", cfg.sample.steps))
        try:
            check_backward_grid(VPSchedule().grid(steps))
        except ValueError as e:
            raise ConfigError(f"{key}=backward with {steps_key}={steps}: {e}") from None


def check_loss_space(cfg: RunConfig, model: ModelConfig) -> None:
    """pretrain.loss_space=x0 with the drawn-noise target: refused for a prox model, the kind it applies to (known
    only here, where a checkpoint's kind wins over model.kind); a score model has no target option."""
    pc = cfg.pretrain
    if model.kind == "prox" and pc.loss_space == "x0" and pc.target != "conditional":
        raise ConfigError("pretrain.loss_space=x0 needs pretrain.target=conditional for a prox model: the drawn noise "
                          "target's residual is mostly unpredictable noise, which the x0 scaling would amplify up to "
                          "300x. Set pretrain.target=conditional or pretrain.loss_space=eps.")


def check_policy_model(cfg: RunConfig, model: ModelConfig) -> None:
    """The GRPO objective and sampler must be ones this model kind has learned: forward and direct are prox-only
    (forward regresses the prox pairs y = x_t + sqrt(lam) xi, which a score model, trained on x_t alone with lam = 0,
    would fit to the wrong target, silently); grpo.stochastic_steps switches the rollouts to the probability-flow ODE,
    which the model must have been trained on; grpo.credit_block must tile the model's images or latents."""
    block = cfg.grpo.credit_block
    if block > 1:
        from proxmodel.latent import model_side

        side = model_side(model.image_size, model.vae)
        if side % block:
            raise ConfigError(f"grpo.credit_block={block} does not divide the model's {side}x{side} "
                              f"{'latents' if model.vae else 'images'}; use a divisor of {side} (e.g. "
                              f"{max(d for d in range(1, block) if side % d == 0)}), or 1.")
    if cfg.grpo.objective in ("forward", "direct") and model.kind != "prox":
        raise ConfigError(f"grpo.objective={cfg.grpo.objective} trains a prox model's proximal operator; this model "
                          f"is kind {model.kind}. Use grpo.objective=policy_gradient (with grpo.stochastic_steps: "
                          "null) for a score model.")
    k = cfg.grpo.stochastic_steps
    if k is None:
        return
    if model.kind != "prox":
        raise ConfigError(f"grpo.stochastic_steps={k} is for prox models (the rest of the chain is the prox "
                          f"probability-flow step); this model is kind {model.kind}. Set grpo.stochastic_steps: null.")
    if "flow" not in (model.trained_variants or []):
        raise ConfigError(f"grpo.stochastic_steps={k} runs the sampler's later steps as the probability-flow ODE, but "
                          f"this model was trained on {model.trained_variants or 'the hybrid steps only'}. Pretrain "
                          "with pretrain.prox_variants including flow (the default), or set grpo.stochastic_steps: null.")


def settings_help() -> str:
    """The --help epilog, from the schema: one line per config section and how to see every key."""
    width = max(len(name) for name, _ in sections())
    lines = [f"  {name:<{width}}  {text}" for name, text in sections()]
    top = [k for k, _ in schema_keys() if "." not in k and "[" not in k]
    return (
        "config sections (set any key with section.key=value after the options, e.g. grpo.lr=5e-5):\n"
        + "\n".join(lines) + f"\n  top-level keys: {', '.join(top)}\n\n"
        "--list-keys [SECTION] prints every key with its type, default and meaning; --print-config prints the\n"
        "resolved config. Bad input exits with status 2 and a message, before anything is written."
    )


def list_keys(section: str) -> int:
    names = sorted({k.split(".")[0].removesuffix("[]") for k, _ in schema_keys()})
    if section and not schema_keys(section):
        print(f"error: no config section or key {section!r}{did_you_mean(section, names)}; the sections are "
              f"{', '.join(n for n, _ in sections())}.", file=sys.stderr)
        return 2
    print(describe_keys(section or None))
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m learner.main",
        description="Pretrain (proximal matching) or reward-fine-tune (GRPO) a proximal text-to-image model.",
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--mode", choices=("pretrain", "grpo", "sample"),
                        help="what to run (required to run); sample: images from init_from, no training")
    parser.add_argument("--resume", metavar="RUN_DIR", default=None,
                        help="continue the run in RUN_DIR from its last run state, with its saved config (only "
                             "overrides that cannot change the result are accepted, e.g. grpo.iterations=N)")
    parser.add_argument("--config", default=None, help="YAML config (default: the embedded configs/default.yaml)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config (YAML) and exit")
    parser.add_argument("--list-keys", nargs="?", const="", metavar="SECTION",
                        help="print every key (or SECTION's) with its type, default and meaning, and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. grpo.iterations=5")
    args = parser.parse_args(argv)
    if args.mode is None and args.resume is None and not args.print_config and args.list_keys is None:
        parser.error("--mode is required: --mode pretrain, grpo or sample (or --resume RUN_DIR, --print-config, "
                     "--list-keys)")
    if args.resume is not None and args.config is not None:
        parser.error("--resume uses the run's own config.yaml: drop --config")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_keys is not None:
        return list_keys(args.list_keys)
    from learner.resume import release_run_dirs

    try:
        return _main(args)
    finally:
        release_run_dirs()


def _main(args: argparse.Namespace) -> int:
    from learner.resume import open_resume, rewrite_config

    resume, mode = None, args.mode
    try:
        if args.resume is not None:
            cfg, resume = open_resume(args.resume, args.overrides, args.mode)
            mode = resume.mode
        else:
            cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        init_from, model = preflight(cfg, mode, resuming=resume is not None)
        if resume is None:
            if init_from is not None:
                cfg = with_checkpoint_model(cfg, model, init_from, args.overrides)
            run_dir = prepare_run_dir(cfg, mode)
        else:
            run_dir = resume.run_dir
            if args.overrides:
                rewrite_config(run_dir, args.overrides, resume.persistable)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run(cfg, mode, run_dir, init_from, resume)


def release_unstarted(run_dir: Path, resume) -> str:
    """A new run refused before it saved anything (a config the cluster cannot place): its config.yaml and run.json
    go, so the same run_dir takes the corrected command (kept, they made it a run to --resume, which refuses a
    changed config). Returns what to add to the error."""
    from learner.resume import RUN_FILE, complete_states

    if resume is not None or complete_states(run_dir):
        return ""
    for name in (RUN_FILE, "config.yaml"):
        (run_dir / name).unlink(missing_ok=True)
    return f" Nothing was trained; {run_dir} takes the corrected command."


def interrupted_message(signum: int, run_dir: Path) -> str:
    """One line: which signal, what was saved, the command that continues the run."""
    import signal

    from learner.resume import complete_states, resume_command

    states = complete_states(run_dir)
    saved = (f"run state {states[-1]} saved" if states else "no run state yet (resuming starts it again)")
    return f"interrupted by {signal.Signals(signum).name}: {saved}; continue with: {resume_command(run_dir)}"


def failed_note(run_dir: Path) -> str:
    """What an unforeseen error leaves behind: the last run state and the command that continues from it."""
    from learner.resume import complete_states, resume_command

    states = complete_states(run_dir)
    if not states:
        return f"No run state was saved in {run_dir} yet: once the cause is fixed, start the run again."
    return (f"The run's last state ({states[-1]}) is kept in {run_dir}: once the cause is fixed, continue with "
            f"`{resume_command(run_dir)}`.")


def run(cfg: RunConfig, mode: str, run_dir: Path, init_from: Path | None, resume) -> int:
    """Run a mode under the MLflow run, write summary.json; on SIGINT/SIGTERM a run state and one line (no
    traceback), exit status 128 + the signal's number."""
    # Heavy imports only once the config is known to be good: a typo fails in a second, not after torch loads.
    from learner.resume import write_run_file
    from learner.tracking import Tracker

    STOP.install()
    tracker = None
    try:
        tracker = Tracker(cfg, mode, run_dir, (resume.mlflow_run_id, resume.tracking_uri) if resume else None,
                          init_from)
        if resume is None:
            write_run_file(run_dir, mode, tracker.run_id, tracker.uri)
        if mode == "pretrain":
            from learner.pretrain import run_pretrain

            result = run_pretrain(cfg, run_dir, tracker, init_from, resume)
        elif mode == "sample":
            from learner.sample import run_sample

            result = run_sample(cfg, run_dir, tracker, init_from)
        else:
            from learner.grpo import run_grpo

            result = run_grpo(cfg, run_dir, tracker, init_from, resume)
        with STOP.deferred():  # the run is done: a signal now must not leave half a summary
            summary = {"mode": mode, "init_from": str(init_from) if init_from else None, **result,
                       "mlflow_run_id": tracker.run_id, "mlflow_tracking_uri": tracker.uri,
                       "mlflow_calls_dropped": tracker.dropped}
            summary_path = run_dir / "summary.json"
            tmp = run_dir / ".summary.json.tmp"
            tmp.write_text(json.dumps(redact(summary), indent=2) + "\n")
            tmp.replace(summary_path)
            tracker.artifact(summary_path)
            tracker.finish()
    except ConfigError as e:  # found once the cluster is known (e.g. not enough GPUs): advice, not a traceback
        if tracker is not None:
            tracker.finish("FAILED")
        print(f"error: {e}{release_unstarted(run_dir, resume)}", file=sys.stderr)
        return 2
    except RunFailed as e:  # a fault the run detected (e.g. non-finite updates): its message says what to do
        if tracker is not None:
            tracker.finish("FAILED")
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        STOP.ignore()  # the run state is written and the processes are stopped: only the last line is left
        if tracker is not None:
            tracker.finish("KILLED")
        print(interrupted_message(e.signum, run_dir), file=sys.stderr)
        return 128 + e.signum
    except BaseException as e:
        if tracker is not None:
            tracker.finish("FAILED")
        if isinstance(e, Exception):  # a failure the run did not foresee: its traceback, then what is kept
            note = failed_note(run_dir)
            if hasattr(e, "add_note"):  # Python 3.11+: printed under the traceback
                e.add_note(note)
            else:  # Python 3.10: the traceback, then the note, the same exit status
                import traceback

                traceback.print_exc()
                print(note, file=sys.stderr)
                raise SystemExit(1) from None
        raise
    finally:
        STOP.uninstall()
    from learner.report import REPORTS

    if mode in REPORTS:  # the numbers to look at first, above the path (the last line: scripts read it)
        print("\n".join(REPORTS[mode](json.loads(summary_path.read_text()))))
    print(summary_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
