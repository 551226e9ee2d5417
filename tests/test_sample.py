"""--mode sample: images from a checkpoint without code, through the real CLI (and MLflow), and the Python API."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from learner.sample import load, prompt_images, sample_images, to_pil
from proxmodel.model import save_model
from tests.cli import run_cli

PROMPTS = ["a small red circle at the top left, on a white background",
           "a large blue square at the bottom right, on a black background",
           "a green triangle, on a gray background"]


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory):
    return str(save_model(tiny_model, tmp_path_factory.mktemp("ckpt") / "c"))


def run_sample(*args: str) -> subprocess.CompletedProcess:
    return run_cli("--mode", "sample", *args, timeout=600)


def test_sample_writes_images_grid_and_scores_and_matches_the_python_api(checkpoint, tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    proc = run_sample(f"init_from={checkpoint}", f"sample.prompt_file={prompt_file}", "sample.images_per_prompt=2",
                   "sample.steps=3", "sample.score=true", "seed=5", f"run_dir={run_dir}", f"mlflow.tracking_uri={uri}",
                   "rewards=[{name: compositional}]")  # (a GRPO check of the default: sample mode ignores the checks)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())
    assert summary["mode"] == "sample" and summary["prompts"] == 3 and summary["images"] == 6
    records = json.loads((run_dir / "samples.json").read_text())
    assert [r["prompt"] for r in records] == [p for p in PROMPTS for _ in range(2)]
    scores = [r["rewards"]["compositional"] for r in records]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert summary["rewards"]["compositional"]["mean"] == pytest.approx(np.mean(scores))
    score = summary["rewards"]["compositional"]  # printed above the summary's path, with its interval
    assert ["compositional", f"{score['mean']:.3f}", f"[{score['ci_low']:.3f},", f"{score['ci_high']:.3f}]"] in \
        [line.split() for line in proc.stdout.splitlines()], proc.stdout
    assert (run_dir / "samples.png").is_file()
    client = MlflowClient(uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.run_name == "sample-run"
    params = run.data.params  # this mode's settings only, and the checkpoint actually sampled from
    assert params["sample.images_per_prompt"] == "2" and not any(k.startswith(("grpo.", "pretrain.")) for k in params)
    assert Path(params["init_from"]).resolve() == Path(checkpoint).resolve()
    assert {a.path for a in client.list_artifacts(summary["mlflow_run_id"])} >= {"samples.json", "samples.png",
                                                                                 "samples_table.json"}

    # The API draws the same images with the same settings; and prompt 2's images do not depend on the others
    # (a sampler batching every prompt into one noise draw would give prompt 2 other noise alone than in the run).
    api = sample_images(checkpoint, PROMPTS, count=2, steps=3, seed=5)
    cli = [Image.open(run_dir / r["image"]) for r in records]
    assert all(np.array_equal(np.asarray(a), np.asarray(c)) for a, c in zip(api, cli))
    alone = to_pil(prompt_images(load(checkpoint), PROMPTS[2], 2, 2, steps=3, seed=5))
    assert all(np.array_equal(np.asarray(a), np.asarray(c)) for a, c in zip(alone, cli[4:]))
    assert not np.array_equal(np.asarray(cli[0]), np.asarray(cli[1]))  # two draws of one prompt differ


@pytest.mark.parametrize("args, words", [
    (["sample.prompts=[a red circle]", "sample.prompt_file=x.txt"], "not both"),
    (["sample.prompt_file=/nonexistent/prompts.txt"], "sample.prompt_file"),
    (["sample.images_per_prompt=0"], "sample.images_per_prompt"),
    (["sample.sampler=euler"], "sample.sampler"),
])
def test_bad_sample_settings_exit_2_naming_the_key_and_write_nothing(checkpoint, tmp_path, args, words):
    run_dir = tmp_path / "run"
    proc = run_sample(f"init_from={checkpoint}", f"run_dir={run_dir}", *args)
    assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr
    assert not run_dir.exists()


def test_reward_matrix_columns_are_the_noise_seeds(tiny_model):
    """Would catch reward_matrix draws every column with the same noise."""
    from learner.evaluation import evaluate, reward_matrix
    from rewards import build

    model, prompts, rewards = tiny_model.eval(), PROMPTS[:2], {"jpeg": build("jpeg_compressibility")}
    with torch.no_grad():
        _, m = reward_matrix(model, prompts, 3, 5, 2, rewards)
        for s in range(2):
            _, mean = evaluate(model, prompts, 3, 5 + s, rewards)
            assert m["jpeg"][:, s].mean() == pytest.approx(mean["jpeg"], rel=1e-6)
    assert not np.allclose(m["jpeg"][:, 0], m["jpeg"][:, 1])


def test_reward_matrix_images_are_the_first_seeds_and_its_guidance_is_the_samplers(tiny_model):
    """reward_matrix returns the images of its first noise seed (the grid shown beside the scores) and samples every
    column with the guidance it is given, as evaluate does. Would catch the last seed's images returned, or the
    guidance dropped from the seeds' sampling (scores of another sampler than the one named)."""
    from learner.evaluation import evaluate, reward_matrix
    from rewards import build

    model, prompts, rewards = tiny_model.eval(), PROMPTS[:2], {"jpeg": build("jpeg_compressibility")}
    with torch.no_grad():
        images, m = reward_matrix(model, prompts, 3, 5, 2, rewards, guidance=3.0)
        first, _ = evaluate(model, prompts, 3, 5, rewards, guidance=3.0)
        for s in range(2):
            _, mean = evaluate(model, prompts, 3, 5 + s, rewards, guidance=3.0)
            assert m["jpeg"][:, s].mean() == pytest.approx(mean["jpeg"], rel=1e-6)
    assert torch.equal(images, first)
