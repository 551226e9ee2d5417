"""benchmarks/before_after_grid.py: the README's before/after picture shows the same prompts in both halves.

The grids are cropped by learner.evaluation.save_grid's layout; a crop one tile short or long, or a tile size read
from the wrong image size, would put other prompts (or a cut row) in the picture without any error.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))  # an installed package owns the name
from before_after_grid import GAP, stack  # noqa: E402

from learner.evaluation import GRID_COLUMNS, GRID_PAD, GRID_UPSCALE, save_grid


def solid(n: int, size: int, offset: int) -> torch.Tensor:
    """n images, image i one flat colour that codes offset + i."""
    codes = torch.arange(n) + offset
    colours = torch.stack([codes % 7, codes // 7 % 7, codes // 49 % 7], 1).float() / 6
    return colours[:, :, None, None].expand(n, 3, size, size).clone()


def tiles(half: np.ndarray, size: int) -> list[tuple]:
    """The colour at the centre of every tile of a cropped half, row by row."""
    step = (size + GRID_PAD) * GRID_UPSCALE
    centre = GRID_PAD * GRID_UPSCALE + size * GRID_UPSCALE // 2
    return [tuple(half[r * step + centre, c * step + centre]) for r in range(half.shape[0] // step)
            for c in range(GRID_COLUMNS)]


@pytest.mark.parametrize("size,prompts", [(32, 32), (16, 12)])
def test_both_halves_hold_the_first_prompts_of_their_own_grid(tmp_path, size, prompts):
    before = save_grid(solid(40, size, 0), tmp_path / "before.png")
    after = save_grid(solid(40, size, 100), tmp_path / "after.png")
    out = np.asarray(stack(before, after, prompts))
    rows = -(-prompts // GRID_COLUMNS)
    half = (rows * (size + GRID_PAD) + GRID_PAD) * GRID_UPSCALE
    assert out.shape[0] == 2 * half + GAP
    assert (out[half:half + GAP] == 255).all()  # the white gap, and nothing of a third row above it
    expect_top, expect_bottom = (np.asarray(save_grid(solid(rows * GRID_COLUMNS, size, o), tmp_path / f"{o}.png"))
                                 for o in (0, 100))
    assert tiles(out[:half], size) == tiles(expect_top, size)  # prompts 0.. of the start, in order
    assert tiles(out[half + GAP:], size) == tiles(expect_bottom, size)  # the same prompts after
    assert tiles(out[:half], size) != tiles(out[half + GAP:], size)


def test_too_few_prompts_in_a_grid_is_refused(tmp_path):
    grid = save_grid(solid(8, 32, 0), tmp_path / "one-row.png")
    with pytest.raises(SystemExit, match="fewer than 16 prompts"):
        stack(grid, grid, 16)
