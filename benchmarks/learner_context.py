"""The learner's text encoding: captions encoded per transition call (before) vs once per batch (after).

    python benchmarks/learner_context.py [--repeats 5] [--out benchmarks/results/learner_context]

With the text encoder frozen (GRPO's default), TrainGroup caches the encoded captions, so a trained transition
runs the U-Net only, for the policy and for the KL reference. This times one trained transition of the default
batch (6 groups x 8 images, one merged call, clipped policy loss + KL, backward) both ways in the same process, for
each shipped base, and checks that both give the same loss.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from report import publish  # a sibling script (see report.py)

ROOT = Path(__file__).resolve().parent.parent


def measure(base: str, repeats: int) -> dict:
    from learner.config import load_config
    from learner.grpo_learner import TrainGroup, transition_loss
    from learner.prompts import prompt_source
    from proxmodel.model import load_model
    from proxmodel.policy import Policy

    g = load_config(ROOT / "configs" / "default.yaml").grpo
    model = load_model(ROOT / "proxmodel" / "weights" / base).eval()
    model.text.requires_grad_(False)  # GRPO's default
    reference = load_model(ROOT / "proxmodel" / "weights" / base).eval().requires_grad_(False)
    policy = Policy.of(model, g.steps, g.eta, g.guidance)
    prompts = prompt_source(load_config(ROOT / "configs" / "default.yaml")).held_out(g.prompts_per_iteration)
    tokens = model.tokenize([p for p in prompts for _ in range(g.group_size)])
    with torch.no_grad():
        tr = policy.sample(model, {"tokens": tokens}, model.sample_shape(len(tokens)), torch.Generator().manual_seed(0))
    with torch.no_grad():
        context = model.encode_text(tokens)
    after = TrainGroup(tokens, tr.images, tr.states, tr.log_probs, torch.randn(len(tokens)), context)
    before = dataclasses.replace(after, context=None)
    j = g.steps // 2

    def step(batch: TrainGroup) -> float:
        model.zero_grad(set_to_none=True)
        loss = transition_loss(model, reference, policy, [batch], j, g.clip_range, g.kl_coef)[0]
        loss.backward()
        return float(loss)

    losses = {name: step(b) for name, b in (("before", before), ("after", after))}  # also the warm-up
    assert abs(losses["before"] - losses["after"]) <= 1e-5 * max(1.0, abs(losses["before"])), losses
    times = {}
    for name, b in (("before", before), ("after", after)):
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step(b)
            runs.append(time.perf_counter() - t0)
        times[name] = sorted(runs)[len(runs) // 2]
    return {"base": base, "images": len(tokens), "before_s": times["before"], "after_s": times["after"],
            "speedup": times["before"] / times["after"], "loss_before": losses["before"],
            "loss_after": losses["after"], "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bases", nargs="+", default=["scenes-base", "scenes-minilm"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "learner_context")
    args = parser.parse_args()
    rows = [measure(b, args.repeats) for b in args.bases]
    lines = ["| base | images | tokens per call (before) s | cached context (after) s | speed-up |", "|---|---|---|---|---|"]
    lines += [f"| {r['base']} | {r['images']} | {r['before_s']:.3f} | {r['after_s']:.3f} | {r['speedup']:.2f}x |"
              for r in rows]
    publish("\n".join(lines), rows, args.out, "learner_context")


if __name__ == "__main__":
    main()
