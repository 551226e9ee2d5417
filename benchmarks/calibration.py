"""Few-step calibration of a prox model's samplers: spread of the samples against the data's, and reward with a CI.

    python benchmarks/calibration.py [--models NAME=CHECKPOINT ...] [--steps 5 10 20] [--prompts 128] [--seeds 2]
                                     [--grids 0,.2,.3,.4,.5,.6,.7,.8,1 ...] [--against 10] [--guidance 1 2]

For each model and step count N (uniform grids, then any --grids through given times) it samples the held-out scene
prompts with each noise seed and reports:

- var ratio: the variance of the final samples x_0 (model space, over samples and dimensions) over the data's
  (the same statistic of as many training images); 1 is calibrated, the shipped eps base reached 2.8 at N = 5;
- query ratios (stochastic hybrid only): var(y_k) / (v_{t_{k-1}} + lam_k) along the chain, how much noisier the
  prox's inputs are than those it was trained on;
- reward: compositional accuracy, mean over prompts x seeds with a 95% bootstrap interval (learner/bootstrap.py).

Samplers: the stochastic hybrid (GRPO's policy), the probability-flow sampler (deterministic, for models trained on
lam = gamma/2), the eta = 0 mode chain (NOT a sampler: shown for its spread only), and for eps models the
inference-time rescaled prox s * prox(y / s), s = max(1, rms(y) / sqrt(v_t + lam)) (exact for Gaussian p_t).
Writes markdown and JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from learner import env  # noqa: E402,F401  (offline, no telemetry)


def rescaled(prox, sigma_data: float):
    """s * prox(y / s) with s = max(1, rms(y) / sqrt(v_t + lam)): the issue's inference-time fix for eps models."""
    import torch

    from proxmodel.model import marginal_variance
    from proxmodel.schedule import VPSchedule

    schedule = VPSchedule()

    def wrapped(y, t, lam):
        alpha = schedule.alpha(t)
        expected = (marginal_variance(alpha, sigma_data) + lam).sqrt()
        rms = y.float().pow(2).flatten(1).mean(1).sqrt()
        s = torch.clamp(rms / expected, min=1.0).view(-1, *([1] * (y.dim() - 1)))
        return s * prox(y / s, t, lam)

    return wrapped


def measure(model, prompts: list[str], grid, seeds: int, sampler: str, data_var: float, reward,
            guidance: float = 1.0) -> dict:
    import torch

    from learner.bootstrap import bootstrap_ci
    from proxmodel.model import marginal_variance, prox_fn
    from proxmodel.sampler import sample_hybrid
    from proxmodel.schedule import VPSchedule

    variant = {"hybrid": "hybrid", "rescaled": "hybrid", "flow": "flow", "mode": "hybrid"}[sampler]
    eta = 0.0 if sampler == "mode" else 1.0
    finals, scores, query = [], [], []
    with torch.no_grad():
        context = model.encode_text(model.tokenize(prompts))
        prox = prox_fn(model.eval(), guidance, context=context)
        if sampler == "rescaled":
            prox = rescaled(prox, model.cfg.sigma_data or float(data_var) ** 0.5)
        for seed in range(seeds):
            traj = sample_hybrid(prox, model.sample_shape(len(prompts)), grid, eta=eta, variant=variant,
                                 generator=torch.Generator().manual_seed(seed))
            finals.append(traj.images)
            scores.append(reward.score(model.to_images(traj.images), prompts))
            if sampler == "hybrid":  # y_k for k = N..1 against the training variance v_{t_{k-1}} + lam_k
                alpha = VPSchedule().alpha(grid.t[:-1].float()).flip(0)
                trained = marginal_variance(alpha, model.cfg.sigma_data or 1.0) + grid.gamma.float().flip(0)
                query.append(traj.states.transpose(0, 1).flatten(1).var(dim=1) / trained)
    matrix = torch.stack(scores, dim=1).numpy()  # [prompts, seeds]
    estimate = bootstrap_ci(matrix)
    out = {"var_ratio": float(torch.cat(finals).var()) / data_var, "reward": estimate.as_dict(), "text": str(estimate),
           "scores": matrix.tolist()}
    if query:
        out["query_ratios"] = [round(float(v), 2) for v in torch.stack(query).mean(0)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["shipped=builtin:scenes-base"],
                        help="NAME=CHECKPOINT (a folder or builtin:NAME)")
    parser.add_argument("--steps", nargs="+", type=int, default=[5, 10, 20])
    parser.add_argument("--grids", nargs="*", default=[], metavar="T0,T1,...",
                        help="non-uniform grids as comma-separated times from 0 to 1 (e.g. 0,.2,.3,.4,.5,.6,.7,.8,1), "
                        "measured after the uniform --steps")
    parser.add_argument("--against", type=int, default=10,
                        help="each row's paired reward difference from this model's uniform grid of this many steps "
                        "(same sampler unguided, prompts and noise seeds; measured first), when --steps includes it")
    parser.add_argument("--guidance", nargs="+", type=float, default=[1.0],
                        help="classifier-free guidance scales w (1 = none); a guided row's vs N = column pairs it with "
                        "the unguided uniform grid")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "calibration")
    args = parser.parse_args()

    import numpy as np
    import torch

    from learner.bootstrap import bootstrap_ci
    from learner.config import DataConfig
    from learner.data import EVAL_SEED_OFFSET, ScenesSource
    from learner.main import resolve_checkpoint
    from proxmodel.model import load_model
    from proxmodel.schedule import VPSchedule
    from rewards import build
    from rewards.scenes import scene_prompts

    torch.set_grad_enabled(False)
    grids = {str(n): VPSchedule().grid(n) for n in args.steps}
    for spec in args.grids:
        try:
            grid = VPSchedule().grid_at([float(v) for v in spec.split(",")])
        except ValueError as error:
            parser.error(f"--grids {spec}: {error}")
        grids[f"{grid.steps}: {','.join(f'{v:g}' for v in grid.t.tolist())}"] = grid
    grids = dict(sorted(grids.items(), key=lambda item: item[0] != str(args.against)))  # the reference first
    scales = sorted(args.guidance, key=lambda w: w != 1.0)  # unguided first: the guided rows' reference
    prompts = scene_prompts(0, EVAL_SEED_OFFSET, args.prompts)
    reward = build("compositional")
    results: dict = {}
    lines = [f"{args.prompts} held-out scene prompts x {args.seeds} noise seeds; reward = compositional accuracy, "
             "mean [95% bootstrap CI over prompts and seeds]; var ratio = var(samples) / var(data); query ratios = "
             "var(y_k) / (v_t + lam) along the stochastic chain, k = N..1; vs first model = the paired difference of "
             "the reward from the first --models entry (same prompts and noise) with its 95% bootstrap CI; vs N = "
             f"{args.against} = the same against this model's uniform {args.against}-step grid, unguided", "",
             f"| model | sampler | N | var ratio | reward | vs first model | vs N = {args.against} | query ratios |",
             "|---|---|---|---|---|---|---|---|"]
    for spec in args.models:
        name, ref = spec.split("=", 1)
        model = load_model(resolve_checkpoint(ref))
        images, _ = ScenesSource(DataConfig(), model.cfg.image_size, 3).batch(0, 512)
        data_var = float(model.encode_images(images).var())
        samplers = ["hybrid", "mode"]
        samplers += ["flow"] if "flow" in (model.cfg.trained_variants or []) else []
        samplers += ["rescaled"] if model.cfg.prox_param == "eps" else []
        for steps, grid in grids.items():
            for w, sampler in [(w, sampler) for w in scales for sampler in samplers]:
                label = sampler if w == 1.0 else f"{sampler} w={w:g}"
                r = measure(model, prompts, grid, args.seeds, sampler, data_var, reward, guidance=w)
                results.setdefault(name, {}).setdefault(label, {})[steps] = r
                cells = []
                for key, other in [("vs_first", results[next(iter(results))].get(label, {}).get(steps)),
                                   ("vs_uniform", results[name].get(sampler, {}).get(str(args.against)))]:
                    cells.append("-")
                    if other is not None and other is not r:
                        diff = bootstrap_ci(np.asarray(r["scores"]) - np.asarray(other["scores"]))
                        r[key], cells[-1] = diff.as_dict(), str(diff)
                row = (f"| {name} | {label} | {steps} | {r['var_ratio']:.2f} | {r['text']} | {' | '.join(cells)} | "
                       f"{' '.join(map(str, r.get('query_ratios', []))) or '-'} |")
                lines.append(row)
                print(row, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibration.md").write_text("\n".join(lines) + "\n")
    (args.out / "calibration.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
