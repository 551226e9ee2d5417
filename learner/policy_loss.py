"""Group-relative advantages and the clipped policy loss (docs/method.md sec. 4). Pure functions, tested directly."""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """A_i = (r_i - mean_group) / (std_group + eps) over the last dimension (one group per row)."""
    mean = rewards.mean(dim=-1, keepdim=True)
    std = rewards.std(dim=-1, unbiased=False, keepdim=True)
    return (rewards - mean) / (std + eps)


def clipped_policy_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-mean(min(ratio A, clip(ratio, 1 - c, 1 + c) A)) over all given (trajectory, step) terms.

    Returns the loss and detached statistics: ratio mean/max deviation from 1, clip fraction, approx KL, |log-ratio|
    max/mean.
    """
    log_ratio = log_prob.float() - old_log_prob.float()
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range) * advantages
    loss = -torch.minimum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "ratio_mean": ratio.mean(),
            "ratio_max_dev": (ratio - 1.0).abs().max(),
            "clip_frac": ((ratio - 1.0).abs() > clip_range).float().mean(),
            "approx_kl": 0.5 * (log_ratio * log_ratio).mean(),
            "log_ratio_abs_max": log_ratio.abs().max(),
            "log_ratio_abs_mean": log_ratio.abs().mean(),
        }
    return loss, stats


class PromptStats:
    """Per-prompt running reward statistics (DDPO): the last `buffer` rewards of each (reward, prompt).

    Plain lists of floats, so its state goes into a JSON checkpoint as it is.
    """

    def __init__(self, buffer: int, min_count: int, state: dict | None = None):
        self.buffer, self.min_count = buffer, min_count
        self.history: dict[str, list[float]] = dict(state or {})

    def normalise(self, key: str, rewards: torch.Tensor, eps: float) -> torch.Tensor:
        """Record `rewards` (one group) and normalise them by this prompt's history, or by the group while short."""
        seen = (self.history.get(key, []) + [float(r) for r in rewards])[-self.buffer :]
        self.history[key] = seen
        if len(seen) < self.min_count:
            return group_advantages(rewards, eps)
        hist = torch.tensor(seen, dtype=rewards.dtype)
        return (rewards - hist.mean()) / (hist.std(unbiased=False) + eps)

    def state(self) -> dict[str, list[float]]:
        return self.history


def compute_advantages(
    rewards: dict[str, torch.Tensor],
    weights: dict[str, float],
    prompts: list[str],
    *,
    aggregation: str = "reward",
    std: str = "group",
    eps: float = 1e-4,
    clip: float = 0.0,
    prompt_stats: PromptStats | None = None,
) -> torch.Tensor:
    """Advantages [P, G] from per-model rewards ({name: [P, G]}, one prompt per row) (docs/method.md sec. 4).

    aggregation: "reward" normalises the weighted sum of rewards; "advantage" sums weighted per-reward advantages.
    std: "group" (each group's own std), "global" (one std over the batch; group means still subtracted) or
    "prompt" (per-prompt running statistics). clip > 0 bounds |A|.
    """
    from rewards import weighted_sum

    def normalise(name: str, r: torch.Tensor) -> torch.Tensor:
        if std == "group":
            return group_advantages(r, eps)
        if std == "global":
            return (r - r.mean(dim=-1, keepdim=True)) / (r.std(unbiased=False) + eps)
        if std == "prompt":
            return torch.stack([prompt_stats.normalise(f"{name}|{p}", row, eps) for p, row in zip(prompts, r)])
        raise ValueError(f"unknown advantage std mode {std!r}; use group, global or prompt")

    if aggregation == "reward":
        adv = normalise("total", weighted_sum(rewards, weights))
    elif aggregation == "advantage":
        adv = sum(weights[name] * normalise(name, rewards[name].float()) for name in weights)
    else:
        raise ValueError(f"unknown reward aggregation {aggregation!r}; use reward or advantage")
    return adv.clamp(-clip, clip) if clip > 0 else adv


def select_train_steps(n_transitions: int, window: list[int] | None, fraction: float, generator: torch.Generator) -> list[int]:
    """Which sampler transitions (0 = the first, noisiest) to train this iteration: a random `fraction` of `window`."""
    pool = list(range(n_transitions)) if window is None else [j for j in window if 0 <= j < n_transitions]
    if not pool:
        raise ValueError(f"train_step_window {window} selects none of the {n_transitions} transitions 0..{n_transitions - 1}")
    count = max(1, round(fraction * len(pool)))
    chosen = torch.randperm(len(pool), generator=generator)[:count]
    return sorted(pool[i] for i in chosen.tolist())
