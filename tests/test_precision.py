"""Mixed precision on the CPU: with deepspeed.bf16 the learner and the rollouts run the same bf16 network, so the
learner's first recomputation (before any step) reproduces the recorded log-probs far inside the clip range."""

import pytest
import torch

from actors.stream import EmbeddedRedis
from learner.config import RunConfig
from learner.grpo_learner import GrpoLearner
from proxmodel.model import save_model
from tests.grpo_batch import PROMPTS, write_batch

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, G, CLIP = 3, 4, 1e-3


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory):
    return str(save_model(tiny_model, tmp_path_factory.mktemp("ckpt") / "c"))


def first_pass(checkpoint, rollout_bf16: bool, guidance: float) -> dict:
    with EmbeddedRedis() as server:
        write_batch(checkpoint, server.address, "p", steps=STEPS, group_size=G, guidance=guidance, bf16=rollout_bf16)
        cfg = RunConfig.model_validate({
            "grpo": {"steps": STEPS, "group_size": G, "prompts_per_iteration": len(PROMPTS), "clip_range": CLIP,
                     "guidance": guidance, "kl_coef": 0.1},
            "actors": {"torch_threads": 1},
            "deepspeed": {"bf16": True},
        })
        learner = GrpoLearner(checkpoint, cfg.model_dump_json(), server.address, "p")
        assert next(learner.engine.module.parameters()).dtype == torch.bfloat16
        return learner.train(0, len(PROMPTS))


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_bf16_rollouts_match_the_bf16_learner_far_inside_the_clip_range(checkpoint, guidance):
    metrics = first_pass(checkpoint, rollout_bf16=True, guidance=guidance)
    print(f"guidance {guidance}: first-pass |log-ratio| max {metrics['first_pass_log_ratio_max']:.3g} "
          f"mean {metrics['first_pass_log_ratio_mean']:.3g}")
    assert metrics["first_pass_log_ratio_max"] <= 0.01 * CLIP
    assert metrics["kl"] <= 1e-6 and metrics["acked"] == len(PROMPTS)  # the first pass: at the reference (bf16 too)
