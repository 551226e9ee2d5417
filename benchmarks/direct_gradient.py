"""How far does the direct objective's gradient reach? Its size and the reward one step along it buys, per K.

    python benchmarks/direct_gradient.py [--init builtin:scenes-base] [--ks 1 3 10] [--reps 2] [--out DIR]

grpo.objective direct (learner/direct_objective.py) backpropagates compositional_soft through the last K sampler
steps. For each K and each of --reps batches (12 training prompts x 8 samples, the stochastic 10-step hybrid sampler),
this computes that gradient g on the batch, then moves the weights one step along it and samples again with the
same noise, on the same batch and on an independent one (other prompts, other noise):

- a sign step, lr x sign(g), the size of Adam's first steps at grpo.lr = lr;
- a normalised step, s x g / |g|, to see how far the first-order picture holds.

and reports |g| and the change of the trained (soft) and the thresholded verifier's mean reward. A step that helps
the same batch but not the other one fits the batch; one that hurts both at a small size means the reward, as a
function of the weights at fixed noise, is rough at that scale. Writes markdown and JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from learner import env  # noqa: E402,F401  (offline, no telemetry)

STEPS = [("sign", 1e-5), ("sign", 1e-4), ("normalised", 3e-3), ("normalised", 3e-2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", default="builtin:scenes-base")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 3, 10])
    parser.add_argument("--reps", type=int, default=2, help="independent batches per K")
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "direct_gradient")
    args = parser.parse_args()

    import torch

    from learner.config import load_config
    from learner.direct_objective import direct_loss
    from learner.main import resolve_checkpoint
    from learner.prompts import prompt_source
    from proxmodel.model import load_model
    from proxmodel.policy import Policy
    from rewards import build

    torch.set_num_threads(args.threads)
    started = time.monotonic()
    model = load_model(resolve_checkpoint(args.init))
    model.text.requires_grad_(False)  # as in GRPO (grpo.train_text false)
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    policy = Policy.of(model, 10)
    prompts = prompt_source(load_config(None, []))
    soft, verifier = build("compositional_soft"), build("compositional")

    def batch(index: int) -> tuple[list[str], torch.Tensor, int]:
        rows = [p for p in prompts.train(index * args.prompts, args.prompts) for _ in range(args.group)]
        return rows, model.tokenize(rows), 1000 + index

    def sample(rows, tokens, seed):
        with torch.no_grad():
            out = policy.sample(model, {"tokens": tokens}, model.sample_shape(len(rows)),
                                torch.Generator().manual_seed(seed))
            images = model.to_images(out.images)
            return out, np.array([float(soft.score(images, rows).mean()), float(verifier.score(images, rows).mean())])

    def set_weights(direction=None, size: float = 0.0) -> None:
        with torch.no_grad():
            for p, p0, d in zip(params, start, direction or [None] * len(params)):
                p.copy_(p0 if d is None else p0 + size * d)

    results = {}
    for k in args.ks:
        norms, changes = [], {f"{kind} {size:g}": [] for kind, size in STEPS}
        for rep in range(args.reps):
            set_weights()
            own, other = batch(2 * rep), batch(2 * rep + 1)
            trajectory, own_before = sample(*own)
            _, other_before = sample(*other)
            loss, _ = direct_loss(model, None, policy, own[1], trajectory.states, own[0], soft, k)
            model.zero_grad()
            loss.backward()
            ascent = [-p.grad.detach().clone() for p in params]  # the loss is minus the reward
            norm = float(torch.sqrt(sum((g * g).sum() for g in ascent)))
            norms.append(norm)
            for kind, size in STEPS:
                direction = [g.sign() for g in ascent] if kind == "sign" else [g / norm for g in ascent]
                set_weights(direction, size)
                changes[f"{kind} {size:g}"].append(np.concatenate([sample(*own)[1] - own_before,
                                                                  sample(*other)[1] - other_before]))
            print(f"K={k} batch {rep}: |g| {norm:.3g} ({time.monotonic() - started:.0f} s)", flush=True)
        results[k] = {"grad_norm": norms, "changes": {name: np.mean(v, axis=0).tolist() for name, v in changes.items()}}
    set_weights()

    lines = [f"`{args.init}`; {args.reps} batches of {args.prompts} training prompts x {args.group} samples per K "
             "(means over batches); change of the mean reward after one step, resampled with the same noise. "
             "Same batch = the one the gradient was taken on; other = other prompts and noise.", "",
             "| K | gradient norm per batch | step | soft, same batch | verifier, same batch | soft, other batch | "
             "verifier, other batch |", "|---|---|---|---|---|---|---|"]
    for k, r in results.items():
        norms = ", ".join(f"{n:.3g}" for n in r["grad_norm"])
        for name, (s_own, v_own, s_other, v_other) in r["changes"].items():
            lines.append(f"| {k} | {norms} | {name} | {s_own:+.3f} | {v_own:+.3f} | {s_other:+.3f} | {v_other:+.3f} |")
    text = "\n".join(lines) + f"\n\nTotal time {time.monotonic() - started:.0f} s.\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps({"init": args.init, "steps": STEPS, "results": results},
                                                      indent=1) + "\n")


if __name__ == "__main__":
    main()
