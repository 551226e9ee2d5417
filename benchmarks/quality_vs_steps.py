"""Prox vs score on the scenes data: compositional accuracy against the number of network evaluations (NFE).

    python benchmarks/quality_vs_steps.py [--quick] [--out benchmarks/results/quality]

Pretrains a prox model and a score model of the same backbone with equal data, iterations and batch size
(`python -m learner.main --mode pretrain`, model.kind=prox / score; same seed, same scene stream), then samples the
same held-out prompts with the same noise seed at each NFE with every sampler of each model (prox: hybrid, and fully
backward where the grid allows it; score: Euler-Maruyama, probability-flow ODE, DDIM) and scores the images with
the compositional verifier. Writes a markdown table and a plot. `--quick` uses a short pretraining (< 15 min on
2 CPU cores); the full version trains for the default config's 2000 iterations.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NFES = (1, 2, 3, 5, 10, 20, 50)
SAMPLERS = {"prox": ("hybrid", "backward"), "score": ("sde", "ode", "ddim")}


def pretrain(kind: str, iterations: int, scratch: Path, uri: str) -> Path:
    """One pretraining run through the CLI; returns its exported (EMA) checkpoint."""
    cmd = [sys.executable, "-m", "learner.main", "--mode", "pretrain", f"run_dir={scratch / kind}",
           f"mlflow.tracking_uri={uri}", "mlflow.experiment=benchmark-quality", f"model.kind={kind}",
           f"pretrain.iterations={iterations}", f"pretrain.checkpoint_every={iterations}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"pretraining the {kind} model failed:\n{proc.stderr[-3000:]}")
    return Path(json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())["checkpoint"])


def accuracy_table(checkpoints: dict[str, Path], prompts: int, seed: int) -> dict[str, dict[int, float]]:
    """{sampler label: {NFE: mean compositional accuracy}} on held-out prompts with fixed noise."""
    from learner.evaluation import generate
    from learner.data import EVAL_SEED_OFFSET
    from proxmodel.model import load_model
    from proxmodel.schedule import VPSchedule
    from rewards import build
    from rewards.scenes import scene_prompts

    reward = build("compositional")
    texts = scene_prompts(0, EVAL_SEED_OFFSET, prompts)
    backward_min = VPSchedule().min_steps_below(2.0)
    rows: dict[str, dict[int, float]] = {}
    for kind, path in checkpoints.items():
        model = load_model(path)
        for sampler in SAMPLERS[kind]:
            row = rows.setdefault(f"{kind} {sampler}", {})
            for nfe in NFES:
                if sampler == "backward" and nfe < backward_min:
                    row[nfe] = float("nan")  # the grid has a step with gamma >= 2
                    continue
                images = generate(model, texts, nfe, seed, eta=1.0, sampler=sampler)
                row[nfe] = float(reward.score(images, texts).mean())
                print(f"{kind} {sampler} NFE={nfe}: {row[nfe]:.3f}", flush=True)
    return rows


def markdown(rows: dict[str, dict[int, float]], iterations: int, prompts: int) -> str:
    head = "| sampler | " + " | ".join(f"NFE {n}" for n in NFES) + " |"
    lines = [f"Compositional accuracy on {prompts} held-out scene prompts, models pretrained {iterations} iterations "
             "(same backbone, data, batch and seed)", "", head, "|" + "---|" * (len(NFES) + 1)]
    for label, row in rows.items():
        lines.append(f"| {label} | " + " | ".join("-" if v != v else f"{v:.3f}" for v in row.values()) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: dict[str, dict[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, row in rows.items():
        points = [(n, v) for n, v in row.items() if v == v]
        ax.plot(*zip(*points), marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel("compositional accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short pretraining and fewer prompts (< 15 min)")
    parser.add_argument("--iterations", type=int, default=None, help="pretraining iterations (default 2000, quick 150)")
    parser.add_argument("--models", type=Path, default=None,
                        help="skip pretraining: a folder with prox/ and score/ checkpoints trained on equal terms "
                        "(e.g. the one benchmarks/grpo_reward_vs_time.py --keep-models writes)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality")
    args = parser.parse_args()
    iterations, prompts = (150, 32) if args.quick else (2000, 128)
    iterations = args.iterations or iterations
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        uri = f"sqlite:///{scratch / 'mlflow.db'}"
        if args.models:
            checkpoints = {kind: args.models / kind for kind in SAMPLERS}
            iterations = json.loads((args.models / "pretrain.json").read_text())["iterations"]
        else:
            checkpoints = {kind: pretrain(kind, iterations, scratch, uri) for kind in SAMPLERS}
        rows = accuracy_table(checkpoints, prompts, seed=0)
    table = markdown(rows, iterations, prompts)
    (args.out / "quality_vs_steps.md").write_text(table)
    plot(rows, args.out / "quality_vs_steps.png")
    print(table)


if __name__ == "__main__":
    main()
