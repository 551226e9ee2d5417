"""LoRA against full fine-tuning: bytes per weight publication and seconds per GRPO update, on the shipped base.

    python benchmarks/lora.py [--ranks 0 4 16] [--repeats 5] [--out benchmarks/results/lora.md]

For each LoRA rank (0 = every weight, the text encoder frozen as in the default run) it builds the learner's real
DeepSpeed engine (ZeRO-2, one rank, gloo) around `builtin:scenes-base`, samples one group of the default run's shape
(8 images, 10 hybrid steps) and times full updates as the learner runs them: 9 transitions re-scored with grad,
accumulated, one optimiser step (median of --repeats after one warm-up). Publication bytes are what the learner
sends the rollouts (learner/grpo_learner.py `publish`): the full fp32 state, or the adapters alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from learner import env  # noqa: E402,F401  (offline, no telemetry)


def measure(rank: int, repeats: int, steps: int = 10, group: int = 8) -> dict:
    import torch

    from learner.config import LoraSettings
    from learner.engine import build_engine, full_state_dict, init_distributed
    from learner.main import resolve_checkpoint
    from proxmodel.lora import adapter_state, add_lora
    from proxmodel.model import load_model
    from proxmodel.policy import Policy

    init_distributed(0, 1)
    model = load_model(resolve_checkpoint("builtin:scenes-base"))
    if rank:
        add_lora(model, LoraSettings(rank=rank).spec())
    else:
        model.text.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    policy = Policy.of(model, steps, 1.0, 1.0)
    tokens = model.tokenize(["a small red circle at the top left, on a white background"] * group)
    with torch.no_grad():
        traj = policy.sample(model, {"tokens": tokens}, model.sample_shape(group), torch.Generator().manual_seed(0))
    engine = build_engine(model, lr=1e-4, weight_decay=0.0, grad_clip=1.0, zero_stage=2, bf16=False,
                          grad_accum=steps - 1)
    advantages = torch.randn(group, generator=torch.Generator().manual_seed(1))

    def update() -> float:
        t0 = time.perf_counter()
        for j in range(steps - 1):
            log_prob = policy.transition(engine, {"tokens": tokens}, traj.states, j).log_prob
            engine.backward(-(advantages * log_prob).mean())
            engine.step()
        return time.perf_counter() - t0

    update()
    seconds = statistics.median(update() for _ in range(repeats))
    state = full_state_dict(engine)
    published = adapter_state(state) if rank else state
    return {"rank": rank, "trainable": trainable, "bytes": sum(v.numel() * v.element_size() for v in published.values()),
            "update_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", nargs="+", type=int, default=[0, 4, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lora.md")
    args = parser.parse_args()
    import torch

    rows = [measure(r, args.repeats) for r in args.ranks]
    full = rows[0] if rows[0]["rank"] == 0 else None
    lines = ["| LoRA rank | trainable weights | bytes per publication | GRPO update (s, median) |", "|---|---|---|---|"]
    for r in rows:
        ratio = f" ({r['bytes'] / full['bytes']:.1%})" if full and r is not full else ""
        lines.append(f"| {r['rank'] or 'off (full)'} | {r['trainable']:,} | {r['bytes'] / 1e6:.2f} MB{ratio} | "
                     f"{r['update_s']:.2f} |")
    table = "\n".join(lines) + f"\n\n(torch {torch.__version__}, {torch.get_num_threads()} threads; one group of 8, " \
        "10 steps: 9 transitions and one optimiser step per update)\n"
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)


if __name__ == "__main__":
    main()
