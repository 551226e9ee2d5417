"""Can the weights hold what the base's best-of-n holds? The offline oracle of rejection-sampling fine-tuning.

    python benchmarks/best_of_n.py --prompts 2048 --n 4 --out /tmp/best4
    python -m learner.main --mode pretrain init_from=builtin:scenes-minilm-x0-4200 data.kind=folder \
        data.path=/tmp/best4/best data.holdout=0 pretrain.loss_space=x0 pretrain.l1_warmup_frac=0 ...
    python benchmarks/train_vs_heldout.py --after runs/<that run>/checkpoint

The tilt bound (benchmarks/tilt_bound.py) says the base's own samples hold the goal's +0.15: the best of 4 samples
per held-out prompt scores +0.16 above one sample. Whether a network of this size can be moved there is a separate
question, and the direct way to ask it is to give the pretraining loss exactly those images. This script draws n
samples for each of `--prompts` fresh training-stream prompts with the evaluation's sampler (the stochastic 10-step
hybrid), scores them with the verifier and writes, as a folder dataset (`data.kind=folder`: image + same-stem .txt):

    best/    each prompt's best sample, for prompts whose best scores above 0 (best-of-n given a success)
    random/  the first sample of the same prompts: the control, own samples without selection, same captions

and scores.json (every score, [prompt, sample]). Pretraining on best/ and on random/ from the base, same steps, then
the paired held-out change of each says what selection buys and what training on own samples costs by itself.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from learner.config import load_config
from learner.evaluation import to_pil
from learner.main import resolve_checkpoint
from learner.prompts import prompt_source
from proxmodel.generate import generate
from proxmodel.model import load_model
from rewards.compositional import CompositionalReward

FRESH_START = 500_000  # training-stream prompt indices past any run's (a run draws 6 per iteration) and the
                       # 777_000 onward that train_vs_heldout.py evaluates on


def save(folder: Path, stem: str, image: torch.Tensor, caption: str) -> None:
    to_pil(image[None])[0].save(folder / f"{stem}.png")
    (folder / f"{stem}.txt").write_text(caption, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", default="builtin:scenes-minilm-x0-4200")
    parser.add_argument("--prompts", type=int, default=2048)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--batch", type=int, default=64, help="prompts per sampling batch")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    model = load_model(resolve_checkpoint(args.init)).eval()
    prompts = prompt_source(load_config(None, [])).train(FRESH_START, args.prompts)
    reward = CompositionalReward()
    for name in ("best", "random"):
        (args.out / name).mkdir(parents=True, exist_ok=True)
    scores = []
    for first in tqdm(range(0, args.prompts, args.batch), desc="best-of-n", unit="batch"):
        chunk = prompts[first:first + args.batch]
        # one batch per draw: draw j of every prompt shares the noise seed, a prompt's draws have different seeds
        draws = [generate(model, chunk, args.steps, 10_000 + first * args.n + j) for j in range(args.n)]
        r = torch.stack([reward.score(images, chunk).float() for images in draws], dim=1)  # [prompts, n]
        scores.extend(r.tolist())
        for i, caption in enumerate(chunk):
            best = int(r[i].argmax())
            if r[i, best] <= 0:
                continue
            stem = f"{first + i:06d}"
            save(args.out / "best", stem, draws[best][i], caption)
            save(args.out / "random", stem, draws[0][i], caption)
    s = np.array(scores)
    best = s.max(axis=1)
    kept = best > 0  # kept: the prompts written to best/ and random/
    summary = {"init": args.init, "prompts": args.prompts, "n": args.n, "steps": args.steps, "kept": int(kept.sum()),
               "mean_one_sample": float(s[:, 0].mean()), "mean_best": float(best.mean()),
               "mean_kept_best": float(best[kept].mean()), "mean_kept_random": float(s[kept, 0].mean()),
               "seconds": round(time.monotonic() - started), "scores": scores}
    (args.out / "scores.json").write_text(json.dumps(summary) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "scores"}, indent=1))


if __name__ == "__main__":
    main()
