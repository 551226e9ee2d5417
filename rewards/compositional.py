"""The compositional verifier of the synthetic scenes: the fraction of a caption's stated attributes that hold.

Pixels are classified to the nearest palette colour; the most common class is the background, and it counts only if
it covers at least half the image. Each stated object is looked for in its stated quadrant (the objects with no
position stated: matched one-to-one to the quadrants no object states, where most of their colours are): its largest
foreground component is the object only if it is big enough and mostly one colour; then that colour, its size
(bounding-box extent) and its shape (the best overlap with each shape drawn in that box, if the overlap is good) are
checked, and the place, size and shape count only once the colour is the stated one: a blob of another colour is
another object. The purity and overlap thresholds make speckle noise worthless, and the colour gate makes one
prompt-agnostic blob worthless: GRPO runs against the earlier, ungated verifier collapsed to the same cyan blobs for
every prompt, which earned about 0.3 from position and size credit alone.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from scipy import ndimage

from rewards.base import RewardModel, register
from rewards.scenes import (
    BACKGROUNDS,
    OBJECT_COLOURS,
    POSITIONS,
    SHAPES,
    SIZE_FRACTION,
    SIZES,
    Scene,
    SceneObject,
    parse_caption,
    quadrant_centre,
    scene_prompts,
    shape_mask,
)

MIN_BACKGROUND = 0.5  # the background covers at least half the image (objects cover at most 38% in the data)
MIN_PURITY = 0.75  # an object's component is at least this fraction one colour
MIN_SHAPE_IOU = 0.6  # a shape is recognised only with at least this overlap with its template


@dataclass(frozen=True)
class Thresholds:
    """How strict the verifier is. `tolerance`: a pixel farther than this (RGB distance) from every palette colour
    belongs to no class (it is neither background nor any object's colour); None = every pixel takes its nearest."""

    purity: float = MIN_PURITY
    shape_iou: float = MIN_SHAPE_IOU
    tolerance: Optional[float] = None


# A held-out check GRPO does not train on: the data are exact palette colours, so clean samples pass it as they pass
# the trained setting, while blurred, tinted or speckled ones (what reward hacking of the lenient setting produces)
# lose the pixels that are only nearest to a colour. The data score 1.0 under both.
STRICT = Thresholds(purity=0.9, shape_iou=0.7, tolerance=0.2)

PALETTE_NAMES = list(BACKGROUNDS) + list(OBJECT_COLOURS)
PALETTE = np.array([BACKGROUNDS.get(n) or OBJECT_COLOURS[n] for n in PALETTE_NAMES], dtype=np.float32)


def quadrant_slices(position: str, side: int) -> tuple[slice, slice]:
    half = side // 2
    cx, cy = quadrant_centre(position, side)
    rows = slice(0, half) if cy < half else slice(half, side)
    cols = slice(0, half) if cx < half else slice(half, side)
    return rows, cols


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = ndimage.sum(mask, labels, index=range(1, count + 1))
    return labels == (1 + int(np.argmax(sizes)))


def classify(image: np.ndarray, thresholds: Thresholds) -> tuple[np.ndarray, np.ndarray, int]:
    """Each pixel's palette class [H, W] (len(PALETTE) = unclassified), the count of each class, the background's."""
    side = image.shape[-1]
    pixels = image.transpose(1, 2, 0).reshape(-1, 3)
    distances = ((pixels[:, None, :] - PALETTE[None]) ** 2).sum(-1)
    classes = np.argmin(distances, axis=1)
    if thresholds.tolerance is not None:  # unclassified pixels get the class len(PALETTE), never a palette name
        classes[distances.min(axis=1) > thresholds.tolerance**2] = len(PALETTE)
    classes = classes.reshape(side, side)
    counts = np.bincount(classes.ravel(), minlength=len(PALETTE) + 1)[: len(PALETTE)]
    return classes, counts, int(counts.argmax())


def _min_area(side: int) -> float:
    """The fewest pixels an object has: a fifth of a small object's box."""
    return 0.2 * (SIZE_FRACTION["small"] * side) ** 2


def count_objects(image: np.ndarray, thresholds: Thresholds = Thresholds()) -> int:
    """How many objects `image` ([3, H, W] in [0, 1]) shows: connected one-colour regions other than the background,
    each at least an object's smallest area (so speckle and thin rims are not objects)."""
    classes, counts, background = classify(image, thresholds)
    found = 0
    for colour in np.nonzero(counts)[0]:
        if colour == background:
            continue
        labels, n = ndimage.label(classes == colour)
        if n:
            found += int((np.bincount(labels.ravel())[1:] >= _min_area(image.shape[-1])).sum())
    return found


def _free_quadrants(scene: Scene) -> list[str]:
    """The quadrants no object of `scene` states: where its objects without a stated place can be."""
    return [q for q in POSITIONS if q not in {o.position for o in scene.objects}]


def _assignments(count: int, free: Sequence[str]) -> Iterator[tuple[Optional[str], ...]]:
    """Every distinct way to give `count` objects without a stated place the quadrants of `free`, one each (None: left
    unmatched when there are more objects than free quadrants). Scenes never put two objects in one quadrant, so both
    verifiers match such objects jointly: looked for one at a time (where most of its colour is), two objects of one
    colour were both matched to one blob, and a faithful render scored by the caption's word order. At most
    count! / (count - 4)! of them: a caption states a few objects (the scenes draw one or two)."""
    if count <= len(free):
        yield from itertools.permutations(free, count)
        return
    for holders in itertools.permutations(range(count), len(free)):  # which objects get the free quadrants
        quadrants: list[Optional[str]] = [None] * count
        for quadrant, i in zip(free, holders):
            quadrants[i] = quadrant
        yield tuple(quadrants)


def verify(image: np.ndarray, scene: Scene, thresholds: Thresholds = Thresholds()) -> float:
    """Fraction in [0, 1] of the attributes stated in `scene` that hold in `image` ([3, H, W] in [0, 1])."""
    side = image.shape[-1]
    classes, counts, background = classify(image, thresholds)
    foreground = classes != background

    small_px = SIZE_FRACTION["small"] * side
    large_px = SIZE_FRACTION["large"] * side
    min_area = _min_area(side)

    held = 0
    if scene.background is not None:
        held += PALETTE_NAMES[background] == scene.background and counts[background] >= MIN_BACKGROUND * side * side

    def judged(obj: SceneObject, position: str) -> tuple[int, int]:
        """(the object's colour pixels in the quadrant's largest blob, the stated attributes that hold there)."""
        rows, cols = quadrant_slices(position, side)
        blob = _largest_component(foreground[rows, cols])
        mass = int((classes[rows, cols][blob] == PALETTE_NAMES.index(obj.colour)).sum()) if obj.colour else 0
        if blob.sum() < min_area:
            return mass, 0
        colour_counts = np.bincount(classes[rows, cols][blob], minlength=len(PALETTE) + 1)[: len(PALETTE)]
        colour_class = int(colour_counts.argmax())
        if colour_counts[colour_class] < thresholds.purity * blob.sum():
            return mass, 0  # a speckled mixture of colours is not an object
        if obj.colour is not None and PALETTE_NAMES[colour_class] != obj.colour:
            return mass, 0  # another object, not the stated one: its place, size and shape say nothing about this one
        credit = sum(a is not None for a in (obj.position, obj.colour))
        ys, xs = np.nonzero(blob)
        extent = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
        if obj.size is not None:
            credit += ("small" if extent < (small_px + large_px) / 2 else "large") == obj.size
        if obj.shape is not None:
            credit += _best_shape(blob, ys, xs, extent, thresholds.shape_iou) == obj.shape
        return mass, credit

    for obj in scene.objects:
        if obj.position is not None:
            held += judged(obj, obj.position)[1]
    # The objects without a stated place go to the quadrants no object states, the matching that finds most of their
    # colours (ties, as between two objects of one colour: the one where most attributes hold).
    unplaced = [o for o in scene.objects if o.position is None]
    if unplaced:
        free = _free_quadrants(scene)
        table = {(i, q): judged(o, q) for i, o in enumerate(unplaced) for q in free}
        table.update({(i, None): (0, 0) for i in range(len(unplaced))})

        def found(quadrants: tuple[Optional[str], ...]) -> tuple[int, int]:  # (colour found, attributes held)
            return tuple(map(sum, zip(*(table[i, q] for i, q in enumerate(quadrants)))))

        held += found(max(_assignments(len(unplaced), free), key=found))[1]
    return held / max(scene.attribute_count(), 1)


def _best_shape(blob: np.ndarray, ys: np.ndarray, xs: np.ndarray, extent: int, min_iou: float) -> str | None:
    cy = (ys.min() + ys.max() + 1) / 2.0
    cx = (xs.min() + xs.max() + 1) / 2.0
    h, w = blob.shape
    best, best_iou = None, min_iou
    for shape in SHAPES:
        template = shape_mask(shape, int(extent), cx, cy, max(h, w))[:h, :w]
        iou = (template & blob).sum() / max((template | blob).sum(), 1)
        if iou >= best_iou:
            best, best_iou = shape, iou
    return best


@register("compositional")
class CompositionalReward(RewardModel):
    """Rewards an image by how many of its caption's stated attributes (scene grammar) it shows. strict: the
    held-out STRICT thresholds (purer colours, closer shapes, off-palette pixels unclassified)."""

    def __init__(self, strict: bool = False) -> None:
        self._parsed: dict[str, Scene] = {}
        self.thresholds = STRICT if strict else Thresholds()

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        arr = images.detach().float().clamp(0, 1).cpu().numpy()
        out = [self.judge(image, self.scene(prompt)) for image, prompt in zip(arr, prompts)]
        return torch.tensor(out, dtype=torch.float32)

    def judge(self, image: np.ndarray, scene: Scene) -> float:
        """One image's score ([3, H, W] in [0, 1]) against its parsed caption."""
        return verify(image, scene, self.thresholds)

    @classmethod
    def check_prompts(cls, prompts: Sequence[str]) -> None:
        """Raise ValueError naming the first prompt outside the scene caption grammar, or one `check_scene` refuses
        (checked before a run)."""
        for prompt in prompts:
            try:
                scene = parse_caption(prompt)
            except ValueError as e:
                raise ValueError(f"the prompt {prompt[:80]!r} is outside the scene caption grammar ({e})") from None
            cls.check_scene(prompt, scene)

    @staticmethod
    def check_scene(prompt: str, scene: Scene) -> None:
        """A reward's own rule on a parsed prompt (ValueError naming it); the verifier reads every caption."""

    def scene(self, prompt: str) -> Scene:
        """The caption parsed (once per distinct caption)."""
        if prompt not in self._parsed:
            self._parsed[prompt] = parse_caption(prompt)
        return self._parsed[prompt]


@register("compositional_strict")
class StrictCompositionalReward(CompositionalReward):
    """The verifier under the STRICT thresholds: a held-out check for runs trained on `compositional`."""

    def __init__(self) -> None:
        super().__init__(strict=True)


@register("compositional_count")
class ObjectCountReward(CompositionalReward):
    """1 if the image shows as many objects as its caption states, else 0 (`count_objects`). The verifier pays for a
    stated object found and never charges for one not asked for, so a policy can hedge: copies of the stated colour
    in several quadrants make one of them land in the stated place more often. Session 22's first significant gain
    (the direct objective at lr 3e-4) was that. A held-out check: never train on it alone (an image with the right
    number of wrong objects passes)."""

    def judge(self, image: np.ndarray, scene: Scene) -> float:
        return float(count_objects(image, self.thresholds) == len(scene.objects))


@register("compositional_contrastive")
class ContrastiveCompositionalReward(CompositionalReward):
    """Prompt-specific credit: the verifier's score under the image's own caption minus its mean score under
    `others` distractor captions (scene captions drawn from a seed fixed by the caption, so the reward is a function
    of image and caption). An image that fits every caption alike earns about nothing, so the prompt-agnostic look
    GRPO found against the plain verifier (the same blue blobs for every prompt, docs/results.md) pays nothing here;
    a faithful render keeps most of its score. Range [-1, 1]."""

    def __init__(self, others: int = 4, strict: bool = False) -> None:
        if others < 1:
            raise ValueError(f"others={others}: at least one distractor caption is needed")
        super().__init__(strict=strict)
        self.others = others
        self._distractors: dict[str, list[str]] = {}

    def distractors(self, prompt: str) -> list[str]:
        if prompt not in self._distractors:
            seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "little")
            self._distractors[prompt] = [c for c in scene_prompts(seed, 0, 4 * self.others) if c != prompt][: self.others]
        return self._distractors[prompt]

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        own = super().score(images, prompts)
        others = [self.distractors(p) for p in prompts]
        tiled = images.repeat_interleave(self.others, dim=0)
        against = super().score(tiled, [c for cs in others for c in cs]).view(len(prompts), self.others)
        return own - against.mean(dim=1)


SOFT_TEMPERATURE = 0.05  # of the soft palette classes: squared RGB distances between palette colours are >= 0.25


@dataclass(frozen=True)
class _Fit:
    """An object's best templates in one quadrant: the colour's fill of the best-filled one (and that template), the
    best-overlapping template, and the overlap with the stated shape (best size) and the stated size (best shape)."""

    fill: torch.Tensor
    filled: torch.Tensor
    drawn: torch.Tensor
    shape_iou: Optional[torch.Tensor]
    size_iou: Optional[torch.Tensor]


@functools.lru_cache(maxsize=None)
def _centroid_offset(shape: str, size_px: int) -> tuple[float, float]:
    """Centroid minus box centre of a drawn shape (a triangle's centroid lies below the centre of its box)."""
    side = 2 * size_px + 4
    mask = shape_mask(shape, size_px, side / 2, side / 2, side)
    ys, xs = np.nonzero(mask)
    return float(ys.mean() + 0.5 - side / 2), float(xs.mean() + 0.5 - side / 2)


def soft_verify(image: torch.Tensor | np.ndarray, scene: Scene, temperature: float = SOFT_TEMPERATURE,
                exact: bool = False, tolerance: Optional[float] = None) -> torch.Tensor:
    """A dense version of `verify`: the same attributes, each credited in [0, 1] by how close the image is to holding
    it, so that images which all fail the verifier's thresholds still differ in credit. Differentiable in the pixels
    (a 0-dim tensor, with gradients when `image` has them): grpo.objective direct backpropagates it into the sampler.

    Pixels get soft palette classes (a softmax of minus squared distances over `temperature`). The background credits
    its class's mean over the pixels outside the objects' best templates. Each object is matched with the shape
    templates the caption allows (stated shape and size, else all), centred on its colour's mass in its quadrant
    (stated, else matched jointly as in `verify`: the objects without a place one each to the quadrants no object
    states, most colour found (here the colour's soft mass in the quadrant), then most credit): its colour is credited
    by how much of the best template its colour fills times the share of the colour's mass inside the quadrant, other
    objects' quadrants of that colour left out (a colour everywhere is background, not an object), its shape and size by
    the soft overlap (intersection over union) of the colour's map with the template of the stated shape (best size) and
    of the stated size (best shape), its place as its colour (as in `verify`, a blob of another colour says nothing
    about this object, and a blob outside the quadrant is not there). Which quadrant and where the templates sit are
    choices, not functions: the gradient flows through the credits. Faithful renders earn >= 0.9 from 32 px up; at 16 px
    (the smoke config) the templates are coarse and a small triangle earns about 0.7.

    exact: "and nothing else": the credit is multiplied by area / (area + clutter), where clutter is the mass of the
    pixels outside the objects' best-overlapping templates that are not background (the stated one, else the class
    most common there) and area an object's smallest (`_min_area`): 1 for a clean image, about 1/6 with one stray
    small object, no clamp. Multiplied, not one more attribute: as an attribute a stray copy cost about 0.15 of the
    credit while a copy landing in the stated place earned 0.3-0.4, and direct training on it hedged more than on the
    plain verifier (session 23, docs/results.md). The background attribute above averages over every outside pixel,
    so an extra object costs it a few percent.

    tolerance: the strict verifier's (`STRICT`): a pixel farther than it from every palette colour is no colour's,
    and in an object's blob it counts against the purity (so blurred, off-palette edges fail most strict verdicts of
    the base's samples: benchmarks/strict_failures.py). Densely: every pixel's classes are scaled by
    exp(-max(0, d^2 - tolerance^2) / temperature), d its distance to the nearest palette colour: 1 within the
    tolerance (which is all the verifier asks), falling with the distance past it, its gradient toward that colour.
    """
    image = torch.as_tensor(image)
    side = image.shape[-1]
    pixels = image.float().permute(1, 2, 0).reshape(-1, 3)
    palette = torch.from_numpy(PALETTE).to(pixels.device)
    distances = ((pixels[:, None, :] - palette[None]) ** 2).sum(-1)
    probs = (-distances / temperature).softmax(dim=1)
    if tolerance is not None:  # off-palette pixels are no colour's (nor the background's)
        probs = probs * torch.exp(-(distances.min(dim=1).values - tolerance**2).clamp(min=0) / temperature)[:, None]
    probs = probs.reshape(side, side, len(PALETTE))

    half = side // 2
    centres = torch.arange(half, dtype=torch.float32, device=pixels.device) + 0.5
    colours = {o.colour for o in scene.objects if o.colour is not None}
    maps = {c: probs[..., PALETTE_NAMES.index(c)] for c in colours}
    masses = {c: {q: maps[c][quadrant_slices(q, side)].sum() for q in POSITIONS} for c in colours}
    totals = {c: maps[c].sum() for c in colours}

    def fit(obj: SceneObject, position: str) -> _Fit:
        """The templates the caption allows for `obj`, centred on its colour's mass in the quadrant."""
        crop = maps[obj.colour][quadrant_slices(position, side)]
        total = masses[obj.colour][position]
        if float(total.detach()) > 1e-6:
            weights = crop.detach() / total.detach()
            cy, cx = float((weights.sum(1) * centres).sum()), float((weights.sum(0) * centres).sum())
        else:
            cy = cx = half / 2
        overlap = {}
        for shape in [obj.shape] if obj.shape else SHAPES:
            for size in [obj.size] if obj.size else SIZES:
                px = max(3, round(SIZE_FRACTION[size] * side))
                dy, dx = _centroid_offset(shape, px)  # the template's centroid goes on the colour's
                template = torch.from_numpy(shape_mask(shape, px, cx - dx, cy - dy, half)).to(crop.device)
                mask = template.float()
                iou = torch.minimum(crop, mask).sum() / torch.maximum(crop, mask).sum().clamp(min=1e-6)
                overlap[shape, size] = (crop[template].mean(), iou, template)
        fill, _, filled = max(overlap.values(), key=lambda o: float(o[0].detach()))
        return _Fit(
            fill, filled, max(overlap.values(), key=lambda o: float(o[1].detach()))[2],
            torch.stack([iou for (shape, _), (_, iou, _) in overlap.items() if shape == obj.shape]).max()
            if obj.shape is not None else None,
            torch.stack([iou for (_, size), (_, iou, _) in overlap.items() if size == obj.size]).max()
            if obj.size is not None else None)

    def credit(obj: SceneObject, position: str, fitted: _Fit, claimed: set[str]) -> torch.Tensor:
        """The object's credit in `position`. Its colour counts as this object's by the share of the colour's mass
        in the quadrant, leaving out the quadrants `claimed` by other objects of that colour: a colour flooding the
        image is the verifier's background, two red objects each own their own red."""
        mass = masses[obj.colour]
        share = mass[position] / (totals[obj.colour] - sum(mass[q] for q in claimed) + 1.0)
        colour = fitted.fill * share
        held = colour * (2 if obj.position is not None else 1)  # its place is credited as its colour
        return held + sum(iou for iou in (fitted.shape_iou, fitted.size_iou) if iou is not None)

    objs = [o for o in scene.objects if o.colour is not None]  # the grammar always states it: else nothing is defined
    unplaced = [i for i, o in enumerate(objs) if o.position is None]
    free = _free_quadrants(scene)
    fits = {(i, o.position): fit(o, o.position) for i, o in enumerate(objs) if o.position is not None}
    fits.update({(i, q): fit(objs[i], q) for i in unplaced for q in free})

    def place(quadrants: tuple[Optional[str], ...]) -> list[Optional[str]]:
        where = [o.position for o in objs]
        for i, q in zip(unplaced, quadrants):
            where[i] = q
        return where

    def credits(where: Sequence[Optional[str]]) -> torch.Tensor:
        """The objects' summed credit with each object in its quadrant of `where` (None: not found)."""
        return sum((credit(o, q, fits[i, q], {where[j] for j, p in enumerate(objs)
                                              if j != i and where[j] not in (None, q) and p.colour == o.colour})
                    for i, (o, q) in enumerate(zip(objs, where)) if q is not None), pixels.new_zeros(()))

    # Objects without a stated place go to the quadrants no object states, one each (`_assignments`): the matching
    # that finds most of their colours, then most credit, scored all at once (one transfer from the device).
    # Which quadrant and where the templates sit are choices; the gradient flows through the chosen one's credit.
    candidates = list(_assignments(len(unplaced), free))
    if len(candidates) > 1:
        with torch.no_grad():
            keys = torch.stack([torch.stack([sum((masses[objs[i].colour][q] for i, q in zip(unplaced, qs)
                                                  if q is not None), pixels.new_zeros(())), credits(place(qs))])
                                for qs in candidates]).tolist()
        where = place(candidates[max(range(len(candidates)), key=lambda k: tuple(keys[k]))])
    else:
        where = place(candidates[0])
    held = credits(where)
    objects = torch.zeros(side, side, dtype=torch.bool, device=pixels.device)  # the objects' best templates
    drawn = torch.zeros_like(objects)  # the templates that match them best (a small square fills a large one)
    for i, q in enumerate(where):
        if q is not None:
            objects[quadrant_slices(q, side)] |= fits[i, q].filled
            drawn[quadrant_slices(q, side)] |= fits[i, q].drawn
    if scene.background is not None:  # every pixel outside the objects: a speckle there joins the verifier's blobs
        outside = probs[..., PALETTE_NAMES.index(scene.background)][~objects]
        held = held + (outside.mean() if outside.numel() else 0.0)
    score = held / max(scene.attribute_count(), 1)
    if exact:
        outside = probs[~drawn]
        if scene.background is not None:
            background = PALETTE_NAMES.index(scene.background)
        else:
            background = int(outside.detach().mean(0).argmax()) if outside.numel() else 0
        clutter = (1.0 - outside[:, background]).sum()  # 0 when the templates cover the image
        area = _min_area(side)
        score = score * area / (area + clutter)
    return score


@register("compositional_soft")
class SoftCompositionalReward(CompositionalReward):
    """The dense verifier (`soft_verify`): partial credit for near misses, so groups that all fail the thresholds
    still rank their images. A shaping reward to train on; the thresholded verifier stays the measure. Differentiable:
    `score` keeps the images' graph (no clamp either: pixels past the palette lose credit by their distance)."""

    differentiable = True

    exact = False
    tolerance: Optional[float] = None

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return torch.stack([soft_verify(image, self.scene(prompt), exact=self.exact, tolerance=self.tolerance)
                            for image, prompt in zip(images, prompts)])

    @staticmethod
    def check_scene(prompt: str, scene: Scene) -> None:
        """Every object must state its colour: the dense credits are all per colour (a colourless "a circle at the
        top left" would score 0 on a faithful image, which the verifier pays 1)."""
        if any(o.colour is None for o in scene.objects):
            raise ValueError(f"the prompt {prompt[:80]!r} states an object without its colour, which the dense "
                             "verifier cannot credit; name each object's colour or train on compositional")


@register("compositional_soft_exact")
class ExactSoftCompositionalReward(SoftCompositionalReward):
    """The dense verifier that also charges for what the caption does not state (`soft_verify(exact=True)`): the
    caption's objects and nothing else, its credit scaled down by any clutter. Trained on with grpo.objective direct,
    the plain dense verifier let session 22's lr 3e-4 run hedge with copies of the stated object (count check
    -0.37), which it charges only through the colour's share and the thresholded verifier not at all."""

    exact = True


@register("compositional_soft_strict")
class StrictSoftCompositionalReward(SoftCompositionalReward):
    """The dense verifier with the strict verifier's colour tolerance (`soft_verify(tolerance=STRICT.tolerance)`):
    the pixels it would leave unclassified, the edges a blur leaves between an object and the background, earn no
    class's credit, and their gradient pulls them to the nearest palette colour."""

    tolerance = STRICT.tolerance
