"""The run config: a typed schema (every field says what it is), YAML files and dotted `key=value` overrides.

Unknown keys (with the closest valid one), wrong types, NaN/inf and values out of range or inconsistent with each
other are rejected with a message naming the key, the value and what is allowed; nothing runs on a config it cannot
read. The schema is also the documentation: `python -m learner.main --list-keys` prints it (`describe_keys`).
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.fields import FieldInfo

from actors.redaction import redact
from proxmodel.config import DEFAULT_LORA_TARGETS, SAMPLERS, LoraSpec, ModelConfig, Strict

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"

# The sampler names, from the one list in proxmodel.config (Literal[("a", "b")] is Literal["a", "b"]).
ProxSampler = Literal[SAMPLERS["prox"]]
AnySampler = Literal[SAMPLERS["prox"] + SAMPLERS["score"]]


class ConfigError(Exception):
    """A config that cannot be used; the message names the key and the fix, with any URL password masked (the
    message may quote a user's override, e.g. a tracking URI with credentials)."""

    def __init__(self, message: str = "", *args) -> None:
        super().__init__(redact(str(message)), *args)


class DataConfig(Strict):
    kind: Literal["scenes", "digits", "folder", "webdataset"] = Field(
        "scenes", description="scenes: the built-in synthetic captioned scenes; digits: scikit-learn's 1797 "
        "handwritten digits ('a handwritten digit k'); folder: image files with same-stem .txt captions under "
        "data.path; webdataset: tar shards (key.jpg/png/webp + key.txt [+ key.json], the LAION layout) at data.path",
    )
    path: Optional[str] = Field(
        None, description="folder: the image folder; webdataset: a folder of .tar shards, one .tar, or a brace "
        "pattern like /data/shards/{00000..00099}.tar",
    )
    seed: int = Field(0, ge=0, description="seed of the data order (scenes: scene i is a pure function of (seed, i))")
    omit_prob: float = Field(0.3, ge=0, le=1, description="scenes: chance a caption leaves out a size/position/background")
    binding_share: float = Field(
        0.0, ge=0, le=1, description="scenes: share of training scenes with two objects of two colours, each at a "
        "place the caption states (about 1 in 5 otherwise), so the model learns which colour goes where: 1200 steps "
        "at 0.5 took builtin:scenes-minilm-x0-4200's two colours from chance to bound and its held-out verifier "
        "0.68 -> 0.81 (builtin:scenes-minilm-bind), 1200 steps more 0.85 (builtin:scenes-minilm-bind2), 1200 more "
        "0.90 (builtin:scenes-minilm-bind3; docs/results.md); a fourth 1200 added nothing. Evaluation prompts keep "
        "the ordinary mix",
    )
    holdout: float = Field(
        0.1, ge=0, lt=1, description="digits, folder: fraction held out of training (fixed by seed); evaluation "
        "prompts are its captions",
    )
    cursor: int = Field(
        0, ge=0, description="index in the data stream of the first training sample; a pretrain run's summary.json "
        "gives data_cursor, the value that continues where it stopped",
    )

    @model_validator(mode="after")
    def _check_path(self) -> "DataConfig":
        if self.kind in ("folder", "webdataset") and not self.path:
            raise ValueError(f"data.kind={self.kind} reads its files from data.path; set data.path=/your/data")
        if self.binding_share and self.kind != "scenes":
            raise ValueError(f"data.binding_share draws synthetic scenes; data.kind={self.kind} has its own images: "
                             "set data.binding_share=0 (or data.kind=scenes)")
        return self


class PretrainConfig(Strict):
    iterations: int = Field(2000, ge=1, description="optimiser steps")
    batch_size: int = Field(32, ge=1, description="images per step (per learner rank)")
    lr: float = Field(5e-4, gt=0, description="AdamW learning rate (linear warm-up, then constant)")
    warmup: int = Field(100, ge=0, description="learning-rate warm-up steps")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, gt=0, description="gradient-norm clipping")
    max_nonfinite_updates: int = Field(
        3, ge=1, description="an optimiser step whose loss or gradient is NaN/inf is skipped (weights unchanged, "
        "counted as the MLflow metric nonfinite_updates); this many in a row stop the run, keeping its last run state",
    )
    step_candidates: list[int] = Field(
        [5, 10, 20], min_length=1, description="sampler step counts N whose (t, lam) pairs are trained (weights "
        "N^1/3); a sampler on another grid queries the prox off its training support"
    )
    prox_variants: list[ProxSampler] = Field(
        ["hybrid", "flow"], min_length=1, description="prox samplers whose lam values are trained, each pair picking "
        "one: hybrid lam = gamma (the stochastic sampler, GRPO's policy); flow lam = gamma/2 (the deterministic "
        "probability-flow sampler); backward lam = gamma / (1 - gamma/2), only for step candidates with every "
        "gamma < 2, i.e. N >= 10 at beta_max = 20"
    )
    l1_warmup_frac: float = Field(0.33, ge=0, lt=1, description="fraction of training with the L1 loss")
    zeta0: float = Field(1.0, gt=0, description="proximal-matching zeta of the first stage; the second uses zeta0/2")
    target: Literal["noise", "conditional"] = Field(
        "conditional", description="kind prox: the regression target of eps. conditional: E[xi | x0, y], the same "
        "conditional mean as the drawn noise without the noise of how y's noise splits between x_t and xi, which "
        "otherwise drowns the caption's share of the gradient (a documented deviation from ProxDM; on the digits it "
        "took caption accuracy at 10 steps from chance to 0.58, docs/results.md); noise: the drawn xi (ProxDM)"
    )
    loss_space: Literal["eps", "x0"] = Field(
        "eps", description="target conditional (kind prox): where the loss measures the prediction's error. eps: as "
        "ProxDM. x0: each pair's eps residual divided by min(k, 1), k = sqrt(lam alpha_t) / (1 - alpha_t + lam) "
        "the weight of x0 in the target, i.e. the error of the clean image the prediction implies: at the noisiest "
        "pairs, where the layout is decided, x0 has 0.004-0.04 of the eps target and a caption's place word hardly "
        "reaches the eps loss. 1800 steps of it from scenes-minilm took the place word's share 0.25 -> 0.47 and the "
        "held-out verifier 0.41 -> 0.50 (docs/results.md, Session 25); not yet measured from scratch. Kind score: "
        "the eps-MSE residual divided by min(k, 1), k = sqrt(alpha_t / (1 - alpha_t)), the same clean-image error"
    )
    mirror_pairs: bool = Field(
        False, description="data.kind scenes: each batch is batch_size / 2 scenes, each beside its left-right "
        "mirror under the mirrored caption (left and right exchanged, an exact symmetry of the scenes), the two "
        "sharing their (t, lam) and noises, so what a pair's gradients share cancels and what is left is the "
        "difference left and right make. Measured against the same 1200 steps without it (from scenes-minilm-x0, "
        "which placed objects at chance left/right): both learned left and right (0.985 vs 0.988 in the stated "
        "half), and the run without it, which read twice the fresh scenes, scored +0.049 [+0.025, +0.077] higher "
        "on the verifier (docs/results.md, Session 27): no gain over plain training shown",
    )
    log_every: int = Field(10, ge=1, description="log losses to MLflow every this many steps")
    checkpoint_every: int = Field(
        500, ge=1, description="every this many steps: overwrite run_dir/checkpoint and write a run state "
        "(run_dir/resume/: engine, optimizer, EMA, RNG, counters) that --resume continues from exactly",
    )
    keep_checkpoints: int = Field(2, ge=1, description="run states kept in run_dir/resume (the newest)")
    sample_steps: int = Field(10, ge=1, description="sampler steps of the final samples (grid and evaluation)")
    eval_prompts: int = Field(
        128, ge=1, description="held-out captions scored at the end (fixed noise): each reward's mean comes with a 95% "
        "bootstrap interval over them (summary.json eval), so fewer than ~100 make it wide",
    )
    eval_seeds: int = Field(
        2, ge=1, description="fixed noise seeds per held-out caption at the end (seed, seed + 1, ...)"
    )
    cfg_dropout: float = Field(
        0.1, ge=0, le=1, description="chance a training caption is replaced by the empty caption (for guidance)"
    )
    ema_decay: float = Field(
        0.999, ge=0, lt=1, description="EMA decay of the weights; evaluation and the exported checkpoint use the "
        "average (0 = off)"
    )
    score_t_min: float = Field(
        1e-3, gt=0, lt=1, description="kind score: training times t ~ U(score_t_min, 1) (the samplers stop there)"
    )
    eval_sampler: Optional[AnySampler] = Field(
        None, description="sampler of the final samples (grid and evaluation); null = hybrid (kind prox) or ddim "
        "(kind score)"
    )
    eval_guidance: float = Field(1.0, ge=0, description="classifier-free guidance scale w of the final samples")

    @model_validator(mode="after")
    def _check_mirror_pairs(self) -> "PretrainConfig":
        if self.mirror_pairs and self.batch_size % 2:
            raise ValueError(f"pretrain.mirror_pairs=true pairs each scene with its mirror: pretrain.batch_size "
                             f"({self.batch_size}) must be even")
        return self


class LoraSettings(Strict):
    rank: int = Field(0, ge=0, description="LoRA rank of the adapters on the U-Net; 0 = off (train every weight). "
                      "On: only the adapters train, travel to the rollouts and are merged into the exported checkpoint")
    alpha: Optional[float] = Field(None, gt=0, description="LoRA scale numerator (the update is alpha / rank x B A); "
                                   "null = rank")
    targets: list[str] = Field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS), min_length=1,
        description="U-Net modules that get adapters (the last parts of their names): attention projections and "
        "the residual blocks' convolutions by default",
    )

    def spec(self) -> Optional[LoraSpec]:
        """What proxmodel.lora adds, or None when LoRA is off."""
        return LoraSpec(self.rank, self.alpha or float(self.rank), tuple(self.targets)) if self.rank else None


# Options that only one objective reads: set away from their defaults under another objective they would do nothing.
OBJECTIVE_OPTIONS = {
    "policy_gradient": ("credit_block", "kl_flow_steps", "train_step_window"),
    "forward": ("forward_beta", "forward_adv_scale", "forward_shared_noise", "forward_negatives", "forward_loss_space",
                "forward_pairs"),
    "direct": ("direct_reward", "direct_steps"),
}


class GrpoConfig(Strict):
    iterations: int = Field(30, ge=1, description="rollout + update iterations")
    prompts_per_iteration: int = Field(6, ge=1, description="prompts P drawn per iteration")
    group_size: int = Field(8, ge=2, description="images G sampled per prompt (the group of the advantage)")
    steps: int = Field(10, ge=2, description="hybrid-sampler steps N (a trajectory has N-1 policy log-probs)")
    eta: float = Field(1.0, gt=0, description="noise scale of the stochastic sampler (1 = the method)")
    stochastic_steps: Optional[int] = Field(
        None, ge=1, description="prox only. null: every sampler transition is stochastic and trained. K: the "
        "rollouts' first K transitions are the stochastic hybrid steps (the policy, trained), the rest the "
        "probability-flow ODE (pretrain.prox_variants must have included flow), so a group's spread in reward comes "
        "from the trained steps' noise alone and the learner re-scores K transitions, not N-1 (MixGRPO, "
        "Flow-GRPO-Fast). The held-out evaluation keeps the fully stochastic sampler",
    )
    shared_start: bool = Field(
        False, description="a group's G rollouts start from the same noise (DanceGRPO's shared initial noise), so "
        "their rewards differ by the policy's own noise alone and the group-relative advantage credits the actions, "
        "not the starting point; the held-out evaluation keeps independent noise",
    )
    credit_block: int = Field(
        1, ge=1, description="policy gradient: s > 1 scores each transition's action by its s x s block means only "
        "(log-probs of the coarse noise; the fine noise is left out of the credit, the mean's fine detail is held "
        "by the KL alone), so the gradient does not carry the variance of thousands of dimensions the reward barely "
        "sees. Must divide the model space's side (docs/credit_block.md)",
    )
    guidance: float = Field(
        1.0, ge=0, description="classifier-free guidance scale w of the rollouts (1 = none); the learner re-scores "
        "actions under the same guided network, so the policy is the guided sampler",
    )
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate")
    adam_eps: float = Field(
        1e-8, gt=0, description="AdamW's eps. Adam's first steps are lr x sign(gradient) for every weight, signal or "
        "noise; an eps above the typical gradient entry makes the small-gradient steps proportional to the gradient "
        "(SGD-like, lr / eps), so noise that averages out over steps is not amplified to full size",
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, gt=0, description="gradient-norm clipping")
    max_nonfinite_updates: int = Field(
        3, ge=1, description="an optimiser step whose loss or gradient is NaN/inf is skipped (weights unchanged, "
        "counted as the MLflow metric nonfinite_updates); this many in a row stop the run, keeping its last run state",
    )
    clip_range: float = Field(
        1e-3, gt=0, description="PPO clip range of the policy ratio (log-probs are MEANS over dimensions)"
    )
    kl_coef: float = Field(
        0.0, ge=0, description="weight of the closed-form per-step KL to the frozen starting policy (0 = off); "
        "objective forward: weight of the mean squared eps difference to it on the same inputs"
    )
    kl_flow_steps: bool = Field(
        False, description="with stochastic_steps K and kl_coef > 0: the KL term also covers the probability-flow "
        "transitions (each optimiser step adds one drawn at random, weighted to stand for all N-1-K), so the part of "
        "the chain the policy gradient does not train cannot drift from the starting policy unpenalised. Off by "
        "default: in 30 iterations it cancels the gain (+0.001 held out over 3 seeds against +0.017; docs/results.md)",
    )
    data_anchor: float = Field(
        0.0, ge=0, description="weight of the pretraining loss on training data (data.*; proximal matching at "
        "pretrain.zeta0 / 2 in pretrain.loss_space, pretraining's last stage) added to every optimiser step: a "
        "restoring force toward the "
        "pretrained operator that the reward gradient lacks (PPO-ptx; learner/anchor.py); 0 = off",
    )
    data_anchor_batch: int = Field(16, ge=1, description="training images per optimiser step of the data anchor")
    adv_eps: float = Field(1e-4, gt=0, description="added to the std when normalising advantages")
    adv_clip: float = Field(5.0, ge=0, description="bound on |advantage| (0 = no bound)")
    advantage_std: Literal["group", "global", "prompt"] = Field(
        "group", description="normalise by each group's std, one std over the batch, or per-prompt running stats"
    )
    reward_aggregation: Literal["reward", "advantage"] = Field(
        "reward", description="normalise the weighted reward sum, or sum weighted per-reward advantages"
    )
    prompt_stats_buffer: int = Field(32, ge=2, description="rewards remembered per prompt (advantage_std: prompt)")
    prompt_stats_min_count: int = Field(16, ge=2, description="below this many, a prompt uses its group's stats")
    drop_zero_std_groups: bool = Field(True, description="skip groups whose rewards are all equal (no signal)")
    train_step_window: Optional[list[int]] = Field(
        None, description="sampler transitions to train, 0 = the first (noisiest); null = all N-1"
    )
    train_step_fraction: float = Field(
        1.0, gt=0, le=1, description="random fraction of the window trained each iteration (timestep subsampling); "
        "objective direct (with direct_detach_inputs): of the replayed network calls, per optimiser step"
    )
    updates_per_batch: int = Field(1, ge=1, description="optimiser steps per batch; after the first the ratio != 1")
    caption_contrast: float = Field(
        0.0, ge=0, description="objective policy_gradient: subtract this times the actions' advantage-weighted "
        "log-likelihood under the empty caption, so an update's caption-independent part cancels (1 = all of it) and "
        "only how the policy depends on its caption trains; costs a second network call per transition; 0 = off"
    )
    recompute: Literal["batch", "group"] = Field(
        "batch", description="how the learner re-scores a transition: batch = one network call over all of a rank's "
        "groups (1.36x faster per trained transition on 2 CPU cores, 1.05x per update, benchmarks/throughput.py; "
        "the first ratio then differs from 1 by kernel rounding only: <= 4e-7 in fp32, bounded in "
        "tests/test_learner.py, but up to ~1e-3 in bf16 at guidance 4 when the shapes pick other kernels, so bf16 "
        "GPU runs use group); group = group by group in the rollout's batch shapes, so the first ratio is exactly 1 "
        "(except under ZeRO-3 when the ranks hold unequal "
        "numbers of groups: then merged, as every rank must make the same number of calls)",
    )
    train_text: bool = Field(
        False, description="also train the text encoder in GRPO. Off: measured on the shipped base, its gradients "
        "across independent batches are pure noise (cosine -0.03; the U-Net's 0.35) and it holds 3.3M of the 4.8M "
        "weights, so training it mostly adds noise to every update",
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapters (rank 0 = off)")
    train_modules: Optional[list[str]] = Field(
        None, min_length=1, description="null: every U-Net weight trains. A list: only the U-Net modules so named "
        "(the last parts of their names, as grpo.lora.targets, e.g. [attn2.to_k, attn2.to_v]: the cross-attention's "
        "per-token keys and values, so an update acts through the caption's words) train, at full rank; the rest "
        "stay as loaded (all weights still travel to the rollouts)",
    )
    objective: Literal["policy_gradient", "forward", "direct"] = Field(
        "policy_gradient", description="policy_gradient: the clipped per-step likelihood-ratio loss over the "
        "sampler's transitions (docs/method.md); forward: the pretraining loss on the rollouts' own final samples, "
        "split by advantage into implicit positive and negative policies around the sampling policy "
        "(docs/forward_objective.md): no trajectories travel, one forward/backward per image, not per transition; "
        "direct: the gradient of a differentiable reward (direct_reward) backpropagated through the last "
        "direct_steps sampler steps, replayed on the recorded trajectories (learner/direct_objective.py, DRaFT-K)",
    )
    direct_reward: str = Field(
        "compositional_soft_strict", description="objective direct: the reward whose pixel gradient trains the "
        "policy; it must be differentiable (a RewardModel with differentiable = True). The `rewards` mix is still "
        "scored by the reward actors, logged, and measured held out",
    )
    direct_steps: int = Field(
        1, ge=1, description="objective direct: sampler steps replayed with gradient, counted from the last (1 = the "
        "final prox only; grpo.steps = the whole chain). Each adds a network call's activations to the backward pass",
    )
    direct_detach_inputs: bool = Field(
        False, description="objective direct: stop the gradient at every replayed network's input (DRTune), so it "
        "reaches each step's output along the sampler's linear path only, not through the later networks' Jacobians: "
        "the early steps, where the layout is decided, get a gradient of the last one's size. Measured from "
        "scenes-minilm (K = 10, compositional_soft_exact, lr 1e-4, 3 seeds): no collapse, no gain (+0.029, -0.046, "
        "-0.048 held out; docs/results.md, session 24)",
    )
    forward_beta: float = Field(
        1.0, gt=0, description="objective forward: the implicit policies are e_old +- beta (e - e_old); the "
        "optimum moves eps by 1/beta times the advantage-weighted residual, so larger beta = smaller steps",
    )
    forward_adv_scale: Optional[float] = Field(
        None, gt=0, description="objective forward: advantages map to r = 1/2 + 1/2 clip(A / scale, -1, 1); null = "
        "sqrt(group_size - 1), the largest |A| a group's own std gives, so nothing is clipped and (2r - 1) sums to 0 "
        "in every group. A smaller scale clips: measured, a group with one success and seven failures then pushed "
        "away from its own samples on balance, and the default run collapsed to blank images in 3 updates",
    )
    forward_shared_noise: bool = Field(
        False, description="objective forward: the images of a group share their (t, lam) and noises (common random "
        "numbers), so what their gradients have in common cancels in the advantage-weighted sum and what is left is "
        "the difference between better and worse samples",
    )
    forward_negatives: bool = Field(
        True, description="objective forward: below-average samples are pushed away from (r < 1/2); false: they get "
        "r = 1/2, so their loss only holds the model at the sampling policy on them (an anchor on the policy's own "
        "samples) while above-average samples pull",
    )
    ema_decay: float = Field(
        0.0, ge=0, lt=1, description="objective forward: rollouts, evaluation and the exported checkpoint use an "
        "EMA of the trained weights (e <- decay e + (1 - decay) w after every optimiser step, starting at the "
        "initial model), and the split loss is taken around the EMA's prediction (DiffusionNFT's soft-updated "
        "sampling policy); 0 = the trained weights themselves",
    )
    forward_loss_space: Literal["eps", "x0"] = Field(
        "eps", description="objective forward: x0 weights each pair's split loss (and anchor) by x0_loss_scale^2, "
        "so it is the implied clean images' error, as pretrain.loss_space=x0 does for pretraining (the eps loss "
        "hears the early, layout-deciding steps ~1/k^2 less); needs pretrain.target=conditional",
    )
    forward_pairs: int = Field(
        1, ge=1, description="objective forward: (t, lam, noise) pairs per image in each optimiser step (the batch "
        "is this many times larger): one pair is a very noisy estimate of an image's loss",
    )
    time_limit_s: Optional[float] = Field(
        None, gt=0, description="stop launching rollouts after this many seconds of training (the iterations in "
        "flight are still trained; the held-out evaluations every eval_every are not counted, so runs evaluated more "
        "often get the same training time); null = run all iterations",
    )
    max_staleness: int = Field(
        0, ge=0, description="async mode: rollouts may run this many policy versions ahead of the learner "
        "(0 = synchronous); older groups are skipped by the learner"
    )
    async_probe: int = Field(
        3, ge=0, description="async mode: time this many iterations synchronous (all cores per actor) and as many "
        "overlapped (actors on a node split its cores, with actors.torch_threads 0), then keep the faster for the rest "
        "of the run (learner/layout.py); 0 = always overlap. Runs shorter than 2 x async_probe + 3 iterations overlap"
    )
    prompt_file: Optional[str] = Field(
        None, description="UTF-8 text file, one prompt per line (eval_prompts of them held out); null = scene captions"
    )
    prompt_seed: int = Field(1, ge=0, description="seed of the prompt stream (scene captions, or the file's shuffles)")
    eval_prompts: int = Field(
        128, ge=1, description="held-out prompts scored at each evaluation (fixed noise); means come with a 95% "
        "bootstrap interval over prompts, so fewer than ~100 make the intervals wide",
    )
    eval_seeds: int = Field(
        2, ge=1, description="fixed noise seeds per held-out prompt at each evaluation (seed, seed + 1, ...)"
    )
    eval_every: int = Field(
        10, ge=0, description="evaluate (rewards, sample grid, hacking monitors) every K iterations; 0 = start and end only"
    )
    checkpoint_every: int = Field(
        10, ge=0, description="write a run state (run_dir/resume/: learner engines and optimizers, RNG, PromptStats, "
        "counters, the 'before' evaluation) every K iterations, that --resume continues from exactly; one is also "
        "written at the end and on SIGINT/SIGTERM (0 = only then)",
    )
    keep_checkpoints: int = Field(2, ge=1, description="run states kept in run_dir/resume (the newest)")
    check_rewards: list[str] = Field(
        default_factory=list, description="held-out checks: registered rewards scored at every evaluation but never "
        "trained on (e.g. compositional_strict, the verifier with thresholds the trained one does not use), logged "
        "as eval_check_<name> with a 95% interval; a check that falls while the trained reward rises is hacking",
    )
    stop_on_hacking: bool = Field(
        False, description="stop the run at the first evaluation (every eval_every) where the policy looks hacked "
        "(a check reward significantly below its start, saturation above hacking_saturation x the base's, "
        "within-group diversity below hacking_diversity x the base's); the run then exports its best evaluated "
        "checkpoint. With eval_every 0 it cannot stop early: it only exports the start's weights if the end looks "
        "hacked (a warning says so)",
    )
    hacking_saturation: float = Field(1.2, gt=1, description="stop_on_hacking: largest saturation ratio to the base")
    hacking_diversity: float = Field(
        0.8, gt=0, lt=1, description="stop_on_hacking: smallest within-group diversity ratio to the base"
    )

    @model_validator(mode="after")
    def _check_consistency(self, info: ValidationInfo) -> "GrpoConfig":
        if self.stochastic_steps is not None:
            if self.stochastic_steps > self.steps - 1:
                raise ValueError(f"grpo.stochastic_steps={self.stochastic_steps}: grpo.steps={self.steps} has "
                                 f"{self.steps - 1} transitions; use 1..{self.steps - 1}, or null for all of them")
            if self.objective == "direct":
                raise ValueError(f"grpo.objective=direct replays the fully stochastic chain, but grpo.stochastic_steps="
                                 f"{self.stochastic_steps} makes its later steps the ODE; also set "
                                 "grpo.stochastic_steps=null (3 is the policy gradient's measured setting)")
        window, last = self.train_step_window, (self.stochastic_steps or self.steps - 1) - 1
        has = (f"grpo.steps={self.steps} has {last + 1}" if self.stochastic_steps is None else
               f"grpo.stochastic_steps={self.stochastic_steps} makes {last + 1} of them stochastic")
        if window is not None:
            bad = [j for j in window if not 0 <= j <= last]
            if not window or bad or len(set(window)) != len(window):
                raise ValueError(
                    f"grpo.train_step_window={window}: entries must be distinct sampler transitions 0..{last} "
                    f"({has}), at least one; null = all"
                )
        if self.caption_contrast and self.objective != "policy_gradient":
            raise ValueError(f"grpo.caption_contrast={self.caption_contrast} needs grpo.objective=policy_gradient (it "
                             "contrasts the sampler's transition log-likelihoods); set it to 0 for objective forward")
        if self.ema_decay > 0 and self.objective != "forward":
            raise ValueError(
                f"grpo.ema_decay={self.ema_decay} needs grpo.objective=forward: the policy gradient re-scores the "
                "sampled actions under the trained weights, so the sampler must be those weights (set ema_decay: 0)"
            )
        if self.direct_detach_inputs and self.objective != "direct":
            raise ValueError("grpo.direct_detach_inputs=true shapes the gradient of grpo.objective=direct, but the "
                             f"objective is {self.objective}; set grpo.objective=direct or drop the option")
        if self.objective == "direct":
            if self.train_step_fraction < 1.0 and not self.direct_detach_inputs:
                raise ValueError(f"grpo.train_step_fraction={self.train_step_fraction} with grpo.objective=direct "
                                 "needs grpo.direct_detach_inputs=true: through the full chain a step run without its "
                                 "graph would cut the gradient of every step before it")
            if self.direct_steps > self.steps:
                raise ValueError(f"grpo.direct_steps={self.direct_steps} is more than the sampler's grpo.steps="
                                 f"{self.steps}; replay at most the whole chain")
            from rewards.base import reward_class

            try:
                cls = reward_class(self.direct_reward)
            except KeyError as e:
                raise ValueError(f"grpo.direct_reward: {e.args[0]}") from None
            if not getattr(cls, "differentiable", False):
                raise ValueError(f"grpo.direct_reward={self.direct_reward!r} is not differentiable in the pixels, so "
                                 "objective direct cannot backpropagate it; use compositional_soft (the scenes) or a "
                                 "reward declaring differentiable = True, or grpo.objective policy_gradient")
        if self.objective == "forward" and self.max_staleness > 0:
            raise ValueError(f"grpo.objective=forward with grpo.max_staleness={self.max_staleness}: the split loss is "
                             "centred on the weights that drew the batch (docs/forward_objective.md), which the "
                             "learner holds only when rollouts do not run ahead. Use grpo.max_staleness=0.")
        if self.objective == "forward" and self.advantage_std != "group":
            raise ValueError(f"grpo.objective=forward with grpo.advantage_std={self.advantage_std}: the split loss "
                             "needs each group's advantages centred on the group (docs/forward_objective.md: with "
                             "no signal, no move), which only group normalisation gives; a running or global "
                             "statistic pulls the model toward its own samples. Use grpo.advantage_std=group.")
        if self.objective == "forward" and 0 < self.adv_clip < min((self.group_size - 1) ** 0.5,
                                                                    self.forward_adv_scale or float("inf")):
            raise ValueError(f"grpo.objective=forward with grpo.adv_clip={self.adv_clip} below sqrt(group_size - 1) = "
                             f"{(self.group_size - 1) ** 0.5:.2f}: a group with one success has that advantage, and "
                             "clipped, the group's advantages no longer sum to 0, so the split loss pulls toward its "
                             "own samples (docs/forward_objective.md). Raise grpo.adv_clip (or 0: no bound) or lower "
                             "grpo.group_size.")
        ignored = [f"grpo.{name}={getattr(self, name)} applies to grpo.objective={objective} only"
                   for objective, names in OBJECTIVE_OPTIONS.items() if objective != self.objective for name in names
                   if getattr(self, name) != type(self).model_fields[name].default]
        if ignored and not (info.context or {}).get("resuming"):  # a started run keeps what it was started with
            raise ValueError(f"{'; '.join(ignored)}, and the objective is {self.objective}: it would be ignored. Drop "
                             "the option, or set the objective it belongs to.")
        if self.train_modules and self.train_text:
            raise ValueError("grpo.train_modules trains the named U-Net modules only; grpo.train_text would train the "
                             "text encoder beside them. Set grpo.train_text: false (or grpo.train_modules: null).")
        if self.lora.rank and self.train_modules:
            raise ValueError("grpo.lora.rank > 0 and grpo.train_modules both choose what trains; use one (the LoRA "
                             "modules are grpo.lora.targets)")
        if self.lora.rank and self.train_text:
            raise ValueError("grpo.lora.rank > 0 trains adapters on the U-Net only; set grpo.train_text: false (or "
                             "grpo.lora.rank: 0 to train every weight, the text encoder included)")
        if self.prompt_stats_min_count > self.prompt_stats_buffer:
            raise ValueError(
                f"grpo.prompt_stats_min_count={self.prompt_stats_min_count} must be at most grpo.prompt_stats_buffer="
                f"{self.prompt_stats_buffer} (a prompt never remembers more rewards than the buffer holds)"
            )
        return self


class SampleConfig(Strict):
    prompts: list[str] = Field(
        default_factory=list, description="captions to draw; empty = sample.prompt_file, else held-out scene captions"
    )
    prompt_file: Optional[str] = Field(None, description="a UTF-8 text file with one caption per line")
    num_prompts: int = Field(8, ge=1, description="held-out scene captions drawn when no prompts or file are given")
    images_per_prompt: int = Field(4, ge=1, description="images per caption (a row of the grid); caption i uses "
                                   "the noise of seed + i")
    steps: int = Field(10, ge=2, description="sampler steps")
    eta: float = Field(1.0, ge=0, description="noise scale of the stochastic sampler (1 = the method; 0 = the "
                       "noiseless chain, mode-seeking: not a sample of the model)")
    guidance: float = Field(1.0, ge=0, description="classifier-free guidance scale w (1 = none)")
    sampler: Optional[AnySampler] = Field(
        None, description="null = hybrid (prox model) or ddim (score model)"
    )
    score: bool = Field(False, description="score every image with the run's `rewards` (samples.json, summary.json)")

    @model_validator(mode="after")
    def _one_source(self) -> "SampleConfig":
        if self.prompts and self.prompt_file:
            raise ValueError("set sample.prompts or sample.prompt_file, not both")
        if any(not p.strip() for p in self.prompts):
            raise ValueError("sample.prompts holds an empty caption; remove it (the empty caption is guidance's "
                             "unconditional branch, not a prompt)")
        return self


class RewardSpec(Strict):
    name: str = Field(description="a registered reward (see rewards.available())")
    weight: float = Field(1.0, description="weight in the summed reward")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the reward's constructor")


class ActorResources(Strict):
    count: int = Field(1, ge=1, description="how many actors of this kind")
    num_cpus: float = Field(1.0, ge=0, description="Ray CPUs reserved per actor")
    num_gpus: float = Field(0.0, ge=0, description="Ray GPUs per actor (fractions allowed)")


class RewardActorConfig(ActorResources):
    batch_size: int = Field(64, ge=1, description="images scored per reward-model call")
    timeout_s: float = Field(120.0, gt=0, description="a scoring call slower than this is sent to the next reward "
                             "actor as well; the first answer is used")
    retries: int = Field(2, ge=0, description="extra attempts on other reward actors after a failure")
    cache: bool = Field(
        False, description="keep scores on the run's Redis under (reward, image hash, prompt) and reuse them "
        "instead of rescoring (worth it for slow rewards and repeated images, e.g. evaluation with fixed noise)"
    )
    cache_ttl_s: int = Field(86400, ge=1, description="seconds a cached score is kept")


class ActorsConfig(Strict):
    rollout: ActorResources = Field(default_factory=ActorResources)
    reward: RewardActorConfig = Field(default_factory=lambda: RewardActorConfig(num_cpus=0.5))
    learner: ActorResources = Field(
        default_factory=ActorResources, description="count = DeepSpeed ranks, one Ray actor each, in a placement group"
    )
    rollout_timeout_s: float = Field(
        3600.0, gt=0, description="the driver waits at most this long for an iteration's rollouts (sampling and "
        "scoring, the first iteration's actor start-up included) or a weight update of a rollout actor; past it the "
        "run stops with a message naming the actor (a stuck actor never hangs the run)",
    )
    rollout_restarts: int = Field(
        3, ge=0, description="how many times Ray restarts a rollout actor whose process died (OOM killer, a lost "
        "node); the restarted actor gets the current weights and the driver samples its unfinished prompts again with "
        "the same seeds. One more death stops the run with a message",
    )
    reward_restarts: int = Field(
        3, ge=0, description="how many times Ray restarts a reward actor whose process died (with a single reward "
        "actor there is no other to retry on); a scoring call lost with it is made again on the restarted actor "
        "(scoring has no side effects)",
    )
    learner_timeout_s: float = Field(
        3600.0, gt=0, description="the driver waits at most this long for a learner call (an update, publishing the "
        "weights, a run state); past it the run stops with a message naming the rank",
    )
    stream_read_timeout_s: float = Field(
        600.0, gt=0, description="a learner rank waits at most this long for an update's groups on the stream "
        "(they were counted by the rollouts, so a longer wait means entries were lost, e.g. a Redis restarted "
        "without its data); past it the run stops with a message",
    )
    torch_threads: int = Field(
        None, ge=0, validate_default=True, description="torch threads in each actor; 0 = all cores (while an async "
        "run overlaps rollout and update, the node's cores split between the actors on it: grpo.async_probe); null "
        "(the default) = the OMP_NUM_THREADS of the shell that starts the run if it is set (not in a `ray job`, where "
        "Ray sets it), else 0; the run's config.yaml records the number used. Rollout and learner use the same count, "
        "so on CPU they run the same kernels and the first on-policy ratio is exactly 1",
    )

    @field_validator("torch_threads", mode="before")
    @classmethod
    def _threads_from_environment(cls, value):
        # Set: two jobs sharing a machine's cores then each keep to theirs. Unset, every actor takes all cores, and a
        # rollout actor's threads waiting on each other behind another job's sampled 23x slower (session 43).
        if value is not None:
            return value
        # Started by Ray, its OMP_NUM_THREADS is Ray's 1: a worker's (RAY_RAYLET_PID), a `ray job` entrypoint's (Ray
        # removes RAY_RAYLET_PID from it and sets RAY_JOB_CONFIG_JSON_ENV_VAR, ray/dashboard/.../job_supervisor.py).
        if "RAY_RAYLET_PID" in os.environ or "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
            return 0
        omp = os.environ.get("OMP_NUM_THREADS", "").strip()
        return int(omp) if omp.isdigit() else 0


class DeepSpeedConfig(Strict):
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage of the learner")
    bf16: bool = Field(
        False, description="bf16 network in the learner (fp32 master weights), the KL reference, the rollout actors "
        "and evaluation, so rollouts and learner compute the same function; log-probs and losses stay float32",
    )


class RedisConfig(Strict):
    url: Optional[str] = Field(
        None, description="redis://host:port/db of a Redis server (rediss:// with TLS, unix:///path for a socket); "
        "null = an embedded one on a private unix socket"
    )

    @field_validator("url")
    @classmethod
    def _url_has_a_scheme(cls, url: Optional[str]) -> Optional[str]:
        # redis-py's own error for a bare host:port names neither the key nor the fix, and came as a traceback.
        if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis.url {url!r} must start with redis://, rediss:// or unix:// (e.g. "
                             "redis://127.0.0.1:6379/0), or be null for the embedded Redis")
        return url

    password_env: str = Field("PROXRL_REDIS_PASSWORD", description="environment variable holding the password")
    max_memory_mb: int = Field(
        4096, ge=16, description="embedded Redis only: its memory cap (maxmemory). The stream is trimmed to the groups "
        "in flight (about max_staleness + 1 iterations; configs/gpu.yaml: ~2.6 MB per group), so this is a guard: "
        "past it the reward cache is evicted first, then a write fails with Redis's OOM error instead of taking "
        "the node's memory",
    )


class RayConfig(Strict):
    address: Optional[str] = Field(None, description="a Ray cluster to join; null = RAY_ADDRESS or a local Ray")
    resource_wait_s: float = Field(
        0.0, ge=0, description="if the cluster lacks the CPUs/GPUs the actors ask for, ask the autoscaler and wait "
        "this long for new nodes before failing (0 = fail at once)",
    )


class MlflowConfig(Strict):
    tracking_uri: Optional[str] = Field(
        None, description="MLflow store; null = MLFLOW_TRACKING_URI or sqlite:///mlflow.db in the working directory"
    )
    experiment: str = Field("proxrl", description="MLflow experiment name")
    system_metrics: bool = Field(
        True, description="log the machine's CPU, memory, disk and network use (and GPU use with pynvml installed) "
        "as system/* metrics of the run (MLflow's system metrics, sampled by psutil in the driver process)",
    )
    system_metrics_interval_s: float = Field(10.0, gt=0, description="seconds between two system metrics samples")


class RunConfig(Strict):
    seed: int = Field(0, ge=0, description="global seed (model init, noise, prompts)")
    run_dir: Optional[str] = Field(None, description="the run's directory; null = runs/<mode>-<time>")
    init_from: Optional[str] = Field(
        None,
        description="checkpoint folder to start from ('builtin:NAME' = shipped with ProxRL); "
        "null = from scratch (pretrain) or builtin:scenes-minilm-bind3 (grpo, sample). Its config (model_index.json, "
        "or config.json in older checkpoints) sets the architecture.",
    )
    model: ModelConfig = Field(
        default_factory=ModelConfig, description="architecture: U-Net sizes, text encoder, optional VAE (pretrain from scratch)"
    )
    data: DataConfig = Field(
        default_factory=DataConfig, description="pretraining images and captions: scenes, digits, a folder or shards"
    )
    pretrain: PretrainConfig = Field(
        default_factory=PretrainConfig, description="--mode pretrain: proximal matching, optimiser, EMA, samples"
    )
    grpo: GrpoConfig = Field(
        default_factory=GrpoConfig, description="--mode grpo: rollouts, policy loss, advantages, prompts, evaluation"
    )
    sample: SampleConfig = Field(
        default_factory=SampleConfig, description="--mode sample: captions, images per caption, sampler, scoring"
    )
    rewards: list[RewardSpec] = Field(
        default_factory=lambda: [RewardSpec(name="compositional")], min_length=1,
        description="reward models and their weights, a list of {name, weight, options}",
    )
    actors: ActorsConfig = Field(
        default_factory=ActorsConfig, description="Ray actors: how many rollout, reward and learner actors, CPUs, GPUs"
    )
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig, description="ZeRO stage and precision of the learner")
    redis: RedisConfig = Field(default_factory=RedisConfig, description="the experience stream's Redis server")
    ray: RayConfig = Field(default_factory=RayConfig, description="the Ray cluster to join and how long to wait for it")
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig, description="where runs are tracked")

    @model_validator(mode="after")
    def _check_learner_ranks(self) -> "RunConfig":
        if self.grpo.prompts_per_iteration < self.actors.learner.count:
            raise ValueError(
                f"grpo.prompts_per_iteration ({self.grpo.prompts_per_iteration}) must be at least the number of "
                f"learner ranks actors.learner.count ({self.actors.learner.count}): each rank trains whole groups"
            )
        if self.pretrain.mirror_pairs and self.data.kind != "scenes":
            raise ValueError(f"pretrain.mirror_pairs=true mirrors scenes under their mirrored captions, but data.kind="
                             f"{self.data.kind}: a digit or a photo is not the same thing mirrored. Set it to false.")
        if self.grpo.forward_loss_space == "x0" and self.pretrain.target != "conditional":
            raise ValueError("grpo.forward_loss_space=x0 needs pretrain.target=conditional (the forward objective's "
                             "target): only then is the residual k times the clean image's error. Set "
                             "pretrain.target=conditional or grpo.forward_loss_space=eps.")
        return self

    @model_validator(mode="after")
    def _check_rewards(self) -> "RunConfig":
        from rewards import available  # imports torch: only once every other field is known to be good

        names, known = [r.name for r in self.rewards], available()
        for i, name in enumerate(names):
            if name not in known:
                raise ValueError(f"rewards[{i}].name={name!r}: unknown reward{did_you_mean(name, known)}; "
                                 f"the registered rewards are {', '.join(known)} (your own: an entry point in the "
                                 "group proxrl.rewards, see docs/custom_rewards.md)")
        if len(set(names)) != len(names):
            raise ValueError(f"a reward is listed twice in rewards: {names}; list each once and set its weight")
        for i, name in enumerate(self.grpo.check_rewards):
            if name not in known:
                raise ValueError(f"grpo.check_rewards[{i}]={name!r}: unknown reward{did_you_mean(name, known)}; "
                                 f"the registered rewards are {', '.join(known)}")
        return self  # (a check that is also trained on is refused by GRPO's preflight: other modes ignore checks)


LIST_KEYS_HINT = "`python -m learner.main --list-keys` lists every key with its type, default and allowed values"


def did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"command-line argument {item!r} is not a key=value override (e.g. grpo.iterations=5).")
    key, raw = item.split("=", 1)
    keys = key.split(".")
    if not all(keys):
        raise ConfigError(f"override {item!r} has an empty key; write it as section.key=value, e.g. grpo.iterations=5.")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or _one_line(e)
        raise ConfigError(
            f"override {item!r}: the value {raw!r} is not valid YAML ({problem}). Write lists as [0, 1] and mappings "
            f"as {{name: x, weight: 1}}, and put the whole override in quotes if it holds spaces."
        ) from None
    return keys, value


def load_config(path: Optional[str | Path] = None, overrides: tuple[str, ...] | list[str] = (),
                resuming: bool = False) -> RunConfig:
    """Read `path` (default: the embedded default), apply dotted overrides, validate. `resuming`: the config of a
    started run, which is not refused for rules added after it started (an option another objective reads)."""
    path = Path(path).expanduser() if path is not None else DEFAULT_CONFIG  # a '~/...' the shell left quoted
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(f"config file {path} {what}. Pass a YAML file with --config, e.g. configs/smoke.yaml.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid UTF-8 YAML ({_one_line(e)}). Fix the file and run again.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values at the top level.")
    for item in overrides:
        keys, value = _parse_override(item)
        node = data
        for depth, k in enumerate(keys[:-1]):
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {item!r}: {'.'.join(keys[: depth + 1])} is a value, not a section, so it has no key "
                    f"{keys[depth + 1]!r}. Check the key against {path}."
                )
            node = child
        node[keys[-1]] = value
    return validate_config(data, path, resuming)


def validate_config(data: dict, path: str | Path, resuming: bool = False) -> RunConfig:
    """`data` (the mapping read from `path`, overrides applied) as a RunConfig; ConfigError naming each problem."""
    try:
        return RunConfig.model_validate(data, context={"resuming": resuming})
    except ValidationError as e:
        raise ConfigError(_explain(e, path)) from None


# The schema, walked: what --list-keys prints and what error messages quote (never written out by hand).

def _section_of(annotation: Any) -> Optional[type[BaseModel]]:
    """The config class a field holds (a section, or the items of a list of sections), else None."""
    for tp in (annotation, *get_args(annotation)):
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            return tp
    return None


def _field_at(loc: tuple) -> tuple[Optional[type[BaseModel]], Optional[FieldInfo]]:
    """(the class holding the last key of `loc`, that key's field or None if it has no such key); indices skipped."""
    names = [part for part in loc if not isinstance(part, int)]
    owner: Optional[type[BaseModel]] = RunConfig
    field = None
    for i, part in enumerate(names):
        if owner is None or part not in owner.model_fields:
            return owner, None
        field = owner.model_fields[part]
        if i < len(names) - 1:
            owner = _section_of(field.annotation)
    return owner, field


def type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + "|".join(str(a) for a in args)
    if origin is Union:
        inner = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(inner) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list[{type_name(args[0])}]"
    if origin is dict:
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "at least", "max_length": "at most"}


def allowed(field: FieldInfo) -> str:
    """The field's type and bounds as a user reads them, e.g. 'float > 0' or 'int >= 0, <= 1'."""
    bounds = [f"{sign} {getattr(m, attr)}" for m in field.metadata for attr, sign in _BOUNDS.items() if hasattr(m, attr)]
    bounds = [b + " item(s)" if b.startswith("at ") else b for b in bounds]
    kind = type_name(field.annotation)
    if kind == "float":
        kind = "finite float"
    return kind + (" " + ", ".join(bounds) if bounds else "")


def schema_keys(section: Optional[str] = None) -> list[tuple[str, FieldInfo]]:
    """Every setting as (dotted key, field), in schema order; `section` keeps one section (e.g. 'grpo' or 'actors.reward')."""
    out: list[tuple[str, FieldInfo]] = []

    def walk(cls: type[BaseModel], prefix: str) -> None:
        for name, field in cls.model_fields.items():
            key = prefix + name
            sub = _section_of(field.annotation)
            if sub is None:
                out.append((key, field))
            else:
                walk(sub, key + ("[]." if get_origin(field.annotation) is list else "."))

    walk(RunConfig, "")
    if section is None:
        return out
    return [(k, f) for k, f in out if k.startswith(section + ".") or k.startswith(section + "[].") or k == section]


def sections() -> list[tuple[str, str]]:
    """(name, one-line description) of each top-level section, from the schema."""
    return [(n, f.description or "") for n, f in RunConfig.model_fields.items() if _section_of(f.annotation)]


def default_values(data: Optional[dict] = None) -> dict[str, Any]:
    """Every key's default as the schema builds it (a section's own default wins over its class's field defaults);
    or, given `data` (a config dumped as JSON), every key's value in it."""
    out: dict[str, Any] = {}

    def walk(data: Any, prefix: str) -> None:
        if isinstance(data, dict) and data and prefix.rstrip(".") not in ("rewards", "rewards[]"):
            for k, v in data.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = data

    walk(RunConfig.model_construct().model_dump(mode="json") if data is None else data, "")  # construct: no validators
    return out


def describe_keys(section: Optional[str] = None) -> str:
    """One line per key: `grpo.lr (finite float > 0; default 0.0001): AdamW learning rate`. The default is the
    schema's (what a --config file that omits the key gets); where the embedded configs/default.yaml (a run without
    --config) sets another value, the line says so."""
    defaults = default_values()
    embedded = default_values(yaml.safe_load(DEFAULT_CONFIG.read_text(encoding="utf-8")))  # unvalidated: no torch
    lines = []
    for key, field in schema_keys(section):
        if key in defaults:
            default = "default " + json.dumps(defaults[key])
        elif field.is_required():
            default = "required"
        else:
            default = "default " + json.dumps(field.get_default(call_default_factory=True))
        if key in embedded and key in defaults and embedded[key] != defaults[key]:
            default += f"; without --config {json.dumps(embedded[key])} (configs/default.yaml)"
        lines.append(f"{key} ({allowed(field)}; {default}): {field.description or ''}")
    return "\n".join(lines)


def _explain(error: ValidationError, path: Path) -> str:
    errors = error.errors()
    lines = []
    for err in errors[:5]:
        loc = err["loc"]
        key = ".".join(str(p) for p in loc) or "(top level)"
        owner, field = _field_at(loc)
        if err["type"] == "extra_forbidden":
            parent = key.rpartition(".")[0]
            valid = [f"{parent}.{k}" if parent else k for k in (owner.model_fields if owner is not None else [])]
            lines.append(f"unknown config key '{key}'{did_you_mean(key, valid)}: no such setting exists.")
        elif err["type"] == "value_error":  # our validators' messages name the key, the value and the rule
            lines.append(_one_line(err["ctx"]["error"]).rstrip(".") + ".")
        elif err["type"] == "list_type" and field is not None and _section_of(field.annotation) is not None:
            keys = ", ".join(_section_of(field.annotation).model_fields)
            lines.append(f"'{key}' is a list of mappings with the keys {keys}, e.g. {key}=[{{name: compositional}}].")
        elif err["type"] == "model_type" and field is not None and _section_of(field.annotation) is not None:
            if isinstance(loc[-1], int):
                keys = ", ".join(_section_of(field.annotation).model_fields)
                lines.append(f"'{key}' must be a mapping with the keys {keys}.")
            else:
                lines.append(f"'{key}' is a section, not a value: set its keys one by one, e.g. {key}.KEY=VALUE.")
        else:
            got = repr(err.get("input"))
            got = got if len(got) <= 80 else got[:77] + "..."
            rule = f"; allowed: {allowed(field)}" if field is not None else ""
            lines.append(f"config key '{key}' = {got}: {err['msg']}{rule}.")
    if len(errors) > 5:
        lines.append(f"({len(errors) - 5} more problem(s) not shown.)")
    return f"The config ({path} plus command-line overrides) is invalid: " + " ".join(lines) + f" {LIST_KEYS_HINT}."


def dump_config(cfg: RunConfig) -> str:
    """The config as YAML, URL passwords masked (actors/redaction.py): what config.yaml files and --print-config show."""
    return yaml.safe_dump(redact(cfg.model_dump(mode="json")), sort_keys=False)
