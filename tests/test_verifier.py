"""The compositional verifier: right on ground-truth renders, clearly lower on mismatched pairs."""

import numpy as np
import pytest
import torch

from rewards import build
from rewards.compositional import PALETTE, PALETTE_NAMES, STRICT, count_objects, soft_verify, verify
from rewards.scenes import (Scene, SceneObject, bound_scene, mirror_caption, near_miss, parse_caption, random_scene,
                           render, scene_batch, scene_prompts)

SEEDS = 300


@pytest.mark.parametrize("side", [32, 48])  # the default resolution and above; 16 px is too coarse for shapes
def test_ground_truth_scores_high_and_mismatches_low(side):
    images, captions = scene_batch(seed=123, start=0, count=SEEDS, side=side, omit_prob=0.3)
    matched = np.array([verify(im, parse_caption(c)) for im, c in zip(images, captions)])
    shuffled = captions[1:] + captions[:1]
    mismatched = np.array([verify(im, parse_caption(c)) for im, c in zip(images, shuffled)])
    # Every render satisfies its own caption exactly (2% of them did not while two objects of one colour could be
    # matched to one blob).
    assert np.all(matched == 1.0), [c for c, m in zip(captions, matched) if m < 1][:3]
    assert mismatched.mean() <= 0.5
    assert matched.mean() - mismatched.mean() >= 0.45


def test_each_attribute_is_checked():
    base = Scene("white", (SceneObject("red", "circle", "large", "top left"),))
    image = render(base, 32)
    assert verify(image, base) == 1.0
    for wrong in (
        Scene("black", base.objects),
        Scene("white", (SceneObject("red", "square", "large", "top left"),)),
        Scene("white", (SceneObject("red", "circle", "small", "top left"),)),
    ):
        assert verify(image, wrong) == pytest.approx(4 / 5)
    # Another colour is another object: its place and size earn nothing (only the background holds).
    assert verify(image, Scene("white", (SceneObject("blue", "circle", "large", "top left"),))) == pytest.approx(1 / 5)
    # Wrong quadrant: nothing is found there, so only the background holds.
    assert verify(image, Scene("white", (SceneObject("red", "circle", "large", "bottom right"),))) == pytest.approx(1 / 5)


def test_captions_round_trip_through_the_parser():
    rng = np.random.default_rng(0)
    for _ in range(200):
        _, stated = random_scene(rng, omit_prob=0.5)
        assert parse_caption(stated.caption()) == stated


def test_a_near_miss_caption_changes_one_binding_and_a_faithful_render_fails_it():
    """near_miss feeds a reward model labels that differ only in which word binds to which object: each must stay in
    the grammar, differ from its source in exactly one attribute (or one swap of two objects' colours or shapes),
    and cost a faithful render of a fully stated caption some credit (a no-op edit, or one the verifier cannot see,
    would teach the model nothing and fails here)."""
    rng = np.random.default_rng(1)
    kinds = set()
    for index in range(300):
        full, _ = random_scene(np.random.default_rng([7, index]))
        caption = full.caption()
        image = render(full, 32, np.random.default_rng([7, index]))
        other = near_miss(caption, rng)
        edited = parse_caption(other)
        assert other != caption and len(edited.objects) == len(full.objects)
        diffs = [(i, a) for i, (o, e) in enumerate(zip(full.objects, edited.objects))
                 for a in ("colour", "shape", "size", "position") if getattr(o, a) != getattr(e, a)]
        diffs += [(None, "background")] if edited.background != full.background else []
        attr = diffs[0][1]
        swapped = (len(diffs) == 2 and diffs[1][1] == attr
                   and [getattr(o, attr) for o in edited.objects] == [getattr(o, attr) for o in full.objects][::-1])
        assert len(diffs) == 1 or swapped, (caption, other)
        kinds.add("swap" if swapped else diffs[0][1])
        assert len({o.position for o in edited.objects}) == len(edited.objects)  # a moved object keeps its own quadrant
        assert verify(image, full) == 1.0 and verify(image, edited) < 1.0, (caption, other)
    assert kinds == {"background", "colour", "shape", "size", "position", "swap"}
    # partially stated captions edit only what they state
    colours = ("red", "green", "blue", "yellow", "cyan", "magenta")
    edits = {f"a {c} {s}" for c in colours for s in ("circle", "square", "triangle")} - {"a red circle"}
    assert near_miss("a red circle", rng) in edits


def test_a_mirrored_image_scores_under_the_mirrored_caption_what_the_image_scores_under_its_own():
    """The free augmentation a learned reward model trains with: flip left-right and exchange left and right in the
    caption. Checked on imperfect images too (renders under other captions, and noisy ones), where a verifier or
    mirror that is not symmetric would show."""
    assert mirror_caption("a red circle at the top left and a blue square at the bottom right, on a white background") \
        == "a red circle at the top right and a blue square at the bottom left, on a white background"
    assert mirror_caption("a large red triangle") == "a large red triangle"
    images, captions = scene_batch(seed=11, start=0, count=200, side=32, omit_prob=0.3)
    rng = np.random.default_rng(0)
    images = np.clip(images + rng.normal(0, 0.15, images.shape).astype(np.float32), 0, 1)  # imperfect images
    pairs = list(zip(images, captions)) + list(zip(images, captions[1:] + captions[:1]))  # and wrong captions
    own = np.array([verify(im, parse_caption(c)) for im, c in pairs])
    mirrored = np.array([verify(im[:, :, ::-1].copy(), parse_caption(mirror_caption(c))) for im, c in pairs])
    assert own.std() > 0.1  # the check sees scores of every kind, not only 1s
    np.testing.assert_allclose(mirrored, own)


def test_reward_interface_and_bad_captions():
    images, captions = scene_batch(seed=5, start=0, count=6, side=32)
    reward = build("compositional")
    scores = reward.score(torch.from_numpy(images), captions)
    assert scores.dtype == torch.float32 and scores.shape == (6,) and bool((scores == 1.0).all())
    with pytest.raises(ValueError, match="not in the scene grammar"):
        parse_caption("a photograph of a cat")
    with pytest.raises(KeyError, match="registered rewards"):
        build("no-such-reward")


def test_noise_cannot_earn_reward():
    """Speckle of palette colours (what a reward-hacking policy drifts to) scores about nothing."""
    from rewards.compositional import PALETTE

    rng = np.random.default_rng(0)
    _, captions = scene_batch(seed=9, start=0, count=100, side=32)
    uniform = [PALETTE[rng.integers(0, len(PALETTE), (32, 32))].transpose(2, 0, 1) for _ in captions]
    assert np.mean([verify(im, parse_caption(c)) for im, c in zip(uniform, captions)]) < 0.02
    # Speckle on a dominant background still earns at most the background attribute.
    speckled = []
    for caption in captions:
        classes = rng.integers(0, len(PALETTE), (32, 32))
        classes[rng.random((32, 32)) < 0.6] = 0
        speckled.append(verify(PALETTE[classes].transpose(2, 0, 1), parse_caption(caption)))
    assert np.mean(speckled) < 0.1


def test_one_blob_for_every_prompt_earns_only_where_its_colour_is_asked_for():
    """The collapse seen with the ungated verifier: a large cyan blob on a light background for every prompt."""
    blob = Scene("white", (SceneObject("cyan", "circle", "large", "top left"),
                           SceneObject("cyan", "square", "large", "bottom right")))
    image = render(blob, 32)
    captions = scene_prompts(0, 10_000_000, 300)
    scores = np.array([verify(image, parse_caption(c)) for c in captions])
    asks_cyan = np.array(["cyan" in c for c in captions])
    assert scores[~asks_cyan].mean() < 0.1  # at most the background, which most prompts do not share
    assert scores[asks_cyan].mean() > scores[~asks_cyan].mean()


def test_the_strict_check_passes_clean_renders_and_fails_what_only_the_lenient_verifier_accepts():
    """compositional_strict, the held-out check of GRPO runs: the data score as under the trained verifier, while a
    blur (soft edges, off-palette pixels) or a tint that keeps every pixel nearest its colour keeps the lenient
    score and loses the strict one."""
    images, captions = scene_batch(seed=11, start=0, count=200, side=32)
    images = torch.from_numpy(images)
    lenient, strict = build("compositional"), build("compositional_strict")
    assert torch.equal(strict.score(images, captions), lenient.score(images, captions))
    assert float(strict.score(images, captions).mean()) >= 0.95
    tinted = (images * 0.6 + 0.2).clamp(0, 1)  # contrast down: each pixel still nearest its palette colour
    assert float(lenient.score(tinted, captions).mean()) >= 0.95
    assert float(strict.score(tinted, captions).mean()) < 0.5
    blurred = torch.nn.functional.avg_pool2d(images, 3, 1, 1, count_include_pad=False)
    assert float(strict.score(blurred, captions).mean()) < float(lenient.score(blurred, captions).mean()) - 0.3


def test_the_contrastive_verifier_pays_faithful_renders_and_nothing_for_one_image_for_every_prompt():
    """compositional_contrastive = own-caption score - mean score under distractor captions. A faithful render keeps
    most of its score; one fixed image scored as the answer to 300 different captions earns about 0 on average
    (while the plain verifier pays it for whatever those captions happen to share with it: the prompt-agnostic
    hack). Would catch distractors equal to the own caption (renders would earn 0) or not subtracted (the fixed
    image would earn what the plain verifier pays)."""
    contrastive, plain = build("compositional_contrastive"), build("compositional")
    images, captions = scene_batch(3, 0, 64, 32)
    images = torch.from_numpy(images)
    assert float(contrastive.score(images, captions).mean()) > 0.7
    prompts = scene_prompts(11, 0, 300)
    fixed = images[:1].repeat(len(prompts), 1, 1, 1)
    assert float(plain.score(fixed, prompts).mean()) > 0.05
    assert abs(float(contrastive.score(fixed, prompts).mean())) < 0.03


def test_the_soft_verifier_credits_what_the_verifier_does_and_degrades_gradually():
    """compositional_soft is a shaping reward: it must agree with the verifier where the verifier is sure (faithful
    renders high, other captions, speckle and a blob of the wrong colour low) and, unlike it, keep ranking images
    that all fail or all pass a threshold: an object slid out of its quadrant loses credit at every step, where the
    verifier's score is a staircase."""
    images, captions = scene_batch(seed=123, start=0, count=200, side=32, omit_prob=0.3)
    soft = build("compositional_soft")
    faithful = soft.score(torch.from_numpy(images), captions)
    shuffled = soft.score(torch.from_numpy(images), captions[1:] + captions[:1])
    assert faithful.mean() >= 0.95 and shuffled.mean() <= 0.2
    rng = np.random.default_rng(0)
    speckle = PALETTE[rng.integers(len(PALETTE), size=(200, 32, 32))].transpose(0, 3, 1, 2).copy()
    assert soft.score(torch.from_numpy(speckle), captions).mean() <= 0.2

    scene = Scene("white", (SceneObject("red", "square", "large", "top left"),))
    image = render(scene, 32)
    wrong_colour = Scene("white", (SceneObject("blue", "square", "large", "top left"),))
    assert float(soft_verify(image, wrong_colour)) == pytest.approx(1 / 5, abs=0.01)  # the background only, as verify
    shifted, hard = [], []
    for d in range(0, 15, 2):
        moved = np.ones_like(image)
        moved[:, :, d:] = image[:, :, :32 - d]
        shifted.append(float(soft_verify(moved, scene)))
        hard.append(verify(moved, scene))
    assert np.all(np.diff(shifted) < 0), shifted
    assert len(set(hard)) < len(set(shifted)) / 2  # the verifier's staircase has few steps


def test_ascending_the_soft_verifiers_pixel_gradient_satisfies_the_verifier():
    """grpo.objective direct trains on the gradient of compositional_soft in the pixels: followed from noise, that
    gradient must lead to images the thresholded verifier accepts. A detached or sign-flipped credit, or one a
    colour flood or speckle can max out (both worthless to the verifier), fails this."""
    generator = torch.Generator().manual_seed(0)
    before, after = [], []
    for caption in scene_prompts(5, 0, 8):
        scene = parse_caption(caption)
        x = (0.5 + 0.2 * torch.randn(3, 32, 32, generator=generator)).requires_grad_(True)
        before.append(verify(x.detach().clamp(0, 1).numpy(), scene))
        optimiser = torch.optim.Adam([x], lr=0.05)
        for _ in range(300):
            optimiser.zero_grad()
            (-soft_verify(x, scene)).backward()
            optimiser.step()
        after.append(verify(x.detach().clamp(0, 1).numpy(), scene))
    assert np.mean(before) < 0.2 and np.mean(after) >= 0.75, (before, after)


def blurred_renders() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(faithful renders, the same blurred by a 3x3 binomial kernel, their captions): the off-palette edges of the
    strict verifier's typical failure."""
    import torch.nn.functional as F

    images, captions = scene_batch(seed=7, start=0, count=12, side=32, omit_prob=0.3)
    faithful = torch.from_numpy(images)
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None] / 16).expand(3, 1, 3, 3)
    return faithful, F.conv2d(F.pad(faithful, (1, 1, 1, 1), mode="replicate"), kernel, groups=3), captions


def test_the_strict_soft_verifier_charges_off_palette_pixels_and_its_gradient_sharpens_blurred_edges():
    """compositional_soft_strict adds the strict verifier's colour tolerance to the dense one: pixels within it keep
    their credit exactly (a faithful render, a slight tint), and ascending it from blurred renders (the strict
    verifier's typical failure: off-palette edges in the blob) must satisfy the strict verifier more than ascending
    the plain dense verifier does. Would catch the tolerance ignored, applied inside it, or its gradient reversed."""
    faithful, blurred, captions = blurred_renders()
    soft, strict = build("compositional_soft"), build("compositional_soft_strict")
    for x in (faithful, faithful * 0.9 + 0.05):  # the tint moves each pixel by at most 0.1 * sqrt(3) < 0.2
        assert torch.equal(strict.score(x, captions), soft.score(x, captions))
    assert float(strict.score(blurred, captions).mean()) < float(soft.score(blurred, captions).mean()) - 0.1

    def strict_verdicts_after_ascending(tolerance) -> float:
        verdicts = []
        for image, caption in zip(blurred, captions):
            scene, x = parse_caption(caption), image.clone().requires_grad_(True)
            optimiser = torch.optim.Adam([x], lr=0.01)
            for _ in range(60):
                optimiser.zero_grad()
                (-soft_verify(x, scene, tolerance=tolerance)).backward()
                optimiser.step()
            verdicts.append(verify(x.detach().clamp(0, 1).numpy(), scene, STRICT))
        return float(np.mean(verdicts))

    start = np.mean([verify(b.numpy(), parse_caption(c), STRICT) for b, c in zip(blurred, captions)])
    plain, tolerant = strict_verdicts_after_ascending(None), strict_verdicts_after_ascending(STRICT.tolerance)
    assert start < 0.2 and tolerant >= 0.65 and tolerant > plain + 0.1, (start, plain, tolerant)


def test_the_exact_soft_verifier_charges_for_objects_the_caption_does_not_state():
    """compositional_soft_exact adds "nothing else" to the dense verifier, so that grpo.objective direct cannot gain
    by hedging. The plain dense verifier charges a copy of the stated colour (its share of the colour's mass) but
    barely one of another colour; the exact one charges both, and keeps the data's credit. Would catch: the charge
    measured outside the fill-best templates (a small template inside a large square leaves the rest of the square
    as clutter: the data's mean falls to 0.84), a flat or detached clutter credit, two same-colour objects of unstated
    place matched in one quadrant."""
    images, captions = scene_batch(seed=123, start=0, count=200, side=32, omit_prob=0.3)
    exact = build("compositional_soft_exact").score(torch.from_numpy(images), captions)
    assert float(exact.mean()) >= 0.95

    scene = parse_caption("a small red square at the top left, on a white background")
    clean = render(Scene("white", (SceneObject("red", "square", "small", "top left"),)), 32)
    for colour in ("red", "blue"):
        hedge = render(Scene("white", (SceneObject("red", "square", "small", "top left"),
                                       SceneObject(colour, "square", "small", "bottom right"))), 32)
        assert verify(hedge, scene) == verify(clean, scene) == 1.0  # what the hedge exploits
        assert float(soft_verify(hedge, scene, exact=True)) < float(soft_verify(clean, scene, exact=True)) - 0.1
    assert float(soft_verify(hedge, scene)) > float(soft_verify(clean, scene)) - 0.05  # the blue copy, plain

    credits = []  # the blue copy fading into the background: credit rises, with a gradient that says so
    for alpha in np.linspace(0, 1, 9):
        faded = torch.from_numpy((1 - alpha) * hedge + alpha * clean).requires_grad_(True)
        credit = soft_verify(faded, scene, exact=True)
        credit.backward()
        credits.append(float(credit.detach()))
        if alpha == 0.625:  # between the two colours' soft classes (saturated near either)
            assert float((faded.grad * torch.from_numpy(clean - hedge)).sum()) > 0.1
    assert np.all(np.diff(credits) >= -1e-6) and credits[-1] > credits[0] + 0.1, credits

    pair = parse_caption("a large green square and a green triangle, on a gray background")
    both = render(Scene("gray", (SceneObject("green", "square", "large", "top left"),
                                 SceneObject("green", "triangle", "small", "bottom right"))), 32)
    assert float(soft_verify(both, pair, exact=True)) >= 0.82  # 0.78 with both matched to the large square


def test_the_count_check_passes_the_data_and_fails_hedged_copies_the_verifier_pays_for():
    """compositional_count, the held-out check against hedging: session 22's direct objective at lr 3e-4 drew copies
    of the stated object in several quadrants (+0.09 on the verifier, which never charges for an extra object).
    Would catch: a count that merges objects of different colours or splits one, speckle counted as objects, a
    check that the verifier's own score implies (it must fail the image the verifier pays in full)."""
    images, captions = scene_batch(seed=5, start=0, count=300, side=32)
    count = build("compositional_count")
    assert float(count.score(torch.from_numpy(images), captions).mean()) == 1.0
    touching = render(Scene("black", ()), 32)
    touching[:, 4:12, 4:12] = PALETTE[PALETTE_NAMES.index("red")][:, None, None]
    touching[:, 4:12, 12:20] = PALETTE[PALETTE_NAMES.index("blue")][:, None, None]
    assert count_objects(touching) == 2  # two colours side by side are two objects, not one

    caption = "a small red square at the top left, on a white background"
    stated = parse_caption(caption)
    hedged = Scene("white", tuple(SceneObject("red", "square", "small", q) for q in
                                  ("top left", "top right", "bottom left", "bottom right")))
    image = render(hedged, 32)
    assert verify(image, stated) == 1.0  # every stated attribute holds: the verifier pays the copies in full
    assert count_objects(image) == 4 and float(count.score(torch.from_numpy(image[None]), [caption])) == 0.0

    speckled = render(Scene("white", stated.objects), 32)
    rng = np.random.default_rng(0)
    ys, xs = rng.integers(0, 32, 40), rng.integers(0, 32, 40)
    speckled[:, ys, xs] = PALETTE[rng.integers(len(PALETTE) - 5, len(PALETTE), 40)].T  # single off pixels
    assert count_objects(speckled) == 1


def test_a_shape_is_credited_only_when_it_overlaps_its_template_well():
    """MIN_SHAPE_IOU: a blob of the stated colour, place and size that is no shape of the grammar (a square's 1-px
    outline: IoU 0.27 with the filled square) earns no shape credit; the filled square earns it. Would catch the
    threshold dropped (every blob would take its best-overlapping shape, however poor the overlap)."""
    scene = parse_caption("a large red square at the top left, on a white background")
    image = render(Scene("white", ()), 32)
    image[:, 2:16, 2:16] = PALETTE[PALETTE_NAMES.index("red")][:, None, None]
    assert verify(image, scene) == 1.0
    image[:, 3:15, 3:15] = 1.0  # the outline alone
    assert verify(image, scene) == pytest.approx(4 / 5)


def test_an_exact_square_or_circle_is_its_own_template():
    """The shape template is drawn in the blob's bounding box (centre and extent), the way the renderer drew it, so an
    unjittered square or circle overlaps it exactly (IoU 1 at 32 px). Would catch the template off by half a pixel
    (a centre without the +1 of the box's last row), which eats into the STRICT threshold's margin."""
    from rewards.compositional import Thresholds

    for shape in ("square", "circle"):
        for size in ("small", "large"):
            for position in ("top left", "bottom right"):
                scene = Scene("white", (SceneObject("red", shape, size, position),))
                assert verify(render(scene, 32), scene, Thresholds(shape_iou=0.999)) == 1.0, (shape, size, position)


def test_the_soft_verifier_credits_two_objects_of_one_colour_each_in_full():
    """The colour's share leaves out the quadrants stated for other objects of that colour: a faithful render of two
    red objects earns about what the verifier pays (1.0). Would catch the share taken over all of the colour's mass
    (each object would own half of it: about 0.78)."""
    scene = parse_caption("a small red square at the top left and a large red circle at the bottom right, "
                          "on a white background")
    image = render(scene, 32)
    assert verify(image, scene) == 1.0
    assert float(soft_verify(image, scene)) >= 0.95


def test_pixels_far_past_the_palette_give_the_dense_verifier_a_finite_credit():
    """compositional_soft scores unclamped images (grpo.objective direct): pixels far past [0, 1] can leave a colour
    with exactly zero soft mass in a quadrant, and the credit must stay finite there (the templates fall back to the
    quadrant's centre). Would catch the fallback dropped: the 0/0 colour centre makes the reward NaN."""
    scene = parse_caption("a large red square at the top left, on a white background")
    far = torch.full((3, 32, 32), 5.0, requires_grad=True)  # every pixel nearest white, red's soft mass exactly 0
    for exact in (False, True):
        credit = soft_verify(far, scene, exact=exact)
        assert bool(torch.isfinite(credit.detach())) and 0.0 <= float(credit.detach()) <= 1.0
        credit.backward()
        assert bool(torch.isfinite(far.grad).all())


def test_triangles_are_drawn_apex_up():
    """The renderer's (and the verifier's templates') triangle points up, base down, as the data a shipped base was
    trained on. Would catch an inverted triangle, which the verifier would still accept (render and template
    agree) while every model trained on the data lost its shape credit."""
    from rewards.scenes import shape_mask

    widths = shape_mask("triangle", 14, 16.0, 16.0, 32).sum(axis=1)
    rows = np.nonzero(widths)[0]
    assert len(rows) >= 12 and np.all(np.diff(widths[rows]) >= 0) and widths[rows[-1]] > 3 * widths[rows[0]]


def test_the_contrastive_distractors_depend_on_the_caption():
    """Each caption has its own distractors (drawn from a seed fixed by the caption), never itself, the same in
    every process. Would catch one fixed set of distractors for all prompts: a policy could then learn to fail
    those few captions alone."""
    prompts = scene_prompts(2, 0, 20)
    reward = build("compositional_contrastive")
    sets = [tuple(reward.distractors(p)) for p in prompts]
    assert len(set(sets)) == len(prompts)
    assert all(p not in s and len(s) == 4 for p, s in zip(prompts, sets))
    assert [tuple(build("compositional_contrastive").distractors(p)) for p in prompts] == sets


def test_a_background_must_cover_half_the_image():
    """MIN_BACKGROUND: the most common colour is the stated background only if it covers at least half the image.
    White on 7/16 of the image (still the most common colour, beside three others) is not a white background; on
    9/16 it is. Would catch a lower threshold (a policy could then earn the background with a patchwork)."""
    def patchwork(white_rows):
        image = render(Scene("white", ()), 32)
        rest = (32 - white_rows) // 3
        for i, colour in enumerate(("red", "green", "blue")):
            start = white_rows + i * rest
            image[:, start:start + rest if i < 2 else 32] = PALETTE[PALETTE_NAMES.index(colour)][:, None, None]
        return image

    assert verify(patchwork(18), Scene("white", ())) == 1.0
    assert verify(patchwork(14), Scene("white", ())) == 0.0


def test_an_object_must_be_mostly_one_colour():
    """MIN_PURITY: the object found in the stated quadrant counts only if at least 3/4 of it is one colour. A square
    11/14 red (79%) earns its colour, place and shape; one 8/14 red (57%) earns none of them. Would catch a lower
    threshold (two-coloured blobs would pass for objects)."""
    scene = parse_caption("a red square at the top left, on a white background")
    for red_columns, expected in ((11, 1.0), (8, 1 / 4)):
        image = render(Scene("white", ()), 32)
        image[:, 2:16, 2:16] = PALETTE[PALETTE_NAMES.index("blue")][:, None, None]
        image[:, 2:16, 2:2 + red_columns] = PALETTE[PALETTE_NAMES.index("red")][:, None, None]
        assert verify(image, scene) == pytest.approx(expected), red_columns


def test_captions_leave_out_size_position_and_background_at_the_omit_rate_and_always_name_colour_and_shape():
    """random_scene(omit_prob): a caption states each object's colour and shape, and leaves out its size, its
    position and the background each with probability omit_prob (prompts from coarse to fine-grained). Would catch
    an attribute never (or always) omitted."""
    rng = np.random.default_rng(0)
    objects, backgrounds = [], []
    for _ in range(2000):
        _, stated = random_scene(rng, omit_prob=0.3)
        objects += stated.objects
        backgrounds.append(stated.background)
    assert all(o.colour is not None and o.shape is not None for o in objects)
    for name, values in (("size", [o.size for o in objects]), ("position", [o.position for o in objects]),
                         ("background", backgrounds)):
        assert np.mean([v is None for v in values]) == pytest.approx(0.3, abs=0.03), name


@pytest.mark.parametrize("caption", [
    "a large red circle and a small red square, on a white background",
    "a small red square and a large red circle, on a white background",
    "a large red circle at the top left and a small red square, on a white background",
])
def test_two_objects_of_one_colour_without_a_stated_place_are_found_in_two_quadrants(caption):
    """A caption may state two objects of one colour and leave a place out (4% of the scene prompts at omit_prob
    0.3). Scenes never put two objects in one quadrant, so each must be looked for apart from the other, in either
    order: a faithful render scores 1.0 and one object alone less. Both were matched to the blob with most red: the
    faithful render scored 5/7 (a shape and a size failed), and so did the single circle."""
    scene = parse_caption(caption)
    faithful = render(Scene("white", (SceneObject("red", "circle", "large", "top left"),
                                      SceneObject("red", "square", "small", "bottom right"))), 32)
    alone = render(Scene("white", (SceneObject("red", "circle", "large", "top left"),)), 32)
    assert verify(faithful, scene) == 1.0
    assert verify(alone, scene) < verify(faithful, scene)


@pytest.mark.parametrize("exact", [False, True])
def test_the_dense_verifier_matches_two_objects_of_one_colour_in_either_caption_order(exact):
    """compositional_soft(_exact) matches unplaced objects as `verify` does (one each to the free quadrants, most
    colour, then most credit): a faithful render of two red objects earns about full credit in either caption order,
    and one object alone less. Matched one at a time in caption order, the small square took the circle's quadrant
    when listed first (0.48; exact 0.03 on such renders), and each object's colour share counted the other's red."""
    faithful = render(Scene("white", (SceneObject("red", "circle", "large", "top left"),
                                      SceneObject("red", "square", "small", "bottom right"))), 32)
    alone = render(Scene("white", (SceneObject("red", "circle", "large", "top left"),)), 32)
    credits = []
    for caption in ("a large red circle and a small red square, on a white background",
                    "a small red square and a large red circle, on a white background",
                    "a large red circle at the top left and a small red square, on a white background"):
        scene = parse_caption(caption)
        credits.append(float(soft_verify(faithful, scene, exact=exact)))
        assert float(soft_verify(alone, scene, exact=exact)) < credits[-1] - 0.2, caption
    assert min(credits) >= 0.95 and max(credits) - min(credits) < 0.01, credits


def test_the_dense_verifier_credits_every_faithful_render():
    """Every rendered scene (with the data's omitted attributes) earns the dense verifier's near-full credit, as every
    one earns the verifier's 1.0: would catch any caption the matching or the colour share misreads (before the
    joint matching 78 of 2000 scored below 0.95, the lowest 0.36)."""
    images, captions = scene_batch(seed=3, start=0, count=300, side=32, omit_prob=0.3)
    soft = build("compositional_soft").score(torch.from_numpy(images), captions)
    assert float(soft.min()) >= 0.9, captions[int(soft.argmin())]


def test_the_dense_verifier_counts_stray_colour_against_its_object_wherever_it_lies():
    """An object's colour share leaves out only the quadrants other objects of *that* colour hold: a red smear in the
    blue object's quadrant costs the red circle as much as one in an empty quadrant. Would catch the quadrants of
    objects of any colour left out (the smear beside the blue square would then be free)."""
    scene = parse_caption("a large red circle and a small blue square, on a white background")
    clean = render(Scene("white", (SceneObject("red", "circle", "large", "top left"),
                                   SceneObject("blue", "square", "small", "bottom right"))), 32)  # rows 20-27
    credits = {}
    for name, (rows, cols) in {"beside the blue square": (slice(16, 19), slice(28, 31)),
                               "in an empty quadrant": (slice(0, 3), slice(28, 31))}.items():
        smeared = clean.copy()
        smeared[:, rows, cols] = np.array([1.0, 0.0, 0.0])[:, None, None]
        credits[name] = float(soft_verify(smeared, scene))
    assert credits["beside the blue square"] == pytest.approx(credits["in an empty quadrant"], abs=0.005), credits
    assert max(credits.values()) < float(soft_verify(clean, scene)) - 0.005


def test_the_dense_verifier_stays_in_range_and_fast_on_captions_the_grammar_never_draws():
    """User captions may state one place twice or many objects: a quadrant claimed by two objects was subtracted
    from a colour's mass twice (a faithful render scored 1.8), and the matching enumerated count! orders of the
    objects (a caption of 9 objects took minutes per image). Would catch either coming back."""
    import time

    image = render(Scene("white", (SceneObject("red", "circle", "large", "top left"),
                                   SceneObject("red", "square", "large", "bottom right"))), 32)
    for caption in ("a red circle at the top left and a red square at the top left and a red square at the bottom "
                    "right", "a red circle at the top left and a red square at the top left and a red square"):
        for exact in (False, True):
            assert 0.0 <= float(soft_verify(image, parse_caption(caption), exact=exact)) <= 1.0, (caption, exact)
    many = parse_caption(" and ".join(["a red circle"] * 9))
    started = time.perf_counter()
    soft, hard = float(soft_verify(image, many)), verify(image, many)
    assert time.perf_counter() - started < 20  # a bound far above the ~1 s it takes, far below the minutes it took
    assert 0.0 <= soft <= 1.0 and 0.0 <= hard <= 1.0


def test_the_dense_reward_refuses_an_object_without_its_colour():
    """The dense credits are all per colour: a colourless object would score 0 on a faithful image (the verifier
    pays 1), so a prompt stating one is refused before a run. Would catch it accepted."""
    build("compositional_soft").check_prompts(["a red circle at the top left, on a white background"])
    for name in ("compositional_soft", "compositional_soft_exact"):
        with pytest.raises(ValueError, match="without its colour"):
            build(name).check_prompts(["a circle at the top left, on a white background"])
    build("compositional").check_prompts(["a circle at the top left, on a white background"])  # the verifier can


def test_unplaced_objects_beyond_the_free_quadrants_score_alike_in_any_caption_order():
    """Three placed objects leave one quadrant free for two unplaced ones: whichever of them the image shows there
    must be found whatever the caption's order (only the first-listed could be matched, so the same image and scene
    scored 0.72 or 0.89 by the order of the words)."""
    placed = (SceneObject("red", "circle", "large", "top left"), SceneObject("blue", "square", "large", "top right"),
              SceneObject("green", "circle", "large", "bottom left"))
    image = render(Scene("white", (*placed, SceneObject("yellow", "square", "large", "bottom right"))), 32)
    yellow, cyan = SceneObject("yellow", "square", "large", None), SceneObject("cyan", "circle", "large", None)
    first = verify(image, Scene("white", (*placed, yellow, cyan)))
    assert verify(image, Scene("white", (*placed, cyan, yellow))) == first
    assert verify(render(Scene("white", placed), 32), Scene("white", (*placed, cyan, yellow))) < first  # found


def test_the_contrastive_verifier_takes_the_strict_thresholds_when_asked():
    """compositional_contrastive with strict: true judges own and distractor captions under the STRICT thresholds:
    renders with their contrast lowered (every pixel still nearest its palette colour) keep the lenient contrastive
    score and lose the strict one, while clean renders score alike under both. Would catch the option ignored."""
    images, captions = scene_batch(3, 0, 64, 32)
    images = torch.from_numpy(images)
    tinted = (images * 0.6 + 0.2).clamp(0, 1)
    lenient, strict = build("compositional_contrastive"), build("compositional_contrastive", strict=True)
    assert torch.equal(strict.score(images, captions), lenient.score(images, captions))
    assert float(lenient.score(tinted, captions).mean()) > 0.7
    assert float(strict.score(tinted, captions).mean()) < float(lenient.score(tinted, captions).mean()) - 0.3


def test_binding_scenes_state_two_colours_at_two_places_and_their_share_leaves_the_stream_a_function_of_its_index():
    """data.binding_share (scene_batch's binding_share): a bound scene has two objects of two colours at two
    quadrants its caption states, and renders to what its caption says; with share 0 the stream is the ordinary
    one, with share p about p of it (plus the ordinary stream's own ~1 in 5) is bound, and any slice of it is the
    same scenes. Would catch a bound scene leaving a place unstated or repeating a colour (its colours could not be
    told apart), the share ignored or inverted, or a draw that depends on the batch rather than the index."""
    def bound(caption):
        objects = parse_caption(caption).objects
        return (len(objects) == 2 and all(o.position for o in objects) and len({o.position for o in objects}) == 2
                and len({o.colour for o in objects}) == 2)

    rng = np.random.default_rng(5)
    for _ in range(200):
        full, stated = bound_scene(rng, omit_prob=0.3)
        assert bound(stated.caption())
        assert verify(render(full, 32, rng), stated) == 1.0
    ordinary, captions = scene_batch(3, 0, 400, 32, omit_prob=0.3)
    plain = [random_scene(np.random.default_rng([3, i]), 0.3)[1].caption() for i in range(400)]
    assert captions == plain and scene_batch(3, 0, 400, 32, 0.3, binding_share=0.0)[1] == plain
    share = np.mean([bound(c) for c in plain])
    assert 0.12 < share < 0.28  # the ordinary stream: two objects 1/2, two places 0.49, two colours 5/6
    images, mixed = scene_batch(3, 0, 400, 32, 0.3, binding_share=0.5)
    assert 0.5 + 0.5 * share - 0.08 < np.mean([bound(c) for c in mixed]) < 0.5 + 0.5 * share + 0.08
    assert all(bound(c) for c in scene_batch(3, 0, 50, 32, 0.3, binding_share=1.0)[1])
    part_images, part = scene_batch(3, 100, 50, 32, 0.3, binding_share=0.5)
    assert part == mixed[100:150] and np.array_equal(part_images, images[100:150])


def test_strict_failures_reads_each_threshold_where_the_verifier_applies_it():
    """benchmarks/strict_failures.py's table says which strict threshold a model fails (it chose the dense verifier's
    tolerance): faithful renders pass every setting; blurred ones (off-palette edges) fail exactly the settings that
    hold the tolerance, and pass once it alone is dropped. Would catch a setting wired to the wrong threshold."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from strict_failures import verdicts

    faithful, blurred, captions = blurred_renders()
    assert all(v.mean() == 1.0 for v in verdicts(faithful.numpy(), captions).values())
    means = {name: v.mean() for name, v in verdicts(blurred.numpy(), captions).items()}
    with_tolerance = {"tolerance only", "strict", "strict but purity", "strict but shape"}
    assert max(means[n] for n in with_tolerance) < 0.5 < min(means[n] for n in set(means) - with_tolerance), means
