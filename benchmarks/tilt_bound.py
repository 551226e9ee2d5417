"""How far must the policy move to gain a given held-out reward? The KL-optimal bound, measured on the base's samples.

    python benchmarks/tilt_bound.py [--init builtin:scenes-base] [--reward compositional] [--prompts 128]
        [--samples 64] [--out DIR]

Of all policies at a given KL from the base, the one with the highest expected reward is the base tilted by its
reward, p_beta(x | c) ~ p_0(x | c) exp(R(x, c) / beta) (the optimum of KL-regularised RL). On n samples of the base per
prompt, p_beta is a reweighting of them: for each beta, E_beta[R] and KL(p_beta || p_0) = sum w log(n w), per prompt,
one beta for all prompts (the regularised optimum shares it). The script samples the GRPO held-out prompts with the
stochastic 10-step hybrid sampler (GRPO's held-out evaluation), scores them with the trained verifier (`--reward`:
the lenient `compositional` or `compositional_strict`) and the other setting as the check, and prints:

- the base's held-out mean, the best of k samples for k = 1..n (unbiased from the order statistics) and its KL bound
  log k - (k - 1)/k;
- the reward the optimal tilt reaches at the KL per prompt that GRPO runs spent (the per-transition KL to the start
  times the transitions: the path KL, an upper bound on the final images' KL), and the KL it needs for +0.05, +0.10,
  +0.15, with 95% bootstrap intervals over prompts;
- the same gain split by what the tilt may look at: a prompt-agnostic tilt weights an image by its mean credit under
  `--others` distractor captions, m(x), a function of the image alone (the one tilt a policy change that ignores the
  caption can make: brighter, bigger, purer objects for every prompt), and a caption-specific tilt by r(x, c) - m(x).

The empirical tilt cannot exceed log n nats per prompt (all weight on one sample), so larger gains read "> log n".
Writes markdown and JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from learner import env  # noqa: E402,F401  (offline, no telemetry)
from learner.bootstrap import Estimate, bootstrap_ci, bootstrap_stat  # noqa: E402


# --reward: the verifier setting tilted by -> the other, reported as its check
SETTINGS = {"compositional": "compositional_strict", "compositional_strict": "compositional"}


def best_of_k(rewards: np.ndarray, k: int) -> np.ndarray:
    """E[max of k draws without replacement] per row, from n samples per row (order statistics, unbiased)."""
    n = rewards.shape[1]
    r = np.sort(rewards, axis=1)
    # P(the i-th smallest, i = 1..n, is the max of a random k-subset) = C(i-1, k-1) / C(n, k)
    weights = np.array([math.comb(i - 1, k - 1) for i in range(1, n + 1)], dtype=np.float64) / math.comb(n, k)
    return r @ weights


def tilt(rewards: np.ndarray, beta: float, other: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(E_beta[R], KL(p_beta || p_0)) per row: the empirical base reweighted by exp(R / beta); with `other`, the
    tilted mean of that score (e.g. the strict check) instead of R's."""
    logits = rewards / beta
    logits = logits - logits.max(axis=1, keepdims=True)
    w = np.exp(logits)
    w /= w.sum(axis=1, keepdims=True)
    n = rewards.shape[1]
    kl = np.sum(w * np.log(np.clip(w * n, 1e-300, None)), axis=1)
    return (w * (rewards if other is None else other)).sum(axis=1), kl


def tilt_for_gain(rewards: np.ndarray, gain: float, betas: np.ndarray) -> float:
    """The largest beta (smallest KL) whose tilt's mean reward is the base's + gain; nan if no tilt of these samples
    reaches it (the gain needs more than log n nats per prompt)."""
    base = rewards.mean()
    for beta in betas:  # from large beta (near the base) to small (near the per-prompt best)
        if tilt(rewards, beta)[0].mean() - base >= gain:
            return float(beta)
    return float("nan")


def kl_for_gain(rewards: np.ndarray, gain: float, betas: np.ndarray) -> float:
    """The mean KL per prompt of the tilt (one beta for all prompts) whose mean reward is the base's + gain; the cap
    log n where the samples cannot reach the gain (so an interval's upper end at the cap reads "at least")."""
    beta = tilt_for_gain(rewards, gain, betas)
    return math.log(rewards.shape[1]) if math.isnan(beta) else float(tilt(rewards, beta)[1].mean())


def gain_at_kl(rewards: np.ndarray, budget: float, betas: np.ndarray, by: np.ndarray | None = None) -> float:
    """The largest mean reward gain of a tilt whose mean KL per prompt is at most `budget`; with `by`, the tilt is by
    that score instead of the reward (e.g. a score that ignores the caption), and the gain is still the reward's."""
    by = rewards if by is None else by
    best = 0.0
    for beta in betas:
        mean, kl = tilt(by, beta, rewards)
        if kl.mean() <= budget:
            best = max(best, float(mean.mean() - rewards.mean()))
    return best


def caption_split(scores: dict[str, np.ndarray], reward: str = "compositional") -> tuple[np.ndarray, np.ndarray]:
    """(m, r - m) of this script's scores: m, the credit the image earns under any caption (its `reward` score minus
    the contrastive one of the same setting, i.e. its mean under the distractor captions), and the caption-specific
    rest r - m, which is the contrastive score itself."""
    return scores[reward] - scores["contrastive"], scores["contrastive"]


def split_change(before: dict[str, np.ndarray], after: dict[str, np.ndarray], reward: str = "compositional",
                 check: str = "compositional_strict") -> dict[str, Estimate]:
    """Paired change from `before` to `after` (scores [prompts, samples] of two policies on the same prompts and
    noises, as this script writes them) of the verifier r (`reward`), of its caption_split parts and of the check,
    with 95% bootstrap intervals over prompts."""
    n = min(before[reward].shape[1], after[reward].shape[1])

    def parts(scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        scores = {name: value[:, :n] for name, value in scores.items()}
        agnostic, specific = caption_split(scores, reward)
        return {"verifier": scores[reward], "any caption": agnostic, "caption-specific": specific,
                "check": scores[check]}

    old, new = parts(before), parts(after)
    return {name: bootstrap_ci(new[name] - old[name]) for name in old}


def bootstrap(stat, rewards: np.ndarray, resamples: int = 500) -> tuple[float, float, float]:
    """stat(rewards) with a 95% interval over prompts (rows; learner.bootstrap's), as the (mean, low, high) this
    file's JSON keeps: any statistic of the rows, e.g. the KL a tilt needs for a gain."""
    e = bootstrap_stat(lambda rows: stat(rewards[rows]), len(rewards), resamples=resamples)
    return e.mean, e.low, e.high


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", default="builtin:scenes-base", help="checkpoint folder or builtin:NAME")
    parser.add_argument("--reward", choices=list(SETTINGS), default="compositional",
                        help="the verifier setting the tilt is by (GRPO's trained reward); the other is the check")
    parser.add_argument("--prompts", type=int, default=128, help="held-out prompts (GRPO's held-out set, seed 0)")
    parser.add_argument("--samples", type=int, default=64, help="samples per prompt (the tilt's KL is <= log of it)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--spent", type=float, nargs="*", default=[],
                        help="path KLs (nats per prompt) that GRPO runs spent: the tilt's gain at each is printed")
    parser.add_argument("--others", type=int, default=8,
                        help="distractor captions per image for its prompt-agnostic credit m(x) (0 = skip the split)")
    parser.add_argument("--against", type=Path, default=None,
                        help="another run's tilt_bound.json on the same prompts (e.g. the base's): print the paired "
                        "change of the verifier split into what any caption earns and what is caption-specific")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tilt_bound")
    args = parser.parse_args()
    if args.against is not None and not args.others:
        parser.error("--against compares the caption split, which needs distractor captions: drop --others 0")

    import torch

    from learner.config import load_config
    from learner.main import resolve_checkpoint
    from learner.prompts import prompt_source
    from proxmodel.generate import generate
    from proxmodel.model import load_model
    from rewards import build

    torch.set_grad_enabled(False)
    prompts = prompt_source(load_config(None, ["seed=0"])).held_out(args.prompts)
    model = load_model(resolve_checkpoint(args.init))
    reward, check = args.reward, SETTINGS[args.reward]
    verifiers = {"compositional": build("compositional"), "compositional_strict": build("compositional_strict")}
    if args.others:  # own score minus this = m(x), the image's mean credit under other captions (the same setting)
        verifiers["contrastive"] = build("compositional_contrastive", others=args.others,
                                         strict=reward == "compositional_strict")
    scores = {name: np.zeros((len(prompts), args.samples)) for name in verifiers}
    for s in range(args.samples):
        images = generate(model, prompts, args.steps, 10_000 + s)  # other noise than the held-out evaluation's
        for name, v in verifiers.items():
            scores[name][:, s] = v.score(images, prompts).double().numpy()
        print(f"\rsampled {s + 1}/{args.samples}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    betas = np.geomspace(10.0, 1e-3, 400)
    r = scores[reward]
    fmt = lambda e: f"{e[0]:.3f} [{e[1]:.3f}, {e[2]:.3f}]"  # noqa: E731
    lines = [f"{len(prompts)} held-out prompts x {args.samples} samples of `{args.init}` (stochastic hybrid, "
             f"{args.steps} steps); reward: {reward}; 95% bootstrap intervals over prompts", "",
             f"| policy | KL per prompt (nats) | held-out reward | gain | check {check} (the same weights) |",
             "|---|---|---|---|---|"]
    result: dict = {"prompts": len(prompts), "samples": args.samples, "init": args.init, "reward": reward,
                    "check": check, "best_of": {}, "tilt": {}}
    checked = scores[check]
    for k in [1, 2, 4, 8, 16, 32, 64]:
        if k > args.samples:
            break
        e = bootstrap(lambda x: best_of_k(x, k).mean(), r)
        g = bootstrap(lambda x: best_of_k(x, k).mean() - x.mean(), r)
        kl = math.log(k) - (k - 1) / k
        result["best_of"][k] = {"reward": e, "gain": g, "kl_bound": kl}
        name = "the base" if k == 1 else f"best of {k} by the verifier"
        base_check = f"{checked.mean():.3f}" if k == 1 else "-"
        lines.append(f"| {name} | <= {kl:.2f} | {fmt(e)} | {g[0]:+.3f} | {base_check} |")
    for gain in [0.05, 0.10, 0.15]:
        e = bootstrap(lambda x: kl_for_gain(x, gain, betas), r)
        beta = tilt_for_gain(r, gain, betas)
        tilted = float(tilt(r, beta, checked)[0].mean()) if not math.isnan(beta) else float("nan")
        result["tilt"][f"gain {gain}"] = {"kl": e, "check": tilted}
        lines.append(f"| optimal tilt for +{gain:.2f} | {fmt(e)} | {r.mean() + gain:.3f} | +{gain:.2f} | "
                     f"{tilted:.3f} |")
    for spent in args.spent:
        e = bootstrap(lambda x: gain_at_kl(x, spent, betas), r)
        result["tilt"][f"kl {spent}"] = e
        lines.append(f"| optimal tilt at a GRPO run's path KL | {spent:.2f} | - | {fmt(e)} | - |")
    if args.others:
        agnostic, specific = caption_split(scores, reward)
        both = np.stack([r, agnostic, specific], axis=-1)  # bootstrapped together, row by row
        result["split"] = {"agnostic_mean": float(agnostic.mean())}
        lines += ["", f"What the tilt may look at ({args.others} distractor captions per image; the gain is always "
                  "the trained verifier's under the image's own caption):", "",
                  "| KL per prompt (nats) | tilt by r(x, c) | prompt-agnostic tilt, by m(x) | caption-specific tilt, "
                  "by r - m |", "|---|---|---|---|"]
        for budget in [0.1, 0.28, 0.5, 1.0, 2.8]:
            cells = []
            for name, col in [("reward", 0), ("agnostic", 1), ("specific", 2)]:
                e = bootstrap(lambda x: gain_at_kl(x[..., 0], budget, betas, by=x[..., col]), both)
                result["split"][f"{name} kl {budget}"] = e
                cells.append(f"+{e[0]:.3f} [{e[1]:+.3f}, {e[2]:+.3f}]")
            lines.append(f"| {budget:.2f} | " + " | ".join(cells) + " |")
        lines += ["", f"m(x) averages {agnostic.mean():.3f} against the own caption's {r.mean():.3f}: that much of the "
                  "base's credit is paid to any caption."]
    lines += ["", f"Base: verifier {r.mean():.3f}, check {checked.mean():.3f}; prompts whose best of "
              f"{args.samples} samples scores 0: {float((r.max(axis=1) == 0).mean()):.0%}; the empirical tilt's KL "
              f"cannot exceed log {args.samples} = {math.log(args.samples):.2f} nats."]
    if args.against is not None:
        against = json.loads(args.against.read_text())
        if against.get("reward", "compositional") != reward:
            parser.error(f"--against {args.against} tilted by {against.get('reward', 'compositional')}, this run by "
                         f"{reward}: compare runs of one --reward")
        before = {k: np.asarray(v) for k, v in against["scores"].items()}
        change = split_change(before, scores, reward, check)
        result["change"] = {name: e.as_dict() for name, e in change.items()}
        lines += ["", f"Change from `{args.against}` (paired: same prompts and noises):", "",
                  "| score | change [95% CI] |", "|---|---|"]
        lines += [f"| {name} | {e.mean:+.3f} [{e.low:+.3f}, {e.high:+.3f}] |" for name, e in change.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tilt_bound.md").write_text(text)
    result["scores"] = {name: m.round(5).tolist() for name, m in scores.items()}
    (args.out / "tilt_bound.json").write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
