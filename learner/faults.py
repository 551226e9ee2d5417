"""Runs that stop with a message, not a traceback: RunFailed, and the messages of the faults the modes detect.

The CLI prints a RunFailed as one paragraph (`error: ...`), marks the MLflow run FAILED and exits 1; nothing already
written is removed, so the run state named in the message can be resumed once the cause is fixed.
"""

from __future__ import annotations

from pathlib import Path


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
