"""A GRPO run's held-out samples before and after, the first prompts of each stacked: the README's grid.

    python benchmarks/before_after_grid.py RUN_DIR OUT.png [--prompts 32] [--after 30]

RUN_DIR is a run's folder or its MLflow artifacts (either holds samples/stepNNNNN.png, the evaluation grids the run
writes: a row of 8 prompts each, the first noise seed, the same noise at every evaluation). The output is the first
`--prompts` of the start's grid above the same prompts at iteration `--after` (default: the last evaluation).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

TILE, PAD, UPSCALE, COLUMNS = 32, 1, 4, 8  # learner.evaluation.save_grid's layout at the scenes' 32x32
GAP = 12  # white pixels between the two halves


def rows_of(grid: Path, prompts: int) -> Image.Image:
    rows = -(-prompts // COLUMNS)
    height = (rows * (TILE + PAD) + PAD) * UPSCALE
    image = Image.open(grid)
    if image.height < height:
        raise SystemExit(f"{grid} has fewer than {prompts} prompts ({image.height} px high, {height} needed)")
    return image.crop((0, 0, image.width, height))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--after", type=int, default=None, help="iteration of the lower half; default the last")
    args = parser.parse_args()
    grids = sorted((args.run / "samples").glob("step*.png"))
    if len(grids) < 2:
        raise SystemExit(f"{args.run / 'samples'} needs the start's grid and a later one (found {len(grids)})")
    after = grids[-1] if args.after is None else args.run / "samples" / f"step{args.after:05d}.png"
    top, bottom = rows_of(grids[0], args.prompts), rows_of(after, args.prompts)
    out = Image.new("RGB", (top.width, top.height + GAP + bottom.height), "white")
    out.paste(top, (0, 0))
    out.paste(bottom, (0, top.height + GAP))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out.save(args.out)
    print(f"{grids[0].name} above {after.name} -> {args.out} ({out.width}x{out.height})")


if __name__ == "__main__":
    main()
