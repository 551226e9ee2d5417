"""A cost model for GPUs: model FLOPs per image of each phase of a config, and what they predict on one GPU class.

    python benchmarks/gpu_cost_model.py [--config configs/gpu.yaml] [--peak-tflops 989] [--utilisation 0.4]
                                        [--link-gbytes 3] [--out benchmarks/results/gpu_cost]

Every FLOP is counted by torch.utils.flop_counter on the real architectures built on the meta device (no weights,
no memory, a few seconds on a CPU): the config's U-Net (ProxT2I, at the VAE latent shape), the VAE decoder, the
reward models' towers (open_clip architectures). Per image and phase:

  rollout  NFE x the U-Net (x2 under classifier-free guidance: both halves are one batch), the caption encodings
           (shared by a group), the VAE decode;
  reward   each weighted reward's image (and text) towers;
  learner  per trained transition (round(train_step_fraction x (steps - 1))): forward + backward (3 forwards) of the
           U-Net under guidance, plus the KL reference's forward when kl_coef > 0;
  publish  the fp32 weights the learner sends every iteration to each rollout actor (bytes, not FLOPs).

Predictions assume one achieved rate for every kernel (`--utilisation` x `--peak-tflops`: an H100 SXM's dense bf16
is 989) and one network link per node for the weights (`--link-gbytes` GB/s). They are a model, not a measurement:
benchmarks/throughput.py measures the CPU at hand, where the same counting predicts the measured phases to 5%.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Reward name -> (open_clip image architecture, text tokens) whose towers it runs; image_reward's BLIP has a ViT-L/16
# image encoder (counted as open_clip's ViT-L-16) and a BERT-base text encoder with cross-attention (counted as a
# 12-layer width-768 text tower over 77 tokens, ViT-B-16's text tower: an over-count of a small term).
REWARD_TOWERS = {"hpsv2": ("ViT-H-14", "ViT-H-14"), "clip_score": ("ViT-H-14", "ViT-H-14"),
                 "image_reward": ("ViT-L-16", "ViT-B-16"), "pickscore": ("ViT-H-14", "ViT-H-14"),
                 "aesthetic": ("ViT-L-14", None)}


# A pretrained text encoder's width is in its files, which this model does not need: the ones docs/ name.
TEXT_WIDTH = {"clip": 768, "open_clip": 1024, "minilm": 384}  # CLIP ViT-L/14, open_clip ViT-H-14, MiniLM-L6


def gflop(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def unet_gflop(cfg) -> tuple[float, int]:
    """One U-Net forward for one image at the model's sample shape, and the U-Net's parameter count."""
    from proxmodel.config import ModelConfig
    from proxmodel.model import ProxT2I

    text = cfg.model.text
    width, length = TEXT_WIDTH.get(text.pretrained, text.width), text.max_length
    side = cfg.model.image_size // 8 if cfg.model.vae else cfg.model.image_size  # the SD VAEs downscale 8x
    channels = 4 if cfg.model.vae else cfg.model.channels
    # The same architecture with a stand-in text encoder of the real width (the U-Net only sees its output).
    arch = ModelConfig.model_validate({**cfg.model.model_dump(), "vae": None, "image_size": side, "channels": channels,
                                       "text": {"pretrained": "none", "width": width, "max_length": length,
                                                "layers": 1, "heads": 1}})
    with torch.device("meta"):
        model = ProxT2I(arch)
        y, t = torch.zeros(1, channels, side, side), torch.zeros(1)
        context = torch.zeros(1, length, width)
    return gflop(lambda: model(y, t, t, context=context)), sum(p.numel() for p in model.unet.parameters())


def vae_decode_gflop(image_size: int) -> float:
    """The Stable Diffusion VAE's decoder (sd-vae-ft-mse's architecture) for one image."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)
        z = torch.zeros(1, 4, image_size // 8, image_size // 8)
    return gflop(lambda: vae.decode(z))


def tower_gflop(image_arch: str | None, text_arch: str | None, tokens: int = 77) -> dict[str, float]:
    import open_clip

    out = {}
    if image_arch:
        model = open_clip.create_model(image_arch, device="meta")
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        out["image"] = gflop(lambda: model.encode_image(torch.zeros(1, 3, size, size, device="meta")))
    if text_arch:
        model = open_clip.create_model(text_arch, device="meta")
        ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
        out["text"] = gflop(lambda: model.encode_text(ids))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "gpu.yaml")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of one GPU (H100 SXM: 989)")
    parser.add_argument("--utilisation", type=float, default=0.4, help="achieved fraction of the peak, every kernel")
    parser.add_argument("--link-gbytes", type=float, default=3.0, help="GB/s of the link the weights leave by")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_cost")
    args = parser.parse_args()
    from learner.config import load_config
    from learner.policy_loss import select_train_steps

    cfg = load_config(args.config)
    g, a = cfg.grpo, cfg.actors
    cfg_forwards = 1 if g.guidance == 1.0 else 2
    unet, params = unet_gflop(cfg)
    text = tower_gflop(None, "ViT-L-14")["text"] if cfg.model.text.pretrained == "clip" else 0.0
    trained = len(select_train_steps(g.steps - 1, g.train_step_window, g.train_step_fraction, torch.Generator()))
    per_image = {
        "rollout: U-Net": g.steps * cfg_forwards * unet,
        "rollout: caption encodings (per group)": cfg_forwards * text / g.group_size,
        "rollout: VAE decode": vae_decode_gflop(cfg.model.image_size) if cfg.model.vae else 0.0,
    }
    for r in cfg.rewards:
        image_arch, text_arch = REWARD_TOWERS.get(r.name, (None, None))
        towers = tower_gflop(image_arch, text_arch)
        per_image[f"reward: {r.name}"] = towers.get("image", 0.0) + towers.get("text", 0.0) / g.group_size
    per_image["learner: policy forward + backward"] = trained * cfg_forwards * 3 * unet
    per_image["learner: KL reference forward"] = trained * cfg_forwards * unet if g.kl_coef > 0 else 0.0

    rate = args.utilisation * args.peak_tflops * 1e3  # GFLOP/s per GPU
    phase = {"rollout": sum(v for k, v in per_image.items() if k.startswith("rollout")),
             "reward": sum(v for k, v in per_image.items() if k.startswith("reward")),
             "learner": sum(v for k, v in per_image.items() if k.startswith("learner"))}
    gpus = {"rollout": a.rollout.count * max(a.rollout.num_gpus, 1), "reward": a.reward.count * max(a.reward.num_gpus, 1),
            "learner": a.learner.count * max(a.learner.num_gpus, 1)}
    images = g.prompts_per_iteration * g.group_size
    seconds = {p: images * phase[p] / (gpus[p] * rate) for p in phase}
    weights_gb = params * 4 / 1e9
    seconds["publish"] = a.rollout.count * weights_gb / args.link_gbytes
    bound = max(seconds, key=seconds.get)
    iteration = seconds[bound] if g.max_staleness > 0 else sum(seconds.values())
    total_gpus = sum(gpus.values())
    result = {"config": str(args.config.relative_to(ROOT)), "unet_params": params, "unet_gflop_per_forward": unet,
              "trained_transitions": trained, "gflop_per_image": per_image, "phase_gflop_per_image": phase,
              "images_per_gpu_second_alone": {p: rate / v for p, v in phase.items()}, "gpus": gpus,
              "seconds_per_iteration": seconds, "iteration_s": iteration, "bound_by": bound,
              "images_per_gpu_second": images / iteration / total_gpus, "assumptions": vars(args) | {
                  "config": str(args.config), "out": str(args.out)}}

    lines = [f"{result['config']}: U-Net {params / 1e6:.0f}M parameters, {unet:.1f} GFLOP per forward; "
             f"{g.steps} steps, guidance {g.guidance} ({cfg_forwards} forwards per step), {trained} trained "
             f"transitions; {images} images per iteration. Assumed: {args.utilisation:.0%} of {args.peak_tflops:g} "
             f"TFLOP/s per GPU, weights leave by {args.link_gbytes:g} GB/s.", "",
             "| per image | GFLOP |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in per_image.items()]
    lines += ["", "| phase | GFLOP per image | images/s per GPU, alone | GPUs | seconds per iteration |",
              "|---|---|---|---|---|"]
    for p in phase:
        lines.append(f"| {p} | {phase[p]:.0f} | {rate / phase[p]:.0f} | {gpus[p]:g} | {seconds[p]:.2f} |")
    lines.append(f"| publish (fp32 weights, {weights_gb:.2f} GB to each of {a.rollout.count} rollout actors) | - | - | "
                 f"- | {seconds['publish']:.2f} |")
    lines += ["", f"Iteration {'(async: the slowest phase)' if g.max_staleness > 0 else '(sync: the sum)'}: "
              f"{iteration:.2f} s, bound by {bound}; {result['images_per_gpu_second']:.1f} images per GPU-second over "
              f"{total_gpus:g} GPUs."]
    text_out = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cost_model.md").write_text(text_out + "\n")
    (args.out / "cost_model.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(text_out)


if __name__ == "__main__":
    main()
