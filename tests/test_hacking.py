"""Reward hacking caught, not only plotted: the signs (a held-out check falling, saturation, diversity), the config
that names the checks, and a run that stops on them and exports its best clean checkpoint."""

import json
from pathlib import Path

import numpy as np
import pytest

from learner.grpo import hacking_signs

ROOT = Path(__file__).resolve().parent.parent
CLEAN = {"saturation_ratio": 1.1, "diversity_ratio": 0.9}


def test_a_check_that_falls_beyond_its_noise_is_a_sign_and_one_within_it_is_not():
    rng = np.random.default_rng(0)
    before = rng.uniform(0, 1, (128, 2))
    fell = {"strict": before - 0.1 + rng.normal(0, 0.05, before.shape)}
    noisy = {"strict": before + rng.normal(0, 0.05, before.shape)}
    signs = hacking_signs(fell, {"strict": before}, CLEAN, 1.2, 0.8)
    assert len(signs) == 1 and "strict fell by 0.1" in signs[0]
    assert hacking_signs(noisy, {"strict": before}, CLEAN, 1.2, 0.8) == []
    risen = {"strict": before + 0.2}
    assert hacking_signs(risen, {"strict": before}, CLEAN, 1.2, 0.8) == []


@pytest.mark.parametrize("monitors, word", [({"saturation_ratio": 1.3, "diversity_ratio": 1.0}, "saturation"),
                                            ({"saturation_ratio": 1.0, "diversity_ratio": 0.7}, "diversity")])
def test_monitors_past_their_limits_are_signs(monitors, word):
    signs = hacking_signs({}, {}, monitors, 1.2, 0.8)
    assert len(signs) == 1 and word in signs[0]
    assert hacking_signs({}, {}, monitors, 1.5, 0.5) == []


def test_images_that_stop_scoring_are_a_sign():
    """A policy that starts drawing non-finite images scores NaN on the checks (and its monitors go NaN): the
    bootstrap interval is then NaN and every comparison False, so no sign was raised and stop_on_hacking trained on.
    Would catch that silence."""
    rng = np.random.default_rng(0)
    before = rng.uniform(0.3, 0.7, (128, 2))
    after = before.copy()
    after[5, 1] = np.nan
    signs = hacking_signs({"strict": after}, {"strict": before}, CLEAN, 1.2, 0.8)
    assert len(signs) == 1 and "1 image(s) that scored at the start no longer do" in signs[0]
    nan_monitors = {"saturation_ratio": float("nan"), "diversity_ratio": float("nan")}
    assert any("not finite" in sign for sign in hacking_signs({}, {}, nan_monitors, 1.2, 0.8))


def test_a_start_that_did_not_score_leaves_the_check_on_for_the_other_prompts():
    """A base image that scored NaN on a check (a non-finite pixel at the start) made the paired interval NaN, so
    the check was off for the whole run while the rest of its prompts fell. Would catch that silence."""
    rng = np.random.default_rng(1)
    before = rng.uniform(0.3, 0.7, (128, 2))
    after = before - 0.1
    before[3, 0] = np.nan
    signs = hacking_signs({"strict": after}, {"strict": before}, CLEAN, 1.2, 0.8)
    assert len(signs) == 1 and "strict fell by 0.100" in signs[0]


def test_an_image_that_never_scored_is_no_sign_and_one_scored_prompt_gives_no_interval():
    """An image that scored NaN at the start and still does has not stopped scoring: nothing broke. And with every
    other prompt's start unscored, one prompt's fall has no interval (the bootstrap of one prompt is a point, so any
    fall would look significant) and must not stop the run. Would catch every non-finite image counted as broken,
    and an interval taken over a single prompt."""
    rng = np.random.default_rng(2)
    before = rng.uniform(0.3, 0.7, (128, 2))
    before[3, 0] = np.nan
    assert hacking_signs({"strict": before.copy()}, {"strict": before}, CLEAN, 1.2, 0.8) == []
    before = np.array([[0.6, 0.5], [np.nan, 0.5], [0.5, np.nan]])
    assert hacking_signs({"strict": before - 0.3}, {"strict": before}, CLEAN, 1.2, 0.8) == []


def test_check_rewards_must_be_registered_and_in_grpo_not_trained_on():
    from learner.config import ConfigError, load_config
    from learner.main import check_rewards

    with pytest.raises(ConfigError, match="compositional_strikt.*did you mean 'compositional_strict'"):
        load_config(None, ["grpo.check_rewards=[compositional_strikt]"])
    cfg = load_config(None, ["rewards=[{name: compositional}]"])  # the default checks hold compositional
    with pytest.raises(ConfigError, match=r"check_rewards\[0\]='compositional' is also trained on.*"
                                          r"Set grpo.check_rewards=\[compositional_count\]"):
        check_rewards(cfg, "grpo")
    check_rewards(cfg, "sample")  # a sample run scores with `rewards` and never reads the checks
    cfg = load_config(None, ["rewards=[{name: compositional}]", "grpo.check_rewards=[compositional_strict]"])
    check_rewards(cfg, "grpo")
    # the direct objective trains on direct_reward's gradient, not on `rewards`: a check equal to it is trained on
    direct = ["grpo.objective=direct", "grpo.stochastic_steps=null", "grpo.direct_reward=compositional_soft"]
    cfg = load_config(None, [*direct, "grpo.check_rewards=[compositional_soft, compositional_count]"])
    with pytest.raises(ConfigError, match=r"check_rewards\[0\]='compositional_soft' is also trained on"):
        check_rewards(cfg, "grpo")
    check_rewards(load_config(None, [*direct, "grpo.check_rewards=[compositional, compositional_count]"]), "grpo")


DRIVER = """
import sys
import learner.grpo
from learner.main import main

detect = learner.grpo.hacking_signs

def counted(checks, before, monitors, max_saturation, min_diversity):
    print("checks seen:", sorted(checks), flush=True)
    return detect(checks, before, monitors, max_saturation, min_diversity)

learner.grpo.hacking_signs = counted
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_run_that_hacks_its_reward_stops_and_exports_its_best_clean_checkpoint(tmp_path):
    """The whole stack (real Ray actors, Redis, DeepSpeed, MLflow) with a reward pushed until it is gamed: JPEG
    compressibility pays for flat images, and at lr 0.3 without a KL one update raises it (+0.014 [+0.010, +0.017] here)
    while each group's images grow alike (within-group diversity 0.44x the base's against the limit 0.8), with rollouts
    one version ahead in flight. The real detector must see it. The run must stop at that first evaluation, leave
    nothing unacknowledged on the stream, and export the starting weights (the only clean evaluation) as its checkpoint,
    keeping the trained ones as last_checkpoint. The driver only counts the detector's calls (the stop must reuse the
    evaluation's scores, not evaluate again)."""
    import os
    import subprocess
    import sys

    from learner.main import main

    pretrain = tmp_path / "pretrain"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["--mode", "pretrain", "--config", "configs/smoke.yaml", f"run_dir={pretrain}",
                 f"mlflow.tracking_uri={uri}", "pretrain.iterations=2"]) == 0
    run_dir = tmp_path / "grpo"
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, "--mode", "grpo", "--config", "configs/smoke.yaml", f"run_dir={run_dir}",
         f"mlflow.tracking_uri={uri}", f"init_from={pretrain / 'checkpoint'}", "grpo.iterations=4",
         "grpo.eval_every=1", "grpo.max_staleness=1", "grpo.stop_on_hacking=true", "grpo.lr=0.3", "grpo.kl_coef=0",
         "grpo.check_rewards=[compositional_strict]", "rewards=[{name: jpeg_compressibility}]"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one evaluation of step 1: the stop right after it reuses its scores instead of evaluating the same weights again
    assert proc.stdout.count("checks seen: ['compositional_strict']") == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iterations"] == 1
    assert any(sign.startswith("within-group diversity") for sign in summary["hacking"]), summary["hacking"]
    assert summary["eval"]["rewards"]["jpeg_compressibility"]["difference"]["mean"] > 0  # the reward it hacked rose
    assert "compositional_strict" in summary["eval"]["checks"]
    assert Path(summary["checkpoint"]).resolve() == (pretrain / "checkpoint").resolve() and summary["best"]["step"] == 0
    assert Path(summary["last_checkpoint"]) == (run_dir / "checkpoint").resolve()
    assert summary["stream"]["pending"] == 0 and summary["groups_dropped"] == 2  # the drained iteration's groups


def test_monitors_exactly_at_their_limits_are_not_signs():
    """The limits are the largest saturation ratio and the smallest diversity ratio still clean ('past its limit').
    Would catch >= / <= at the boundary: a run configured with hacking_saturation 1.0 stopped on a policy exactly as
    saturated as its start."""
    assert hacking_signs({}, {}, {"saturation_ratio": 1.2, "diversity_ratio": 0.8}, 1.2, 0.8) == []
    assert hacking_signs({}, {}, {"saturation_ratio": 1.0, "diversity_ratio": 1.0}, 1.0, 1.0) == []


def test_one_nonfinite_monitor_is_a_sign():
    """Either monitor going NaN (non-finite images) is a sign on its own. Would catch the two finiteness checks
    joined so that a NaN saturation with a finite diversity passes (NaN > limit is False: no sign at all)."""
    for monitors in ({"saturation_ratio": float("nan"), "diversity_ratio": 1.0},
                     {"saturation_ratio": 1.0, "diversity_ratio": float("nan")}):
        assert any("not finite" in sign for sign in hacking_signs({}, {}, monitors, 1.2, 0.8))


def bare_run(best_total: float, hacked: list[str]):
    """A GrpoRun with only what keep_if_best reads (no Ray, no actors): the start as the best so far."""
    from types import SimpleNamespace

    from learner.config import load_config
    from learner.grpo import GrpoRun

    run = object.__new__(GrpoRun)
    run.cfg, run.init_from, run.eval_prompts = load_config(None, []), Path("start"), ["p"]
    run.tracker, run.run_dir = SimpleNamespace(run_id="r"), Path("run")
    run.best, run.hacked = (0, best_total, Path("start")), hacked
    return run


def test_the_best_checkpoint_is_the_best_clean_evaluation():
    """stop_on_hacking exports the best evaluation that showed no sign of hacking: a hacked one never replaces it,
    however high its reward (the reward is what hacking inflates), and a clean one must beat it, not tie it. Would
    catch the hacking condition dropped (the hacked weights exported as the run's checkpoint) or a tie replacing the
    earlier, less trained weights."""
    higher = {"total": np.array([[0.9, 0.7]])}
    run = bare_run(0.5, ["forced"])
    run.keep_if_best(3, higher, saved=Path("ckpt3"))
    assert run.best == (0, 0.5, Path("start"))
    run.hacked = []
    run.keep_if_best(4, {"total": np.array([[0.5, 0.5]])}, saved=Path("ckpt4"))
    assert run.best == (0, 0.5, Path("start"))
    run.keep_if_best(5, higher, saved=Path("ckpt5"))
    assert run.best == (5, pytest.approx(0.8), Path("ckpt5"))


def test_the_held_out_total_is_the_weighted_sum_the_policy_is_trained_on():
    """The held-out 'total' (what the best checkpoint is chosen by, and the summary reports) weighs each reward's
    [prompts, seeds] matrix as the training reward does. Would catch an unweighted sum (a reward of weight 0.1 then
    choosing the checkpoint as much as one of weight 1)."""
    from learner.config import RunConfig

    run = bare_run(0.0, [])
    run.cfg = RunConfig.model_validate({"rewards": [{"name": "compositional", "weight": 0.5},
                                                    {"name": "jpeg_compressibility", "weight": 2.0}]})
    a, b = np.array([[1.0, 0.0]]), np.array([[0.25, 0.5]])
    out = run.with_total({"compositional": a, "jpeg_compressibility": b})
    np.testing.assert_allclose(out["total"], [[1.0, 1.0]])
    assert out["compositional"] is a and out["jpeg_compressibility"] is b
