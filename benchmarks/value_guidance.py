"""Can a learned value realise the caption-specific reward tilt? The base steered by V, on held-out prompts.

    python benchmarks/value_guidance.py [--train-prompts 256] [--group 8] [--value-steps 800] [--scales 2 5 10 20]

tilt_bound.py showed that the base's own samples hold +0.15 held out at 0.28 nats per prompt, but only as a
caption-specific tilt, and that every parameter-space update tried gains what a caption-blind one can (+0.01-0.02).
This measures the first step of the other route, the tilt as a control of the sampler (proxmodel/value.py):

1. sample the base (stochastic 10-step hybrid, GRPO's policy) on `--train-prompts` TRAINING prompts, `--group` each,
   and score the images with the trained verifier;
2. regress V(y_k, c, k) on the final reward from every recorded state (a copy of the base, `--value-steps` Adam steps);
3. on GRPO's 128 held-out prompts x 2 noise seeds: how well V predicts the final reward per step (correlation), and
   whether what it predicts depends on the caption (V under the own caption minus its mean under distractor captions
   against the verifier's caption-specific credit r - m);
4. sample the held-out prompts steered by V at each `--scale` (1 / beta) with the base's noises, and report the paired
   change of the verifier, its caption-blind and caption-specific parts and the strict check, with 95% bootstrap
   intervals over prompts, and the steering's exact path KL (nats per sample).

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
from tilt_bound import split_change  # noqa: E402  (the sibling script; a site package owns the name `benchmarks`)

EVAL_NOISE = 20_000  # held-out noise seeds: EVAL_NOISE + seed * 1000 + batch
TRAIN_NOISE = 30_000


def training_prompts(source, count: int, held_out: list[str]) -> list[str]:
    """`count` distinct training captions; scene captions repeat (about 4% of a training draw is a held-out
    caption), so those are kept out of the training data."""
    seen = set(held_out)
    return list(dict.fromkeys(p for p in source.train(0, 4 * count) if p not in seen))[:count]


def base_rollouts(model, init: str, grid, prompts: list[str], group: int, batch: int, verifier,
                  cache: Path | None, log):
    """`group` stochastic base samples of each prompt: (rows, every state y_N..y_1 [rows, N, ...], final reward
    [rows]), read from `cache` (safetensors) if it holds these rows, else sampled (noise TRAIN_NOISE + batch index)
    and kept there."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from proxmodel.value import sample_steered

    rows = [p for p in prompts for _ in range(group)]
    meta = {"init": init, "steps": str(grid.steps), "prompts": json.dumps(rows)}
    if cache is not None and cache.exists():
        with safe_open(str(cache), "pt") as f:
            if f.metadata() == meta:
                saved = load_file(cache)
                log(f"rollouts read from {cache}")
                return rows, saved["states"], saved["rewards"]
    ctx = model.encode_text(model.tokenize(prompts))
    states, rewards = [], []
    with torch.no_grad():
        for b, first in enumerate(range(0, len(rows), batch)):
            idx = list(range(first, min(first + batch, len(rows))))
            out = sample_steered(model, None, ctx[[i // group for i in idx]], model.sample_shape(len(idx)), grid, 0.0,
                                 generator=torch.Generator().manual_seed(TRAIN_NOISE + b))
            states.append(out.states)
            rewards.append(verifier.score(model.to_images(out.images), [rows[i] for i in idx]).float())
    states, rewards = torch.cat(states), torch.cat(rewards)
    if cache is not None:
        save_file({"states": states.contiguous(), "rewards": rewards}, cache, metadata=meta)
    return rows, states, rewards


def final_images(model, grid, last_states, contexts, batch: int):
    """x_0 = prox(y_1) of recorded trajectories, as images in [0, 1] (the sampler's last step is deterministic)."""
    import torch

    from proxmodel.model import prox_fn
    from proxmodel.sampler import hybrid_step

    with torch.no_grad():
        return torch.cat([model.to_images(hybrid_step(prox_fn(model, context=contexts[f:f + batch]),
                                                      last_states[f:f + batch], grid, 1).x)
                          for f in range(0, len(last_states), batch)])


def near_miss_labels(images, rows: list[str], verifier, relabel: int, index: dict[str, int], seed: int = 2):
    """Each image scored under `relabel` near-miss captions of its own (rewards.scenes.near_miss): the captions'
    indices [rows, relabel] (new captions are added to `index`) and the verifier's scores [rows, relabel]."""
    import torch

    from rewards.scenes import near_miss

    rng = np.random.default_rng(seed)
    others = [[near_miss(p, rng) for _ in range(relabel)] for p in rows]
    slots = torch.tensor([[index.setdefault(c, len(index)) for c in cs] for cs in others])
    labels = verifier.score(images.repeat_interleave(relabel, 0), [c for cs in others for c in cs])
    return slots, labels.view(len(rows), relabel)


def mirror_table(index: dict[str, int]):
    """The row of every caption's mirror image's caption (added to `index` where new), as a tensor over `index`."""
    import torch

    from rewards.scenes import mirror_caption

    mirrored = [mirror_caption(c) for c in list(index)]
    for c in mirrored:
        index.setdefault(c, len(index))
    return torch.tensor([index[c] for c in mirrored])


def held_out_samples(model, value, contexts: torch.Tensor, grid, scale: float, batch: int, seeds: range):
    """The held-out prompts' samples on their fixed noises (EVAL_NOISE + 1000 x seed + batch number), seed-major:
    (seed, prompt rows, sample_steered's output) per batch of `batch` prompts. value None or scale 0: the base."""
    import torch

    from proxmodel.value import sample_steered

    for seed in seeds:
        for b, first in enumerate(range(0, len(contexts), batch)):
            idx = list(range(first, min(first + batch, len(contexts))))
            yield seed, idx, sample_steered(model, value, contexts[idx], model.sample_shape(len(idx)), grid, scale,
                                            generator=torch.Generator().manual_seed(EVAL_NOISE + 1000 * seed + b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", default="builtin:scenes-base", help="checkpoint folder or builtin:NAME")
    parser.add_argument("--train-prompts", type=int, default=256)
    parser.add_argument("--group", type=int, default=8, help="base samples per training prompt")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--value", choices=["denoised", "unet"], default="denoised",
                        help="denoised: a small reward model on the frozen base's prox(y_k); unet: a copy of the base")
    parser.add_argument("--value-steps", type=int, default=3000, help="Adam steps of the value regression")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--scales", type=float, nargs="+", default=[2.0, 5.0, 10.0, 20.0],
                        help="steering strengths 1 / beta (per unit of reward)")
    parser.add_argument("--prompts", type=int, default=128, help="held-out prompts")
    parser.add_argument("--seeds", type=int, default=2, help="noise seeds per held-out prompt")
    parser.add_argument("--select", type=int, default=8,
                        help="base samples per held-out prompt to pick the best of by V (0 = skip)")
    parser.add_argument("--others", type=int, default=8, help="distractor captions for the caption split")
    parser.add_argument("--relabel", type=int, default=0,
                        help="near-miss captions each training image is also scored under (free labels; 0 = none)")
    parser.add_argument("--own-frac", type=float, default=0.5,
                        help="with --relabel: the fraction of the value's training rows read under their own caption")
    parser.add_argument("--mirror", action="store_true",
                        help="train the value on left-right mirrored rows as well (flipped state, mirrored caption)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--rollouts", type=Path, default=None,
                        help="safetensors file keeping the training rollouts between runs (read if it matches)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "value_guidance")
    args = parser.parse_args()

    import torch

    from learner.config import load_config
    from learner.main import resolve_checkpoint
    from learner.prompts import prompt_source
    from proxmodel.model import load_model
    from proxmodel.policy import Policy
    from proxmodel.value import DenoisedValue, ValueModel, state_inputs
    from safetensors.torch import save_file

    from rewards import build
    from rewards.scenes import near_miss

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.monotonic()
    source = prompt_source(load_config(None, ["seed=0"]))
    held_out = source.held_out(args.prompts)
    train_prompts = training_prompts(source, args.train_prompts, held_out)
    model = load_model(resolve_checkpoint(args.init)).eval().requires_grad_(False)
    grid = Policy.of(model, args.steps).grid
    n = args.steps
    verifier = build("compositional")
    checks = {"compositional_strict": build("compositional_strict"),
              "contrastive": build("compositional_contrastive", others=args.others)}

    def contexts(prompts: list[str]) -> torch.Tensor:
        return model.encode_text(model.tokenize(prompts))

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.0f} s] {msg}", file=sys.stderr, flush=True)

    # 1. the base's rollouts on training prompts: every state, and the final reward
    rows, states, rewards = base_rollouts(model, args.init, grid, train_prompts, args.group, args.batch, verifier,
                                          args.rollouts, log)
    train_ctx = contexts(train_prompts)
    ctx_index = torch.arange(len(rows)) // args.group
    log(f"{len(rows)} base rollouts on {len(train_prompts)} training prompts: reward {rewards.mean():.3f}")

    # 1b. free labels: each rollout's final image scored under --relabel near-miss captions as well (one attribute
    # changed or two objects' colours / shapes swapped), so the value sees how the credit of ONE image depends on its
    # caption; slot 0 of every rollout is its own caption. Captions index train_ctx (the training prompts first).
    slots = ctx_index[:, None].repeat(1, 1 + args.relabel)
    labels = rewards[:, None].repeat(1, 1 + args.relabel)
    index = {p: i for i, p in enumerate(train_prompts)}  # caption -> its row of train_ctx
    if args.relabel:
        images = final_images(model, grid, states[:, -1], train_ctx[ctx_index], args.batch)
        again = verifier.score(images, rows)
        if not torch.allclose(again, rewards):  # the cache's rewards must be these images'
            raise RuntimeError(f"final images recomputed from y_1 score {again.mean():.4f}, the rollouts "
                               f"{rewards.mean():.4f}: stale --rollouts file?")
        slots[:, 1:], labels[:, 1:] = near_miss_labels(images, rows, verifier, args.relabel, index)
        log(f"{len(index) - len(train_prompts)} near-miss captions: label mean {labels[:, 1:].mean():.3f} "
            f"(own {rewards.mean():.3f}); "
            f"a near miss scores below the own caption on {(labels[:, 1:] < rewards[:, None]).float().mean():.0%}, "
            f"above on {(labels[:, 1:] > rewards[:, None]).float().mean():.0%}")
    if args.mirror:  # the left-right mirror of a row is a row: the verifier scores it under the mirrored caption alike
        mirror_of = mirror_table(index)
    extra = list(index)[len(train_prompts):]
    train_ctx = torch.cat([train_ctx] + [contexts(extra[f:f + 1024]) for f in range(0, len(extra), 1024)])

    # 2. the value: V(y_k, c, k) regressed on the final reward from every state the steering reads (k < n)
    if args.value == "unet":
        value = ValueModel(model).train()
        with torch.no_grad():  # V starts at the mean reward; the head's scale grows at its own rate (one scalar)
            value.head.weight.zero_()
            value.head.bias.fill_(float(rewards.mean()))
        groups = [{"params": [p for p in value.model.parameters() if p.requires_grad]},
                  {"params": list(value.head.parameters()), "lr": 1e-2}]
        denoised = None
    else:
        value = DenoisedValue(model, n).train()
        with torch.no_grad():
            value.out[-1].bias.fill_(float(rewards.mean()))
            denoised = torch.zeros_like(states)  # prox_0(y_k) of every recorded state, computed once
            for j in range(1, n):
                t, lam = state_inputs(grid, n - j, args.batch, "cpu")
                for f in range(0, len(rows), args.batch):
                    sl = slice(f, min(f + args.batch, len(rows)))
                    size = sl.stop - sl.start
                    denoised[sl, j] = value.denoise(states[sl, j], t[:size], lam[:size], train_ctx[ctx_index[sl]])
        log("denoised estimates of every training state computed")
        groups = [{"params": list(value.parameters())}]
    trainable = [p for g in groups for p in g["params"]]
    opt = torch.optim.Adam(groups, lr=args.lr)
    gen = torch.Generator().manual_seed(1)
    # (t, lam) of the state y_k, indexed by k (k = 0 is never trained: no transition leaves the image)
    t_of, lam_of = (torch.cat([torch.zeros(1), torch.cat(column)]) for column in
                    zip(*(state_inputs(grid, k, 1, "cpu") for k in range(1, n + 1))))
    losses = []
    for step in range(args.value_steps):
        i = torch.randint(len(rows), (args.batch,), generator=gen)
        j = torch.randint(1, n, (args.batch,), generator=gen)
        k = n - j
        m = torch.randint(1, 1 + args.relabel, (args.batch,), generator=gen) if args.relabel else torch.zeros_like(i)
        m[torch.rand(args.batch, generator=gen) < args.own_frac] = 0
        y, c = states[i, j], slots[i, m]
        x = None if denoised is None else denoised[i, j]  # the base's prox under the own caption
        if args.mirror:
            flip = torch.rand(args.batch, generator=gen) < 0.5
            y, c = torch.where(flip[:, None, None, None], y.flip(-1), y), torch.where(flip, mirror_of[c], c)
            x = None if x is None else torch.where(flip[:, None, None, None], x.flip(-1), x)
        pred = value(y, t_of[k], lam_of[k], train_ctx[c], k, **({} if x is None else {"denoised": x}))
        loss = (pred - labels[i, m]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 200 == 0:
            log(f"value step {step + 1}: mse {np.mean(losses[-200:]):.4f} (reward variance {rewards.var():.4f})")
    value.eval().requires_grad_(False)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in value.state_dict().items()}, args.out / "value.safetensors")

    # 3-4. held-out: the base (scale 0) and the steered samplers on the same noises
    held_ctx = contexts(held_out)
    batches = [list(range(f, min(f + args.batch, len(held_out)))) for f in range(0, len(held_out), args.batch)]

    def run(scale: float, seeds: int, first: int = 0) -> dict:
        """Noise seeds first..seeds-1 of every held-out prompt: scores and KL [prompts, seed], states seed-major."""
        scores = {name: np.zeros((len(held_out), seeds - first)) for name in ["compositional", *checks]}
        kl = np.zeros((len(held_out), seeds - first))
        kept = []
        for seed, idx, out in held_out_samples(model, value, held_ctx, grid, scale, args.batch, range(first, seeds)):
            images, prompts = model.to_images(out.images), [held_out[i] for i in idx]
            scores["compositional"][idx, seed - first] = verifier.score(images, prompts).double().numpy()
            for name, check in checks.items():
                scores[name][idx, seed - first] = check.score(images, prompts).double().numpy()
            kl[idx, seed - first] = out.kl.sum(1).double().numpy()
            kept.append((out.states, images))
        return {"scores": scores, "kl": kl, "states": torch.cat([x for x, _ in kept]),
                "images": torch.cat([x for _, x in kept])}

    base = run(0.0, args.seeds)
    log(f"held-out base: verifier {base['scores']['compositional'].mean():.3f}")

    # how well V predicts, per step, and whether its prediction depends on the caption
    r = torch.from_numpy(base["scores"]["compositional"].T.reshape(-1)).float()  # seed-major, like `states`
    specific = torch.from_numpy(base["scores"]["contrastive"].T.reshape(-1)).float()
    order = [i for _ in range(args.seeds) for b in batches for i in b]
    own = held_ctx[order]
    rng = np.random.default_rng(0)
    others = [rng.choice([p for p in range(len(held_out)) if held_out[p] != held_out[i]], size=args.others,
                         replace=False) for i in order]
    near_rng = np.random.default_rng(3)
    near_captions = [[near_miss(held_out[i], near_rng) for i in order] for _ in range(4)]
    near_rewards = [verifier.score(base["images"], near).float() for near in near_captions]
    prediction = []
    with torch.no_grad():
        for j in range(1, n):
            t, lam = state_inputs(grid, n - j, len(order), "cpu")
            k = torch.full((len(order),), n - j, dtype=torch.long)
            v = value(base["states"][:, j], t, lam, own, k)
            row = {"k": n - j, "corr_reward": float(np.corrcoef(v, r)[0, 1])}
            if j in (n // 2, n - 1):
                v_other = torch.stack([value(base["states"][:, j], t, lam, held_ctx[[o[d] for o in others]], k)
                                       for d in range(args.others)]).mean(0)
                row["corr_caption_specific"] = float(np.corrcoef(v - v_other, specific)[0, 1])
                # binding: of the image's own caption and a near miss that the verifier scores differently, does V
                # prefer the one the verifier prefers? (chance 0.5; V reads both on the base's prox under the own
                # caption, as in its training rows)
                read = {"denoised": value.denoise(base["states"][:, j], t, lam, own)} \
                    if isinstance(value, DenoisedValue) else {}
                v_own = value(base["states"][:, j], t, lam, own, k, **read)
                right = []
                for near, r_near in zip(near_captions, near_rewards):
                    v_near = value(base["states"][:, j], t, lam, contexts(near), k, **read)
                    differ = r_near != r
                    right.append(((v_own - v_near).sign() == (r - r_near).sign())[differ].double().numpy())
                row["binding"] = bootstrap_ci(np.concatenate(right)).as_dict()
            prediction.append(row)
    log("value prediction: " + ", ".join(f"k={p['k']}: {p['corr_reward']:.2f}" for p in prediction)
        + "; binding accuracy " + ", ".join(f"k={p['k']}: {p['binding']['mean']:.2f}" for p in prediction
                                            if "binding" in p))

    results, lines = {}, []
    before = {name: s for name, s in base["scores"].items()}
    for scale in args.scales:
        steered = run(scale, args.seeds)
        change = split_change(before, steered["scores"])
        path_kl = bootstrap_ci(steered["kl"])
        results[scale] = {"change": {k: e.as_dict() for k, e in change.items()}, "path_kl": path_kl.as_dict(),
                          "verifier": float(steered["scores"]["compositional"].mean())}
        log(f"scale {scale:g}: {change['verifier']} verifier change, path KL {path_kl.mean:.3g} nats")
        fmt = lambda e: f"{e.mean:+.3f} [{e.low:+.3f}, {e.high:+.3f}]"  # noqa: E731
        lines.append(f"| {scale:g} | {path_kl.mean:.3g} | {steered['scores']['compositional'].mean():.3f} | "
                     + " | ".join(fmt(change[k]) for k in ["verifier", "any caption", "caption-specific",
                                                          "strict check"]) + " |")

    selection = []
    if args.select:  # the value as a ranking: of K base samples per prompt keep the one V rates best at y_1
        pool = {"scores": {k: v[:, :args.select] for k, v in base["scores"].items()},  # the base's seeds come first
                "states": base["states"][:args.select * len(held_out)]}
        if args.select > args.seeds:
            extra = run(0.0, args.select, first=args.seeds)
            pool = {"scores": {k: np.hstack([v, extra["scores"][k]]) for k, v in pool["scores"].items()},
                    "states": torch.cat([pool["states"], extra["states"]])}
        t, lam = state_inputs(grid, 1, len(held_out), "cpu")
        k = torch.ones(len(held_out), dtype=torch.long)
        with torch.no_grad():
            v = torch.stack([value(pool["states"][s * len(held_out):(s + 1) * len(held_out), n - 1], t, lam,
                                   held_ctx, k) for s in range(args.select)], 1)
        pick = v.argmax(1).numpy()
        rows_ = np.arange(len(held_out))
        bound = float(np.log(args.select) - (args.select - 1) / args.select)
        lines += ["", f"The value as a ranking: best of {args.select} base samples per held-out prompt by V(y_1), "
                  f"against a random one of them (KL <= {bound:.2f} nats), and by the verifier itself (the oracle):",
                  "", "| score | a random sample | best by V: change | best by the verifier: change |",
                  "|---|---|---|---|"]
        for name, label in [("compositional", "verifier"), ("contrastive", "caption-specific part"),
                            ("compositional_strict", "strict check")]:
            sc = pool["scores"][name]
            oracle = sc[rows_, pool["scores"]["compositional"].argmax(1)]
            by_value, by_oracle = bootstrap_ci(sc[rows_, pick] - sc.mean(1)), bootstrap_ci(oracle - sc.mean(1))
            selection.append({"score": label, "by_value": by_value.as_dict(), "by_verifier": by_oracle.as_dict()})
            lines.append(f"| {label} | {sc.mean():.3f} | {by_value.mean:+.3f} [{by_value.low:+.3f}, "
                         f"{by_value.high:+.3f}] | {by_oracle.mean:+.3f} [{by_oracle.low:+.3f}, "
                         f"{by_oracle.high:+.3f}] |")
        log(f"selection by V of {args.select}: {selection[0]['by_value']}")
        # the same ranking on the training prompts' own rollouts: what V learned about prompts it saw
        with torch.no_grad():
            t, lam = state_inputs(grid, 1, len(rows), "cpu")
            ones = torch.ones(len(rows), dtype=torch.long)
            extra = {} if denoised is None else {"denoised": denoised[:, n - 1]}
            seen = value(states[:, n - 1], t, lam, train_ctx[ctx_index], ones, **extra).view(-1, args.group).numpy()
        r_seen = rewards.view(-1, args.group).double().numpy()
        picked = r_seen[np.arange(len(r_seen)), seen.argmax(1)]
        on_train = {"random": float(r_seen.mean()), "by_value": bootstrap_ci(picked - r_seen.mean(1)).as_dict(),
                    "by_verifier": bootstrap_ci(r_seen.max(1) - r_seen.mean(1)).as_dict()}
        selection.append({"score": "verifier, training prompts", **on_train})
        lines.append(f"| verifier, on the {len(r_seen)} TRAINING prompts' own {args.group} rollouts | "
                     f"{r_seen.mean():.3f} | {on_train['by_value']['mean']:+.3f} [{on_train['by_value']['ci_low']:+.3f}, "
                     f"{on_train['by_value']['ci_high']:+.3f}] | {on_train['by_verifier']['mean']:+.3f} |")

    relabelled = (f", each image also labelled under {args.relabel} near-miss captions, own caption in "
                  f"{args.own_frac:.0%} of the rows" if args.relabel else "")
    relabelled += ", half the rows mirrored" if args.mirror else ""
    header = [
        f"`{args.init}`, value regressed on {len(rows)} base rollouts ({len(train_prompts)} training prompts x "
        f"{args.group}{relabelled}; {args.value_steps} Adam steps of {args.batch}, lr {args.lr:g}); held out: {len(held_out)} "
        f"prompts x {args.seeds} noise seeds, steered and base on the same noises; 95% bootstrap intervals over "
        f"prompts. Base verifier {base['scores']['compositional'].mean():.3f}, strict "
        f"{base['scores']['compositional_strict'].mean():.3f}.", "",
        "Value prediction on the held-out base trajectories (correlation with the final reward, by state y_k; "
        "caption-specific: V(own) - mean V(distractors) against r - m):", "",
        "| k | " + " | ".join(str(p["k"]) for p in prediction) + " |",
        "|---|" + "---|" * len(prediction),
        "| corr(V, r) | " + " | ".join(f"{p['corr_reward']:.2f}" for p in prediction) + " |",
        "| caption-specific | " + " | ".join(f"{p['corr_caption_specific']:.2f}" if "corr_caption_specific" in p
                                           else "-" for p in prediction) + " |",
        "| binding (own vs near miss) | " + " | ".join(
            f"{p['binding']['mean']:.2f} [{p['binding']['ci_low']:.2f}, {p['binding']['ci_high']:.2f}]"
            if "binding" in p else "-" for p in prediction) + " |", "",
        "Binding: of an image's own caption and a near miss (one attribute changed or two objects' colours / shapes "
        "swapped) that the verifier scores differently, the fraction where V prefers the verifier's choice (chance "
        "0.5).", "",
        "| scale (1 / beta) | path KL (nats) | verifier | change | caption-blind part | caption-specific part | "
        "strict check change |", "|---|---|---|---|---|---|---|",
    ]
    text = "\n".join(header + lines) + f"\n\nTotal time {time.monotonic() - started:.0f} s.\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "value_guidance.md").write_text(text)
    (args.out / "value_guidance.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "train_reward": float(rewards.mean()),
         "value_mse_last100": float(np.mean(losses[-100:])) if losses else None,
         "prediction": prediction, "scales": {str(k): v for k, v in results.items()}, "selection": selection}, indent=1) + "\n")


if __name__ == "__main__":
    main()
