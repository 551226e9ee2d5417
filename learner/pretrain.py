"""Pretraining mode: the learner's DeepSpeed engine on captioned images.

kind prox: the proximal-matching loss schedule on (y, t, lam) pairs; kind score: the eps-MSE loss of the score
baseline at t ~ U(t_min, 1). Captions are dropped (empty) with probability cfg_dropout for classifier-free guidance;
an EMA of the weights (if on) is what evaluation samples from and what the checkpoint holds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch

from learner.config import RunConfig
from learner.data import build_source, drop_captions, mirror_pairs
from learner.engine import (
    NonFiniteSteps, build_engine, device, full_state_dict, init_distributed, prepare_ops, train_step,
)
from learner.faults import nonfinite_stop
from learner.ema import ema_metadata, make_ema, update_ema
from learner.bootstrap import bootstrap_ci, ci_metrics
from learner.evaluation import reward_matrix, save_grid
from learner.resume import (
    Resume, config_fingerprint, engine_files, json_bytes, load_engine_files, tensor_bytes, tensors_from, write_state,
)
from learner.progress import steady_range
from learner.signals import STOP
from learner.tracking import Tracker
from proxmodel.losses import LossSchedule, in_loss_space, make_score_pairs, make_training_pairs, mse_loss
from proxmodel.config import ModelConfig
from proxmodel.checkpoint import write_card
from proxmodel.model import ProxT2I, load_model, save_state
from proxmodel.schedule import VPSchedule
from rewards import build as build_reward


GRID_IMAGES = 16  # the final grid shows the first held-out captions' samples; the evaluation scores them all
SIGMA_DATA_SAMPLES = 512  # images whose RMS sets model.sigma_data: its standard error is well under 1%


def fresh_per_step(pc) -> int:
    """New data items a step reads: half the batch with pretrain.mirror_pairs (the other half are their mirrors)."""
    return pc.batch_size // 2 if pc.mirror_pairs else pc.batch_size


@torch.no_grad()
def record_training(model: ProxT2I, source, cfg: RunConfig) -> ModelConfig:
    """The model's config as this run will leave it: sigma_data measured on the data if it has none yet (a loaded
    checkpoint keeps its own: changing it would change the function), and the (t, lam) support it is trained on."""
    mc, pc = model.cfg, cfg.pretrain
    update: dict = {}
    if mc.kind == "prox":
        update.update(trained_steps=list(pc.step_candidates), trained_variants=list(pc.prox_variants),
                      trained_target=pc.target)
        if mc.prox_param == "precond" and mc.sigma_data is None:
            images, _ = source.batch(cfg.data.cursor, SIGMA_DATA_SAMPLES)
            # On the device training will use (the model is still on the CPU here; the VAE follows its input),
            with torch.no_grad():  # in chunks: a VAE on all 512 at once needs ~100 GB
                parts = [model.encode_images(images[i:i + 32].to(device())).double().pow(2)
                         for i in range(0, len(images), 32)]
            squares = sum(float(part.sum()) for part in parts) / sum(part.numel() for part in parts)
            update["sigma_data"] = round(squares ** 0.5, 4)
    return mc.model_copy(update=update)


def export(engine, ema, decay: float, directory: Path, card: Optional[dict] = None) -> Path:
    """Write the checkpoint sampling uses: the EMA weights (with their update count) if EMA is on, else the live ones.
    `card`: how it was made (its README.md); the EMA's decay and update count are added to it."""
    if ema is None:  # gathered: under ZeRO-3 the module itself holds only this rank's shards
        return save_state(full_state_dict(engine), engine.module.cfg, directory, card=card)
    return save_state(ema.module.state_dict(), engine.module.cfg, directory,
                      card={**(card or {}), **ema_metadata(ema, decay)})


def model_card(cfg: RunConfig, init_from: Path | None, tracker: Tracker, iterations: int) -> dict:
    """What the exported checkpoint's README.md says about how it was made."""
    pc = cfg.pretrain
    return {"mode": "pretrain", "base": str(init_from) if init_from else "none (trained from scratch)",
            "iterations": f"{iterations} of {pc.iterations} (batch {pc.batch_size})", "data": cfg.data.kind,
            "config_fingerprint": config_fingerprint(cfg), "mlflow_run_id": tracker.run_id}


def save_run_state(cfg: RunConfig, run_dir: Path, tracker: Tracker, engine, ema, gen: torch.Generator,
                   progress: dict) -> Path:
    """The whole pretraining state after progress["iteration"] steps: DeepSpeed's engine files (weights, optimizer,
    lr schedule), the EMA, the pair/caption-dropout generator and torch's global RNG, counters."""
    files = {f"engine/{name}": data for name, data in engine_files(engine).items()}
    if ema is not None:
        files["ema.safetensors"] = tensor_bytes(ema.state_dict())  # the average and its update count
    rng = {"pairs": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # dropout on a GPU (a text encoder trained with model.text.train) draws from these
        rng.update({f"cuda{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    files["rng.safetensors"] = tensor_bytes(rng)
    files["run.json"] = json_bytes({
        "mode": "pretrain", **progress, "mlflow_run_id": tracker.run_id,
        "data_cursor": cfg.data.cursor + progress["iteration"] * fresh_per_step(cfg.pretrain),
        "config_fingerprint": config_fingerprint(cfg),
    })
    with STOP.deferred():
        return write_state(run_dir, progress["iteration"], files, cfg.pretrain.keep_checkpoints)


def load_run_state(files: dict[str, bytes], engine, ema, gen: torch.Generator) -> dict:
    """Restore what save_run_state wrote; returns its progress (iteration, loss, wall time, resumed_at, the non-finite steps [total, in a row])."""
    load_engine_files(engine, {k.removeprefix("engine/"): v for k, v in files.items() if k.startswith("engine/")})
    if ema is not None:
        ema.load_state_dict(tensors_from(files["ema.safetensors"]))
    rng = tensors_from(files["rng.safetensors"])
    gen.set_state(rng["pairs"])
    torch.set_rng_state(rng["torch"])
    cuda = [rng[f"cuda{i}"] for i in range(len(rng)) if f"cuda{i}" in rng]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    saved = json.loads(files["run.json"])
    return {"nonfinite": [0, 0], **{k: saved[k] for k in ("iteration", "loss", "wall_time_s", "resumed_at", "nonfinite")
                                     if k in saved}}


def run_pretrain(cfg: RunConfig, run_dir: Path, tracker: Tracker, init_from: Path | None,
                 resume: Optional[Resume] = None) -> dict:
    pc = cfg.pretrain
    torch.manual_seed(cfg.seed)
    prepare_ops()
    init_distributed()
    model = load_model(init_from) if init_from else ProxT2I(cfg.model)
    source = build_source(cfg.data, model.cfg.image_size, model.cfg.channels)
    model.cfg = record_training(model, source, cfg)
    mc = model.cfg
    ema = make_ema(model, pc.ema_decay)  # before DeepSpeed sees the model: a full copy under any ZeRO stage
    engine = build_engine(
        model, lr=pc.lr, weight_decay=pc.weight_decay, grad_clip=pc.grad_clip,
        zero_stage=cfg.deepspeed.zero_stage, bf16=cfg.deepspeed.bf16, micro_batch=pc.batch_size,
        lr_lambda=lambda s: min(1.0, (s + 1) / max(1, pc.warmup)),
    )
    if ema is not None:  # beside the weights it averages (on a GPU every update copied them to the CPU)
        ema.to(engine.device)
    dev = device()
    schedule = VPSchedule()
    losses = LossSchedule(pc.iterations, pc.l1_warmup_frac, pc.zeta0)
    gen = torch.Generator().manual_seed(cfg.seed)
    nonfinite = NonFiniteSteps(pc.max_nonfinite_updates)
    progress = {"iteration": 0, "loss": float("nan"), "wall_time_s": 0.0, "resumed_at": [], "nonfinite": [0, 0]}
    if resume is not None and resume.files is not None:
        progress = load_run_state(resume.files, engine, ema, gen)
        progress["resumed_at"].append(progress["iteration"])
        nonfinite.total, nonfinite.in_a_row = progress["nonfinite"]  # a streak continues across a resume
    first, loss_value = progress["iteration"], progress["loss"]
    start = time.time()
    elapsed_before = progress["wall_time_s"]
    steps = steady_range(first, pc.iterations, desc="pretrain", unit="step")  # ETA without the warm-up
    saved_at = first if resume is not None and resume.files is not None else None
    fresh = fresh_per_step(pc)
    with STOP.deferred():  # a signal is acted on at a step's end (STOP.check), never mid-step
        for step in steps:
            images, captions = source.batch(cfg.data.cursor + step * fresh, fresh)
            if pc.mirror_pairs:
                images, captions = mirror_pairs(images, captions)
            x0 = model.encode_images(images.to(dev))  # pixels, or the frozen VAE's latents
            captions = drop_captions(captions, pc.cfg_dropout, gen)
            if mc.kind == "score":
                y, t, xi = make_score_pairs(x0, schedule, pc.score_t_min, gen)
                lam = torch.zeros_like(t)
            else:
                y, t, lam, xi = make_training_pairs(x0, schedule, pc.step_candidates, gen, tuple(pc.prox_variants),
                                                    tie=2 if pc.mirror_pairs else 1, target=pc.target)
            eps, xi = in_loss_space(engine(y, t, lam, tokens=model.tokenize(captions, dev)), xi, t, lam, mc.kind,
                                    schedule, pc.loss_space)
            loss = mse_loss(eps, xi) if mc.kind == "score" else losses.loss(step, eps, xi)
            train_step(engine, loss)
            applied = engine.was_step_applied()  # False: a non-finite loss or gradient, the step skipped
            nonfinite.record(applied)
            if ema is not None and applied:
                update_ema(ema, engine)
            loss_value = loss.item()
            if not applied:
                tracker.metrics({"nonfinite_updates": nonfinite.total}, step=step)
                if nonfinite.exceeded:  # the last run state is kept as it is
                    raise nonfinite_stop(run_dir, nonfinite.in_a_row, "pretrain.max_nonfinite_updates", "pretrain.lr")
            if step % pc.log_every == 0 or step == pc.iterations - 1:
                kind, zeta = ("mse", 0.0) if mc.kind == "score" else losses.stage(step)
                elapsed = time.time() - start
                tracker.metrics(
                    {f"loss_{kind}": loss_value, "loss": loss_value, "zeta": zeta, "lr": engine.get_lr()[0],
                     "samples_per_s": (step + 1 - first) * pc.batch_size / elapsed,
                     **({"nonfinite_updates": nonfinite.total} if nonfinite.total else {})},  # 0: not logged
                    step=step,
                )
                steps.bar.set_postfix(loss=f"{loss_value:.4f}", stage=kind)
            progress.update(iteration=step + 1, loss=loss_value, wall_time_s=elapsed_before + time.time() - start,
                            nonfinite=[nonfinite.total, nonfinite.in_a_row])
            if (step + 1) % pc.checkpoint_every == 0 or STOP.requested:
                export(engine, ema, pc.ema_decay, run_dir / "checkpoint", model_card(cfg, init_from, tracker, step + 1))
                save_run_state(cfg, run_dir, tracker, engine, ema, gen, progress)
                saved_at = step + 1
            STOP.check()  # a signal during the step is acted on here, once the step's state is saved
    wall = progress["wall_time_s"]
    if saved_at != pc.iterations:  # the end: the final evaluation can be resumed too
        save_run_state(cfg, run_dir, tracker, engine, ema, gen, progress)
    card = model_card(cfg, init_from, tracker, pc.iterations)
    checkpoint = export(engine, ema, pc.ema_decay, run_dir / "checkpoint", card)

    prompts = source.eval_prompts(pc.eval_prompts)
    rewards = {r.name: build_reward(r.name, **r.options) for r in cfg.rewards}
    sampled = ema.module if ema is not None else load_model(checkpoint)  # whole weights under any ZeRO stage
    images, matrices = reward_matrix(sampled, prompts, pc.sample_steps, cfg.seed, pc.eval_seeds, rewards,
                                     sampler=pc.eval_sampler, guidance=pc.eval_guidance)
    held_out = {name: bootstrap_ci(m).as_dict() for name, m in matrices.items()}
    scores = {name: v["mean"] for name, v in held_out.items()}
    if ema is not None:
        card.update(ema_metadata(ema, pc.ema_decay))
    card["held_out_rewards"] = {"prompts": len(prompts), "seeds": pc.eval_seeds,
                                "sampler": pc.eval_sampler or "default", "steps": pc.sample_steps, "mean": scores,
                                "ci95": {name: [v["ci_low"], v["ci_high"]] for name, v in held_out.items()}}
    write_card(checkpoint, mc, card)
    tracker.folder(checkpoint, "checkpoint")
    tracker.image(save_grid(images[:GRID_IMAGES], run_dir / "samples.png"), "samples.png")
    tracker.metrics(ci_metrics("eval_reward", matrices), step=pc.iterations)
    return {
        "iterations": pc.iterations,
        "device": str(dev),
        "wall_time_s": wall,
        "samples_per_s": pc.iterations * pc.batch_size / wall,
        "checkpoint": str(checkpoint.resolve()),
        "loss_final": loss_value,
        "data_cursor": cfg.data.cursor + pc.iterations * fresh_per_step(pc),  # data.cursor that continues this run
        "eval_reward": scores,
        "eval": {"prompts": len(prompts), "seeds": pc.eval_seeds, "level": 0.95, "rewards": held_out},
        "resumed_at": progress["resumed_at"],
    }
