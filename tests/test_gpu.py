"""The GPU check, for users with a GPU (not run by CI, which has none):

    pytest -m gpu tests/test_gpu.py

Pretrains the smoke model and runs smoke GRPO on one GPU in bf16 with LoRA adapters, every actor sharing the one GPU
(fractional Ray GPUs), through the real CLI; checks that each part ran on the GPU (summary.json's `device` and
`devices`, as each actor reports it) and that every loss, reward and log-ratio logged is finite.

PROXRL_CHECK_DEVICE=cpu runs the same check with no GPU asked for and the CPU expected: the harness itself, on any
machine.
"""

import math
import os

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.cli import SMOKE, run_cli, summary_of

DEVICE = os.environ.get("PROXRL_CHECK_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (or PROXRL_CHECK_DEVICE=cpu to check the harness on the CPU)"),
]
GPUS = {"cuda": ("0.25", "0.25", "0.5"), "cpu": ("0", "0", "0")}[DEVICE]  # rollout, reward, learner on one GPU


def finite_history(client: MlflowClient, run_id: str, names: list[str]) -> None:
    for name in names:
        values = [m.value for m in client.get_metric_history(run_id, name)]
        assert values and all(math.isfinite(v) for v in values), (name, values)


def test_pretrain_and_grpo_run_on_one_gpu_in_bf16_with_lora(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [f"mlflow.tracking_uri={uri}", "deepspeed.bf16=true"]
    pretrained = summary_of(run_cli("--mode", "pretrain", "--config", str(SMOKE), f"run_dir={tmp_path / 'pretrain'}",
                                    *common))
    assert pretrained["device"].startswith(DEVICE)
    assert math.isfinite(pretrained["loss_final"]) and all(math.isfinite(v) for v in pretrained["eval_reward"].values())
    client = MlflowClient(uri)
    finite_history(client, pretrained["mlflow_run_id"], ["loss"])

    rollout, reward, learner = GPUS
    summary = summary_of(run_cli(
        "--mode", "grpo", "--config", str(SMOKE), f"run_dir={tmp_path / 'grpo'}", *common,
        f"init_from={pretrained['checkpoint']}", "grpo.lora.rank=4", f"actors.rollout.num_gpus={rollout}",
        f"actors.reward.num_gpus={reward}", f"actors.learner.num_gpus={learner}",
    ))
    assert {part: {d.split(":")[0] for d in where} for part, where in summary["devices"].items()} == {
        "rollout": {DEVICE}, "reward": {DEVICE}, "learner": {DEVICE}}, summary["devices"]
    assert all(math.isfinite(v) for v in summary["eval_reward_after"].values())
    finite_history(client, summary["mlflow_run_id"], ["reward_mean", "loss", "first_pass_log_ratio_max"])
    # bf16 in rollouts and learner alike: the learner's first pass recomputes the rollout's log-probs closely
    first_pass = [m.value for m in client.get_metric_history(summary["mlflow_run_id"], "first_pass_log_ratio_max")]
    assert max(first_pass) < 1e-3, first_pass  # the clip range: a larger gap would be clipped before any update
