"""Progress bars whose ETA leaves out the one-time warm-up of the first iteration (DeepSpeed op builds, first-call
compilation, actors loading their models): it would otherwise inflate the estimated rate for many iterations."""

from __future__ import annotations

from typing import Iterator

from tqdm import tqdm


def restart_clock(bar: tqdm) -> None:
    """tqdm's reset() (clock, rate averages) keeping the count: rates and ETA are measured from here on."""
    done = bar.n
    bar.reset(total=bar.total)
    bar.initial = bar.n = bar.last_print_n = done  # the rate counts the iterations after `initial`
    bar.refresh()


def steady_range(first: int, total: int, **options) -> Iterator[int]:
    """first .. total - 1 under a bar (tqdm options: desc, unit, ...) that advances after each iteration's body and
    restarts its clock after the first one. `.bar` of the returned iterator is the tqdm bar (for set_postfix)."""
    return _Steady(first, total, tqdm(total=total, initial=first, dynamic_ncols=True, **options))


class _Steady:
    def __init__(self, first: int, total: int, bar: tqdm):
        self.first, self.total, self.bar = first, total, bar

    def __iter__(self) -> Iterator[int]:
        try:
            for i in range(self.first, self.total):
                yield i
                self.bar.update(1)
                if i == self.first:
                    restart_clock(self.bar)
        finally:
            self.bar.close()
