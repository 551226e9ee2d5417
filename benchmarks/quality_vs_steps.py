"""Prox vs score: sample quality against the number of network evaluations (NFE), on scenes and on real digits.

    python benchmarks/quality_vs_steps.py [--quick] [--datasets scenes digits] [--keep-models DIR | --models DIR]

For each dataset it pretrains a prox model and a score model of the same backbone with equal data, iterations and
batch size (`python -m learner.main --mode pretrain`, model.kind=prox / score; same seed, same data stream), then
samples the same held-out prompts with `--seeds` noise seeds at each NFE with every sampler of each model and scores
the images, each number with a 95% bootstrap interval (over prompts with their seed-averaged scores; the Frechet
distance over samples):

    prox:  the stochastic hybrid sampler (the method, GRPO's policy) and the deterministic probability-flow sampler
           (lam = gamma/2). The prox model is pretrained on exactly the NFEs reported (pretrain.step_candidates
           {5, 10, 20}) and both samplers' lam; the eta = 0 hybrid chain (mode-seeking, not a sampler) is not shown.
    score: Euler-Maruyama + final denoising step (sde), probability-flow ODE (ode), DDIM (diffusers' scheduler)

    scenes  compositional accuracy of the scene verifier (configs/default.yaml's model and data)
    digits  accuracy of a classifier trained on the real digits against the prompt's digit, and the Frechet
            distance between generated and real digits in that classifier's hidden features (configs/digits.yaml)

Writes a markdown table and a plot per dataset. `--quick` pretrains briefly (< 15 min on 2 CPU cores, numbers are
only a smoke check); the full version trains for each config's own iteration count.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

NFES = (5, 10, 20)  # = pretrain.step_candidates of both configs: every prox query is on its training support
# (label, sampler, eta) per model kind; flow, ODE and DDIM are deterministic by construction.
SAMPLERS = {
    "prox": (("prox hybrid", "hybrid", 1.0), ("prox flow", "flow", 0.0)),
    "score": (("score sde", "sde", 1.0), ("score ode", "ode", 0.0), ("score ddim", "ddim", 0.0)),
}
CONFIGS = {"scenes": ROOT / "configs" / "default.yaml", "digits": ROOT / "configs" / "digits.yaml"}
QUICK = {"scenes": 200, "digits": 200}  # pretraining iterations of --quick


def pretrain(kind: str, config: Path, iterations: int | None, scratch: Path, uri: str) -> Path:
    """One pretraining run through the CLI; returns its exported (EMA) checkpoint."""
    cmd = [sys.executable, "-m", "learner.main", "--mode", "pretrain", "--config", str(config),
           f"run_dir={scratch}", f"mlflow.tracking_uri={uri}", "mlflow.experiment=benchmark-quality",
           f"model.kind={kind}"]
    if iterations:
        cmd += [f"pretrain.iterations={iterations}", f"pretrain.checkpoint_every={iterations}"]
    print(f"pretraining the {kind} model: {' '.join(cmd[2:])}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"pretraining the {kind} model failed:\n{proc.stderr[-3000:]}")
    return Path(json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())["checkpoint"])


@dataclass
class Metric:
    """How one dataset's images are judged: prompts, and score([images per seed]) -> {metric name: Estimate}."""

    prompts: list[str]
    score: Callable[..., dict]
    names: tuple[str, ...]
    note: str


def scenes_metric(prompts: int) -> Metric:
    import numpy as np

    from learner.bootstrap import bootstrap_ci
    from learner.config import load_config
    from learner.prompts import prompt_source
    from rewards import build

    # GRPO's held-out prompts (the default config's prompt_seed and omit_prob), so that a base's numbers here and in
    # a GRPO run's evaluation are of one prompt set: the prompt set alone moved a score base's 10-step SDE accuracy
    # by 0.04 (0.114 [0.095, 0.134] vs 0.075 [0.058, 0.094], 6 noise seeds each; docs/results.md, session 31).
    texts = prompt_source(load_config(ROOT / "configs" / "default.yaml")).held_out(prompts)
    reward = build("compositional")

    def score(per_seed) -> dict:
        return {"accuracy": bootstrap_ci(np.stack([reward.score(im, texts).numpy() for im in per_seed], axis=1))}

    return Metric(texts, score, ("accuracy",),
                  f"compositional accuracy on {prompts} held-out scene prompts (GRPO's evaluation set)")


def digits_metric(per_digit: int) -> Metric:
    import numpy as np

    from digits_accuracy import DigitJudge, digit_prompts, frechet, hidden_features, ink_8x8
    from learner.bootstrap import Estimate, bootstrap_ci

    judge = DigitJudge.fit(data_seed=0)
    labels, texts = digit_prompts(per_digit)

    def frechet_ci(features: np.ndarray, resamples: int = 200) -> Estimate:
        """The distance of all samples, with a percentile interval from resampling the samples."""
        rng = np.random.default_rng(0)
        draws = [frechet(features[rng.integers(len(features), size=len(features))], judge.real_features)
                 for _ in range(resamples)]
        low, high = np.quantile(draws, [0.025, 0.975])
        return Estimate(frechet(features, judge.real_features), float(low), float(high))

    def score(per_seed) -> dict:
        correct = np.stack([judge.clf.predict(ink_8x8(im)) == labels for im in per_seed], axis=1)
        features = np.concatenate([hidden_features(judge.clf, ink_8x8(im)) for im in per_seed])
        return {"accuracy": bootstrap_ci(correct.astype(float)), "frechet": frechet_ci(features)}

    return Metric(texts, score, ("accuracy", "frechet"),
                  f"{len(texts)} samples ({per_digit} per digit); classifier accuracy on held-out real digits "
                  f"{judge.ceiling:.3f}; Frechet distance of the {judge.held_out} held-out real digits "
                  f"{judge.real_frechet:.2f} (a floor)")


def quality_table(checkpoints: dict[str, Path], metric: Metric, seeds: int, nfes: tuple[int, ...]) -> dict:
    """{sampler label: {NFE: {metric: Estimate}}} on the metric's prompts with noise seeds 0..seeds-1."""
    import torch

    from proxmodel.generate import generate
    from proxmodel.model import load_model

    rows: dict = {}
    for kind, path in checkpoints.items():
        model = load_model(path)
        for label, sampler, eta in SAMPLERS[kind]:
            row = rows.setdefault(label, {})
            for nfe in nfes:
                with torch.no_grad():
                    per_seed = [generate(model, metric.prompts, nfe, seed, eta=eta, sampler=sampler)
                                for seed in range(seeds)]
                row[nfe] = metric.score(per_seed)
                print(f"{label} NFE={nfe}: " + " ".join(f"{k} {v}" for k, v in row[nfe].items()), flush=True)
    return rows


def markdown(rows, metric: Metric, title: str, nfes: tuple[int, ...]) -> str:
    out = [f"{title}; {metric.note}; mean [95% interval]", ""]
    for name in metric.names:
        out += [f"{name}:", "", "| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
                "|" + "---|" * (len(nfes) + 1)]
        for label, row in rows.items():
            out.append(f"| {label} | " + " | ".join(str(row[n][name]) if n in row else "-" for n in nfes) + " |")
        out.append("")
    return "\n".join(out)


def plot(rows, metric: Metric, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metric.names), figsize=(6 * len(metric.names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], metric.names):
        for label, row in rows.items():
            nfes = sorted(row)
            est = [row[n][name] for n in nfes]
            line, = ax.plot(nfes, [e.mean for e in est], marker="o", label=label,
                            linestyle="--" if label.startswith("score") else "-")
            ax.fill_between(nfes, [e.low for e in est], [e.high for e in est], color=line.get_color(), alpha=0.15)
        ax.set_xscale("log")
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_ylabel(name + (" (lower is better)" if name == "frechet" else ""))
        if name == "frechet":
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 90), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK['scenes']} pretraining iterations per model and fewer prompts (< 15 min)")
    parser.add_argument("--datasets", nargs="+", choices=sorted(CONFIGS), default=["scenes", "digits"])
    parser.add_argument("--iterations", type=int, default=None,
                        help="pretraining iterations for every model (default: each config's own; quick: 200)")
    parser.add_argument("--keep-models", type=Path, default=None,
                        help="copy the pretrained checkpoints to DIR/<dataset>/<prox|score> for a later --models")
    parser.add_argument("--models", type=Path, default=None,
                        help="skip pretraining: reuse DIR/<dataset>/<prox|score> (written by --keep-models, or "
                        "DIR/scenes by benchmarks/grpo_reward_vs_time.py --keep-models)")
    parser.add_argument("--seeds", type=int, default=2, help="noise seeds per prompt")
    parser.add_argument("--nfes", type=int, nargs="+", default=list(NFES),
                        help="step counts (the prox model is trained on 5, 10, 20; others query it off support)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="proxrl-quality-"))
    uri = f"sqlite:///{scratch / 'mlflow.db'}"
    try:
        for dataset in args.datasets:
            iterations = args.iterations or (QUICK[dataset] if args.quick else None)
            if args.models:
                kept = args.models / dataset
                checkpoints = {kind: kept / kind for kind in SAMPLERS}
                made = json.loads((kept / "pretrain.json").read_text())
                iterations, warm_start = made["iterations"], made.get("warm_start")
            else:
                warm_start = None
                checkpoints = {kind: pretrain(kind, CONFIGS[dataset], iterations, scratch / dataset / kind, uri)
                               for kind in SAMPLERS}
                if iterations is None:
                    from learner.config import load_config

                    iterations = load_config(CONFIGS[dataset]).pretrain.iterations
                if args.keep_models:
                    for kind, path in checkpoints.items():
                        shutil.copytree(path, args.keep_models / dataset / kind, dirs_exist_ok=True)
                    (args.keep_models / dataset / "pretrain.json").write_text(
                        json.dumps({"iterations": iterations}) + "\n")
            if dataset == "scenes":
                metric = scenes_metric(32 if args.quick else 128)
            else:
                metric = digits_metric(20 if args.quick else 50)
            title = (f"{dataset}: prox and score models pretrained {iterations} iterations "
                     f"({CONFIGS[dataset].name}; same backbone, data, batch and seed)" if warm_start is None else
                     f"{dataset}: prox and score models, both {warm_start}'s network continued {iterations} "
                     "iterations with their own loss (same data, batch and seed)")
            nfes = tuple(args.nfes)
            rows = quality_table(checkpoints, metric, args.seeds, nfes)
            table = markdown(rows, metric, title, nfes)
            (args.out / f"quality_vs_steps_{dataset}.md").write_text(table)
            as_json = {label: {n: {k: e.as_dict() for k, e in r.items()} for n, r in row.items()}
                       for label, row in rows.items()}
            (args.out / f"quality_vs_steps_{dataset}.json").write_text(json.dumps(
                {"title": title, "note": metric.note, "seeds": args.seeds, "rows": as_json}, indent=1) + "\n")
            plot(rows, metric, title, args.out / f"quality_vs_steps_{dataset}.png")
            print(table, flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
