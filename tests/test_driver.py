"""The GRPO driver's bookkeeping (evaluation schedule, prompt slices, held-out noise, hacking and the best
checkpoint) on a GrpoRun built without actors: its Ray calls and tracker are stand-ins, so each rule is checked in
milliseconds where an end-to-end run would need minutes and a lucky seed to show it."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from learner.config import load_config
from tests.cli import SMOKE


class Tracker:
    run_id = "r"

    def __init__(self):
        self.logged = []

    def metrics(self, values, step):
        self.logged.append((step, values))

    def image(self, *a):
        pass

    def table(self, *a):
        pass

    def artifact(self, *a):
        pass

    def folder(self, *a):
        pass


def bare_run(tmp_path, *overrides):
    from learner.grpo import GrpoRun, Progress
    from learner.prompts import prompt_source

    run = GrpoRun.__new__(GrpoRun)
    run.cfg = load_config(SMOKE, list(overrides))
    run.run_dir, run.tracker, run.init_from = tmp_path, Tracker(), Path("init")
    run.progress, run.state, run.hacked, run.reward_actors = Progress(), None, [], []
    run.prompts = prompt_source(run.cfg)
    run.eval_prompts = run.prompts.held_out(run.cfg.grpo.eval_prompts)
    return run


def test_evaluations_fall_every_eval_every_iterations(tmp_path):
    """Would catch the evaluation schedule off by one (invisible at eval_every 1, which most runs here use)."""
    run = bare_run(tmp_path, "grpo.eval_every=2", "grpo.iterations=7")
    done = []
    run.evaluate = lambda step: done.append(step) or {}
    for step in range(1, 8):
        run.scheduled_evaluation(step)
    assert done == [2, 4, 6]


def test_an_iterations_prompts_are_its_slice_of_the_prompt_stream(tmp_path):
    """Would catch iteration it given other prompts than the stream's it*n .. (it+1)*n - 1, or unpaired indices."""
    run = bare_run(tmp_path, "grpo.prompts_per_iteration=4")
    run.rollouts = [None, None]
    run.call = lambda i, method, *args: args
    n = 4
    for it in (0, 1, 3):
        shards = run.launch(it)
        pairs = sorted((i, p) for prompts, indices, iteration, _ in shards for p, i in zip(prompts, indices))
        assert [i for i, _ in pairs] == list(range(it * n, (it + 1) * n))
        assert [p for _, p in pairs] == run.prompts.train(it * n, n)


def test_held_out_evaluation_uses_a_distinct_noise_per_seed_and_chunk(tmp_path, monkeypatch):
    """Would catch held-out noise not varied over eval_seeds."""
    import learner.grpo
    from actors.rollout import eval_seed

    monkeypatch.setattr(learner.grpo, "EVAL_CHUNK", 2)
    run = bare_run(tmp_path, "grpo.eval_seeds=3", "grpo.eval_prompts=4")
    run.rollouts = [None]
    calls = []
    run.call = lambda i, method, *args: calls.append(args) or args
    run.from_rollouts = lambda cs: [{"images": torch.zeros(len(c[0]), 3, 2, 2, dtype=torch.uint8),
                                     "scores": {"compositional": np.zeros((len(c[0]), 3))}} for c in cs]
    run.held_out("hybrid", 1.0, ["compositional"])
    seeds = [c[2] for c in calls]
    assert seeds == [[eval_seed(0, s, c) for s in range(3)] for c in range(2)]
    assert len({s for chunk in seeds for s in chunk}) == 6


def test_held_out_noise_is_never_a_training_groups_noise():
    """eval_seed(seed, noise, chunk) and group_seed(seed, iteration, prompt index) take the same three numbers: the
    held-out draws must still differ from every training group's, or the evaluation would score images of the very
    noise the policy was trained on. Would catch the held-out seeds drawn without their own spawn key."""
    from actors.rollout import eval_seed, group_seed

    triples = [(seed, a, b) for seed in (0, 7) for a in range(4) for b in range(4)]
    assert {eval_seed(*t) for t in triples}.isdisjoint({group_seed(*t) for t in triples})

def test_a_hacked_evaluation_never_becomes_the_best(tmp_path):
    """Would catch a hacked evaluation becoming the best checkpoint."""
    run = bare_run(tmp_path)
    run.best = (0, 0.5, Path("init"))
    run.card = lambda step: {}
    better = {"total": np.full((4, 2), 0.9)}
    run.hacked = ["check fell"]
    run.keep_if_best(3, better, saved=tmp_path / "ckpt")
    assert run.best == (0, 0.5, Path("init"))
    run.hacked = []
    run.keep_if_best(4, better, saved=tmp_path / "ckpt")
    assert run.best == (4, 0.9, tmp_path / "ckpt")


def test_an_evaluation_whose_check_fell_is_marked_hacked(tmp_path):
    """Would catch the held-out checks compared with anything but their start (then no check ever falls)."""
    run = bare_run(tmp_path, "grpo.check_rewards=[compositional_strict]")
    run.model_cfg = SimpleNamespace(kind="prox", trained_variants=["hybrid"])
    run.rollouts = [None]
    rng = np.random.default_rng(0)
    start = rng.uniform(0.6, 0.9, (4, 2))
    run.before = {"compositional_strict": start}
    run.base_monitors = {"saturation": 1.0, "diversity": 1.0, "prompt_diversity": 1.0}
    run.held_out = lambda sampler, eta, names: (torch.rand(4, 3, 16, 16),
                                                {n: (start - 0.5 if n == "compositional_strict" else start)
                                                 for n in names})
    run.call = lambda *a: None
    run.from_rollouts = lambda calls: [{"saturation": 1.0, "diversity": 1.0}]
    run.evaluate(1)
    assert run.hacked and "compositional_strict fell" in run.hacked[0]


def test_the_monitors_are_ratios_to_the_starts_at_every_later_evaluation(tmp_path):
    """Saturation and diversity are judged against the start's values (the first evaluation's), not re-based at
    each evaluation. Would catch the base replaced by every evaluation's own monitors: every ratio 1, so a policy
    that saturates its images is never a sign."""
    run = bare_run(tmp_path)
    run.model_cfg = SimpleNamespace(kind="prox", trained_variants=["hybrid"])
    run.rollouts, run.before, run.base_monitors = [None], {}, None
    run.held_out = lambda sampler, eta, names: (torch.rand(4, 3, 16, 16), {n: np.full((4, 2), 0.5) for n in names})
    run.call = lambda *a: None
    saturation = [0.5]
    run.from_rollouts = lambda calls: [{"saturation": saturation[0], "diversity": 1.0}]
    run.evaluate(0)
    assert run.monitors["saturation_ratio"] == 1.0
    saturation[0] = 1.0
    run.evaluate(3)
    assert run.monitors["saturation_ratio"] == 2.0 and any("saturation 2.00x" in sign for sign in run.hacked)


def test_memory_metrics_report_the_largest_process_of_each_role():
    """A leak in one of several ranks or actors must show: each role's metric is its largest process, and a GPU
    figure appears only for roles whose processes reported one."""
    from learner.grpo import memory_metrics

    out = memory_metrics({"learner": [{"rss_mb": 900.0, "gpu_mb": 10.0}, {"rss_mb": 1500.0, "gpu_mb": 30.0}],
                          "rollout": [{"rss_mb": 700.0}, {"rss_mb": 650.0}], "reward": []})
    assert out == {"memory/learner_rss_mb": 1500.0, "memory/learner_gpu_mb": 30.0, "memory/rollout_rss_mb": 700.0}


def counted_evaluations(run) -> list[int]:
    """Replace run.evaluate by one that records the steps it is asked for."""
    done = []
    run.evaluate = lambda step: done.append(step) or {"total": np.ones((4, 2))}
    return done


def test_the_schedule_leaves_the_last_evaluation_to_finish_and_eval_every_0_schedules_none(tmp_path):
    """finish() evaluates the final weights; the schedule evaluating them too would double the final evaluation's
    time and log a second grid at that step. Would catch `step > iterations`, and eval_every 0 (start and end only)
    reaching `step % eval_every` (ZeroDivisionError)."""
    run = bare_run(tmp_path, "grpo.eval_every=2", "grpo.iterations=6")
    done = counted_evaluations(run)
    for step in range(1, 7):
        run.scheduled_evaluation(step)
    assert done == [2, 4]
    run = bare_run(tmp_path, "grpo.eval_every=0", "grpo.iterations=6")
    done = counted_evaluations(run)
    for step in range(1, 7):
        run.scheduled_evaluation(step)
    assert done == []


def test_every_scheduled_evaluations_scores_reach_the_held_out_scores_by_step(tmp_path):
    """The scores of each evaluation between the start and the end are kept by step (what gain_by_objects.py --step
    pools over seeds): would catch a step's scores filed under another step, or the final step's (the "after")
    listed again among them."""
    from learner.grpo import evaluations_between

    run = bare_run(tmp_path, "grpo.eval_every=2", "grpo.iterations=6")
    run.evaluate = lambda step: {"total": np.full((4, 2), step / 10)}
    for step in range(1, 7):
        run.scheduled_evaluation(step)
    during = evaluations_between(tmp_path, 6)
    assert sorted(during, key=int) == ["2", "4"]
    assert during["4"]["total"] == np.full((4, 2), 0.4).tolist() and during["2"]["total"][0] == [0.2, 0.2]
    assert list(evaluations_between(tmp_path, 4)) == ["2"]  # stopped at 4 (time limit): its scores are the after


def test_a_scheduled_evaluation_exports_a_best_only_with_stop_on_hacking_and_trained_weights(tmp_path):
    """Without stop_on_hacking no best-it* folder is exported (the summary's checkpoint is the last one); before the
    first update (every group of the first iterations dropped) the weights are the start's, already the best, and
    there is no published state to export. Would catch either half of the condition dropped."""
    kept = []

    def scheduled(*overrides, state):
        run = bare_run(tmp_path, "grpo.eval_every=1", "grpo.iterations=4", *overrides)
        counted_evaluations(run)
        run.state, run.from_learners = state, lambda refs: refs
        run.keep_if_best = lambda step, scores, state=None, saved=None: kept.append((step, state))
        run.scheduled_evaluation(2)

    scheduled("grpo.stop_on_hacking=true", state=None)
    scheduled(state="published")
    assert kept == []
    scheduled("grpo.stop_on_hacking=true", state="published")
    assert kept == [(2, "published")]


def fake_clock(monkeypatch, tick: float = 0.0) -> list[float]:
    """learner.grpo's clock as a list the test advances (time.time and time.perf_counter read it); each reading
    also advances it by `tick`."""
    import learner.grpo

    now = [1000.0]

    def read():
        now[0] += tick
        return now[0] - tick

    monkeypatch.setattr(learner.grpo, "time", SimpleNamespace(time=read, perf_counter=read, sleep=lambda s: None))
    return now


def test_the_evaluation_time_sums_every_scheduled_evaluation(tmp_path, monkeypatch):
    """progress.eval_time_s is what time_limit_s and samples_per_s leave out: every evaluation's time, summed (and
    saved in the run state). Would catch it overwritten by the latest evaluation's or not counted."""
    now = fake_clock(monkeypatch)
    run = bare_run(tmp_path, "grpo.eval_every=1", "grpo.iterations=4")

    def evaluate(step):
        now[0] += 3.0
        return {}

    run.evaluate = evaluate
    for step in (1, 2, 3):
        run.scheduled_evaluation(step)
    assert run.progress.eval_time_s == 9.0
    assert [(step, v["eval_s"]) for step, v in run.tracker.logged] == [(1, 3.0), (2, 3.0), (3, 3.0)]


def stepping_run(tmp_path, *overrides, groups=2, nonfinite=0):
    """bare_run whose step() runs on stand-ins: one rollout result of `groups` groups, a learner rank whose train
    reports `nonfinite` skipped steps in a row, a publication of version 1."""
    from collections import deque

    run = bare_run(tmp_path, *overrides)
    run.in_flight = deque([["rollout call"]])
    run.wait_rollouts = lambda calls: [{"groups": groups, "dropped": 2 - groups, "sample_s": 1.0, "reward_s": 1.0,
                                        "threads": 1, "memory": {"rss_mb": 1.0}}]
    run.from_weight_updates = lambda: None
    trained = {"stream_duplicates": 0, "memory": {"rss_mb": 1.0}, "reward_mean": 0.5, "groups_trained": groups,
               "nonfinite_updates": nonfinite, "nonfinite_in_a_row": nonfinite}
    run.learners = SimpleNamespace(call=lambda name, *a, num_returns=1: [dict(trained)] if name == "train"
                                   else [("state", 1)])
    run.from_learners = lambda refs: refs
    run.rollouts = [SimpleNamespace(set_weights=SimpleNamespace(remote=lambda state, version: None))]
    run.streams = [SimpleNamespace(trim=lambda: 0, server_memory_mb=lambda: None)]
    run.duplicates = run.trimmed = 0
    return run


def test_the_evaluation_due_after_an_iteration_that_trained_nothing_still_runs(tmp_path):
    """An iteration whose every group was dropped returns early; the schedule must hold all the same (unit-level
    twin of the slow tests/test_custom_reward.py run). Would catch the early return skipping it."""
    run = stepping_run(tmp_path, "grpo.eval_every=2", "grpo.iterations=4", groups=0)
    done = counted_evaluations(run)
    assert run.step(1) is None
    assert done == [2] and run.progress.dropped == 2


def test_the_run_stops_at_exactly_max_nonfinite_updates_skipped_in_a_row(tmp_path):
    """grpo.max_nonfinite_updates is how many skipped steps in a row stop the run: that many stop it, one fewer does
    not. Would catch `>` (one more NaN step than configured)."""
    from learner.faults import RunFailed

    run = stepping_run(tmp_path, "grpo.max_nonfinite_updates=2", "grpo.eval_every=0", nonfinite=1)
    assert run.step(0)["nonfinite_in_a_row"] == 1
    run = stepping_run(tmp_path, "grpo.max_nonfinite_updates=2", "grpo.eval_every=0", nonfinite=2)
    with pytest.raises(RunFailed, match="grpo.max_nonfinite_updates"):
        run.step(0)


def looping_run(tmp_path, *overrides, on_step=None):
    """bare_run whose loop (GrpoRun.iterate, the real one) drives stand-ins: launch, step, drain and save record what
    they are asked in run.log; step returns on_step(it) (default: trained metrics, reward_mean = it)."""
    from collections import deque

    run = bare_run(tmp_path, *overrides)
    run.in_flight, run.saved_at, run.steady, run.log = deque(), None, True, []
    run.use_layout = lambda layout: None
    run.launch = lambda it: run.log.append(("launch", it)) or [it]

    def step(it):
        assert run.in_flight.popleft() == [it]  # iterations are trained in order, each from its own rollouts
        run.log.append(("step", it))
        return on_step(it) if on_step else {"groups_trained": 2, "reward_mean": float(it)}

    def drain():
        run.log.append(("drain", [c[0] for c in run.in_flight]))
        run.in_flight.clear()

    def save():
        run.log.append(("save", run.progress.iteration))
        run.saved_at = run.progress.iteration

    run.step, run.drain, run.save = step, drain, save
    return run


def test_the_loop_trains_each_iteration_once_and_saves_every_checkpoint_every_and_at_the_end(tmp_path):
    """Would catch a run state written off the checkpoint_every multiples, none at the end (a finished run that
    cannot be resumed into finish()), or no rollout launched in a synchronous run."""
    run = looping_run(tmp_path, "grpo.iterations=5", "grpo.checkpoint_every=2", "grpo.eval_every=0")
    out = run.iterate()
    assert [e for e in run.log if e[0] != "launch"] == [
        ("step", 0), ("step", 1), ("save", 2), ("step", 2), ("step", 3), ("save", 4), ("step", 4), ("save", 5)]
    assert [e[1] for e in run.log if e[0] == "launch"] == [0, 1, 2, 3, 4]
    assert out["iterations"] == 5 and out["history"] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_an_async_loop_runs_ahead_by_max_staleness_but_never_past_the_last_iteration(tmp_path):
    """Would catch a rollout launched for an iteration the run never trains (its groups left in the stream)."""
    run = looping_run(tmp_path, "grpo.iterations=4", "grpo.max_staleness=1", "grpo.async_probe=0",
                      "grpo.checkpoint_every=0", "grpo.eval_every=0")
    run.iterate()
    assert [e for e in run.log if e[0] in ("launch", "step")] == [
        ("launch", 0), ("launch", 1), ("step", 0), ("launch", 2), ("step", 1), ("launch", 3), ("step", 2), ("step", 3)]


def test_a_run_that_looks_hacked_drains_the_rollouts_in_flight_and_stops_there(tmp_path):
    """stop_on_hacking: the iteration whose evaluation looked hacked is the last trained; the rollouts already
    launched are drained (acknowledged untrained: finish() refuses pending entries), and the run state at the end
    is that iteration's. Would catch the drain skipped or the loop going on training a hacked policy."""
    def on_step(it):
        if it == 1:
            run.hacked = ["held-out check fell"]
        return {"groups_trained": 2, "reward_mean": float(it)}

    run = looping_run(tmp_path, "grpo.iterations=6", "grpo.max_staleness=1", "grpo.async_probe=0",
                      "grpo.checkpoint_every=0", "grpo.eval_every=1", "grpo.stop_on_hacking=true", on_step=on_step)
    out = run.iterate()
    assert [e for e in run.log if e[0] != "launch"] == [("step", 0), ("step", 1), ("drain", [2]), ("save", 2)]
    assert out["iterations"] == 2 and not run.in_flight


def test_a_resumed_run_that_had_stopped_on_hacking_trains_no_further(tmp_path):
    """A run state written as the run stopped on hacking (or one before the stop, replayed to it) resumes into
    finish(), not into more training of the hacked policy. Would catch the check at the loop's top dropped."""
    run = looping_run(tmp_path, "grpo.iterations=6", "grpo.eval_every=1", "grpo.stop_on_hacking=true")
    run.progress.iteration, run.progress.history, run.saved_at = 3, [0.1, 0.2, 0.3], 3
    run.hacked = ["held-out check fell"]
    out = run.iterate()
    assert run.log == [] and out["iterations"] == 3


def test_an_iteration_that_trained_nothing_counts_but_adds_no_reward_and_a_run_of_them_fails(tmp_path):
    """An iteration whose every group was dropped (step returns None) is counted, with no reward in the history
    (reward_first/last and the windows are of trained iterations); a run where none trained fails saying so rather
    than writing a summary of nothing. Would catch None appended (TypeError) or the all-dropped check dropped."""
    run = looping_run(tmp_path, "grpo.iterations=3", "grpo.eval_every=0", "grpo.checkpoint_every=0",
                      on_step=lambda it: None if it == 1 else {"groups_trained": 2, "reward_mean": float(it)})
    out = run.iterate()
    assert out["iterations"] == 3 and out["history"] == [0.0, 2.0]
    run = looping_run(tmp_path, "grpo.iterations=2", "grpo.eval_every=0", on_step=lambda it: None)
    with pytest.raises(RuntimeError, match="every group of every iteration was dropped"):
        run.iterate()


def test_the_time_limit_counts_training_only_and_lets_at_least_one_iteration_run(tmp_path, monkeypatch):
    """Each iteration trains for 1 s and is then evaluated for 10 s (progress.eval_time_s): with time_limit_s 3.5
    the loop launches while the training time is under it (iterations 0..3), and logs iteration_s without the
    evaluation. A limit already past still trains one iteration. Would catch the evaluations counted against the
    limit (1 iteration) or in iteration_s, and a run with nothing trained."""
    now = fake_clock(monkeypatch)

    def on_step(it):
        now[0] += 1.0
        run.progress.eval_time_s += 10.0
        now[0] += 10.0
        return {"groups_trained": 2, "reward_mean": float(it)}

    run = looping_run(tmp_path, "grpo.iterations=10", "grpo.time_limit_s=3.5", "grpo.eval_every=1",
                      "grpo.checkpoint_every=0", on_step=on_step)
    assert run.iterate()["iterations"] == 4
    assert [v["iteration_s"] for _, v in run.tracker.logged] == [1.0] * 4
    fake_clock(monkeypatch, tick=1.0)  # every reading of the clock a second later: the limit is past at once
    run = looping_run(tmp_path, "grpo.iterations=10", "grpo.time_limit_s=0.5", "grpo.eval_every=0",
                      "grpo.checkpoint_every=0")
    assert run.iterate()["iterations"] == 1


def finishing_run(tmp_path, monkeypatch, *overrides, after=0.9):
    """bare_run whose finish() (the real one) runs on stand-ins: the published weights saved as an empty folder,
    every evaluation recorded in run.evaluated and scoring `after` everywhere, from a start that scored 0.5 (the best
    so far, at tmp_path/start); compositional_strict is a held-out check."""
    import learner.grpo

    def save_state(state, cfg, folder, card=None):
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    monkeypatch.setattr(learner.grpo, "save_state", save_state)
    monkeypatch.setattr(learner.grpo, "write_card", lambda *a: None)
    run = bare_run(tmp_path, "grpo.check_rewards=[compositional_strict]", *overrides)
    run.learners = SimpleNamespace(call=lambda name, num_returns=1: [("state", 1)])
    run.from_learners = lambda refs: refs
    run.plain_state, run.model_cfg, run.devices = (lambda state: state), None, (lambda: {})
    run.streams = [SimpleNamespace(length=lambda: 0, pending=lambda: 0, key="k")]
    run.trimmed, run.duplicates, run.use_layout = 6, 0, lambda layout: None
    names = ("compositional", "jpeg_compressibility", "compositional_strict", "total")
    run.before = {name: np.full((4, 2), 0.5) for name in names}
    run.best, run.last_evaluation, run.base_monitors, run.monitors = (0, 0.5, tmp_path / "start"), None, {}, {}
    run.evaluated = []

    def evaluate(step):
        run.evaluated.append(step)
        (tmp_path / "samples").mkdir(exist_ok=True)
        (tmp_path / "samples" / f"step{step:05d}.png").write_bytes(b"png")
        return {name: np.full((4, 2), after) for name in names}

    run.evaluate = evaluate
    return run


LOOP = {"iterations": 10, "history": [float(i) for i in range(1, 11)], "wall_time_s": 20.0, "eval_time_s": 8.0,
        "written": 12, "dropped": 0, "resumed_at": []}


def test_the_summary_names_the_best_clean_checkpoint_the_final_one_included(tmp_path, monkeypatch):
    """stop_on_hacking: the final evaluation competes for the best (here it beats the start, so the final weights
    are the checkpoint to use); one below the start leaves the start's. Without stop_on_hacking the checkpoint to use
    is the last one. Would catch the final evaluation left out of the choice, or the best used without
    stop_on_hacking (the start's weights named as the run's result)."""
    final = (tmp_path / "checkpoint").resolve()
    out = finishing_run(tmp_path, monkeypatch, "grpo.stop_on_hacking=true", after=0.9).finish(dict(LOOP))
    assert out["checkpoint"] == out["last_checkpoint"] == str(final)
    assert out["best"] == {"step": 10, "eval_reward_total": pytest.approx(0.9)}
    out = finishing_run(tmp_path, monkeypatch, "grpo.stop_on_hacking=true", after=0.3).finish(dict(LOOP))
    assert out["checkpoint"] == str(tmp_path / "start") and out["last_checkpoint"] == str(final)
    assert out["best"] == {"step": 0, "eval_reward_total": 0.5}
    out = finishing_run(tmp_path, monkeypatch, after=0.3).finish(dict(LOOP))
    assert out["checkpoint"] == out["last_checkpoint"] == str(final) and out["best"]["step"] == 10


def test_a_run_that_stopped_right_after_evaluating_is_not_evaluated_again(tmp_path, monkeypatch):
    """A run stopped on hacking at an evaluation finishes with those weights: that evaluation's scores are the
    final ones (the same weights, prompts and noise), not a second pass over the held-out set. Would catch the
    final evaluation made regardless."""
    run = finishing_run(tmp_path, monkeypatch, after=0.9)
    run.evaluate(10)
    run.last_evaluation, run.evaluated = (10, run.evaluate(10)), []
    out = run.finish(dict(LOOP))
    assert run.evaluated == [] and out["eval_reward_after"]["total"] == pytest.approx(0.9)
    run = finishing_run(tmp_path, monkeypatch, after=0.9)
    run.last_evaluation = (8, {})  # an earlier evaluation: the final weights are not it
    run.finish(dict(LOOP))
    assert run.evaluated == [10]


def test_the_summary_figures_of_the_loop(tmp_path, monkeypatch):
    """samples_per_s counts training time only (wall time less the evaluations), the reward windows are the first
    and last fifth of the trained iterations, the stream's entries count those trimmed once acknowledged, and the
    held-out checks are reported apart from the trained rewards. Would catch each of them computed otherwise."""
    out = finishing_run(tmp_path, monkeypatch).finish(dict(LOOP))
    assert out["samples_per_s"] == pytest.approx(12 * 4 / (20.0 - 8.0)) and out["eval_time_s"] == 8.0
    assert (out["reward_first"], out["reward_last"]) == (1.0, 10.0)
    assert (out["reward_first_window"], out["reward_last_window"]) == (1.5, 9.5)
    assert out["stream"] == {"key": "k", "entries": 6, "pending": 0, "duplicates": 0}
    assert set(out["eval"]["rewards"]) == {"compositional", "jpeg_compressibility", "total"}
    assert set(out["eval"]["checks"]) == {"compositional_strict"}


def test_a_run_with_unacknowledged_stream_entries_does_not_finish(tmp_path, monkeypatch):
    """Entries delivered to a learner rank and never acknowledged mean groups sampled but not known to be trained:
    finish() refuses to write a summary over them. Would catch the check dropped."""
    run = finishing_run(tmp_path, monkeypatch)
    run.streams = [SimpleNamespace(length=lambda: 2, pending=lambda: 2, key="k")]
    with pytest.raises(RuntimeError, match="2 stream entries were never acknowledged"):
        run.finish(dict(LOOP))
