"""A GRPO batch on a real stream, made the way rollout actors make it (shared by the learner tests)."""

import torch

from actors.rollout import group_entry
from actors.stream import ExperienceStream, learner_group
from proxmodel.model import load_model
from proxmodel.policy import Policy

PROMPTS = [
    "a small red circle at the top left, on a white background",
    "a large blue square at the bottom right, on a black background",
    "a green triangle, on a gray background",
    "a small yellow circle at the top right and a large cyan square at the bottom left",
]


def write_batch(checkpoint, address, run_id, *, steps, group_size, eta=1.0, guidance=1.0, ranks=1, rewards=None,
                seed=0):
    """Sample one group per prompt with the checkpoint's policy and stream it; returns the per-group rewards."""
    model = load_model(checkpoint).eval()
    policy = Policy.of(model, steps, eta, guidance)
    gen = torch.Generator().manual_seed(seed)
    streams = [ExperienceStream(address, run_id, learner_group(r)) for r in range(ranks)]
    for s in streams:
        s.create()
    out = []
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            context = model.encode_text(model.tokenize([prompt] * group_size))
        traj = policy.sample(model, {"context": context}, model.sample_shape(group_size), gen)
        reward = rewards[i] if rewards is not None else torch.rand(group_size, generator=gen)
        meta, tensors = group_entry(prompt, i, 0, 0, policy, traj, {"compositional": reward}, reward)
        streams[0].add(meta, tensors)
        out.append(reward)
    return out
