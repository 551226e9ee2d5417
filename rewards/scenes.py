"""Synthetic captioned scenes: a seeded renderer and the caption grammar its verifier parses.

A scene is a background colour and one or two objects (colour, shape, size, quadrant). Captions state every
attribute or leave some out ("a red circle, on a white background"), so prompts range from coarse to fine-grained:

    a small red triangle at the top left and a large blue circle at the bottom right, on a white background
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np

OBJECT_COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "gray": (0.5, 0.5, 0.5),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
# Object extent (side of its bounding box) as a fraction of the image side.
SIZE_FRACTION = {"small": 0.25, "large": 0.4375}


@dataclass(frozen=True)
class SceneObject:
    colour: Optional[str] = None
    shape: Optional[str] = None
    size: Optional[str] = None
    position: Optional[str] = None

    def phrase(self) -> str:
        words = ["a"] + [w for w in (self.size, self.colour) if w] + [self.shape or "shape"]
        if self.position:
            words += ["at the", self.position]
        return " ".join(words)


@dataclass(frozen=True)
class Scene:
    background: Optional[str] = None
    objects: tuple[SceneObject, ...] = field(default_factory=tuple)

    def caption(self) -> str:
        text = " and ".join(o.phrase() for o in self.objects)
        if self.background:
            text += f", on a {self.background} background"
        return text

    def attribute_count(self) -> int:
        per_object = sum(sum(v is not None for v in (o.colour, o.shape, o.size, o.position)) for o in self.objects)
        return per_object + (self.background is not None)


def random_scene(rng: np.random.Generator, omit_prob: float = 0.0) -> tuple[Scene, Scene]:
    """A fully specified scene (to render) and its caption's view of it (some attributes omitted)."""
    count = int(rng.integers(1, 3))
    quadrants = rng.permutation(len(POSITIONS))[:count]
    background = str(rng.choice(list(BACKGROUNDS)))
    objects = tuple(
        SceneObject(
            colour=str(rng.choice(list(OBJECT_COLOURS))),
            shape=str(rng.choice(SHAPES)),
            size=str(rng.choice(SIZES)),
            position=POSITIONS[q],
        )
        for q in quadrants
    )
    full = Scene(background=background, objects=objects)
    return full, caption_view(full, rng, omit_prob)


def caption_view(full: Scene, rng: np.random.Generator, omit_prob: float, state_places: bool = False) -> Scene:
    """What a caption states of `full`: colour and shape always (they name the object); the background and each
    object's size and (unless state_places) position each left out with probability omit_prob, drawn in that
    order from `rng`."""
    def keep(value: str) -> Optional[str]:
        return None if rng.random() < omit_prob else value

    return Scene(background=keep(full.background),
                 objects=tuple(SceneObject(o.colour, o.shape, keep(o.size), o.position if state_places
                                           else keep(o.position)) for o in full.objects))


def bound_scene(rng: np.random.Generator, omit_prob: float = 0.0) -> tuple[Scene, Scene]:
    """A scene of two objects of two colours, each at a quadrant its caption states: the captions whose images
    show which colour goes where (random_scene draws them about one time in five; a base trained on that stream
    places the two colours at random). Size and background are left out of the caption as random_scene does."""
    quadrants = rng.permutation(len(POSITIONS))[:2]
    colours = rng.permutation(len(OBJECT_COLOURS))[:2]
    background = str(rng.choice(list(BACKGROUNDS)))
    objects = tuple(SceneObject(colour=list(OBJECT_COLOURS)[c], shape=str(rng.choice(SHAPES)),
                                size=str(rng.choice(SIZES)), position=POSITIONS[q])
                    for c, q in zip(colours, quadrants))
    full = Scene(background=background, objects=objects)
    return full, caption_view(full, rng, omit_prob, state_places=True)


def near_miss(caption: str, rng: np.random.Generator) -> str:
    """The caption with one stated attribute changed, or two objects' colours or shapes swapped: a caption that
    differs from the image's own only in what binds a word to an object. Scored on one image, such captions teach
    a reward model which object each word belongs to (free labels: the verifier reads any caption)."""
    scene = parse_caption(caption)
    objects = list(scene.objects)
    edits = []  # (kind, object index or None)
    if scene.background is not None:
        edits.append(("background", None))
    for i, obj in enumerate(objects):
        edits += [(a, i) for a in ("colour", "shape", "size", "position") if getattr(obj, a) is not None]
    if len(objects) == 2:
        edits += [(f"swap {a}", None) for a in ("colour", "shape")
                  if getattr(objects[0], a) != getattr(objects[1], a)]
    kind, i = edits[int(rng.integers(len(edits)))]
    choices = {"colour": list(OBJECT_COLOURS), "shape": list(SHAPES), "size": list(SIZES), "position": list(POSITIONS)}
    if kind == "background":
        scene = Scene(str(rng.choice([b for b in BACKGROUNDS if b != scene.background])), scene.objects)
    elif kind.startswith("swap"):
        attr = kind.split()[1]
        a, b = objects
        objects = [replace(a, **{attr: getattr(b, attr)}), replace(b, **{attr: getattr(a, attr)})]
        scene = Scene(scene.background, tuple(objects))
    else:
        taken = {o.position for o in objects}  # a moved object goes to a free quadrant
        current = getattr(objects[i], kind)
        options = [v for v in choices[kind] if v != current and (kind != "position" or v not in taken)]
        objects[i] = replace(objects[i], **{kind: str(rng.choice(options))})
        scene = Scene(scene.background, tuple(objects))
    return scene.caption()


def mirror_caption(caption: str) -> str:
    """The caption of the left-right mirror image: left and right exchanged (every shape is left-right symmetric,
    so a mirrored image scores under the mirrored caption what the image scores under its own)."""
    scene = parse_caption(caption)
    flip = {"left": "right", "right": "left"}
    objects = tuple(replace(o, position=" ".join(flip.get(w, w) for w in o.position.split())) if o.position else o
                    for o in scene.objects)
    return Scene(scene.background, objects).caption()


def shape_mask(shape: str, size_px: int, cx: float, cy: float, side: int) -> np.ndarray:
    """Boolean [side, side] mask of a shape whose bounding box is size_px wide, centred at (cx, cy)."""
    yy, xx = np.mgrid[0:side, 0:side] + 0.5  # pixel centres
    half = size_px / 2.0
    dx, dy = xx - cx, yy - cy
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "triangle":  # apex up, base down
        rel = (dy + half) / (2 * half)  # 0 at the apex row, 1 at the base
        return (rel >= 0) & (rel <= 1) & (np.abs(dx) <= rel * half)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def quadrant_centre(position: str, side: int) -> tuple[float, float]:
    vertical, horizontal = position.split()
    cx = side * (0.25 if horizontal == "left" else 0.75)
    cy = side * (0.25 if vertical == "top" else 0.75)
    return cx, cy


def render(scene: Scene, side: int, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """Render a fully specified scene as float32 [3, side, side] in [0, 1], with a little positional jitter."""
    image = np.empty((side, side, 3), dtype=np.float32)
    image[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        size_px = max(3, round(SIZE_FRACTION[obj.size] * side))
        cx, cy = quadrant_centre(obj.position, side)
        if rng is not None:
            slack = max(0.0, (side / 2 - size_px) / 2 - 0.5)
            cx += rng.uniform(-slack, slack)
            cy += rng.uniform(-slack, slack)
        image[shape_mask(obj.shape, size_px, cx, cy, side)] = OBJECT_COLOURS[obj.colour]
    return image.transpose(2, 0, 1).copy()


_OBJECT_RE = re.compile(
    r"^a(?: (?P<size>small|large))?(?: (?P<colour>\w+))? (?P<shape>\w+)(?: at the (?P<position>(?:top|bottom) (?:left|right)))?$"
)


def parse_caption(caption: str) -> Scene:
    """Invert Scene.caption(). Raises ValueError on text outside the grammar."""
    text = caption.strip().lower()
    background = None
    match = re.search(r", on an? (\w+) background$", text)
    if match:
        background = match.group(1)
        text = text[: match.start()]
    objects = []
    for part in text.split(" and "):
        m = _OBJECT_RE.match(part.strip())
        if not m:
            raise ValueError(f"caption part {part!r} is not in the scene grammar")
        obj = SceneObject(m["colour"], m["shape"], m["size"], m["position"])
        if obj.colour is not None and obj.colour not in OBJECT_COLOURS:
            raise ValueError(f"unknown colour {obj.colour!r} in {caption!r}")
        if obj.shape not in SHAPES:
            raise ValueError(f"unknown shape {obj.shape!r} in {caption!r}")
        objects.append(obj)
    if background is not None and background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r} in {caption!r}")
    return Scene(background=background, objects=tuple(objects))


def scene_batch(seed: int, start: int, count: int, side: int, omit_prob: float = 0.3,
                binding_share: float = 0.0) -> tuple[np.ndarray, list[str]]:
    """Images [count, 3, side, side] in [0, 1] and captions of scenes start..start+count-1 of stream `seed`; with
    `binding_share` p, each is a bound_scene with chance p (drawn from the scene's own rng: the stream stays a pure
    function of (seed, index), and is the same as before for p = 0)."""
    images, captions = [], []
    for index in range(start, start + count):
        rng = np.random.default_rng([seed, index])
        draw = bound_scene if binding_share and rng.random() < binding_share else random_scene
        full, stated = draw(rng, omit_prob)
        images.append(render(full, side, rng))
        captions.append(stated.caption())
    return np.stack(images), captions


def scene_prompts(seed: int, start: int, count: int, omit_prob: float = 0.3) -> list[str]:
    """Captions alone (no rendering) of the same scene stream: the GRPO prompt set."""
    return [random_scene(np.random.default_rng([seed, i]), omit_prob)[1].caption() for i in range(start, start + count)]
