"""Can a reward model learn the verifier from the base's own samples well enough to rank a NEW caption's samples?

    python benchmarks/reward_model.py [--train-prompts 1024] [--relabel 8] [--mirror] [--renders 0] [--steps 10000]

value_guidance.py found that a value regressed on rollouts ranks the samples of a held-out caption at chance: it
learns which prompts are hard, not how an image's credit depends on its caption. This isolates that last step. A
reward model R(x_0, c) (proxmodel.value.DenoisedValue read at the last step, on the final image) is regressed on the
verifier's scores of the base's final images of training prompts (value_guidance.py's rollouts, the same cache),
optionally with free labels:

- `--relabel K`: each image also scored under K near-miss captions (one attribute changed, or two objects' colours
  or shapes swapped: rewards.scenes.near_miss), so one image is seen with captions that differ only in a binding;
- `--mirror`: half the rows flipped left-right under the mirrored caption (an exact symmetry of the verifier);
- `--renders N`: N rendered scenes (the pretraining data) with their captions and near misses.

Every `--eval-every` steps, on GRPO's 128 held-out prompts x 8 base samples: the gain of keeping the sample R rates
best over a random one (95% bootstrap over prompts; the verifier itself as the oracle), R's correlation with the
verifier within a prompt, and binding accuracy (of an image's own caption and a near miss that the verifier scores
differently, how often R prefers the verifier's choice; chance 0.5); and R's pick on its own training prompts.
Writes markdown and JSON to --out.
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
from value_guidance import (base_rollouts, final_images, held_out_samples, mirror_table,  # noqa: E402  (sibling script)
                            near_miss_labels, training_prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", default="builtin:scenes-base", help="checkpoint folder or builtin:NAME")
    parser.add_argument("--train-prompts", type=int, default=1024)
    parser.add_argument("--group", type=int, default=8, help="base samples per training prompt")
    parser.add_argument("--sampler-steps", type=int, default=10)
    parser.add_argument("--relabel", type=int, default=8, help="near-miss captions per training image (0 = none)")
    parser.add_argument("--own-frac", type=float, default=0.5, help="with --relabel: rows read under the own caption")
    parser.add_argument("--mirror", action="store_true", help="half the rows mirrored left-right")
    parser.add_argument("--renders", type=int, default=0, help="rendered training scenes added to the rollouts")
    parser.add_argument("--steps", type=int, default=10_000, help="Adam steps")
    parser.add_argument("--eval-every", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--width", type=int, default=48)
    parser.add_argument("--prompts", type=int, default=128, help="held-out prompts")
    parser.add_argument("--samples", type=int, default=8, help="base samples per held-out prompt")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--rollouts", type=Path, default=None, help="value_guidance.py's --rollouts cache")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "reward_model")
    args = parser.parse_args()

    import torch

    from learner.config import load_config
    from learner.main import resolve_checkpoint
    from learner.prompts import prompt_source
    from proxmodel.model import load_model
    from proxmodel.policy import Policy
    from proxmodel.value import DenoisedValue
    from rewards import build
    from rewards.scenes import near_miss, scene_batch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.0f} s] {msg}", file=sys.stderr, flush=True)

    source = prompt_source(load_config(None, ["seed=0"]))
    held_out = source.held_out(args.prompts)
    train_prompts = training_prompts(source, args.train_prompts, held_out)
    model = load_model(resolve_checkpoint(args.init)).eval().requires_grad_(False)
    grid = Policy.of(model, args.sampler_steps).grid
    verifier = build("compositional")

    def contexts(prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model.encode_text(model.tokenize(prompts[f:f + 1024]))
                              for f in range(0, len(prompts), 1024)])

    # training rows: the base's final images (and rendered scenes), each under its own caption and K near misses
    rows, states, rewards = base_rollouts(model, args.init, grid, train_prompts, args.group, args.batch, verifier,
                                          args.rollouts, log)
    own_index = torch.arange(len(rows)) // args.group
    images = final_images(model, grid, states[:, -1], contexts(train_prompts)[own_index], args.batch)
    del states
    index = {p: i for i, p in enumerate(train_prompts)}  # caption -> its row of the context table
    captions, scores = [rows], [rewards]
    if args.renders:
        drawn, drawn_captions = scene_batch(seed=99, start=0, count=args.renders, side=images.shape[-1])
        keep = [i for i, c in enumerate(drawn_captions) if c not in set(held_out)]  # no held-out caption trained on
        drawn, drawn_captions = torch.from_numpy(drawn[keep]), [drawn_captions[i] for i in keep]
        images = torch.cat([images, drawn])
        captions.append(drawn_captions)
        scores.append(verifier.score(drawn, drawn_captions))
    captions = [c for part in captions for c in part]
    slots = torch.tensor([index.setdefault(c, len(index)) for c in captions])[:, None]
    labels = torch.cat(scores)[:, None]
    if args.relabel:
        near_slots, near_labels = near_miss_labels(images, captions, verifier, args.relabel, index)
        slots, labels = torch.cat([slots, near_slots], 1), torch.cat([labels, near_labels], 1)
    mirror_of = mirror_table(index) if args.mirror else None
    table = contexts(list(index))
    x0 = model.encode_images(images * 2 - 1)  # what the value reads: model space (the identity without a VAE)
    log(f"{len(captions)} training images ({len(rows)} rollouts), {len(index)} captions; label variance "
        f"{labels.var():.4f}")

    # held-out: `samples` base samples per prompt on value_guidance.py's noises (its seeds 0..samples-1)
    held_ctx = contexts(held_out)
    with torch.no_grad():
        held = [out.images for _, _, out in held_out_samples(model, None, held_ctx, grid, 0.0, args.batch,
                                                              range(args.samples))]
    held = torch.stack(torch.cat(held).split(len(held_out)), 1)  # [prompt, sample, ...]
    flat = held.flatten(0, 1)
    held_images = model.to_images(flat)
    held_rows = [p for p in held_out for _ in range(args.samples)]
    r = verifier.score(held_images, held_rows).view(len(held_out), args.samples).numpy()
    near_rng = np.random.default_rng(4)
    near = [near_miss(p, near_rng) for p in held_rows]
    r_near = verifier.score(held_images, near).view(len(held_out), args.samples).numpy()
    near_ctx = contexts(near)
    oracle = bootstrap_ci(r.max(1) - r.mean(1))
    log(f"held-out base {r.mean():.3f}; the verifier's pick of {args.samples}: {oracle}")

    reward_model = DenoisedValue(model, args.sampler_steps, width=args.width)
    with torch.no_grad():
        reward_model.out[-1].bias.fill_(float(rewards.mean()))
    last = torch.ones(len(flat), dtype=torch.long)  # the step index the value reads the final image at

    def rate(x: torch.Tensor, ctx: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return torch.cat([reward_model(x[f:f + 256], None, None, ctx[f:f + 256], last[:len(x[f:f + 256])],
                                           denoised=x[f:f + 256]) for f in range(0, len(x), 256)]).numpy()

    def measures(v: np.ndarray, v_near: np.ndarray) -> dict:
        """How a scorer's ratings v [prompt, sample] (and under the near misses, v_near) rank as the verifier does."""
        pick = bootstrap_ci(r[np.arange(len(r)), v.argmax(1)] - r.mean(1))
        differ = r_near != r
        binding = bootstrap_ci((np.sign(v - v_near) == np.sign(r - r_near))[differ].astype(float))
        within = [np.corrcoef(v[i], r[i])[0, 1] for i in range(len(r)) if r[i].std() > 0 and v[i].std() > 0]
        return {"pick": pick.as_dict(), "within_corr": float(np.mean(within)), "binding": binding.as_dict(),
                "pairs": int(differ.sum()), "all_equal": float((v.std(1) == 0).mean())}

    def evaluate(step: int) -> dict:
        reward_model.eval()
        v = rate(flat, held_ctx.repeat_interleave(args.samples, 0)).reshape(r.shape)
        v_near = rate(flat, near_ctx).reshape(r.shape)
        seen = rate(x0[:len(rows)], table[slots[:len(rows), 0]]).reshape(-1, args.group)
        reward_model.train()
        r_seen = rewards.view(-1, args.group).numpy()
        on_train = float((r_seen[np.arange(len(r_seen)), seen.argmax(1)] - r_seen.mean(1)).mean())
        result = {"step": step, **measures(v, v_near), "train_pick": on_train}
        log(f"step {step}: pick {result['pick']}, within-prompt corr {result['within_corr']:.2f}, binding "
            f"{result['binding']}, training prompts' pick {on_train:+.3f}")
        return result

    # a hand-written dense reward on the same measures, for reference: no learning, no training captions
    dense = build("compositional_soft")
    reference = measures(dense.score(held_images, held_rows).view(r.shape).numpy(),
                         dense.score(held_images, near).view(r.shape).numpy())
    log(f"compositional_soft: pick {reference['pick']}, within-prompt corr {reference['within_corr']:.2f}, "
        f"binding {reference['binding']}")

    opt = torch.optim.Adam(reward_model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(1)
    ones = torch.ones(args.batch, dtype=torch.long)
    curve, losses = [], []
    for step in range(1, args.steps + 1):
        i = torch.randint(len(captions), (args.batch,), generator=gen)
        m = torch.randint(1, 1 + args.relabel, (args.batch,), generator=gen) if args.relabel else torch.zeros_like(i)
        m[torch.rand(args.batch, generator=gen) < args.own_frac] = 0
        x, c = x0[i], slots[i, m]
        if mirror_of is not None:
            flip = torch.rand(args.batch, generator=gen) < 0.5
            x, c = torch.where(flip[:, None, None, None], x.flip(-1), x), torch.where(flip, mirror_of[c], c)
        loss = (reward_model(x, None, None, table[c], ones, denoised=x) - labels[i, m]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reward_model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % args.eval_every == 0 or step == args.steps:
            curve.append({**evaluate(step), "mse": float(np.mean(losses[-args.eval_every:]))})

    fmt = lambda e: f"{e['mean']:+.3f} [{e['ci_low']:+.3f}, {e['ci_high']:+.3f}]"  # noqa: E731
    data = (f"{len(rows)} base rollouts ({len(train_prompts)} training prompts x {args.group})"
            + (f" + {args.renders} rendered scenes" if args.renders else "")
            + (f", each also under {args.relabel} near-miss captions (own caption in {args.own_frac:.0%} of the rows)"
               if args.relabel else "") + (", half the rows mirrored" if args.mirror else ""))
    trained = (f"a reward model R(x_0, c) regressed on the verifier over {data}; Adam lr {args.lr:g}, batch "
               f"{args.batch}, width {args.width}" if args.steps else "no reward model trained (--steps 0)")
    lines = [f"`{args.init}`; {trained}. Held out: {len(held_out)} prompts x {args.samples} base "
             f"samples (verifier {r.mean():.3f}); the verifier's own pick gains {fmt(oracle.as_dict())}.", "",
             "| step | training mse (label variance " + f"{labels.var():.4f}) | held-out pick of {args.samples}: gain "
             "[95% CI] | within-prompt corr | binding accuracy [95% CI] | training prompts' pick |",
             "|---|---|---|---|---|---|",
             f"| `compositional_soft` (hand-written, not trained) | - | {fmt(reference['pick'])} | "
             f"{reference['within_corr']:.2f} | {reference['binding']['mean']:.2f} [{reference['binding']['ci_low']:.2f}, "
             f"{reference['binding']['ci_high']:.2f}] | - |"]
    lines += [f"| {p['step']} | {p['mse']:.4f} | {fmt(p['pick'])} | {p['within_corr']:.2f} | "
              f"{p['binding']['mean']:.2f} [{p['binding']['ci_low']:.2f}, {p['binding']['ci_high']:.2f}] | "
              f"{p['train_pick']:+.3f} |" for p in curve]
    text = "\n".join(lines) + (
        f"\n\nBinding pairs (own vs near miss, scored differently): {reference['pairs']}. Prompts whose {args.samples} "
        f"samples all score the same (no ranking, no GRPO gradient): {(r.std(1) == 0).mean():.0%} under the verifier, "
        f"{reference['all_equal']:.0%} under `compositional_soft`. Total time {time.monotonic() - started:.0f} s.\n")
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reward_model.md").write_text(text)
    (args.out / "reward_model.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "oracle": oracle.as_dict(),
         "held_out_reward": float(r.mean()), "verifier_all_equal": float((r.std(1) == 0).mean()),
         "compositional_soft": reference, "curve": curve}, indent=1) + "\n")


if __name__ == "__main__":
    main()
