"""A reward from an installed package (entry point group proxrl.rewards), used without editing the repository; and
one whose NaN drops a whole iteration, for the driver's schedule."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from proxmodel.model import save_model
from tests.cli import ROOT, run_cli

PLUGIN = '''
import torch
from rewards.base import RewardModel


class Brightness(RewardModel):
    def __init__(self, target: float = 0.5):
        self.target = target

    def score(self, images, prompts):
        return 1.0 - (images.float().mean(dim=(1, 2, 3)) - self.target).abs()


class NotAReward:
    pass
'''


def install(site: Path, entry: str) -> dict:
    """An installed distribution as pip leaves it (module + dist-info with entry_points.txt) on a PYTHONPATH;
    returns the environment that puts it there."""
    site.mkdir(parents=True, exist_ok=True)
    (site / "brightplug.py").write_text(PLUGIN)
    info = site / "brightplug-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: brightplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[proxrl.rewards]\n{entry}\n")
    return {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory):
    return str(save_model(tiny_model, tmp_path_factory.mktemp("ckpt") / "c"))


def sample(tmp_path: Path, env: dict, checkpoint: str, rewards: str) -> subprocess.CompletedProcess:
    return run_cli("--mode", "sample", f"init_from={checkpoint}", "sample.steps=2", "sample.num_prompts=2",
                   "sample.images_per_prompt=2", "sample.score=true", f"rewards={rewards}",
                   f"run_dir={tmp_path / 'run'}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                   env=env, timeout=600)


def test_an_installed_reward_scores_with_its_options(checkpoint, tmp_path):
    env = install(tmp_path / "site", "brightness = brightplug:Brightness")
    proc = sample(tmp_path, env, checkpoint, "[{name: compositional}, {name: brightness, options: {target: 0.25}}]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for record in json.loads((tmp_path / "run" / "samples.json").read_text()):
        pixels = np.asarray(Image.open(tmp_path / "run" / record["image"]), dtype=np.float64) / 255
        expected = 1.0 - abs(pixels.mean() - 0.25)  # the option reached the class (the default 0.5 would differ)
        assert record["rewards"]["brightness"] == pytest.approx(expected, abs=2e-3)
        assert set(record["rewards"]) == {"compositional", "brightness"}


@pytest.mark.parametrize("entry, rewards, words", [
    ("brightness = brightplug:Brightness", "[{name: brightness, options: {targt: 0.2}}]", "did you mean 'target'"),
    ("brightness = brightplug:NotAReward", "[{name: brightness}]", "not a rewards.base.RewardModel"),
    ("brightness = brightplug:Missing", "[{name: brightness}]", "reward plugin 'brightness'"),
    ("compositional = brightplug:Brightness", "[{name: compositional}]", "already exists"),
])
def test_a_bad_plugin_or_option_stops_the_run_at_start_naming_it(checkpoint, tmp_path, entry, rewards, words):
    proc = sample(tmp_path, install(tmp_path / "site", entry), checkpoint, rewards)
    assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


NAN_FOR = '''
import torch
from rewards.base import RewardModel

MARKED = {marked!r}


class NanFor(RewardModel):
    """Brightness, and NaN for the marked captions (as a reward that overflowed on them would give)."""

    def score(self, images, prompts):
        nan = torch.tensor([p in MARKED for p in prompts])
        return images.float().mean(dim=(1, 2, 3)).masked_fill(nan, float("nan"))
'''


@pytest.mark.slow
def test_the_scheduled_evaluation_runs_after_an_iteration_whose_groups_were_all_dropped(pretrained, tmp_path):
    """Iteration 1's every group scores NaN (a reward plugin, in the reward actors, marks its captions), so it
    trains nothing; the held-out evaluation due after it (eval_every 2) must still run. The driver skipped it when
    an iteration wrote no group."""
    from learner.config import load_config
    from learner.prompts import prompt_source
    from rewards.scenes import scene_prompts
    from tests.cli import SMOKE, metrics_by_step, summary_of

    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(scene_prompts(5, 0, 40)) + "\n")
    overrides = [f"grpo.prompt_file={prompt_file}", "grpo.iterations=3", "grpo.eval_every=2"]
    cfg = load_config(SMOKE, overrides)  # (the plugin is not installed in this process)
    n = cfg.grpo.prompts_per_iteration
    marked = prompt_source(cfg).train(n, n)  # iteration 1's captions
    overrides.append("rewards=[{name: nanfor}]")
    site = tmp_path / "site"
    env = install(site, "nanfor = nanplug:NanFor")
    (site / "nanplug.py").write_text(NAN_FOR.format(marked=set(marked)))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli("--mode", "grpo", "--config", str(SMOKE), *overrides, f"init_from={pretrained['checkpoint']}",
                   f"run_dir={tmp_path / 'run'}", f"mlflow.tracking_uri={uri}", env=env)
    summary = summary_of(proc)
    assert summary["groups_dropped"] == n and summary["iterations"] == 3
    steps = metrics_by_step(uri, summary["mlflow_run_id"])["eval_reward_total"]
    assert sorted(steps) == [0, 2, 3]  # the start, the one due after the dropped iteration, the end
    during = json.loads(Path(summary["held_out_scores"]).read_text())["during"]
    assert list(during) == ["2"]  # the scheduled evaluation's scores, every prompt under every noise
    assert np.array(during["2"]["total"]).shape == (cfg.grpo.eval_prompts, cfg.grpo.eval_seeds)
