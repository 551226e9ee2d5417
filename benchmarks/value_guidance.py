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
    from proxmodel.value import DenoisedValue, ValueModel, sample_steered, state_inputs
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from rewards import build

    def safe_open_meta(path: Path) -> dict:
        with safe_open(str(path), "pt") as f:
            return f.metadata()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.monotonic()
    source = prompt_source(load_config(None, ["seed=0"]))
    held_out = source.held_out(args.prompts)
    # scene captions repeat (about 4% of a training draw is a held-out caption): keep those out of the value's data
    seen_held_out = set(held_out)
    pool = [p for p in source.train(0, 4 * args.train_prompts) if p not in seen_held_out]
    train_prompts = list(dict.fromkeys(pool))[:args.train_prompts]
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
    rows = [p for p in train_prompts for _ in range(args.group)]
    train_ctx = contexts(train_prompts)
    meta = {"init": args.init, "steps": str(n), "prompts": json.dumps(rows)}
    if args.rollouts is not None and args.rollouts.exists() and safe_open_meta(args.rollouts) == meta:
        saved = load_file(args.rollouts)
        states, rewards = saved["states"], saved["rewards"]
        log(f"rollouts read from {args.rollouts}")
    else:
        states, rewards = [], []
        with torch.no_grad():
            for b, first in enumerate(range(0, len(rows), args.batch)):
                idx = list(range(first, min(first + args.batch, len(rows))))
                out = sample_steered(model, None, train_ctx[[i // args.group for i in idx]],
                                     model.sample_shape(len(idx)), grid, 0.0,
                                     generator=torch.Generator().manual_seed(TRAIN_NOISE + b))
                states.append(out.states)
                rewards.append(verifier.score(model.to_images(out.images), [rows[i] for i in idx]).float())
        states, rewards = torch.cat(states), torch.cat(rewards)
        if args.rollouts is not None:
            save_file({"states": states.contiguous(), "rewards": rewards}, args.rollouts, metadata=meta)
    ctx_index = torch.arange(len(rows)) // args.group
    log(f"{len(rows)} base rollouts on {len(train_prompts)} training prompts: reward {rewards.mean():.3f}")

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
        kwargs = {} if denoised is None else {"denoised": denoised[i, j]}
        pred = value(states[i, j], t_of[k], lam_of[k], train_ctx[ctx_index[i]], k, **kwargs)
        loss = (pred - rewards[i]).pow(2).mean()
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

    def run(scale: float, seeds: int) -> dict:
        scores = {name: np.zeros((len(held_out), seeds)) for name in ["compositional", *checks]}
        kl = np.zeros((len(held_out), seeds))
        kept = []
        for seed in range(seeds):
            for b, idx in enumerate(batches):
                out = sample_steered(model, value, held_ctx[idx], model.sample_shape(len(idx)), grid, scale,
                                     generator=torch.Generator().manual_seed(EVAL_NOISE + 1000 * seed + b))
                images, prompts = model.to_images(out.images), [held_out[i] for i in idx]
                scores["compositional"][idx, seed] = verifier.score(images, prompts).double().numpy()
                for name, check in checks.items():
                    scores[name][idx, seed] = check.score(images, prompts).double().numpy()
                kl[idx, seed] = out.kl.sum(1).double().numpy()
                kept.append(out.states)
        return {"scores": scores, "kl": kl, "states": torch.cat(kept)}

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
            prediction.append(row)
    log("value prediction: " + ", ".join(f"k={p['k']}: {p['corr_reward']:.2f}" for p in prediction))

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
        pool = run(0.0, args.select)
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

    header = [
        f"`{args.init}`, value regressed on {len(rows)} base rollouts ({len(train_prompts)} training prompts x "
        f"{args.group}; {args.value_steps} Adam steps of {args.batch}, lr {args.lr:g}); held out: {len(held_out)} "
        f"prompts x {args.seeds} noise seeds, steered and base on the same noises; 95% bootstrap intervals over "
        f"prompts. Base verifier {base['scores']['compositional'].mean():.3f}, strict "
        f"{base['scores']['compositional_strict'].mean():.3f}.", "",
        "Value prediction on the held-out base trajectories (correlation with the final reward, by state y_k; "
        "caption-specific: V(own) - mean V(distractors) against r - m):", "",
        "| k | " + " | ".join(str(p["k"]) for p in prediction) + " |",
        "|---|" + "---|" * len(prediction),
        "| corr(V, r) | " + " | ".join(f"{p['corr_reward']:.2f}" for p in prediction) + " |",
        "| caption-specific | " + " | ".join(f"{p['corr_caption_specific']:.2f}" if "corr_caption_specific" in p
                                           else "-" for p in prediction) + " |", "",
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
