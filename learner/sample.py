"""Generate from a checkpoint without writing code: `python -m learner.main --mode sample init_from=... [sample.*]`.

The same sampler as evaluation (learner/evaluation.py). Prompt i's images use the noise of seed + i, so an image
depends on its prompt, its index and the seed, never on which other prompts were drawn with it. From Python:

    from learner.sample import sample_images
    images = sample_images("builtin:scenes-base", ["a red circle at the top left, on a white background"], count=4)
    images[0].save("circle.png")
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from learner.config import RunConfig
from learner.evaluation import save_grid, to_pil
from proxmodel.generate import generate
from learner.tracking import Tracker
from proxmodel.model import ProxT2I, load_model


def load(checkpoint: str | Path | ProxT2I) -> ProxT2I:
    """A model from a checkpoint folder or `builtin:NAME`, on the GPU if there is one, ready to sample."""
    from learner.engine import device
    from learner.main import resolve_checkpoint

    model = checkpoint if isinstance(checkpoint, ProxT2I) else load_model(resolve_checkpoint(str(checkpoint)))
    return model.to(device()).eval()


def prompt_images(model: ProxT2I, prompt: str, index: int, count: int, *, steps: int = 10, seed: int = 0,
                  eta: float = 1.0, guidance: float = 1.0, sampler: Optional[str] = None) -> torch.Tensor:
    """`count` images [count, C, H, W] in [0, 1] of prompt number `index`, with the noise of seed + index."""
    return generate(model, [prompt] * count, steps, seed + index, eta, sampler, guidance)


def sample_images(checkpoint: str | Path | ProxT2I, prompts: Sequence[str], count: int = 1, *, steps: int = 10,
                  seed: int = 0, eta: float = 1.0, guidance: float = 1.0,
                  sampler: Optional[str] = None) -> list[Image.Image]:
    """`count` PIL images per prompt, prompt by prompt, as `--mode sample` draws them with the same settings."""
    model = load(checkpoint)
    return [image for i, prompt in enumerate(prompts)
            for image in to_pil(prompt_images(model, prompt, i, count, steps=steps, seed=seed, eta=eta,
                                              guidance=guidance, sampler=sampler))]


def sample_prompts(cfg: RunConfig) -> list[str]:
    """sample.prompts, else the lines of sample.prompt_file, else held-out scene captions (never trained on)."""
    from learner.prompts import ScenePrompts, read_prompt_file

    s = cfg.sample
    if s.prompts:
        return list(s.prompts)
    if s.prompt_file:
        return read_prompt_file(s.prompt_file, "sample.prompt_file")
    return ScenePrompts(cfg.grpo.prompt_seed, cfg.data.omit_prob).held_out(s.num_prompts)


def run_sample(cfg: RunConfig, run_dir: Path, tracker: Tracker, init_from: Path) -> dict:
    """Images, a grid (a row per prompt) and samples.json (prompt, file, seed, rewards) in run_dir."""
    from learner.bootstrap import bootstrap_ci
    from rewards import build

    s, start = cfg.sample, time.time()
    model = load(init_from)
    prompts = sample_prompts(cfg)
    rewards = {spec.name: build(spec.name, **spec.options) for spec in cfg.rewards} if s.score else {}
    (run_dir / "images").mkdir(parents=True, exist_ok=True)
    records, everything, pictures = [], [], []
    for i, prompt in enumerate(prompts):
        images = prompt_images(model, prompt, i, s.images_per_prompt, steps=s.steps, seed=cfg.seed, eta=s.eta,
                               guidance=s.guidance, sampler=s.sampler)
        scores = {name: r.score(images, [prompt] * len(images)).double().cpu().tolist() for name, r in rewards.items()}
        pictures += to_pil(images)
        for k, image in enumerate(pictures[-len(images):]):
            name = f"images/{i:04d}-{k:02d}.png"
            image.save(run_dir / name)
            records.append({"prompt": prompt, "prompt_index": i, "image": name, "noise_seed": cfg.seed + i,
                            "index_in_prompt": k, "rewards": {n: v[k] for n, v in scores.items()}})
        everything.append(images)
    grid = save_grid(torch.cat(everything), run_dir / "samples.png", nrow=s.images_per_prompt)
    (run_dir / "samples.json").write_text(json.dumps(records, indent=1) + "\n")
    tracker.image(grid, "samples.png")
    tracker.artifact(run_dir / "samples.json")
    tracker.table({"prompt": [r["prompt"] for r in records], "image": pictures,
                   **{n: [r["rewards"][n] for r in records] for n in rewards}}, "samples_table.json")
    means = {}
    for name in rewards:  # per prompt first: the interval is over prompts, as evaluation's
        per_prompt = np.array([[r["rewards"][name] for r in records if r["prompt_index"] == i]
                               for i in range(len(prompts))])
        means[name] = bootstrap_ci(per_prompt).as_dict()
        tracker.metrics({f"sample_reward_{name}": means[name]["mean"]}, step=0)
    return {"prompts": len(prompts), "images": len(records), "samples": str(run_dir / "samples.json"),
            "grid": str(run_dir / "samples.png"), "rewards": means, "wall_time_s": time.time() - start}
