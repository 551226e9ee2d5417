"""Reward models behind one interface: `score(images, prompts) -> tensor[B]`."""

from rewards.base import RewardModel, available, build, register, weighted_sum

__all__ = ["RewardModel", "available", "build", "register", "weighted_sum"]
