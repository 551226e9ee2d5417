"""Runs that stop with a message, not a traceback: RunFailed, and the messages of the faults the modes detect.

`wait_for` bounds every wait of the driver on its actors: a stuck actor becomes a RunFailed naming it.
The CLI prints a RunFailed as one paragraph (`error: ...`), marks the MLflow run FAILED and exits 1; nothing already
written is removed, so the run state named in the message can be resumed once the cause is fixed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional


class RunFailed(Exception):
    """The run cannot go on; the message names the problem, what was kept and what to do."""


def nonfinite_stop(run_dir: Path, in_a_row: int, key: str, lr_key: str) -> RunFailed:
    """The error that ends a run after `in_a_row` skipped (non-finite) optimiser steps in a row."""
    from learner.resume import complete_states, resume_command

    states = complete_states(run_dir)
    kept = f"the last run state, {states[-1]}, is kept" if states else "no run state had been written yet"
    return RunFailed(
        f"stopped after {in_a_row} optimiser steps in a row with a non-finite (NaN/inf) loss or gradient norm (the "
        f"limit {key}). Each was skipped, so the weights are those of the last finite update; {kept}. Usually the "
        f"learning rate is too high: start a new run from {run_dir / 'checkpoint'} (init_from=...) with a lower "
        f"{lr_key}; if a data or reward fault caused it, fix that and continue with `{resume_command(run_dir)}`. "
        f"Raise {key} to tolerate longer streaks."
    )


def wait_for(ray, refs: list, names: list[str], timeout_s: float, key: str, run_dir: Path,
             on_tick: Optional[Callable[[], None]] = None) -> list:
    """ray.get of `refs` (one per actor, named by `names`) with a bound: past `timeout_s` a RunFailed naming the actors
    that have not answered, instead of a hang. `on_tick` runs every half second of the wait (e.g. STOP.check)."""
    deadline = time.monotonic() + timeout_s
    while True:
        _, waiting = ray.wait(refs, num_returns=len(refs), timeout=min(0.5, max(0.0, deadline - time.monotonic())))
        if not waiting:
            return ray.get(refs)  # all done: a task's own error surfaces here
        if on_tick is not None:
            on_tick()
        if time.monotonic() >= deadline:
            raise stuck(sorted({names[i] for i, ref in enumerate(refs) if ref in waiting}), timeout_s, key, run_dir)


def stuck(names: list[str], timeout_s: float, key: str, run_dir: Path) -> RunFailed:
    from learner.resume import resume_command

    return RunFailed(
        f"{', '.join(names)} did not answer within {timeout_s:g} s (the bound {key}). It is stuck (a deadlock, a hung "
        f"collective, a node Ray has not yet noticed is gone) or far slower than expected; its output is in Ray's "
        f"worker logs (/tmp/ray/session_latest/logs/worker-*). Raise {key} if the machine is only slow. The run "
        f"stopped and its processes were ended; continue from the last run state with `{resume_command(run_dir)}`."
    )
