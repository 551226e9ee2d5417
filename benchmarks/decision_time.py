"""At which sampler step is a sample's reward decided? Branch the chain there and compare.

    python benchmarks/decision_time.py [--model builtin:scenes-minilm-x0-4200] [--reward compositional] [--prompts 128]
        [--branches 2]

One 10-step stochastic chain per held-out prompt (the evaluation's sampler); from each recorded state y_k the chain is
continued `--branches` times with fresh noise. How far the branches' rewards agree with the original's says how much
of the outcome is fixed by y_k: at the start (only y_N shared) the branches are nearly independent samples of the
prompt; at the last state only the final prox is left. An update that must move *which composition* is drawn (the
reward's object / colour / place) has to act on the steps before the outcome is decided; this measures where that is,
for the pretraining loss's (t, lam) pairs and the policy gradient's trained transitions alike.
Per branch point: the share of the outcome still undecided (the branches' mean squared reward change over that of
independent samples of the same prompts), the fraction of verdicts kept (reward above 0.5 on both or neither) and
the branches' mean |reward change|, with 95% bootstrap intervals over prompts.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from learner.bootstrap import bootstrap_ci, bootstrap_stat
from learner.config import load_config
from learner.main import resolve_checkpoint
from learner.prompts import prompt_source
from proxmodel.generate import generate, sample
from proxmodel.model import load_model, prox_fn
from proxmodel.policy import Policy
from proxmodel.sampler import hybrid_step, standard_normal
from rewards import build


@torch.no_grad()
def continue_chain(prox, y: torch.Tensor, grid, k: int, generator: torch.Generator) -> torch.Tensor:
    """The hybrid sampler from the recorded y_k down to x_0 with fresh noise (every step stochastic, eta = 1)."""
    for step in range(k, 0, -1):
        noise = standard_normal(tuple(y.shape), generator, y.device) if step > 1 else None
        out = hybrid_step(prox, y, grid, step, noise=noise)
        y = out.x if step == 1 else out.y
    return y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:scenes-minilm-x0-4200")
    parser.add_argument("--reward", choices=["compositional", "compositional_strict"], default="compositional",
                        help="the verifier setting whose outcome is branched (GRPO's default trains the strict one)")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--branches", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decision_time"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    prompts = prompt_source(load_config(None, [])).held_out(args.prompts)
    reward = build(args.reward)
    model = load_model(resolve_checkpoint(args.model)).eval()
    policy = Policy.of(model, args.steps)
    context = model.encode_text(model.tokenize(prompts))
    prox = prox_fn(model, 1.0, context=context)
    traj = sample(model, prompts, args.steps, seed=0)
    original = reward.score(model.to_images(traj.images), prompts).double().numpy()
    n = args.steps
    orig = np.repeat(original[:, None], args.branches, axis=1)

    # [prompts, branches]: independent samples of every prompt (new start noise), the undecided reference
    independent = np.stack([reward.score(generate(model, prompts, args.steps, 10_000 + b), prompts).double().numpy()
                            for b in range(args.branches)], axis=1)
    rows, result = [], {"model": args.model, "reward": args.reward, "prompts": args.prompts,
                        "branches": args.branches, "points": []}
    for j in range(n):  # branch from states[:, j] = y_{n - j}: j transitions of the original kept
        k = n - j
        branch = np.stack([
            reward.score(model.to_images(continue_chain(prox, traj.states[:, j], policy.grid, k,
                                                        torch.Generator().manual_seed(100 + 10 * j + b))),
                         prompts).double().numpy()
            for b in range(args.branches)], axis=1)  # [prompts, branches]
        # the branches' squared reward change over that of independent samples: 1 = nothing decided yet, 0 = all
        undecided = bootstrap_stat(lambda i: ((branch[i] - orig[i]) ** 2).mean()
                                   / max(((independent[i] - orig[i]) ** 2).mean(), 1e-12), len(prompts),
                                   resamples=1000)
        kept = bootstrap_ci(((orig > 0.5) == (branch > 0.5)).astype(float))
        change = bootstrap_ci(np.abs(branch - orig))
        t_k = float(policy.grid.t_at(k))
        result["points"].append({"kept_transitions": j, "t": t_k, "undecided": undecided.as_dict(),
                                 "verdict_kept": kept.as_dict(), "abs_change": change.as_dict()})
        rows.append(f"| y_{k} (t = {t_k:.1f}) | {j} | {undecided.mean:.2f} [{undecided.low:.2f}, "
                    f"{undecided.high:.2f}] | {kept} | {change} |")
        print(rows[-1], flush=True)
    kept = bootstrap_ci(((orig > 0.5) == (independent > 0.5)).astype(float))
    rows.insert(0, f"| nothing (independent samples) | - | 1 | {kept} | {bootstrap_ci(np.abs(independent - orig))} |")
    text = (f"`{args.model}`, {args.prompts} held-out prompts, one {n}-step stochastic chain each, continued "
            f"{args.branches} times with fresh noise from each state; reward {args.reward}; 95% bootstrap over "
            "prompts. Undecided: the branches' mean squared reward change over that of independent samples of the "
            "prompt.\n\n"
            "| branched at | transitions kept | undecided | verdict kept (> 0.5) | "
            "mean abs change |\n|---|---|---|---|---|\n" + "\n".join(rows)
            + f"\n\nOriginal mean {original.mean():.3f}. Total time {time.monotonic() - started:.0f} s.\n")
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decision_time.md").write_text(text)
    (args.out / "decision_time.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
