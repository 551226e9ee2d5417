"""The async run's layout probe (learner/layout.py): what it times, what it keeps, how it splits cores."""

import pytest

from learner.layout import LayoutProbe, split_threads


def run_probe(probe: LayoutProbe, seconds: dict[str, float], iterations: int,
              groups: dict[str, int] | None = None) -> list[str]:
    """Drive the probe as the loop does: each iteration's layout, then its wall time and groups trained under that
    layout (the warm-up and the switch are made very slow: they must not be counted)."""
    layouts = []
    for it in range(probe.start, probe.start + iterations):
        layout = probe.layout(it)
        layouts.append(layout)
        switch = probe.chosen is None and it - probe.start == probe.iterations + 1
        probe.record(it, 100.0 if switch or it == probe.start else seconds[layout], (groups or {}).get(layout, 6))
    return layouts


@pytest.mark.parametrize("sync_s, async_s, kept", [(7.3, 6.1, "async"), (7.3, 8.0, "sync"), (7.3, 7.3, "sync")])
def test_the_probe_keeps_the_faster_layout_and_ties_go_to_sync(sync_s, async_s, kept):
    """Would catch: the comparison inverted, a tie that keeps the overlapped layout (off-policy data for nothing)."""
    probe = LayoutProbe.plan(staleness=1, iterations=2, start=0, total=20)
    layouts = run_probe(probe, {"sync": sync_s, "async": async_s}, 12)
    assert layouts[:6] == ["sync", "sync", "sync", "async", "async", "async"]
    assert probe.chosen == kept and layouts[6:] == [kept] * 6
    assert probe.times == {"sync": [sync_s] * 2, "async": [async_s] * 2} and probe.groups["async"] == [6, 6]


def test_the_layouts_are_compared_per_trained_group_not_per_iteration():
    """An update costs in proportion to the groups it trains (those whose rewards all tie are skipped), and that
    varies between iterations: overlapped iterations that happened to train 3 groups in 6 s are slower than
    synchronous ones that trained 6 in 9 s. Would catch: comparing raw iteration times (async kept here)."""
    probe = LayoutProbe.plan(staleness=1, iterations=2, start=0, total=20)
    run_probe(probe, {"sync": 9.0, "async": 6.0}, 8, groups={"sync": 6, "async": 3})
    assert probe.seconds_per_group("sync") == 1.5 and probe.seconds_per_group("async") == 2.0
    assert probe.chosen == "sync"


def test_the_warm_up_and_the_switch_are_not_timed():
    """The first iteration (compilation, caches) and the switch (its rollout ran alone) would bias the choice: an
    async layout 1 s faster must win even though the two untimed iterations took 100 s."""
    probe = LayoutProbe.plan(staleness=2, iterations=3, start=5, total=50)  # a resumed run probes from its start
    run_probe(probe, {"sync": 5.0, "async": 4.0}, 9)
    assert probe.times == {"sync": [5.0] * 3, "async": [4.0] * 3} and probe.chosen == "async"
    assert probe.staleness_at(20) == 2 and probe.timed(20) is None


def test_sync_runs_short_runs_and_a_made_choice_are_not_probed():
    assert LayoutProbe.plan(0, 3, 0, 100).chosen == "sync"  # max_staleness 0
    assert LayoutProbe.plan(1, 3, 0, 8).chosen == "async"  # 2 x 3 + 3 iterations needed: too short to gain
    assert LayoutProbe.plan(1, 3, 0, 9).chosen is None  # just long enough: one iteration runs the faster layout
    assert LayoutProbe.plan(1, 3, 4, 13).chosen is None and LayoutProbe.plan(1, 3, 5, 13).chosen == "async"
    assert LayoutProbe.plan(1, 0, 0, 100).chosen == "async"  # grpo.async_probe 0
    assert LayoutProbe.plan(1, 3, 0, 100).staleness_at(0) == 0  # probing: the first iterations run synchronous
    done = LayoutProbe.plan(1, 2, 0, 30)
    run_probe(done, {"sync": 3.0, "async": 9.0}, 7)
    resumed = LayoutProbe.plan(1, 2, 17, 30, saved=done.as_dict())  # a resumed run keeps what was measured
    assert resumed.chosen == "sync" and resumed.staleness_at(17) == 0 and resumed.times == done.times


def test_cores_are_split_between_the_actors_sharing_a_node():
    # one rollout actor and one learner rank on a 2-core machine; 3 actors on a 16-core node and one alone on
    # another; more actors than cores still get a thread each
    assert split_threads([("a", 2), ("a", 2)]) == [1, 1]
    assert split_threads([("a", 16), ("b", 8), ("a", 16), ("a", 16)]) == [5, 8, 5, 5]
    assert split_threads([("a", 2)] * 3) == [1, 1, 1]


def test_timed_iterations_that_trained_no_group_still_lead_to_a_choice():
    """Every group of an iteration can tie (all its rewards equal) and be skipped: an update of no group. Would catch
    seconds per group dividing by zero groups, an async run crashing at the end of its probe."""
    probe = LayoutProbe.plan(staleness=1, iterations=2, start=0, total=20)
    run_probe(probe, {"sync": 4.0, "async": 3.0}, 8, groups={"sync": 0, "async": 0})
    assert probe.chosen == "async" and probe.seconds_per_group("sync") == 8.0
