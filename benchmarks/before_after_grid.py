"""A GRPO run's held-out samples before and after, the first prompts of each stacked: the README's grid.

    python benchmarks/before_after_grid.py RUN_DIR OUT.png [--prompts 32] [--after 30]

RUN_DIR is a run's folder or its MLflow artifacts (either holds samples/stepNNNNN.png, the evaluation grids the run
writes: a row of 8 prompts each, the first noise seed, the same noise at every evaluation). The output is the first
`--prompts` of the start's grid above the same prompts at iteration `--after` (default: the last evaluation).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from learner.evaluation import GRID_COLUMNS, GRID_PAD, GRID_UPSCALE  # noqa: E402  the layout save_grid writes

GAP = 12  # white pixels between the two halves


def first_rows(grid: Image.Image, prompts: int) -> Image.Image:
    """The rows of `grid` (save_grid's layout, any image size) that hold its first `prompts` images."""
    tile = (grid.width // GRID_UPSCALE - GRID_PAD) // GRID_COLUMNS  # an image plus one padding line
    height = (-(-prompts // GRID_COLUMNS) * tile + GRID_PAD) * GRID_UPSCALE
    if grid.height < height:
        raise SystemExit(f"the grid holds fewer than {prompts} prompts ({grid.height} px high, {height} needed)")
    return grid.crop((0, 0, grid.width, height))


def stack(before: Image.Image, after: Image.Image, prompts: int) -> Image.Image:
    top, bottom = first_rows(before, prompts), first_rows(after, prompts)
    out = Image.new("RGB", (top.width, top.height + GAP + bottom.height), "white")
    out.paste(top, (0, 0))
    out.paste(bottom, (0, top.height + GAP))
    return out


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
    if not after.is_file():
        raise SystemExit(f"no evaluation at iteration {args.after} in {args.run / 'samples'}: --after takes one of "
                         f"{[int(g.stem[4:]) for g in grids[1:]]}")
    out = stack(Image.open(grids[0]), Image.open(after), args.prompts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out.save(args.out)
    print(f"{grids[0].name} above {after.name} -> {args.out} ({out.width}x{out.height})")


if __name__ == "__main__":
    main()
