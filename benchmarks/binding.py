"""Which of a caption's attributes does a model's sampler get right, and how much of it is the caption's doing?

    python benchmarks/binding.py [--init builtin:scenes-base] [--against CKPT] [--prompts 128] [--seeds 2]
                                 [--guidance 1] [--out DIR]

Samples GRPO's held-out prompts with the stochastic 10-step hybrid sampler (GRPO's policy) and checks each stated
attribute on its own with the verifier (`rewards.compositional.verify` on the caption reduced to that attribute):
the background; an object's colour in its stated quadrant (or, with no position stated, in any quadrant); its shape
and its size where its colour was found; and the whole verifier on one-object and multi-object captions apart. The
same checks against another held-out prompt's caption (prompt i + 1's, on prompt i's images) are the chance level:
what a sampler that ignored its caption would score. The difference, paired per prompt, is what the caption makes the
model do. On the captions that state two colours at two places, how often both colours are at their own places
against at each other's (`colour_binding`: equal rates mean the colours are placed but not bound to their places).
Then a paired check of the place word alone
(`place_effect`): single-object captions drawn at each of the four places with the same noises, scored by the
colour's share in the stated quadrant (0.25 if the word is ignored). 95% bootstrap intervals over prompts (over
captions for the place check). `--against CKPT` samples the same prompts and noises with a second model and adds
each check's paired difference (init - CKPT) over the prompts both have it for. `--guidance w` samples with classifier-free guidance w (1 = none; every base here was
pretrained with caption dropout). Writes markdown and
JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from learner import env  # noqa: E402,F401  (offline, no telemetry)
from learner.bootstrap import bootstrap_ci  # noqa: E402
from rewards.compositional import PALETTE_NAMES, Thresholds, classify, quadrant_slices, verify  # noqa: E402
from rewards.scenes import OBJECT_COLOURS, POSITIONS, SHAPES, Scene, SceneObject, parse_caption  # noqa: E402

CHECKS = ["background", "colour at its stated place", "colour, no place stated", "shape where the colour is",
          "size where the colour is", "verifier (all attributes)"]


def colour_at(image: np.ndarray, colour: str, place: str | None) -> bool:
    """Whether the verifier finds `colour` in `image` at `place` (a quadrant; None: in any quadrant)."""
    return verify(image, Scene(None, (SceneObject(colour, None, None, place),))) > 0


def attribute_checks(image: np.ndarray, caption: str) -> dict[str, list[float]]:
    """Each stated attribute of `caption` checked on its own in `image` [3, H, W]: check name -> 0/1 per instance."""
    scene = parse_caption(caption)
    out: dict[str, list[float]] = {name: [] for name in CHECKS}
    out["verifier (all attributes)"].append(verify(image, scene))
    if scene.background is not None:
        out["background"].append(float(verify(image, Scene(scene.background, ())) == 1.0))
    for obj in scene.objects:
        found = colour_at(image, obj.colour, obj.position)
        out["colour at its stated place" if obj.position else "colour, no place stated"].append(float(found))
        if not found:
            continue
        for name, attr in (("shape where the colour is", "shape"), ("size where the colour is", "size")):
            if getattr(obj, attr) is not None:
                reduced = SceneObject(obj.colour, obj.shape if attr == "shape" else None,
                                      obj.size if attr == "size" else None, obj.position)
                out[name].append(float(verify(image, Scene(None, (reduced,))) == 1.0))
    return out


def per_prompt(images: np.ndarray, captions: list[str]) -> dict[str, np.ndarray]:
    """images [prompts, seeds, 3, H, W]: check name -> [prompts] mean over the prompt's instances (nan if none)."""
    table = {name: np.full(len(captions), np.nan) for name in CHECKS}
    for i, caption in enumerate(captions):
        pooled: dict[str, list[float]] = {name: [] for name in CHECKS}
        for image in images[i]:
            for name, values in attribute_checks(image, caption).items():
                pooled[name] += values
        for name, values in pooled.items():
            if values:
                table[name][i] = float(np.mean(values))
    return table


def by_objects(verifier: np.ndarray, captions: list[str]) -> dict[str, dict]:
    """The verifier's per-prompt values [prompts] split by how many objects each caption states (where the reward
    is lost), over every prompt of each kind: label -> {"prompts": n, "mean": ...} (no interval for an empty kind)."""
    counts = np.array([len(parse_caption(caption).objects) for caption in captions])
    kinds = {"one object": counts == 1, "two or more objects": counts >= 2}
    return {label: {"prompts": int(mask.sum()), **(bootstrap_ci(verifier[mask]).as_dict() if mask.any() else {})}
            for label, mask in kinds.items()}


def paired(a: np.ndarray, b: np.ndarray):
    """Per-prompt values of two samplers (or one against chance): (mask of the prompts both have, bootstrap of a - b
    over them, None if there are none)."""
    kept = ~np.isnan(a) & ~np.isnan(b)
    return kept, bootstrap_ci(a[kept] - b[kept]) if kept.any() else None


def signed(estimate) -> str:
    return "-" if estimate is None else f"{estimate.mean:+.3f} [{estimate.low:+.3f}, {estimate.high:+.3f}]"


def check_table(own: dict, control: dict, other: dict | None = None, other_name: str = ""):
    """Per check: the own-caption rate, the chance rate, their paired lift and (with `other`) the paired difference.
    Returns (table rows, rows against `other`, results for the JSON); a check no prompt states gets a row of dashes
    (few prompts may state no place, say) instead of stopping the script after the sampling."""
    rows, against_rows, results = [], [], {}
    for name in CHECKS:
        kept, lift = paired(own[name], control[name])
        count = int(kept.sum())
        mine = bootstrap_ci(own[name][kept]) if count else None
        chance = bootstrap_ci(control[name][kept]) if count else None
        results[name] = {"prompts": count, **({"own": mine.as_dict(), "chance": chance.as_dict(),
                                                "lift": lift.as_dict()} if count else {})}
        rows.append(f"| {name} | {count} | {mine or '-'} | {chance or '-'} | {signed(lift)} |")
        if other is not None:
            both, diff = paired(own[name], other[name])
            results[name]["against"] = {"init": other_name, "prompts": int(both.sum()),
                                        **({"difference": diff.as_dict()} if diff is not None else {})}
            against_rows.append(f"| {name} | {int(both.sum())} | {signed(diff)} |")
    return rows, against_rows, results


def bound_pair(caption: str):
    """The two objects of a caption that states two colours at two places ((a, b)), else None: the captions on
    which a model's colours can be bound to their places or swapped."""
    objects = parse_caption(caption).objects
    if len(objects) != 2:
        return None
    a, b = objects
    if not (a.position and b.position) or a.position == b.position or a.colour == b.colour:
        return None
    return a, b


def colour_binding(images: np.ndarray, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Is each colour drawn where its caption puts it, or at the other object's place? For every caption stating
    two colours at two places (bound_pair), the share of its images [prompts, seeds, 3, H, W] with both colours
    at their own stated places (own) and with each at the other's (swapped), nan for other captions. A model that
    places the colours and ignores which goes where scores own = swapped; one that binds them, own > swapped."""
    own, swapped = np.full(len(captions), np.nan), np.full(len(captions), np.nan)
    for i, caption in enumerate(captions):
        pair = bound_pair(caption)
        if pair is None:
            continue
        a, b = pair
        own[i] = np.mean([colour_at(x, a.colour, a.position) and colour_at(x, b.colour, b.position)
                          for x in images[i]])
        swapped[i] = np.mean([colour_at(x, a.colour, b.position) and colour_at(x, b.colour, a.position)
                              for x in images[i]])
    return own, swapped


def quadrant_shares(images: np.ndarray, colour: str) -> dict[str, float]:
    """Of the pixels of images [N, 3, H, W] whose palette class (the verifier's `classify`) is `colour`, the
    fraction in each quadrant (nan if there are none). 1 in the caption's quadrant: obeyed; 0.25 each: anywhere."""
    index = PALETTE_NAMES.index(colour)
    found = np.stack([classify(image, Thresholds())[0] == index for image in images])  # [N, H, W]
    total = found.sum()
    return {position: float(found[(slice(None), *quadrant_slices(position, images.shape[-1]))].sum() / total)
            if total else float("nan") for position in POSITIONS}


def half_shares(shares: dict[str, float], position: str) -> tuple[float, float]:
    """From quadrant_shares: the colour's share in the stated half of the image along each axis, (vertical: the
    stated top/bottom half, horizontal: the stated left/right half); 0.5 = that word ignored, 1 = obeyed."""
    row, column = position.split()
    return (sum(v for q, v in shares.items() if q.split()[0] == row),
            sum(v for q, v in shares.items() if q.split()[1] == column))


def place_effect(generate_images, noises: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Does the place word move the object? Each single-object caption "a large C S at the P" (6 colours x 3
    shapes) is drawn at each of the four places with the same `noises` noises (paired), and scored by the share of
    its colour in the stated quadrant; the same images scored against the other three quadrants are what a model
    that ignored the place word would get. generate_images(captions, seed) -> [len(captions), 3, H, W] in [0, 1].
    Returns (stated, control) [18] shares, each a mean over places and noises, and halves [18, 2]: the shares in the
    stated vertical and horizontal half (half_shares), so a model that obeys one word of "top left" and not the
    other shows which."""
    items = [(c, s) for c in OBJECT_COLOURS for s in SHAPES]
    stated = np.zeros((len(items), len(POSITIONS)))
    control = np.zeros_like(stated)
    halves = np.zeros((len(items), len(POSITIONS), 2))
    for p, position in enumerate(POSITIONS):
        captions = [f"a large {c} {s} at the {position}" for c, s in items for _ in range(noises)]
        images = generate_images(captions, 0)
        images = images.reshape(len(items), noises, *images.shape[1:])
        for i, (colour, _) in enumerate(items):
            shares = quadrant_shares(images[i], colour)
            stated[i, p] = shares[position]
            control[i, p] = np.nanmean([shares[other] for other in POSITIONS if other != position])
            halves[i, p] = half_shares(shares, position)
    return np.nanmean(stated, axis=1), np.nanmean(control, axis=1), np.nanmean(halves, axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", default="builtin:scenes-base")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    parser.add_argument("--against", default=None,
                        help="a second checkpoint sampled on the same prompts and noises: paired differences")
    parser.add_argument("--place-noises", type=int, default=16,
                        help="noises per single-object caption and place in the place-word check (0: skip it)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "binding")
    args = parser.parse_args()

    import torch

    from learner.config import load_config
    from learner.main import resolve_checkpoint
    from learner.prompts import prompt_source
    from proxmodel.generate import generate
    from proxmodel.model import load_model

    torch.set_num_threads(args.threads)
    started = time.monotonic()
    captions = prompt_source(load_config(None, [])).held_out(args.prompts)

    def sample(init: str):
        """The model and its images [prompts, seeds, 3, H, W]; noise seed s is the same for every model."""
        net = load_model(resolve_checkpoint(init)).eval()
        return net, np.stack([generate(net, captions, args.steps, seed, guidance=args.guidance).numpy()
                              for seed in range(args.seeds)], axis=1)

    model, images = sample(args.init)
    own = per_prompt(images, captions)
    control = per_prompt(images, captions[1:] + captions[:1])
    other_images = sample(args.against)[1] if args.against else None
    other = per_prompt(other_images, captions) if args.against else None

    rows, against_rows, results = check_table(own, control, other, args.against)
    results["verifier by objects stated"] = split = by_objects(own["verifier (all attributes)"], captions)
    place = "\n\nThe verifier by how many objects the caption states (every prompt of each kind): " + "; ".join(
        f"{label} ({kind['prompts']} prompts) {kind['mean']:.3f} [{kind['ci_low']:.3f}, {kind['ci_high']:.3f}]"
        for label, kind in split.items() if kind["prompts"]) + "."
    bound, swapped = colour_binding(images, captions)
    kept, binding = paired(bound, swapped)
    if binding is not None:
        own_places, other_places = bootstrap_ci(bound[kept]), bootstrap_ci(swapped[kept])
        results["colour binding"] = {"prompts": int(kept.sum()), "own": own_places.as_dict(),
                                     "swapped": other_places.as_dict(), "own_minus_swapped": binding.as_dict()}
        place += (f"\n\nIs each colour drawn at its own place or at the other's? On the {int(kept.sum())} captions "
                  f"stating two colours at two places: both colours at their own places {own_places}, "
                  f"each at the other's place {other_places}, own minus swapped {signed(binding)} "
                  "(0: the colours are placed, but which goes where is chance).")
        if other_images is not None:
            other_bound, other_swapped = colour_binding(other_images, captions)
            _, against = paired(bound - swapped, other_bound - other_swapped)
            results["colour binding"]["against"] = {"init": args.against, "difference": against.as_dict()}
            place += f" Own minus swapped, this model minus `{args.against}`, paired: {signed(against)}."
    if args.place_noises:
        stated, control, halves = place_effect(
            lambda caps, seed: generate(model, caps, args.steps, seed, guidance=args.guidance).numpy(), args.place_noises)
        kept = ~np.isnan(stated) & ~np.isnan(control)  # a caption whose colour never appeared has no share
        stated, control, halves = stated[kept], control[kept], halves[kept]
        share, lift = bootstrap_ci(stated), bootstrap_ci(stated - control)
        vertical, horizontal = bootstrap_ci(halves[:, 0]), bootstrap_ci(halves[:, 1])
        results["place word"] = {"captions": len(stated), "noises": args.place_noises, "share": share.as_dict(),
                                 "lift": lift.as_dict(), "vertical_half": vertical.as_dict(),
                                 "horizontal_half": horizontal.as_dict()}
        place += (f"\n\nDoes the place word move the object? {len(stated)} single-object captions (\"a large C S at the "
                  f"P\", every colour and shape), each at the four places with the same {args.place_noises} noises: share "
                  f"of the colour's pixels in the stated quadrant {share} (0.25 if the place word is ignored, 1 if obeyed); "
                  f"minus its share in the other quadrants {lift.mean:+.3f} [{lift.low:+.3f}, {lift.high:+.3f}] "
                  f"(95% intervals over captions). By axis, the share in the stated half (0.5 = that word ignored): "
                  f"top / bottom {vertical}, left / right {horizontal}.")
    text = (f"`{args.init}`, {args.prompts} held-out prompts x {args.seeds} noise seeds, stochastic hybrid sampler, "
            f"{args.steps} steps, guidance {args.guidance:g}. Chance: the same images checked against the next prompt's caption. Rates per "
            f"stated attribute, mean per prompt; 95% bootstrap intervals over prompts.\n\n"
            "| check | prompts | own caption | another caption (chance) | lift over chance |\n|---|---|---|---|---|\n"
            + "\n".join(rows) + place
            + (f"\n\nAgainst `{args.against}` on the same prompts and noises, paired per prompt (this model minus "
               f"it):\n\n| check | prompts | difference |\n|---|---|---|\n" + "\n".join(against_rows)
               if against_rows else "")
            + f"\n\nTotal time {time.monotonic() - started:.0f} s.\n")
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.init.replace("builtin:", "").replace("/", "_") + (f"-guidance{args.guidance:g}" if args.guidance != 1 else "")
    (args.out / f"{stem}.md").write_text(text)
    (args.out / f"{stem}.json").write_text(json.dumps({"init": args.init, "prompts": args.prompts,
                                                       "seeds": args.seeds, "steps": args.steps, "guidance": args.guidance,
                                                       "checks": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
