"""A GRPO batch on a real stream, sampled by a rollout actor's own code (in this process; shared by learner tests)."""

import torch

from actors.experience import Group
from actors.rollout import RolloutActor
from actors.stream import ExperienceStream, learner_group

PROMPTS = [
    "a small red circle at the top left, on a white background",
    "a large blue square at the bottom right, on a black background",
    "a green triangle, on a gray background",
    "a small yellow circle at the top right and a large cyan square at the bottom left",
]
WEIGHTS = {"compositional": 1.0}  # the learner's default reward mix


def write_batch(checkpoint, address, run_id, *, steps, group_size, eta=1.0, guidance=1.0, ranks=1, rewards=None,
                seed=0, bf16=False, trajectory=True, iteration=0, lora=None, weights=None,
                order=None, stochastic_steps=None, shared_start=False,
                credit_block=1, version=0) -> list[torch.Tensor]:
    """Sample one group per prompt as a rollout actor does and stream it; returns the per-group rewards.
    `weights`: a learner's published state, set on the actor first (with `lora`, the adapters' alone). `order`: the
    prompt indices in the order their groups reach the stream (as actors finishing in another order write them).
    `version`: the policy version the groups claim to come from."""
    actor = RolloutActor(checkpoint, steps, group_size, eta, guidance, [], WEIGHTS, 1.0, 0, address, run_id,
                         torch_threads=torch.get_num_threads(), bf16=bf16, lora=lora, stochastic_steps=stochastic_steps,
                         shared_start=shared_start, credit_block=credit_block)
    if weights is not None:
        actor.set_weights(weights, 0)
    for r in range(ranks):
        ExperienceStream(address, run_id, learner_group(r)).create()
    trajectories = actor.sample(PROMPTS, list(range(len(PROMPTS))), 0, seed)
    gen = torch.Generator().manual_seed(seed)
    out, groups = [], []
    for i, (prompt, traj) in enumerate(zip(PROMPTS, trajectories)):
        reward = rewards[i] if rewards is not None else torch.rand(group_size, generator=gen)
        recorded = (traj.states, traj.log_probs) if trajectory else (None, None)
        groups.append(Group(prompt, i, iteration, version, actor.sampler, {"compositional": reward}, WEIGHTS,
                            traj.images, *recorded))
        out.append(reward)
    for i in order if order is not None else range(len(groups)):
        actor.stream.add(groups[i])
    return out
