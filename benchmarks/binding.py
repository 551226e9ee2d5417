"""Which of a caption's attributes does a model's sampler get right, and how much of it is the caption's doing?

    python benchmarks/binding.py [--init builtin:scenes-base] [--prompts 128] [--seeds 2] [--guidance 1] [--out DIR]

Samples GRPO's held-out prompts with the stochastic 10-step hybrid sampler (GRPO's policy) and checks each stated
attribute on its own with the verifier (`rewards.compositional.verify` on the caption reduced to that attribute):
the background; an object's colour in its stated quadrant (or, with no position stated, in any quadrant); its shape
and its size where its colour was found. The same checks against another held-out prompt's caption (prompt i + 1's,
on prompt i's images) are the chance level: what a sampler that ignored its caption would score. The difference,
paired per prompt, is what the caption makes the model do. 95% bootstrap intervals over prompts. `--guidance w` samples with
classifier-free guidance w (1 = none; every base here was pretrained with caption dropout). Writes markdown and
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
from rewards.compositional import verify  # noqa: E402
from rewards.scenes import Scene, SceneObject, parse_caption  # noqa: E402

CHECKS = ["background", "colour at its stated place", "colour, no place stated", "shape where the colour is",
          "size where the colour is", "verifier (all attributes)"]


def attribute_checks(image: np.ndarray, caption: str) -> dict[str, list[float]]:
    """Each stated attribute of `caption` checked on its own in `image` [3, H, W]: check name -> 0/1 per instance."""
    scene = parse_caption(caption)
    out: dict[str, list[float]] = {name: [] for name in CHECKS}
    out["verifier (all attributes)"].append(verify(image, scene))
    if scene.background is not None:
        out["background"].append(float(verify(image, Scene(scene.background, ())) == 1.0))
    for obj in scene.objects:
        found = verify(image, Scene(None, (SceneObject(obj.colour, None, None, obj.position),))) > 0
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", default="builtin:scenes-base")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
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
    model = load_model(resolve_checkpoint(args.init)).eval()
    captions = prompt_source(load_config(None, [])).held_out(args.prompts)
    images = np.stack([generate(model, captions, args.steps, seed, guidance=args.guidance).numpy() for seed in range(args.seeds)], axis=1)
    own = per_prompt(images, captions)
    control = per_prompt(images, captions[1:] + captions[:1])

    rows, results = [], {}
    for name in CHECKS:
        kept = ~np.isnan(own[name]) & ~np.isnan(control[name])
        mine, chance = bootstrap_ci(own[name][kept]), bootstrap_ci(control[name][kept])
        lift = bootstrap_ci(own[name][kept] - control[name][kept])
        results[name] = {"prompts": int(kept.sum()), "own": mine.as_dict(), "chance": chance.as_dict(),
                         "lift": lift.as_dict()}
        rows.append(f"| {name} | {int(kept.sum())} | {mine} | {chance} | {lift.mean:+.3f} [{lift.low:+.3f}, "
                    f"{lift.high:+.3f}] |")
    text = (f"`{args.init}`, {args.prompts} held-out prompts x {args.seeds} noise seeds, stochastic hybrid sampler, "
            f"{args.steps} steps, guidance {args.guidance:g}. Chance: the same images checked against the next prompt's caption. Rates per "
            f"stated attribute, mean per prompt; 95% bootstrap intervals over prompts.\n\n"
            "| check | prompts | own caption | another caption (chance) | lift over chance |\n|---|---|---|---|---|\n"
            + "\n".join(rows) + f"\n\nTotal time {time.monotonic() - started:.0f} s.\n")
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.init.replace("builtin:", "").replace("/", "_") + (f"-guidance{args.guidance:g}" if args.guidance != 1 else "")
    (args.out / f"{stem}.md").write_text(text)
    (args.out / f"{stem}.json").write_text(json.dumps({"init": args.init, "prompts": args.prompts,
                                                       "seeds": args.seeds, "steps": args.steps, "guidance": args.guidance,
                                                       "checks": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
