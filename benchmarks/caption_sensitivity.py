"""How much does each part of a caption move the network's output, at each noise level?

    python benchmarks/caption_sensitivity.py [--init builtin:scenes-minilm] [--out DIR]

For "a large red square at the top left, on a black background" and the same caption with one attribute changed
(the place, the colour, the shape, the background), the relative change of eps_theta(y; t, lam, c) on the same 32
inputs y ~ N(0, I) (lam = (1 - alpha_t) / 2), ||eps(c') - eps(c)|| / ||eps(c)||. The first steps (t near 1) decide a
scene's layout; a word the network does not respond to there cannot place anything (docs/results.md, Session 25).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from learner import env  # noqa: E402,F401  (offline, no telemetry)

BASE = "a large red square at the top left, on a black background"
CHANGED = {"place": "a large red square at the bottom right, on a black background",
           "colour": "a large blue square at the top left, on a black background",
           "shape": "a large red circle at the top left, on a black background",
           "background": "a large red square at the top left, on a white background"}
TIMES = (0.95, 0.7, 0.4, 0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", default="builtin:scenes-minilm")
    parser.add_argument("--inputs", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "caption_sensitivity")
    args = parser.parse_args()

    import torch

    from learner.main import resolve_checkpoint
    from proxmodel.model import load_model

    model = load_model(resolve_checkpoint(args.init)).eval()
    torch.manual_seed(0)
    n, table = args.inputs, {}
    for t in TIMES:
        tt = torch.full((n,), t)
        lam = 0.5 * (1.0 - model.schedule.alpha(tt))
        y = torch.randn(n, *model.sample_shape(1)[1:])
        with torch.no_grad():
            eps = model(y, tt, lam, model.tokenize([BASE] * n))
            table[t] = {part: float((model(y, tt, lam, model.tokenize([c] * n)) - eps).norm() / eps.norm())
                        for part, c in CHANGED.items()}
    rows = [f"| {t} | " + " | ".join(f"{100 * table[t][p]:.2f}%" for p in CHANGED) + " |" for t in TIMES]
    text = (f"`{args.init}`: relative change of eps when one part of \"{BASE}\" changes, {n} pure-noise inputs "
            "per noise level.\n\n| t | " + " | ".join(CHANGED) + " |\n|---|" + "---|" * len(CHANGED) + "\n"
            + "\n".join(rows) + "\n")
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.init.replace("builtin:", "").replace("/", "_")
    (args.out / f"{stem}.md").write_text(text)
    (args.out / f"{stem}.json").write_text(json.dumps({"init": args.init, "inputs": n, "relative_change": table},
                                                      indent=1) + "\n")


if __name__ == "__main__":
    main()
