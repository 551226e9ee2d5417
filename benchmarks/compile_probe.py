"""Does torch.compile pay for the rollout's sampler? Eager vs compiled U-Net in the default 10-step sampler call.

    python benchmarks/compile_probe.py [--threads 1] [--batch 8]

Both models in one process, calls interleaved (this machine's speed drifts +-15% between minutes), then the largest
difference of the two models' samples from the same noise. Prints the result (benchmarks/results/throughput/compile.md).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import Kernels  # noqa: E402  (the throughput benchmark's model, policy and prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    k = Kernels(quick=True)
    compiled = copy.deepcopy(k.model)
    compiled.unet = torch.compile(compiled.unet, dynamic=False)
    calls = {"eager": k.sample(args.batch, k.steps, k.model), "compiled": k.sample(args.batch, k.steps, compiled)}
    start = time.time()
    calls["compiled"]()
    print(f"compilation and the first call: {time.time() - start:.1f} s")
    for _ in range(2):  # warm-up
        for call in calls.values():
            call()
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, call in calls.items():
            t = time.perf_counter()
            call()
            seconds[name].append(time.perf_counter() - t)
    median = {name: statistics.median(v) for name, v in seconds.items()}
    for name, v in seconds.items():
        print(f"{name}: median {median[name]:.3f} s per call ({', '.join(f'{x:.3f}' for x in v)})")
    print(f"speed-up {median['eager'] / median['compiled']:.2f}x ({args.threads} threads, batch {args.batch}, "
          f"{k.steps} steps)")
    a, b = (k.sample(args.batch, k.steps, m)().images for m in (k.model, compiled))
    print(f"largest difference of the samples from the same noise: {float((a - b).abs().max()):.1e}")


if __name__ == "__main__":
    main()
