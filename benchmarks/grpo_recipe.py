"""Which GRPO recipe moves the held-out reward: each choice against the current default, over seeds, with CIs.

    python benchmarks/grpo_recipe.py [--recipes default,lr3e-4,...] [--seeds 0 1 2] [--out benchmarks/results/grpo_recipe]

Every recipe is a list of config overrides on top of configs/default.yaml, run with the real CLI (`python -m
learner.main --mode grpo`: Ray actors, the Redis stream, the DeepSpeed learner). A run's result is its summary.json:
the held-out change of the trained reward (128 prompts x 2 noise seeds, 95% bootstrap interval over prompts; every
prompt's scores are kept under --out/scores/ for benchmarks/gain_by_objects.py and paired comparisons), the
probability-flow sampler's change, the hacking monitors against the base (saturation, within-group and
between-prompt diversity) and its wall time. Finished runs are kept under --out and not run again, so the script can
be stopped and restarted; it prints a markdown table and writes it to --out/table.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

# name -> overrides on configs/default.yaml. Each comment says what the recipe tests. Every recipe but "default" was
# written against the policy-gradient default (sessions 28-45: stochastic_steps 3), so each runs on top of
# PG_DEFAULT; its own overrides come after and win. Since session 46 the shipped default is the direct objective,
# since session 47 with compositional_soft_strict: the direct recipes written before keep compositional_soft (_DIRECT).
PG_DEFAULT = ["grpo.objective=policy_gradient", "grpo.stochastic_steps=3"]
_FWD = ["grpo.objective=forward"]
_FULL_CHAIN = "grpo.stochastic_steps=null"  # objective direct replays the fully stochastic chain
_DIRECT = ["grpo.objective=direct", _FULL_CHAIN, "grpo.direct_reward=compositional_soft"]  # as sessions 19-46 ran it
_TRAINED6 = "grpo.prompt_file=benchmarks/data/prompts-6-trained-and-evaluated.txt"  # evaluated on its own captions
_LOW_NOISE = ["grpo.forward_shared_noise=true", "grpo.forward_pairs=4"]  # group-shared pairs, 4 per image
RECIPES: dict[str, list[str]] = {
    # the shipped default (whatever configs/default.yaml says)
    "default": [],
    # session 4's default: the forward objective, balanced split, one pair per image, lr 1e-4
    "fwd-session4-default": ["grpo.objective=forward", "grpo.lr=1e-4"],
    # the per-step policy gradient with the default optimiser settings
    "pg": ["grpo.objective=policy_gradient"],
    # policy gradient with an SGD-like Adam (eps 1e-3 above every gradient entry: steps follow the raw gradient)
    "pg-sgd-lr2e-3": ["grpo.objective=policy_gradient", "grpo.adam_eps=1e-3", "grpo.lr=2e-3"],
    # forward, only above-average images pull (the rest hold the model at e_old), SGD-like Adam
    "fwd-positive-sgd-lr1e-3": [*_FWD, *_LOW_NOISE, "grpo.forward_negatives=false", "grpo.adam_eps=1e-3",
                                "grpo.lr=1e-3"],
    # forward, balanced split, low-noise estimate, at the default lr
    "fwd-lownoise-lr1e-4": [*_FWD, *_LOW_NOISE, "grpo.lr=1e-4"],
    # forward, balanced split, low-noise estimate, EMA sampling policy (DiffusionNFT's soft update) at a larger lr
    "fwd-lownoise-ema0.9-lr3e-4": [*_FWD, *_LOW_NOISE, "grpo.ema_decay=0.9", "grpo.lr=3e-4"],
    # the same with the anchor to the starting model (kl_coef x ||e - e_ref||^2)
    "fwd-lownoise-ema0.9-lr3e-4-anchor1": [*_FWD, *_LOW_NOISE, "grpo.ema_decay=0.9", "grpo.lr=3e-4",
                                           "grpo.kl_coef=1.0"],
    # session 6: the policy gradient at 3x the lr with the data anchor (pretraining loss on data in every step)
    "pg-lr3e-4-anchor0.5": ["grpo.objective=policy_gradient", "grpo.lr=3e-4", "grpo.data_anchor=0.5"],
    # session 6: the default policy gradient with a light data anchor
    "pg-anchor0.1": ["grpo.objective=policy_gradient", "grpo.data_anchor=0.1"],
    # session 6: the policy gradient trained on the strict verifier (held-out check: the lenient one; session 45
    # ran it with --set "grpo.check_rewards=[compositional, compositional_count]", which the default now is)
    "pg-strict": ["grpo.objective=policy_gradient", "rewards=[{name: compositional_strict, weight: 1.0}]",
                  "grpo.check_rewards=[compositional]"],
    # session 8: classifier-free guidance w = 2 in the rollouts and the learner's re-scoring (the base's guided
    # samples score higher, so more groups hold a success to learn from)
    "pg-guidance2": ["grpo.objective=policy_gradient", "grpo.guidance=2.0"],
    # session 8: the per-step KL to the starting policy as a trust region that binds (kl_coef 0 never did)
    "pg-kl0.5": ["grpo.objective=policy_gradient", "grpo.kl_coef=0.5"],
    # session 9: with the KL binding, a larger step inside the trust region (lr 2e-4+ degraded without it)
    "kl0.5-lr3e-4": ["grpo.kl_coef=0.5", "grpo.lr=3e-4"],
    "kl0.5-lr1e-3": ["grpo.kl_coef=0.5", "grpo.lr=1e-3"],
    # session 9: a looser and a tighter trust region at the larger step
    "kl0.2-lr3e-4": ["grpo.kl_coef=0.2", "grpo.lr=3e-4"],
    "kl1-lr1e-3": ["grpo.kl_coef=1.0", "grpo.lr=1e-3"],
    # session 9: four minibatch updates per batch, so the ratio leaves 1 and the clip can act
    "kl0.5-upb4": ["grpo.kl_coef=0.5", "grpo.updates_per_batch=4"],
    # session 9: twice the groups per optimiser step (less gradient noise per step, twice the rollout per iteration)
    "kl0.5-p12": ["grpo.kl_coef=0.5", "grpo.prompts_per_iteration=12"],
    # session 9: the default twice as long (does the gain keep growing inside the trust region?)
    "kl0.5-60it": ["grpo.kl_coef=0.5", "grpo.iterations=60"],
    # session 11: the default from a base pretrained with the conditional eps target (pretrain.target), which
    # follows its captions; run with --set init_from=<that checkpoint> (2000 steps of the default pretraining)
    "default-condbase": [],
    # session 12: the default from the shipped base continued 2000 steps with the conditional eps target (the base
    # shipped since session 12); run with --set init_from=<that checkpoint> before it was shipped
    "default-condcont": [],
    # session 12: looser trust regions at the default lr (kl 0 drifted ~23 nats per transition and hacked; 0.5 holds
    # the policy at ~0.4 nats and gains ~+0.02: is the gain limited by the distance the KL allows?)
    "kl0.2": ["grpo.kl_coef=0.2"],
    "kl0.1": ["grpo.kl_coef=0.1"],
    # session 14: the lenient verifier's margins are what the policy hacks; half the reward from the strict one (each
    # normalised in its group, so the sparse strict signal is not drowned) and the held-out check the contrastive
    # verifier, never trained on (prompt-agnostic looks earn ~0 on it)
    "mix-strict": ["rewards=[{name: compositional, weight: 0.5}, {name: compositional_strict, weight: 0.5}]",
                   "grpo.reward_aggregation=advantage", "grpo.check_rewards=[compositional_contrastive]"],
    # session 15, a diagnostic: the default on 6 training prompts, each seen every iteration (128 others held out).
    # Does the update learn the prompts it trains on (training reward windows), and does any of it transfer?
    "prompts6": ["grpo.prompt_file=benchmarks/data/prompts-6-train-128-held-out.txt"],
    # the same without the trust region and at 3x the lr: can the update raise the reward of its own 6 prompts at all?
    "prompts6-kl0-lr3e-4": ["grpo.prompt_file=benchmarks/data/prompts-6-train-128-held-out.txt", "grpo.kl_coef=0",
                            "grpo.lr=3e-4"],
    # session 16: the 6-prompt diagnostic with 32 images per prompt (4x the samples per optimiser step, same KL 0.5):
    # tilting the base's own samples by the reward gains +0.15 at 0.28 nats per prompt (benchmarks/tilt_bound.py),
    # while the default spends about 2.8 nats of path KL for nothing. If a 4x less noisy gradient raises the
    # training prompts' reward, the update's noise is what wastes the KL budget
    "prompts6-g32": ["grpo.prompt_file=benchmarks/data/prompts-6-train-128-held-out.txt", "grpo.group_size=32"],
    "prompts6-g32-lr3e-4": ["grpo.prompt_file=benchmarks/data/prompts-6-train-128-held-out.txt", "grpo.group_size=32",
                            "grpo.lr=3e-4"],
    # session 16: the first Adam step at lr 3e-4 is lr x sign(g) and raised the 6 training prompts' reward 0.19 -> 0.33
    # (group 32, kl 0.5) and 0.22 -> 0.40 (kl 0) before later steps undid it or collapsed the samples. Does that
    # first step, on fresh prompts, move the held-out reward? Eight iterations with a held-out evaluation after each
    "early-kl0-lr3e-4": ["grpo.kl_coef=0", "grpo.lr=3e-4", "grpo.iterations=8", "grpo.eval_every=1"],
    "early-kl0.5-lr3e-4": ["grpo.lr=3e-4", "grpo.iterations=8", "grpo.eval_every=1"],
    # session 16: one std for the batch instead of each group's own. A group whose rewards differ only on the lenient
    # verifier's margins (0.10 vs 0.12) gets |A| up to 2.65 under the group std, as much as a group with a real hit:
    # the batch std weights groups by how much their rewards actually differ
    "std-global": ["grpo.advantage_std=global"],
    # session 16: an SGD-like step inside the KL trust region. Raw gradients of two batches agree (cosine 0.35) but
    # their signs do not (agreement 0.49), and Adam's step is about lr x sign(g): at kl 0.5 / lr 1e-4 the policy
    # spends its 0.3-0.5 nats per transition on sign noise (at lr 3e-4 the noise walked it 12.9 nats, past the KL).
    # eps 1e-3 above every gradient entry makes the step follow the raw gradient (pg-sgd-lr2e-3 without the KL went
    # 829 nats and hacked); with the KL it should move along the true gradient until the penalty balances it
    "sgd-kl0.5": ["grpo.adam_eps=1e-3", "grpo.lr=2e-3"],
    "sgd-kl0.5-lr5e-4": ["grpo.adam_eps=1e-3", "grpo.lr=5e-4"],
    # session 17: every recipe so far turned the KL it spent into a look shared by all captions (saturation, wash-out,
    # blob size). Subtract the actions' advantage-weighted log-likelihood under the empty caption: what an update
    # would change for every caption alike cancels, and only the caption's effect on the policy trains
    "caption-contrast": ["grpo.caption_contrast=1.0"],
    "caption-contrast-lr3e-4": ["grpo.caption_contrast=1.0", "grpo.lr=3e-4"],
    # the cancellation is exact in the gradient, but Adam's first steps are lr x sign(g): they blow the small
    # caption-specific residue up to full-size steps on every weight. With an SGD-like Adam the update itself is the
    # contrasted gradient (the step rule of sgd-kl0.5)
    "caption-contrast-sgd": ["grpo.caption_contrast=1.0", "grpo.adam_eps=1e-3", "grpo.lr=2e-3"],
    # session 16: train only the three noisiest transitions (where layout and colour are decided) so the KL budget is
    # not spent on the late ones, which change details the verifier does not check
    "window3": ["grpo.train_step_window=[0, 1, 2]"],
    # session 16: LoRA rank 4 on the default targets (75k trainable weights instead of 1.5M): Adam's sign-noise walk
    # has 20x fewer coordinates to spend the KL on
    "lora4": ["grpo.lora.rank=4", "grpo.lr=3e-4"],
    # session 16: train only what reads the caption. LoRA adapters on the cross-attention's key and value projections
    # (their input is the text alone), so an update changes the image through the caption: a prompt-agnostic look,
    # the direction every recipe so far drifted in, is hard to express. lr 3e-4: LoRA's B starts at 0, its steps
    # move W by about a third of what a full-weight step of the same lr does
    "xattn-lora": ["grpo.lora.rank=8", "grpo.lora.targets=[attn2.to_k, attn2.to_v]", "grpo.lr=3e-4"],
    # session 19: trained on the dense verifier (compositional_soft: partial credit for near misses, so 96% of the
    # base's groups rank their images against 65% under the thresholded verifier, which becomes the held-out check;
    # picking the best of 8 base samples by it gains +0.199 of the verifier's own +0.228)
    "soft": ["rewards=[{name: compositional_soft, weight: 1.0}]",
             "grpo.check_rewards=[compositional, compositional_strict]"],
    # session 20: no advantages, no likelihood ratios: compositional_soft's pixel gradient backpropagated through
    # the final prox (direct) or the whole 10-step chain (direct-k10), replayed on the rollouts' trajectories
    # (DRaFT-K); the thresholded verifier stays the trained-on mix's measure, held out
    "direct": _DIRECT,
    "direct-k10": [*_DIRECT, "grpo.direct_steps=10"],
    # session 21: the default from a base that reads the object words (frozen MiniLM text encoder, cross-attention at
    # 16x16 too; benchmarks/binding.py): the shipped base ignores them, so every recipe above had to teach binding
    # from nothing. Run with --set init_from=<that checkpoint> before it ships
    "default-minilmbase": [],
    "direct-k3-minilmbase": [*_DIRECT, "grpo.direct_steps=3"],
    # session 22, from the same base: the default and direct-k3 each moved it within noise (+0.006, +0.008). The
    # dense verifier gives nearly every group a ranking now that samples follow their captions half the time; a
    # looser trust region (the default spent 0.29 nats per transition, the KL binding); the direct objective at 3x lr
    "soft-minilmbase": ["rewards=[{name: compositional_soft, weight: 1.0}]",
                        "grpo.check_rewards=[compositional, compositional_strict]"],
    "kl0.1-minilmbase": ["grpo.kl_coef=0.1"],
    "direct-k3-lr3e-4-minilmbase": [*_DIRECT, "grpo.direct_steps=3", "grpo.lr=3e-4"],
    # lr 3e-4 gained +0.09 by hedging with extra copies of the stated object (the count check, held out since
    # this session, fell -0.37): is there a step size between 1e-4 (nothing) and 3e-4 (hedging) that gains honestly?
    "direct-k3-lr2e-4-minilmbase": [*_DIRECT, "grpo.direct_steps=3", "grpo.lr=2e-4"],
    # Session 23: the same step trained on the dense verifier that also charges for objects the caption does not
    # state (compositional_soft_exact): does the lr 3e-4 gain survive without the hedge?
    "direct-k3-lr3e-4-exact-minilmbase": [*_DIRECT, "grpo.direct_steps=3", "grpo.lr=3e-4",
                                          "grpo.direct_reward=compositional_soft_exact"],
    # The last 3 of 10 steps can paint an object where the caption asks but not move one drawn earlier (where a copy
    # comes from): the gradient through every step.
    "direct-k10-lr3e-4-exact-minilmbase": [*_DIRECT, "grpo.direct_steps=10", "grpo.lr=3e-4",
                                           "grpo.direct_reward=compositional_soft_exact"],
    "direct-k10-lr1e-4-exact-minilmbase": [*_DIRECT, "grpo.direct_steps=10", "grpo.lr=1e-4",
                                           "grpo.direct_reward=compositional_soft_exact"],
    # Session 24: the full chain's gradient is the product of 10 network Jacobians (collapsed at 3e-4, fell at 1e-4);
    # stopping it at each network's input (DRTune) gives every step, the layout-deciding early ones included, the
    # pixel gradient along the sampler's linear path only.
    "direct-k10-detach-lr1e-4-exact-minilmbase": [*_DIRECT, "grpo.direct_steps=10", "grpo.lr=1e-4",
                                                  "grpo.direct_detach_inputs=true",
                                                  "grpo.direct_reward=compositional_soft_exact"],
    "direct-k10-detach-lr3e-4-exact-minilmbase": [*_DIRECT, "grpo.direct_steps=10", "grpo.lr=3e-4",
                                                  "grpo.direct_detach_inputs=true",
                                                  "grpo.direct_reward=compositional_soft_exact"],
    # 10 network backward passes per update made the detached replay cost 645 s of loop: a random 3 of the 10
    # (unbiased, DRTune's subsampling) to fit the default's 10-minute budget.
    "direct-k10-detach-frac0.3-lr1e-4-exact-minilmbase": [*_DIRECT, "grpo.direct_steps=10",
                                                          "grpo.lr=1e-4", "grpo.direct_detach_inputs=true",
                                                          "grpo.train_step_fraction=0.3",
                                                          "grpo.direct_reward=compositional_soft_exact"],
    # The forward objective (DiffusionNFT-style: low-noise pairs, EMA sampling policy, the default's anchor 0.5) had
    # only been measured from the old bases, where every variant lost: from the base that reads its captions?
    "fwd-lownoise-ema0.9-minilmbase": [*_FWD, *_LOW_NOISE, "grpo.ema_decay=0.9"],
    # Session 26, from a base pretrained with the x0-space loss (it places the object where the caption says about
    # half the time; the default's first run from it gained +0.006): the forward objective is the pretraining loss
    # on the policy's own samples, so measure it where that loss heard the layout, in x0 space.
    # Run with --set init_from=<that checkpoint> before it ships
    "fwd-x0-x0base": [*_FWD, *_LOW_NOISE, "grpo.forward_loss_space=x0"],
    "fwd-x0-ema0.9-x0base": [*_FWD, *_LOW_NOISE, "grpo.forward_loss_space=x0", "grpo.ema_decay=0.9"],
    # Session 27, from scenes-minilm-mirror (the default's start): the 30-minute budget, the default recipe
    # run until grpo.time_limit_s (training seconds; the held-out evaluations every 40 iterations are not counted).
    "budget30": ["grpo.iterations=1000", "grpo.time_limit_s=1800", "grpo.eval_every=40"],
    # Session 28: the sampler's noise at every step spreads a group's rewards, but the learner can only credit the
    # transitions it trains; the late steps' noise (colour and edges) blurs the advantage of the early ones (layout).
    # Only the first K transitions stochastic, the rest the probability-flow ODE (MixGRPO, Flow-GRPO-Fast): the
    # reward's spread is then the trained steps' own, and an iteration re-scores K transitions instead of 9.
    # The held-out evaluation keeps the fully stochastic sampler.
    "sde3": ["grpo.stochastic_steps=3"],  # the default since session 28
    "all-stochastic": ["grpo.stochastic_steps=null"],  # the default before it: all 9 transitions trained
    "sde1": ["grpo.stochastic_steps=1"],
    "sde3-budget30": ["grpo.stochastic_steps=3", "grpo.iterations=1000", "grpo.time_limit_s=1800",
                      "grpo.eval_every=40"],
    # Session 29: with K stochastic steps the KL binds only those; the ODE steps (the same network at other inputs)
    # drifted in the 30-minute run. grpo.kl_flow_steps adds one random ODE transition's drift per optimiser step.
    "sde3-flow-kl": ["grpo.stochastic_steps=3", "grpo.kl_flow_steps=true"],
    "sde3-flow-kl-budget30": ["grpo.stochastic_steps=3", "grpo.kl_flow_steps=true", "grpo.iterations=1000",
                              "grpo.time_limit_s=1800", "grpo.eval_every=40"],
    # Session 29: the default's lr, KL and batch were set on the all-9-transitions policy (sessions 8-27); with 3
    # trained transitions an update is cheaper and each step's KL budget is spent on fewer transitions.
    # (session 30: lr 2e-4 +0.003 mean over 3 seeds, strict -0.081 paired; KL 0.2 +0.012: the default holds)
    "sde3-lr2e-4": ["grpo.stochastic_steps=3", "grpo.lr=2e-4"],
    "sde3-kl0.2": ["grpo.stochastic_steps=3", "grpo.kl_coef=0.2"],
    "sde3-p12": ["grpo.stochastic_steps=3", "grpo.prompts_per_iteration=12"],  # 96 images per update
    "sde3-60it": ["grpo.stochastic_steps=3", "grpo.iterations=60"],
    # Session 29: a group's 8 rollouts started from 8 independent noises, so part of their reward spread is the start
    # (independent of theta), which the advantage credits to the actions. grpo.shared_start: one start per group
    # (DanceGRPO's shared initial noise); with 3 stochastic transitions the spread is then their noise alone.
    "sde3-shared-start": ["grpo.stochastic_steps=3", "grpo.shared_start=true"],
    # Session 31: the tilt bound finds the goal's gain within a prompt's own samples (best of 4: +0.16), i.e. in
    # selection among a prompt's draws; 16 per group (at 3 prompts: the same 48 images and cost per iteration) see
    # twice the draws of each prompt and estimate its advantages from twice the samples. (Session 31, seeds 0-1:
    # +0.003, -0.003 against the default's +0.011, +0.021; paired -0.008 [-0.025, +0.010]: no better.)
    "sde3-g16": ["grpo.stochastic_steps=3", "grpo.group_size=16", "grpo.prompts_per_iteration=3"],
    # Session 33: benchmarks/decision_time.py branches the evaluation's fully stochastic chain at every state: the
    # noise of transitions 0 and 1 (t 1.0 -> 0.8, where sqrt(alpha_t) < 0.04) decides nothing of the reward, the
    # noise of transitions 2-5 decides ~80% of it (2: 45%, 3: 22%, 4: 11%, 5: 4%). sde3 credits 0-2 and makes 3-5
    # deterministic, unlike the sampler it is evaluated with; this trains exactly where the evaluated outcome is made.
    # (Session 33, seeds 0-2: +0.002, +0.009, +0.006 against the default's +0.011, +0.021, +0.018; paired -0.005
    # [-0.020, +0.009], strict check -0.064 [-0.092, -0.039]: worse.)
    "decide-window": ["grpo.stochastic_steps=null", "grpo.train_step_window=[2, 3, 4, 5]"],
    # Session 35: can the update raise the reward of the captions it trains on? The file repeats the 6 captions of
    # prompts6 40 times, so the "held-out" evaluation (128 of its lines x 2 noise seeds) scores those same captions:
    # it separates an update that does not learn from one that learns what does not transfer to new captions.
    "trained6": [_TRAINED6],
    "trained6-kl0-lr3e-4": [_TRAINED6, "grpo.kl_coef=0", "grpo.lr=3e-4"],
    "trained6-kl0.0078": [_TRAINED6, "grpo.kl_coef=0.0078125"],
    # grpo.credit_block (docs/credit_block.md): the log-probs of each transition's 8x8 block means only, the same
    # expected gradient for a reward that sees coarse layout and colour, without the fine noise's variance. At the
    # default KL the update is KL-dominated (a smaller policy-gradient norm under Adam's normalisation); KL/64 (0.0078) gives
    # the policy-gradient term the weight it had when the block log-prob was a mean over the blocks alone.
    "trained6-block8": [_TRAINED6, "grpo.credit_block=8"],
    "trained6-block8-kl0.0078": [_TRAINED6, "grpo.credit_block=8", "grpo.kl_coef=0.0078125"],
    # full-rank training of the cross-attention's keys and values only: every update acts through the caption's words
    # (per-token features shared by every caption that uses the word), the one place a change must transfer
    "trained6-xattn-kv-lr1e-3": [_TRAINED6, "grpo.train_modules=[attn2.to_k,attn2.to_v]", "grpo.lr=1e-3"],
    "xattn-kv-lr1e-3": ["grpo.train_modules=[attn2.to_k,attn2.to_v]", "grpo.lr=1e-3"],
    # the default's 48 images per iteration spread over 4x the captions (24 prompts x pairs): a gradient averaged
    # over more captions is less caption-specific; pairs tie often under the thresholded verifier, so the dense one
    # trains and the verifier is held out as a check
    "p24-g2-soft": ["grpo.prompts_per_iteration=24", "grpo.group_size=2",
                    "rewards=[{name: compositional_soft, weight: 1.0}]",
                    "grpo.check_rewards=[compositional, compositional_strict, compositional_count]"],
    # Session 46: the strict verifier (the default's reward since 45) fails an image for impure colour, off-palette
    # pixels or a rough shape: what the late, low-noise transitions make, which sde3 runs as the untrained ODE while
    # the evaluation's sampler draws them. All 9 stochastic ("all-stochastic" above), or only the last 3 trained
    # (the learner's cost of sde3, the rollouts' noise of the evaluation). (Session 46, seed 0, bind3-late/: strict
    # +0.029 and +0.025 against the default's +0.035; paired with it -0.006 [-0.041, +0.031], -0.010 [-0.045,
    # +0.025]; all 9 cost 2x the loop: no better.)
    "late-window": ["grpo.stochastic_steps=null", "grpo.train_step_window=[6, 7, 8]"],
    # Session 46: benchmarks/decision_time.py --reward compositional_strict: from bind3 the strict verdict is still
    # 0.90 undecided after the 3 transitions sde3 trains and 0.46 at y_2; the last noise and the final prox, which
    # no transition's likelihood ratio credits, decide it. The direct objective trains exactly that prox with the
    # dense verifier's pixel gradient ("direct" above: grpo.direct_steps=1 at the default's lr and KL).
    # ("direct", seeds 0-2 from bind3, bind3-strict-tune/: +0.120, +0.132, +0.160, pooled +0.137 [+0.114, +0.163],
    # paired with the policy gradient +0.088 [+0.062, +0.115]: the default since. Seed 0 of these: +0.082, +0.110.)
    "direct-lr2e-4": [*_DIRECT, "grpo.lr=2e-4"],
    "direct-k2": [*_DIRECT, "grpo.direct_steps=2"],
    # Session 47: does the direct objective keep climbing past 30 iterations? Evaluated every 10 (the scores at each
    # step are in the scores json: gain_by_objects.py --step), and 30 minutes of it on the strict verifier.
    "direct-50": [*_DIRECT, "grpo.iterations=50", "grpo.eval_every=10"],
    # Session 47, benchmarks/strict_failures.py: the base's strict failures are off-palette pixels in the blobs (the
    # tolerance, through the purity: strict 0.449, without its tolerance 0.873, without its purity 0.780, without its
    # shape threshold 0.449); the dense verifier with that tolerance as the direct reward. (Seeds 0-2 from bind3,
    # bind3-softstrict/: +0.178, +0.207, +0.218, pooled +0.201 [+0.172, +0.231]; paired with "direct" +0.064
    # [+0.040, +0.087]: the default since.)
    "direct-softstrict": [*_DIRECT, "grpo.direct_reward=compositional_soft_strict"],
    "direct-budget30": [*_DIRECT, "grpo.iterations=1000", "grpo.time_limit_s=1800",
                        "grpo.eval_every=35"],
    "block8": ["grpo.credit_block=8"],
    "block8-kl0.0078": ["grpo.credit_block=8", "grpo.kl_coef=0.0078125"],
    # session 45: the default until then, trained on the lenient verifier with the strict one held out (since 45 the
    # default trains on the strict one: the same lenient gain, +0.039 on the strict, 3 seeds paired)
    "lenient-reward": ["rewards=[{name: compositional, weight: 1.0}]",
                       "grpo.check_rewards=[compositional_strict, compositional_count]"],
}

REWARD = "total"


def run(name: str, overrides: list[str], seed: int, out: Path, uri: str, extra: list[str]) -> dict:
    """One CLI run (or its stored result); returns the summary with the recipe's name and overrides."""
    result = out / f"{name}-seed{seed}.json"
    if result.exists():
        return json.loads(result.read_text())
    with tempfile.TemporaryDirectory(prefix=f"recipe-{name}-") as tmp:
        cmd = [sys.executable, "-m", "learner.main", "--mode", "grpo", f"run_dir={tmp}/run", f"seed={seed}",
               f"mlflow.tracking_uri={uri}", "mlflow.experiment=benchmark-grpo-recipe", *overrides, *extra]
        print("$", " ".join(cmd[1:]), flush=True)
        started = time.monotonic()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        command_s = time.monotonic() - started  # what a user waits: start-up, evaluations and the loop
        if proc.returncode != 0:
            raise SystemExit(f"recipe {name} (seed {seed}) failed:\n{proc.stderr[-3000:]}")
        summary = json.loads(Path(tmp, "run", "summary.json").read_text())
        scores = Path(tmp, "run", "held_out_scores.json")  # every prompt's scores: paired and per-kind comparisons
        (out / "scores").mkdir(parents=True, exist_ok=True)
        (out / "scores" / f"{name}-seed{seed}.json").write_text(scores.read_text())
    summary.update(recipe=name, overrides=overrides, seed=seed, command_s=command_s)
    out.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps(summary, indent=1))
    return summary


def row(name: str, runs: list[dict]) -> str:
    """One markdown row: per-seed held-out differences with CIs, their mean, monitors, time."""
    def cell(s: dict) -> str:
        d = s["eval"]["rewards"][REWARD]["difference"]
        return f"{d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"

    diffs = [s["eval"]["rewards"][REWARD]["difference"]["mean"] for s in runs]
    before = np.mean([s["eval"]["rewards"][REWARD]["before"]["mean"] for s in runs])
    after = np.mean([s["eval"]["rewards"][REWARD]["after"]["mean"] for s in runs])
    mon = [s.get("monitors", {}).get("after", {}) for s in runs]
    sat = np.mean([m.get("saturation_ratio", np.nan) for m in mon])
    div = np.mean([m.get("diversity_ratio", np.nan) for m in mon])
    wall = f"{np.mean([s['wall_time_s'] for s in runs]):.0f}"
    if all("command_s" in s for s in runs):  # recorded since session 22
        wall += f" ({np.mean([s['command_s'] for s in runs]):.0f})"
    per_seed = "; ".join(cell(s) for s in runs)
    checks = [s["eval"].get("checks", {}) for s in runs]
    check = "; ".join(f"{n.removeprefix('compositional_')} {c[n]['difference']['mean']:+.3f}" for c in checks for n in c) or "-"
    return (f"| {name} | {len(runs)} | {before:.3f} -> {after:.3f} | {np.mean(diffs):+.3f} | {per_seed} | {check} | "
            f"{sat:.2f} / {div:.2f} | {wall} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated names from RECIPES")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="run seeds (rollout noise, pairs, prompts)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "grpo_recipe")
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides for every run (e.g. grpo.iterations=2)")
    args = parser.parse_args()
    names = [n for n in args.recipes.split(",") if n]
    unknown = sorted(set(names) - set(RECIPES))
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}; known: {sorted(RECIPES)}")
    uri = f"sqlite:///{(args.out / 'mlflow.db').resolve()}"
    args.out.mkdir(parents=True, exist_ok=True)
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).search_experiments()  # creates the store now: two scripts started together both migrated it
    for name in names:
        overrides = RECIPES[name] if name == "default" else [*PG_DEFAULT, *RECIPES[name]]
        runs = [run(name, overrides, seed, args.out, uri, args.set) for seed in args.seeds]
        print(row(name, runs), flush=True)
    table = stored_table(args.out)
    (args.out / "table.md").write_text(table + "\n")
    print(table)


def stored_table(out: Path) -> str:
    """Every result stored under `out` (this invocation's and earlier ones'), a row per recipe, in RECIPES' order."""
    by_recipe: dict[str, list[dict]] = {}
    for path in sorted(out.glob("*-seed*.json")):
        summary = json.loads(path.read_text())
        by_recipe.setdefault(summary.get("recipe", path.stem.rsplit("-seed", 1)[0]), []).append(summary)
    order = {name: i for i, name in enumerate(RECIPES)}
    lines = ["| recipe | seeds | held-out before -> after | mean change | change per seed [95% CI] | check change | "
             "saturation / diversity vs base | GRPO loop s (whole command) |", "|---|---|---|---|---|---|---|---|"]
    for name in sorted(by_recipe, key=lambda n: (order.get(n, len(order)), n)):
        lines.append(row(name, sorted(by_recipe[name], key=lambda s: s.get("seed", 0))))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
