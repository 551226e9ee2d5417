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


def last_state(run_dir: Path) -> str:
    """What a stopped run kept, for its message."""
    from learner.resume import complete_states

    states = complete_states(run_dir)
    return f"the last run state, {states[-1]}, is kept" if states else "no run state had been written yet"


def nonfinite_stop(run_dir: Path, in_a_row: int, key: str, lr_key: str) -> RunFailed:
    """The error that ends a run after `in_a_row` skipped (non-finite) optimiser steps in a row."""
    from learner.resume import resume_command

    kept = last_state(run_dir)
    start = (f"init_from={run_dir / 'checkpoint'}" if (run_dir / "checkpoint").is_dir()
             else "the same start")  # written with each run state (none yet: the run's start is the last good)
    return RunFailed(
        f"stopped after {in_a_row} optimiser steps in a row with a non-finite (NaN/inf) loss or gradient norm (the "
        f"limit {key}). Each was skipped, so the weights are those of the last finite update; {kept}. Usually the "
        f"learning rate is too high: start a new run from {start} with a lower "
        f"{lr_key}; if a data or reward fault caused it, fix that and continue with `{resume_command(run_dir)}`. "
        f"Raise {key} to tolerate longer streaks."
    )


def wait_for(ray, refs: list, names: list[str], timeout_s: float, key: str, run_dir: Path,
             on_tick: Optional[Callable[[], None]] = None) -> list:
    """ray.get of `refs` (one per actor, named by `names`) with a bound: past `timeout_s` a RunFailed naming the actors
    that have not answered, instead of a hang. `on_tick` runs every half second of the wait (e.g. STOP.check)."""
    deadline = time.monotonic() + timeout_s
    checked = set()
    while True:
        ready, waiting = ray.wait(refs, num_returns=len(refs), timeout=min(0.5, max(0.0, deadline - time.monotonic())))
        if not waiting:
            return ray.get(refs)  # all done: a task's own error surfaces here
        for ref in ready:  # a call that failed (its actor died, say) ends the wait now: the others may wait on it
            if ref not in checked:  # forever (a learner rank in a collective with a dead one)
                checked.add(ref)
                ray.get(ref)
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


def rank_died(names: list[str], run_dir: Path) -> RunFailed:
    """The error that ends a run whose learner rank(s) `names` died: DeepSpeed's ranks cannot go on without one."""
    from learner.resume import resume_command

    return RunFailed(
        f"{', '.join(names)} died: its process ended (killed, the OOM killer, a lost node, or a crash in native code; "
        f"its output is in Ray's worker logs, /tmp/ray/session_latest/logs/worker-*). The learner ranks train "
        f"together, so the run stopped and its processes were ended; {last_state(run_dir)}. Continue with "
        f"`{resume_command(run_dir)}`."
    )


def redis_lost(error: BaseException, run_dir: Path) -> RunFailed:
    """The error that ends a run whose Redis stopped answering (the experience stream is gone with it)."""
    from actors.redaction import redact
    from learner.resume import resume_command

    text = str(error).strip()
    detail = redact(f"{type(error).__name__}: {text.splitlines()[0] if text else ''}")
    return RunFailed(
        f"the run's Redis stopped answering ({detail}). It was stopped or killed (the OOM killer: see dmesg and "
        f"redis.max_memory_mb), or the network to it failed; the experience stream in it is lost, so the run "
        f"stopped and its processes were ended; {last_state(run_dir)}. Continue with `{resume_command(run_dir)}`: "
        f"groups not yet trained are sampled again with the same seeds."
    )


def stream_stalled(error: BaseException, run_dir: Path) -> RunFailed:
    """The error that ends a run whose learner waited in vain for groups the rollouts reported written."""
    from learner.resume import resume_command

    return RunFailed(
        f"{error} (the bound actors.stream_read_timeout_s). The rollouts reported writing them, so they were lost "
        f"on the way (a Redis restarted without its data, or another run using the same stream on a shared Redis), "
        f"or Redis is far slower than expected: then raise actors.stream_read_timeout_s. The run stopped and its "
        f"processes were ended; {last_state(run_dir)}. Continue with `{resume_command(run_dir)}`."
    )
