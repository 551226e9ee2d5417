"""Check that a reward's files load and score: `python -m rewards.check NAME [key=value ...]`.

The key=value pairs are the reward's options, as under `rewards: [{name: NAME, options: {...}}]` in a config, e.g.
    python -m rewards.check hpsv2 checkpoint=/models/hps/HPS_v2.1_compressed.pt
Loads the model, scores a few generated captioned scenes, prints each score and the time per image.
Exit status 0 if it scored, 2 if a file or option is wrong (the message says which and where to get it).
"""

from __future__ import annotations

import argparse
import sys
import time

from proxmodel import env  # noqa: F401  (offline, no telemetry)


def parse_options(items: list[str]) -> dict:
    import yaml

    options = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"option {item!r} is not key=value (e.g. checkpoint=/models/hps/HPS_v2.1_compressed.pt)")
        options[key] = yaml.safe_load(raw)
    return options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rewards.check", description=__doc__.splitlines()[0])
    parser.add_argument("name", help="a registered reward, e.g. hpsv2, image_reward, pickscore, clip_score")
    parser.add_argument("options", nargs="*", metavar="key=value", help="the reward's options")
    parser.add_argument("--images", type=int, default=4, help="how many generated images to score")
    parser.add_argument("--side", type=int, default=256, help="image side in pixels")
    args = parser.parse_args(argv)

    import torch

    from rewards import available, build
    from rewards.base import preflight
    from rewards.scenes import scene_batch

    try:
        if args.name not in available():
            raise ValueError(f"unknown reward {args.name!r}; registered rewards are {available()}")
        options = parse_options(args.options)
        preflight(args.name, options)
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    reward = build(args.name, **options)
    print(f"loaded {args.name} in {time.perf_counter() - start:.1f} s")
    images, captions = scene_batch(seed=0, start=0, count=args.images, side=args.side)
    images = torch.from_numpy(images)
    reward.score(images[:1], captions[:1])  # warm-up: first-call allocations are not per-image cost
    start = time.perf_counter()
    scores = reward.score(images, captions)
    per_image = (time.perf_counter() - start) / len(captions)
    for caption, value in zip(captions, scores.tolist()):
        print(f"{value:10.4f}  {caption}")
    print(f"{per_image * 1000:.0f} ms per image ({torch.get_num_threads()} torch threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
