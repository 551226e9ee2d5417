"""Does a GRPO run's gain on its training prompts reach the held-out ones? Two checkpoints, three measurements.

    python benchmarks/train_vs_heldout.py --before builtin:scenes-minilm-x0-4200 --after runs/<grpo>/checkpoint

Across the recipes in benchmarks/results/grpo_recipe/ the training reward's window mean rose more than the held-out
reward (about +0.03 more on average): a gain the held-out set misses, or noise in 6-prompt iterations? Measured here
on the same two checkpoints, paired per prompt (95% bootstrap intervals over prompts):
(a) GRPO's 128 held-out prompts, sampled in one batch per noise seed (as the held-out evaluation does);
(b) as many fresh prompts of the training stream (indices far past any run's), the same way;
(c) the same fresh prompts as the rollouts sample them: a group of 8 per prompt from one generator.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from learner.bootstrap import bootstrap_ci
from learner.config import load_config
from learner.main import resolve_checkpoint
from learner.prompts import prompt_source
from proxmodel.generate import generate
from proxmodel.model import load_model
from proxmodel.policy import Policy
from rewards.compositional import CompositionalReward

FRESH_START = 777_000  # training-stream prompt indices no run reaches (a run draws 6 per iteration)


def batch_scores(model, prompts, steps, seeds, reward) -> np.ndarray:
    """[prompts, seeds]: one sample per prompt and noise seed, the whole prompt list in one batch."""
    return np.stack([reward.score(generate(model, prompts, steps, 1000 + s), prompts).double().numpy()
                     for s in range(seeds)], axis=1)


@torch.no_grad()
def group_scores(model, prompts, steps, group, reward) -> np.ndarray:
    """[prompts, group]: a rollout's group per prompt (the same prompt repeated, one generator per group)."""
    policy = Policy.of(model, steps)
    rows = []
    for i, prompt in enumerate(prompts):
        context = model.encode_text(model.tokenize([prompt] * group))
        traj = policy.sample(model, {"context": context}, model.sample_shape(group),
                             torch.Generator().manual_seed(5000 + i))
        rows.append(reward.score(model.to_images(traj.images).cpu(), [prompt] * group).double().numpy())
    return np.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="builtin:scenes-minilm-x0-4200")
    parser.add_argument("--after", required=True)
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fresh-start", type=int, default=FRESH_START,
                        help="index of the first training-stream prompt of (b) and (c); e.g. 500000: the prompts "
                        "benchmarks/best_of_n.py samples, to measure a model on the captions it was fine-tuned on")
    parser.add_argument("--name", default=None, help="the result files' stem (default: the after checkpoint's run)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_vs_heldout"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    source = prompt_source(load_config(None, []))
    prompts = {"held": source.held_out(args.prompts), "fresh": source.train(args.fresh_start, args.prompts)}
    reward = CompositionalReward()
    scores = {}
    for name, ref in (("before", args.before), ("after", args.after)):
        model = load_model(resolve_checkpoint(ref)).eval()
        scores[name] = {
            "held-out prompts, batch": batch_scores(model, prompts["held"], args.steps, args.seeds, reward),
            "fresh training prompts, batch": batch_scores(model, prompts["fresh"], args.steps, args.seeds, reward),
            "fresh training prompts, groups": group_scores(model, prompts["fresh"], args.steps, args.group, reward),
        }
    rows, result = [], {"before": args.before, "after": args.after, "prompts": args.prompts}
    for key in scores["before"]:
        b, a = scores["before"][key], scores["after"][key]
        est = {"before": bootstrap_ci(b), "after": bootstrap_ci(a), "difference": bootstrap_ci(a - b)}
        result[key] = {k: v.as_dict() for k, v in est.items()}
        d = est["difference"]
        rows.append(f"| {key} | {b.shape[1]} | {est['before']} | {est['after']} | "
                    f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}] |")
    text = (f"`{args.before}` -> `{args.after}`, {args.prompts} prompts each (training-stream prompts from index "
            f"{args.fresh_start}), {args.steps}-step stochastic sampler, "
            "verifier; paired per prompt, 95% bootstrap intervals over prompts.\n\n"
            "| prompts, sampled as | samples per prompt | before | after | change |\n|---|---|---|---|---|\n"
            + "\n".join(rows) + f"\n\nTotal time {time.monotonic() - started:.0f} s.\n")
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    after = Path(args.after.split(":", 1)[-1])
    stem = args.name or (after.parent.name if after.name == "checkpoint" else after.name)
    (args.out / f"{stem}.md").write_text(text)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
