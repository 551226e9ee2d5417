"""Async or sync, chosen by measuring both on the machine at hand.

Overlapping the rollout with the update (grpo.max_staleness >= 1) pays only when the two phases do not compete for
the same cores: on a 2-core machine each phase gets one core instead of two, and whether that beats running them one
after the other with all cores depends on how well each phase's kernels scale with threads (measured: 1.37x faster
on one machine of this kind, 0.91x on another). So an async run measures its first iterations both ways and keeps
the faster layout, per trained group (an update's cost grows with the groups it trains, which vary between
iterations: correlation 0.7-0.8 measured, 3-6 of 6 groups):

    iteration   start   start+1 .. start+k   start+k+1    start+k+2 .. start+2k+1   then
    layout      sync    sync (timed)         async        async (timed)             the faster (ties: sync)
                warm-up                      (its rollout
                                             was not overlapped)

In the async layout, actors that share a node split its cores (actors.torch_threads 0); in the sync layout each
uses all of them, as they take turns.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass
class LayoutProbe:
    """Which layout each iteration runs under while an async run measures both, and the choice it then keeps."""

    staleness: int  # grpo.max_staleness: the async layout's
    iterations: int  # timed per layout (grpo.async_probe); 0 = no probe, the configured async layout throughout
    start: int = 0  # the first iteration of this run segment (a resumed run probes again unless it had chosen)
    times: dict[str, list[float]] = field(default_factory=lambda: {"sync": [], "async": []})  # timed iterations' s
    groups: dict[str, list[int]] = field(default_factory=lambda: {"sync": [], "async": []})  # and groups trained
    chosen: Optional[str] = None  # "sync" | "async" once measured

    @classmethod
    def plan(cls, staleness: int, iterations: int, start: int, total: int, saved: Optional[dict] = None) -> "LayoutProbe":
        """The probe of a run segment from iteration `start` of `total`; `saved` is a resumed run's as_dict()."""
        if saved and saved.get("chosen"):
            return cls(staleness, iterations, saved["start"], saved["times"], saved["groups"], saved["chosen"])
        probe = cls(staleness, iterations, start)
        if staleness == 0:
            probe.chosen = "sync"
        elif iterations == 0 or total - start < 2 * iterations + 3:  # too short to measure and still gain
            probe.chosen = "async"
        return probe

    def layout(self, it: int) -> str:
        """The layout iteration `it` runs under."""
        if self.chosen is not None:
            return self.chosen
        return "sync" if it - self.start <= self.iterations else "async"

    def timed(self, it: int) -> Optional[str]:
        """The layout whose time iteration `it` measures, or None (the warm-up and the switch are not timed)."""
        if self.chosen is not None:
            return None
        i = it - self.start
        if 1 <= i <= self.iterations:
            return "sync"
        if self.iterations + 2 <= i <= 2 * self.iterations + 1:
            return "async"
        return None

    def record(self, it: int, seconds: float, groups: int) -> Optional[str]:
        """Count iteration `it`'s wall time and the groups it trained; returns the choice when this iteration
        completes the measurement."""
        name = self.timed(it)
        if name is None:
            return None
        self.times[name].append(seconds)
        self.groups[name].append(groups)
        if len(self.times["async"]) == self.iterations:
            sync, overlapped = (self.seconds_per_group(n) for n in ("sync", "async"))
            self.chosen = "async" if overlapped < sync else "sync"
            return self.chosen
        return None

    def seconds_per_group(self, layout: str) -> float:
        """The timed iterations' seconds over the groups they trained (a ratio of sums: robust to one slow one)."""
        return sum(self.times[layout]) / max(1, sum(self.groups[layout]))

    def staleness_at(self, it: int) -> int:
        """How many versions ahead rollouts may be launched while iteration `it` is next to train."""
        return self.staleness if self.layout(it) == "async" else 0

    def as_dict(self) -> dict:
        return asdict(self)


def split_threads(placements: list[tuple[str, int]]) -> list[int]:
    """Torch threads for actors that compute at the same time, each given as (node id, cores on that node): the
    cores of a node are split evenly between the actors on it, at least one each."""
    on_node: dict[str, int] = {}
    for node, _ in placements:
        on_node[node] = on_node.get(node, 0) + 1
    return [max(1, cores // on_node[node]) for node, cores in placements]
