"""One interface for every reward model, and a registry so a new reward is one file that registers a name.

Rewards outside this repository plug in as Python entry points in the group `proxrl.rewards` (name = the reward's
name in configs, value = `module:Class`, a RewardModel subclass): installed with their package, they are found in
every process of a run (driver, reward actors) without editing ProxRL. docs/custom_rewards.md has an example.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from importlib.metadata import entry_points
from typing import Callable, Sequence

import numpy as np
import torch


class RewardModel:
    """score(images [B, 3, H, W] in [0, 1], prompts) -> float32 tensor [B]; higher is better.

    Every subclass's `score` (built-in or plugin) keeps two promises without writing them: an image holding a NaN or
    inf scores NaN (so its group is dropped, never trained on: a learned reward would see the NaN as black after
    the uint8 conversion and give it an ordinary score), and an empty batch scores an empty tensor.

    Optional hooks, checked before a run starts: `preflight(**options)` (files and options) and
    `check_prompts(prompts)` (raise ValueError naming a prompt the reward cannot read)."""

    name: str = ""
    # True: `score` is differentiable in the images (keeps their graph), so grpo.objective direct can train on it.
    differentiable: bool = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "score" in cls.__dict__:
            cls.score = _checked(cls.__dict__["score"])

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError


def _checked(score: Callable) -> Callable:
    """`score` with the interface's promises about non-finite images and empty batches (RewardModel)."""

    @functools.wraps(score)
    def checked(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(images) == 0:
            return torch.zeros(0, dtype=torch.float32, device=images.device)
        return nan_where_nonfinite(images, score(self, images, prompts))

    return checked


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] floats in [0, 1] to uint8 [B, H, W, 3], as PIL and image codecs take them."""
    return (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def nan_where_nonfinite(images: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """`scores` [B] with NaN for every image holding a NaN or inf: such an image has no score (clamping it to [0, 1]
    first would give it a finite one), and a group with a NaN reward is dropped by the rollout, not trained on."""
    broken = ~torch.isfinite(images.detach().flatten(1)).all(dim=1).to(scores.device)
    return scores.masked_fill(broken, float("nan"))


def weighted_sum(scores: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """The mixed reward: sum of weight x score over the configured reward models (each [B])."""
    return sum(weights[name] * scores[name].float() for name in weights)


_REGISTRY: dict[str, Callable[..., RewardModel]] = {}


def register(name: str):
    """Class decorator: make a reward model constructible by `name` from configs."""

    def wrap(cls):
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available() -> list[str]:
    _import_builtin()
    return sorted(_REGISTRY)


def reward_class(name: str) -> type[RewardModel]:
    """The class registered as `name` (nothing loaded)."""
    _import_builtin()
    if name not in _REGISTRY:
        raise KeyError(f"unknown reward {name!r}; registered rewards are {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def build(name: str, **options) -> RewardModel:
    """The reward `name`; one that takes a `device` gets this process's GPU if it has one and none was given."""
    cls = reward_class(name)
    if "device" not in options and "device" in inspect.signature(cls).parameters:
        options["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    return cls(**options)


def preflight(name: str, options: dict) -> None:
    """Check a reward's files and options without loading it (a reward class may define `preflight(**options)`)."""
    _import_builtin()
    cls = _REGISTRY[name]
    accepted = list(inspect.signature(cls).parameters)
    unknown = sorted(set(options) - set(accepted))
    if unknown:  # first: a misspelt option would otherwise read as a missing file
        hint = difflib.get_close_matches(unknown[0], accepted, n=1)
        raise TypeError(f"unknown option(s) {', '.join(unknown)}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                        + f"; {name} takes {', '.join(accepted) or 'no options'}")
    check = getattr(cls, "preflight", None)
    if check is not None:
        check(**options)  # a missing file's message names the file, its source and the option to set
    inspect.signature(cls).bind(**options)  # missing required options fail here, not inside an actor


PLUGIN_GROUP = "proxrl.rewards"
_plugins_loaded = False


def _import_builtin() -> None:
    # Importing a module runs its @register; the built-in ones live beside this file, plugins in installed packages.
    global _plugins_loaded
    from rewards import aesthetic, clip_score, compositional, hps, image_reward, jpeg, pickscore  # noqa: F401

    if not _plugins_loaded:
        _plugins_loaded = True
        for entry in entry_points(group=PLUGIN_GROUP):
            _register_plugin(entry)


def _register_plugin(entry) -> None:
    """Load one `proxrl.rewards` entry point and register its class under the entry point's name."""
    where = f"reward plugin {entry.name!r} ({entry.value}" + (f", from {entry.dist.name}" if entry.dist else "") + ")"
    try:
        cls = entry.load()
    except Exception as e:  # a broken plugin must say which one, not fail somewhere inside a reward actor
        raise ValueError(f"{where} cannot be loaded: {type(e).__name__}: {e}; fix or uninstall that package") from e
    if not (isinstance(cls, type) and issubclass(cls, RewardModel)):
        raise ValueError(f"{where} is not a rewards.base.RewardModel subclass; point the entry point at one")
    if _REGISTRY.get(entry.name) is cls:  # it registered itself with @register under the same name
        return
    if entry.name in _REGISTRY:
        raise ValueError(f"{where} takes the name of a reward that already exists; give the entry point another name")
    cls.name = entry.name
    _REGISTRY[entry.name] = cls
