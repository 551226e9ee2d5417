import pytest
import torch

from rewards import available, build
from rewards.base import RewardModel, to_uint8_images
from rewards.scenes import scene_batch


def test_registry_lists_the_builtin_rewards():
    assert {"compositional", "jpeg_compressibility", "jpeg_incompressibility"} <= set(available())


def test_jpeg_rewards_order_flat_above_noisy_and_are_deterministic():
    flat = torch.full((2, 3, 32, 32), 0.5)
    noisy = torch.rand((2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, noisy])
    compress, incompress = build("jpeg_compressibility"), build("jpeg_incompressibility")
    c = compress.score(images, [""] * 4)
    assert c.dtype == torch.float32 and c.shape == (4,)
    assert bool((c[:2] > c[2:].max()).all())
    assert torch.equal(incompress.score(images, [""] * 4), -c)
    assert torch.equal(compress.score(images, [""] * 4), c)
    # Scenes (flat colours) compress better than noise, worse than a blank image.
    scenes, captions = scene_batch(seed=0, start=0, count=4, side=32)
    s = compress.score(torch.from_numpy(scenes), captions)
    assert bool((s < c[:2].min()).all()) and bool((s > c[2:].max()).all())


@pytest.mark.parametrize("name", ["compositional", "compositional_strict", "compositional_soft", "compositional_soft_exact",
                                  "compositional_soft_strict", "compositional_count", "jpeg_compressibility",
                                  "jpeg_incompressibility"])
def test_a_nonfinite_image_scores_nan_and_the_others_keep_their_scores(name):
    scenes, captions = scene_batch(seed=1, start=0, count=4, side=32)
    images = torch.from_numpy(scenes)
    broken = images.clone()
    broken[1, 0, 3, 3] = float("nan")  # one pixel is enough
    broken[2, 2, 0, 0] = float("inf")
    reward = build(name)
    clean, scored = reward.score(images, captions), reward.score(broken, captions)
    assert scored.isnan().tolist() == [False, True, True, False]
    assert torch.equal(scored[[0, 3]], clean[[0, 3]])


@pytest.mark.parametrize("name", ["compositional", "compositional_soft", "jpeg_compressibility"])
def test_an_empty_batch_scores_an_empty_tensor(name):
    """A rank whose every trajectory was dropped scores an empty batch: torch.stack / torch.cat of nothing raised."""
    assert build(name).score(torch.zeros(0, 3, 32, 32), []).shape == (0,)


def test_a_plugin_written_without_the_guards_keeps_the_interfaces_promises():
    """A custom reward (docs/custom_rewards.md) that reads pixels as uint8, as the learned rewards do, and never
    thinks of NaN: its NaN image scores NaN, not the black image's score, and an empty batch does not reach it."""

    class Brightness(RewardModel):
        def score(self, images, prompts):
            return torch.from_numpy(to_uint8_images(images).mean(axis=(1, 2, 3))).float()

    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    images[0] = float("nan")
    scores = Brightness().score(images, ["a"] * 3)
    assert scores.isnan().tolist() == [True, False, False]
    assert Brightness().score(images[:0], []).shape == (0,)


@pytest.mark.parametrize("name", ["compositional", "compositional_count", "compositional_contrastive",
                                  "compositional_soft", "compositional_soft_exact", "compositional_soft_strict",
                                  "jpeg_compressibility"])
def test_a_batch_scores_each_image_as_it_scores_alone(name):
    """An image's reward cannot depend on the other images of its batch (the rollout batches a GRPO group's images
    together). Would catch the contrastive verifier tiling its images in the wrong order (images.repeat for
    repeat_interleave: each image scored against other prompts' distractors)."""
    scenes, captions = scene_batch(seed=4, start=0, count=6, side=32)
    images = torch.from_numpy(scenes)
    captions = captions[:3] + captions[4:] + captions[3:4]  # some images under other captions: varied scores
    reward = build(name)
    batch = reward.score(images, captions)
    alone = torch.cat([reward.score(images[i:i + 1], captions[i:i + 1]) for i in range(len(captions))])
    assert torch.allclose(batch, alone, atol=1e-6)


def test_the_check_command_refuses_an_option_without_a_name():
    """`python -m rewards.check NAME key=value ...`: '=x' (no key) is refused with the form to use, as 'x' (no '=')
    is. Would catch an empty key accepted as an option named '' (it would then fail later as an unknown option of
    no name)."""
    from rewards.check import parse_options

    assert parse_options(["strict=true", "others=3"]) == {"strict": True, "others": 3}
    for bad in ("=true", "strict"):
        with pytest.raises(ValueError, match="is not key=value"):
            parse_options([bad])


def test_a_reward_name_cannot_be_registered_twice():
    """@register refuses a name that is taken, and the reward registered first keeps it. Would catch a second
    registration silently replacing a built-in reward (a plugin or a copy-pasted module named `compositional`
    would change what every config's `compositional` scores)."""
    from rewards import base
    from rewards.base import register, reward_class
    from rewards.compositional import CompositionalReward

    available()
    saved = dict(base._REGISTRY)
    try:
        with pytest.raises(ValueError, match="registered twice"):
            register("compositional")(type("Impostor", (RewardModel,), {}))
        assert reward_class("compositional") is CompositionalReward
    finally:
        base._REGISTRY.clear()
        base._REGISTRY.update(saved)


def test_preflight_names_a_missing_required_option_of_a_reward_without_its_own_check():
    """rewards.base.preflight runs before any actor starts: a reward (e.g. a plugin with no preflight hook) whose
    required option the config leaves out fails there, naming the option, not later inside a reward actor. Would
    catch the signature check dropped."""
    from rewards import base
    from rewards.base import preflight, register

    class NeedsPath(RewardModel):
        def __init__(self, path: str, scale: float = 1.0):
            self.path, self.scale = path, scale

        def score(self, images, prompts):
            return torch.zeros(len(images))

    available()
    saved = dict(base._REGISTRY)
    try:
        register("mut38_needs_path")(NeedsPath)
        preflight("mut38_needs_path", {"path": "/x", "scale": 2.0})
        with pytest.raises(TypeError, match="path"):
            preflight("mut38_needs_path", {"scale": 2.0})
    finally:
        base._REGISTRY.clear()
        base._REGISTRY.update(saved)
