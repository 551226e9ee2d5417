"""benchmarks/decision_time.py's branching: a chain continued from a recorded state must be the sampler itself.

Its table (docs/results.md, session 33) reads "how much of the reward is settled at y_k" off chains continued from
the recorded y_k. If the continuation started at the wrong step (an off-by-one between the state index and k, a wrong
lam or t) it would measure a different sampler and the table would be wrong without looking wrong; so: continued
with the very noises the original drew, it must reproduce the original images exactly, from every state.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))  # an installed package owns the name
from decision_time import continue_chain  # noqa: E402

from proxmodel.sampler import sample_hybrid  # noqa: E402
from proxmodel.schedule import VPSchedule  # noqa: E402

SHAPE = (3, 2, 4, 4)


def toy_prox(y, t, lam):
    """Shrinks toward a t-dependent point by an amount that depends on lam: any mix-up of (k, t, lam) changes it."""
    view = (-1, 1, 1, 1)
    return (y + 0.3 * t.view(view)) / (1.0 + lam.view(view)) + 0.05 * torch.sin(y)


@pytest.mark.parametrize("steps", [5, 10])
def test_continuing_a_recorded_state_with_the_original_noise_reproduces_the_original_images(steps):
    grid = VPSchedule().grid(steps)
    traj = sample_hybrid(toy_prox, SHAPE, grid, generator=torch.Generator().manual_seed(7))
    for j in range(steps):  # states[:, j] = y_{steps - j}, made after the 2 start draws and j step noises
        gen = torch.Generator().manual_seed(7)
        for _ in range(2 + j):
            torch.randn(SHAPE, generator=gen)
        images = continue_chain(toy_prox, traj.states[:, j], grid, steps - j, gen)
        torch.testing.assert_close(images, traj.images, rtol=0, atol=1e-6, msg=f"branched at state {j}")


def test_a_continuation_with_fresh_noise_differs_until_only_the_final_prox_is_left():
    steps = 5
    grid = VPSchedule().grid(steps)
    traj = sample_hybrid(toy_prox, SHAPE, grid, generator=torch.Generator().manual_seed(7))
    for j in range(steps):
        images = continue_chain(toy_prox, traj.states[:, j], grid, steps - j, torch.Generator().manual_seed(99))
        if j == steps - 1:  # from y_1 only the deterministic final prox remains
            torch.testing.assert_close(images, traj.images, rtol=0, atol=1e-6)
        else:
            assert (images - traj.images).abs().max() > 1e-3, f"fresh noise from state {j} changed nothing"
