"""What fine-tuning the shipped base on its OWN samples does to the held-out reward, against fine-tuning on data.

    python benchmarks/own_samples.py data [--losses pm0.5 mse l1 pm1] [--steps 100] [--lr 1e-4]
    python benchmarks/own_samples.py online [--variants raft awr nft] [--iterations 30] [--lr 1e-4]

In one process, no Ray or DeepSpeed (the question is the update, not the system): AdamW, gradient clipping 1.0, the
text encoder frozen, held-out reward on 64 prompts x 2 noise seeds (hybrid sampler, 10 steps) with the paired 95%
bootstrap interval against the base.
- data: `steps` steps of the pretraining loss (proximal matching at zeta, eps-MSE or L1) on batches of 32 scenes.
- online: each iteration samples 6 training prompts x 8 images with the current model, scores them with the
  verifier, and takes 2 optimiser steps on them: `raft` = eps-MSE on the best image of each informative group
  (rejection-sampling fine-tuning), `awr` = eps-MSE weighted by max(advantage, 0), `nft` = the split loss of
  grpo.objective=forward (learner/forward_objective.py) around the model that drew the batch.
Results: benchmarks/results/own_samples.md.
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

from learner.bootstrap import bootstrap_ci
from learner.config import load_config
from learner.data import build_source, drop_captions
from learner.evaluation import reward_matrix
from proxmodel.generate import generate
from learner.forward_objective import optimality, split_loss
from learner.main import resolve_checkpoint
from learner.prompts import prompt_source
from proxmodel.losses import l1_loss, make_training_pairs, mse_loss, proximal_matching_loss
from proxmodel.model import load_model
from proxmodel.schedule import VPSchedule
from rewards import build

LOSSES = {"pm0.5": lambda e, x: proximal_matching_loss(e, x, 0.5), "pm1": lambda e, x: proximal_matching_loss(e, x, 1.0),
          "mse": mse_loss, "l1": l1_loss}
CPU = torch.device("cpu")
G = 8


def held_out(model, prompts, rewards) -> dict[str, np.ndarray]:
    return reward_matrix(model, prompts, 10, 0, 2, rewards, 1.0, "hybrid", 1.0)[1]


def trainable(base):
    model = copy.deepcopy(base)
    model.text.requires_grad_(False)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=ARGS.lr, weight_decay=0.0)


def step(model, opt, loss) -> None:
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def on_data(base, name: str, cfg) -> object:
    model, opt = trainable(base)
    model.train()
    source, gen = build_source(cfg.data, 32, 3), torch.Generator().manual_seed(0)
    for s in range(ARGS.steps):
        images, captions = source.batch(10_000_000 + s * 32, 32)  # scenes the base never saw
        tokens = model.tokenize(drop_captions(captions, 0.1, gen), CPU)
        y, t, lam, xi = make_training_pairs(images, VPSchedule(), [5, 10, 20], gen, ("hybrid", "flow"))
        eps = model(y, t, lam, tokens=tokens)
        step(model, opt, LOSSES[name](eps, xi))
    return model.eval()


def online(base, variant: str, cfg, reward) -> tuple[object, list[float]]:
    model, opt = trainable(base)
    old = copy.deepcopy(base).eval().requires_grad_(False)
    source, gen, history, P = prompt_source(cfg), torch.Generator().manual_seed(0), [], 6
    for it in range(ARGS.iterations):
        texts = [p for p in source.train(it * P, P) for _ in range(G)]
        images = generate(model.eval(), texts, 10, 1000 + it, 1.0, "hybrid", 1.0)
        r = reward.score(images, texts).reshape(P, G).float()
        history.append(float(r.mean()))
        adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)
        x0, tokens = images * 2 - 1, model.tokenize(texts, CPU)
        old.load_state_dict(model.state_dict())
        model.train()
        for _ in range(2):
            y, t, lam, xi = make_training_pairs(x0, VPSchedule(), [5, 10, 20], gen, ("hybrid", "flow"))
            if variant in ("raft", "awr"):
                if variant == "raft":
                    w = torch.zeros(P * G)
                    w[[i * G + int(r[i].argmax()) for i in range(P) if r[i].std() > 0]] = 1.0
                else:
                    w = adv.clamp_min(0).flatten()
                if w.sum() == 0:
                    continue
                per_image = (model(y, t, lam, tokens=tokens) - xi).pow(2).flatten(1).mean(1)
                loss = (w * per_image).sum() / w.sum()
            else:
                with torch.no_grad():
                    e_old = old(y, t, lam, tokens=tokens)
                r01 = optimality(adv.flatten(), np.sqrt(G - 1))
                loss = split_loss(model(y, t, lam, tokens=tokens), e_old, xi, r01, 1.0)
            step(model, opt, loss)
    return model.eval(), history


def main() -> None:
    torch.set_num_threads(ARGS.threads)
    cfg = load_config(None, [])
    prompts = prompt_source(cfg).held_out(64)
    rewards = {"compositional": build("compositional"), "compositional_strict": build("compositional_strict")}
    base = load_model(resolve_checkpoint("builtin:scenes-base"))
    before = held_out(base, prompts, rewards)
    print("base: " + ", ".join(f"{k} {v.mean():.3f}" for k, v in before.items()), flush=True)
    for name in (ARGS.losses if ARGS.mode == "data" else ARGS.variants):
        start = time.time()
        if ARGS.mode == "data":
            model, history = on_data(base, name, cfg), None
        else:
            model, history = online(base, name, cfg, rewards["compositional"])
        after = held_out(model, prompts, rewards)
        cells = []
        for k in rewards:
            d = bootstrap_ci(after[k] - before[k])
            cells.append(f"{k} {before[k].mean():.3f} -> {after[k].mean():.3f}, {d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]")
        fifths = f"; training reward by fifths {[round(float(np.mean(c)), 3) for c in np.array_split(history, 5)]}" \
            if history else ""
        print(f"| {ARGS.mode} {name} lr {ARGS.lr} | " + " | ".join(cells) + f" |{fifths} ({time.time() - start:.0f} s)",
              flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("data", "online"))
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    parser.add_argument("--variants", nargs="+", default=["raft", "awr", "nft"], choices=["raft", "awr", "nft"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    ARGS = parser.parse_args()
    main()
