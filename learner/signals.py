"""SIGINT / SIGTERM to the driver: stop at the next safe point with a run state written, never mid-update.

Inside a `deferred()` block (an iteration, a run state being written) the first signal is only recorded; the loop
then writes a run state at the iteration's end (or, waiting for rollouts, at once) and raises Interrupted. Outside
such blocks (startup, the final evaluation) there is nothing half-done to protect, so Interrupted is raised at once.
A second signal always raises at once. Interrupted derives from BaseException, like KeyboardInterrupt, so no
`except Exception` on the way swallows it; the CLI turns it into one line naming the resume command.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator, Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """The driver got SIGINT or SIGTERM; `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class GracefulStop:
    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.depth = 0

    def install(self) -> None:
        """Take SIGINT and SIGTERM (again: `ray.init` installs its own SIGTERM handler)."""
        for s in SIGNALS:
            signal.signal(s, self._handle)

    def uninstall(self) -> None:
        for s in SIGNALS:
            signal.signal(s, signal.SIG_DFL if s == signal.SIGTERM else signal.default_int_handler)

    def ignore(self) -> None:
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)

    def _handle(self, signum: int, frame) -> None:
        first = self.signum is None
        self.signum = signum
        if self.depth == 0 or not first:
            raise Interrupted(signum)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def check(self) -> None:
        """Raise Interrupted if a signal came in (call at safe points)."""
        if self.signum is not None:
            raise Interrupted(self.signum)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """A block the first signal does not cut short (it is raised by the next check())."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1


STOP = GracefulStop()  # the driver process's one instance: installed by learner.main
