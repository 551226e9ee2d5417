"""Throughput: where a GRPO iteration's seconds go, and how close each phase runs to this machine's limit.

    python benchmarks/throughput.py [--quick] [--iterations 6] [--threads N] [--out benchmarks/results/throughput]

Kernels, in this process, on the default config's model (`builtin:scenes-base`) and shapes:
  - the same-run peak: a float32 matmul (2048^3) and a 3x3 convolution at the U-Net's widest shape, so every
    achieved rate below is also a ratio to what this machine does at that moment;
  - model FLOPs (torch.utils.flop_counter) per image per sampler step and per learner transition (re-scoring and
    backward of the policy, plus the KL reference's forward);
  - the sampler's images/s and achieved FLOP/s against the batch (group size x prompts per call) and the number of
    steps: is the cost linear in both?
  - the learner's recomputation per group (the rollout's batch shape, which keeps the first ratio exact) against one
    call on the whole batch; the optimiser step; the reward per image; one group's Redis hop (write, read, ack).
The system, through the real CLI (`python -m learner.main --mode grpo`, `grpo.iterations=K`, no mid-run evaluation):
per-phase seconds of an iteration from MLflow (median over the iterations after the first two), and rollout images/s
with 1 and 2 real rollout actors (Ray, a real reward actor and Redis) with no learner running.

Prints markdown tables, writes them with a JSON of every number and a plot to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PHASES = ("rollout_s", "sample_s", "reward_s", "update_s", "publish_s")


def seconds(fn: Callable[[], object], min_total_s: float = 1.0, repeats: int = 3) -> float:
    """Median over `repeats` of the mean time of one call, each repeat running for at least min_total_s."""
    fn()  # warm-up (allocations, lazy inits)
    times = []
    for _ in range(repeats):
        n, start = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_total_s:
                break
        times.append(elapsed / n)
    return statistics.median(times)


def flops(fn: Callable[[], object]) -> int:
    """Model FLOPs of one call (matmuls, convolutions, attention; torch's count, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peaks(channels: int, side: int, quick: bool) -> dict[str, float]:
    """GFLOP/s of a float32 matmul and of the model's widest 3x3 convolution, measured now."""
    n = 1024 if quick else 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    matmul = 2 * n**3 / seconds(lambda: a @ b) / 1e9
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1).eval()
    x = torch.randn(64, channels, side, side)
    with torch.no_grad():
        conv_flops = flops(lambda: conv(x))
        conv_rate = conv_flops / seconds(lambda: conv(x)) / 1e9
    return {"matmul_gflops": matmul, "conv_gflops": conv_rate, "conv_shape": f"3x3, {channels} ch, {side}x{side}, batch 64"}


class Kernels:
    """The default config's model, policy and reward, measured piece by piece."""

    def __init__(self, quick: bool):
        from learner.config import load_config
        from proxmodel.model import load_model
        from proxmodel.policy import Policy
        from rewards import build

        self.cfg = load_config(ROOT / "configs" / "default.yaml")
        g = self.cfg.grpo
        self.model = load_model(ROOT / "proxmodel" / "weights" / "scenes-base").eval()
        self.reference = load_model(ROOT / "proxmodel" / "weights" / "scenes-base").eval().requires_grad_(False)
        self.model.text.requires_grad_(False)  # GRPO's default: the text encoder is frozen
        self.steps, self.group = g.steps, g.group_size
        self.policy = Policy.of(self.model, g.steps, g.eta, g.guidance)
        self.reward = build("compositional")
        self.quick = quick
        from learner.prompts import prompt_source

        self.prompts = prompt_source(self.cfg).held_out(max(64, g.prompts_per_iteration * 8))

    def condition(self, batch: int, prompt_offset: int = 0) -> dict[str, torch.Tensor]:
        prompts = [self.prompts[(prompt_offset + i // self.group) % len(self.prompts)] for i in range(batch)]
        return {"tokens": self.model.tokenize(prompts)}

    def sample(self, batch: int, steps: int, model: torch.nn.Module | None = None):
        """A sampler call of `batch` images in `steps` steps with `model` (default: the float32 base)."""
        model = model or self.model
        policy = dataclasses.replace(self.policy, steps=steps)
        cond = self.condition(batch)
        gen = torch.Generator().manual_seed(0)
        return lambda: policy.sample(model, cond, model.sample_shape(batch), gen)

    def sampler_rows(self) -> list[dict]:
        """images/s and achieved GFLOP/s of whole sampler calls (text encoding included) against batch and steps."""
        rows = []
        batches = (8, 48) if self.quick else (4, 8, 16, 48, 96)
        settings = [(b, self.steps) for b in batches] + [(self.group, s) for s in (5, 20)]
        for batch, steps in settings:
            call = self.sample(batch, steps)
            f = flops(call)
            t = seconds(call, min_total_s=0.5 if self.quick else 2.0)
            rows.append({"batch": batch, "steps": steps, "s_per_call": t, "images_per_s": batch / t,
                         "image_steps_per_s": batch * steps / t, "gflop_per_image_step": f / batch / steps / 1e9,
                         "gflops": f / t / 1e9})
        return rows

    def variant_rows(self) -> list[dict]:
        """One group's 10-step sampler call in other layouts and precisions than the float32 default: does it pay?"""
        import copy

        rows = []
        for name in ("float32 (default)", "channels_last", "bfloat16"):
            model = copy.deepcopy(self.model)
            if name == "channels_last":
                model = model.to(memory_format=torch.channels_last)
            elif name == "bfloat16":
                model = model.to(torch.bfloat16)
            t = seconds(self.sample(self.group, self.steps, model), min_total_s=0.5 if self.quick else 2.0)
            rows.append({"variant": name, "s_per_call": t, "images_per_s": self.group / t})
        return rows

    def learner_rows(self, prompts: int) -> dict:
        """One trained transition over `prompts` groups: re-scored group by group (the rollout's shapes; what the
        learner does) vs in one call, each with the KL reference's forward and the backward; the optimiser step."""
        from learner.grpo_learner import TrainGroup, transition_loss

        g = self.cfg.grpo
        j = self.steps // 2
        groups = []
        for p in range(prompts):
            tr = self.sample(self.group, self.steps)()
            groups.append(TrainGroup(self.condition(self.group, p)["tokens"], tr.images, tr.states, tr.log_probs,
                                     torch.randn(self.group)))

        def step(batch):  # the learner's own loss: clipped policy loss + kl_coef x KL to the reference
            self.model.zero_grad(set_to_none=True)
            transition_loss(self.model, self.reference, self.policy, batch, j, g.clip_range, g.kl_coef)[0].backward()

        whole = [TrainGroup(*(torch.cat([getattr(b, f) for b in groups]) for f in
                              ("tokens", "samples", "states", "log_probs", "advantages")))]

        def per_group():
            step(groups)

        def batched():
            step(whole)

        params = [p for p in self.model.parameters() if p.requires_grad]
        optimiser = torch.optim.AdamW(params, lr=1e-12)
        per_group()

        out = {}
        for name, call in (("per_group", per_group), ("batched", batched)):
            f = flops(call)
            t = seconds(call, min_total_s=0.5 if self.quick else 2.0)
            out[name] = {"s": t, "gflop": f / 1e9, "gflops": f / t / 1e9,
                         "gflop_per_image": f / (prompts * self.group) / 1e9}
        out["optimiser_step_s"] = seconds(optimiser.step, min_total_s=0.5)
        out["trained_transitions"] = self.steps - 1
        out["trained_parameters"] = sum(p.numel() for p in params)
        return out

    def reward_s_per_image(self) -> float:
        with torch.no_grad():
            images = self.model.to_images(self.sample(48, self.steps)().images)
        texts = [self.prompts[i // self.group] for i in range(48)]
        return seconds(lambda: self.reward.score(images, texts), min_total_s=0.5) / 48

    def redis_hop_s(self) -> dict[str, float]:
        """One group with its trajectory: written, read by a learner consumer and acknowledged (real Redis)."""
        from actors.experience import Group, SamplerSpec
        from actors.stream import EmbeddedRedis, ExperienceStream

        tr = self.sample(self.group, self.steps)()
        group = Group(self.prompts[0], 0, 0, 0, SamplerSpec.of(self.policy), scores={"compositional": torch.rand(self.group)},
                      weights={"compositional": 1.0}, samples=tr.images.float(), states=tr.states, log_probs=tr.log_probs)
        with EmbeddedRedis() as server:
            stream = ExperienceStream(server.address, "throughput")
            stream.create()

            written = itertools.count()

            def hop():  # a new iteration each time: the reader skips a group it has already returned
                stream.add(dataclasses.replace(group, iteration=next(written)))
                ids = [entry_id for entry_id, _ in stream.read("rank0", 1, timeout_s=10)]
                stream.ack(ids)
                stream.trim()

            t = seconds(hop, min_total_s=0.5)
        return {"s_per_group": t, "mb_per_group": sum(len(v) for v in group.to_wire().values()) / 2**20}


def grpo_phases(iterations: int, threads: int, scratch: Path, overrides: list[str] = ()) -> dict:
    """The real CLI run (with `overrides`): per-phase median seconds after the first two iterations, the run's totals
    and its training reward per iteration."""
    from mlflow.tracking import MlflowClient

    scratch.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{scratch / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "learner.main", "--mode", "grpo", f"run_dir={scratch / 'grpo'}",
           f"mlflow.tracking_uri={uri}", "mlflow.experiment=benchmark-throughput", f"grpo.iterations={iterations}",
           "grpo.eval_every=0", "grpo.eval_prompts=8", "grpo.eval_seeds=1", f"actors.torch_threads={threads}",
           *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    total = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"the GRPO run failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())
    client = MlflowClient(uri)
    history = {k: [m.value for m in sorted(client.get_metric_history(summary["mlflow_run_id"], k), key=lambda m: m.step)]
               for k in (*PHASES, "reward_mean")}
    rewards = history.pop("reward_mean")
    steady = {k: statistics.median(v[2:] or v) for k, v in history.items() if v}
    return {"per_iteration_s": steady, "first_iteration_s": {k: v[0] for k, v in history.items() if v},
            "loop_s": summary["wall_time_s"], "process_s": total, "iterations": iterations,
            "images_per_s": summary["samples_per_s"], "reward_mean": rewards, "overrides": list(overrides)}


def rollout_scaling(counts: tuple[int, ...], threads: int, calls: int) -> list[dict]:
    """Rollout images/s with n real rollout actors sharing the machine, no learner: each actor samples, has scored
    and streams one iteration's prompts (divided among the actors) per call."""
    import ray

    from actors.checkpoint import pack
    from actors.reward import RewardActor
    from actors.rollout import RolloutActor
    from actors.stream import EmbeddedRedis, ExperienceStream
    from learner.config import load_config
    from learner.prompts import prompt_source

    cfg = load_config(ROOT / "configs" / "default.yaml")
    g, a = cfg.grpo, cfg.actors
    prompts = prompt_source(cfg).held_out(g.prompts_per_iteration * calls)
    rows = []
    ray.init(num_cpus=max(counts) + 1, include_dashboard=False, log_to_driver=False)
    try:
        with EmbeddedRedis() as server:
            packed = ray.put(pack(ROOT / "proxmodel" / "weights" / "scenes-base"))
            reward = ray.remote(RewardActor).options(num_cpus=0.5).remote([{"name": "compositional"}],
                                                                            a.reward.batch_size, threads)
            for n in counts:
                run_id = f"scaling{n}"
                ExperienceStream(server.address, run_id).create()
                actors = [ray.remote(RolloutActor).options(num_cpus=1).remote(
                    packed, g.steps, g.group_size, g.eta, g.guidance, [reward], {"compositional": 1.0}, 120.0, 0,
                    server.address, run_id, threads) for _ in range(n)]
                ray.get([r.placement.remote() for r in actors])

                def one_call(c: int) -> list:
                    share = prompts[c * g.prompts_per_iteration:(c + 1) * g.prompts_per_iteration]
                    return [r.rollout.remote(share[i::n], list(range(len(share)))[i::n], c, 0)
                            for i, r in enumerate(actors)]

                ray.get(one_call(0))  # warm-up
                start = time.perf_counter()
                for c in range(1, calls):
                    ray.get(one_call(c))
                elapsed = time.perf_counter() - start
                images = (calls - 1) * g.prompts_per_iteration * g.group_size
                rows.append({"actors": n, "threads_per_actor": threads, "images_per_s": images / elapsed})
                for r in actors:
                    ray.kill(r)
    finally:
        ray.shutdown()
    base = rows[0]["images_per_s"]
    for r in rows:
        r["speedup"] = r["images_per_s"] / base
    return rows


def predicted(k: dict) -> dict[str, float]:
    """One default iteration's phases from the kernels: the rollout's per-group sampler calls, and the learner's
    re-scoring in the configured `grpo.recompute` shape (one call over all groups, or group by group)."""
    per_group_call = next(r for r in k["sampler"] if r["batch"] == k["group"] and r["steps"] == k["steps"])
    learner = k["learner"]["batched" if k.get("recompute", "group") == "batch" else "per_group"]
    return {
        "sample_s": k["learner_prompts"] * per_group_call["s_per_call"],
        "reward_s": k["learner_prompts"] * k["group"] * k["reward_s_per_image"],
        "learner_s": k["learner"]["trained_transitions"] * learner["s"],
        "redis_s": k["learner_prompts"] * k["redis"]["s_per_group"],
    }


def tables(result: dict) -> str:
    peak, k = result["peak"], result["kernels"]
    conv = peak["conv_gflops"]
    lines = [
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, torch {result['machine']['torch']}, "
        f"{result['machine']['threads']} torch threads in this process.",
        f"Same-run peak: matmul {peak['matmul_gflops']:.0f} GFLOP/s (float32), convolution {conv:.0f} GFLOP/s "
        f"({peak['conv_shape']}; {peak['conv_gflops_after']:.0f} again after the kernels).",
        "",
        "| sampler call (text encoding included) | batch | steps | s per call | images/s | GFLOP per image-step | "
        "GFLOP/s | of the conv peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in k["sampler"]:
        lines.append(f"| | {r['batch']} | {r['steps']} | {r['s_per_call']:.3f} | {r['images_per_s']:.1f} | "
                     f"{r['gflop_per_image_step']:.3f} | {r['gflops']:.1f} | {r['gflops'] / conv:.0%} |")
    base = k["variants"][0]["s_per_call"]
    lines += ["", f"| sampler call, batch {k['group']}, {k['steps']} steps | s per call | images/s | speed-up |",
              "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['s_per_call']:.3f} | {r['images_per_s']:.1f} | {base / r['s_per_call']:.2f}x |"
              for r in k["variants"]]
    ln = k["learner"]
    lines += ["", f"| learner: one trained transition of {k['learner_prompts']} groups x {k['group']} (policy forward + "
              "backward, reference forward) | s | GFLOP | GFLOP/s | of the conv peak |", "|---|---|---|---|---|"]
    for name in ("per_group", "batched"):
        r = ln[name]
        label = "group by group (the rollout's shapes: first ratio exact)" if name == "per_group" else "one call"
        lines.append(f"| {label} | {r['s']:.3f} | {r['gflop']:.2f} | {r['gflops']:.1f} | {r['gflops'] / conv:.0%} |")
    lines += ["", f"Optimiser step (AdamW, {ln['trained_parameters']:,} trained parameters): {ln['optimiser_step_s'] * 1e3:.1f} ms. "
              f"Reward (compositional verifier): {k['reward_s_per_image'] * 1e3:.2f} ms per image. Redis hop of one group "
              f"with its trajectory ({k['redis']['mb_per_group']:.2f} MB: write, read, ack): "
              f"{k['redis']['s_per_group'] * 1e3:.1f} ms."]
    if "grpo" in result:
        k["predicted"] = predicted(k)
        s = result["grpo"]
        it = s["per_iteration_s"]
        iteration = it["rollout_s"] + it["update_s"] + it.get("publish_s", 0.0)
        model = {  # what the kernels above predict for one iteration of the default config
            "sample": k["predicted"]["sample_s"], "reward": k["predicted"]["reward_s"],
            "learner forward/backward": k["predicted"]["learner_s"], "optimiser step": ln["optimiser_step_s"],
            "Redis hops": k["predicted"]["redis_s"],
        }
        b = result.get("grpo_before")
        bit = b["per_iteration_s"] if b else None
        before_head = f" before ({', '.join(b['overrides'])}) | speed-up |" if b else ""
        lines += ["", f"| GRPO iteration ({s['iterations']} iterations, median after the first two; first iteration "
                  f"{sum(s['first_iteration_s'].get(p, 0) for p in ('rollout_s', 'update_s', 'publish_s')):.1f} s) | "
                  f"seconds | share |{before_head}", "|---|---|---|" + ("---|---|" if b else "")]
        for name in ("rollout_s", "sample_s", "reward_s", "update_s", "publish_s"):
            if name in it:
                extra = f" {bit[name]:.2f} | {bit[name] / it[name]:.2f}x |" if b and name in bit else (" | |" if b else "")
                lines.append(f"| {name[:-2]}{' (inside rollout)' if name in ('sample_s', 'reward_s') else ''} | "
                             f"{it[name]:.2f} | {it[name] / iteration:.0%} |{extra}")
        if b:
            before = sum(bit.get(p, 0.0) for p in ("rollout_s", "update_s", "publish_s"))
            lines.append(f"| iteration | {iteration:.2f} | 100% | {before:.2f} | {before / iteration:.2f}x |")
            diff = max(abs(x - y) for x, y in zip(s["reward_mean"], b["reward_mean"]))
            same = "is identical in both runs" if diff == 0 else f"differs between the runs by at most {diff:.2g}"
            lines += ["", f"Same seed: the training reward of every iteration {same} "
                      f"(rewards {min(s['reward_mean']):.3f}-{max(s['reward_mean']):.3f})."]
        else:
            lines.append(f"| iteration | {iteration:.2f} | 100% |")
        lines += ["", "Predicted from the kernels (same process, no Ray): " +
                  ", ".join(f"{n} {v:.2f} s" for n, v in model.items()) +
                  f"; the Redis hops are {model['Redis hops'] / iteration:.1%} of the iteration."]
    if "scaling" in result:
        lines += ["", "| rollout actors (no learner) | threads each | images/s | speed-up |", "|---|---|---|---|"]
        for r in result["scaling"]:
            lines.append(f"| {r['actors']} | {r['threads_per_actor']} | {r['images_per_s']:.2f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conv = result["peak"]["conv_gflops"]
    rows = [r for r in result["kernels"]["sampler"] if r["steps"] == result["kernels"]["steps"]]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax.plot([r["batch"] for r in rows], [r["gflops"] / conv for r in rows], "o-", label="sampler")
    ln = result["kernels"]["learner"]
    ax.axhline(ln["per_group"]["gflops"] / conv, color="C1", ls="--", label="learner, group by group")
    ax.axhline(ln["batched"]["gflops"] / conv, color="C2", ls=":", label="learner, one call")
    ax.axhline(0.6, color="grey", lw=0.8)
    ax.set(xscale="log", xlabel="images per sampler call", ylabel="achieved / same-run conv peak",
           title="How close to the machine's limit")
    ax.legend(fontsize=8)
    if "grpo" in result:
        it = result["grpo"]["per_iteration_s"]
        names = ["sample_s", "reward_s", "update_s", "publish_s"]
        other = it["rollout_s"] - it.get("sample_s", 0) - it.get("reward_s", 0)
        values = [it.get(n, 0.0) for n in names] + [max(other, 0.0)]
        bx.bar([n[:-2] for n in names] + ["rollout other"], values, color=["C0", "C3", "C1", "C2", "C7"])
        bx.set(ylabel="seconds per iteration", title="Default GRPO iteration")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes, no system runs (a minute or two)")
    parser.add_argument("--iterations", type=int, default=6, help="GRPO iterations of the system measurement")
    parser.add_argument("--threads", type=int, default=0, help="torch threads here and per actor (0 = all cores)")
    parser.add_argument("--skip-system", action="store_true", help="kernels only")
    parser.add_argument("--before", nargs="*", default=["grpo.recompute=group"],
                        help="overrides that undo the measured speed-ups: the GRPO run is measured with them too "
                             "(nothing: only the default)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "throughput")
    parser.add_argument("--render", type=Path, help="re-render table.md and the plot from a stored throughput.json")
    args = parser.parse_args()
    if args.render:
        return write(json.loads(args.render.read_text()), args.out)
    from actors.reward import set_threads

    set_threads(args.threads)
    kernels = Kernels(args.quick)
    cfg = kernels.cfg
    widest = cfg.model.base_channels * max(cfg.model.channel_mults)
    result: dict = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__},
        "peak": peaks(widest, cfg.model.image_size // 2, args.quick),
    }
    g = cfg.grpo
    k = {"steps": g.steps, "group": g.group_size, "learner_prompts": g.prompts_per_iteration}
    k["sampler"] = kernels.sampler_rows()
    k["variants"] = kernels.variant_rows()
    k["learner"] = kernels.learner_rows(g.prompts_per_iteration)
    k["reward_s_per_image"] = kernels.reward_s_per_image()
    k["redis"] = kernels.redis_hop_s()
    k["recompute"] = g.recompute
    result["kernels"] = k
    result["peak"]["conv_gflops_after"] = peaks(widest, cfg.model.image_size // 2, True)["conv_gflops"]
    if not (args.quick or args.skip_system):
        scratch = Path(tempfile.mkdtemp(prefix="proxrl-throughput-"))
        try:
            if args.before:  # the same run before this changes, in the same process's session
                result["grpo_before"] = grpo_phases(args.iterations, args.threads, scratch / "before", args.before)
            result["grpo"] = grpo_phases(args.iterations, args.threads, scratch / "after")
            result["scaling"] = rollout_scaling((1, 2), 1, calls=4)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    write(result, args.out)


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = tables(result)
    (out / "table.md").write_text(text + "\n")
    (out / "throughput.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "throughput.png")
    print(text)


if __name__ == "__main__":
    main()
