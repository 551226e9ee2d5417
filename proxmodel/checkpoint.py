"""Checkpoint folders, in the diffusers layout (written) and ProxRL's earlier flat one (still read).

Written (`save_checkpoint`), through diffusers' and transformers' own save_pretrained:

    model_index.json        the pipeline index (ProxT2IPipeline); `proxrl_model`: sizes, text encoder, VAE path
    unet/                   config.json + diffusion_pytorch_model.safetensors (UNet2DConditionModel.from_pretrained)
    text_encoder/           config.json + model.safetensors (transformers' CLIPTextModel / BertModel format), or,
                            for an open_clip text tower, model.safetensors of its own state + proxrl_text.json
    scheduler/              scheduler_config.json: kind, prox_param, sigma_data, trained steps and samplers
    pipeline.py             one import line, so DiffusionPipeline.from_pretrained(..., trust_remote_code=True) works
    README.md               the model card: how it was made
    extra/model.safetensors only if the model ever has weights outside the U-Net and text encoder (today none:
                            the t and lam embeddings are the U-Net's own time and class embeddings)

Read (`load_checkpoint_folder`): that layout, or the flat `config.json` + `model.safetensors` of earlier exports
(the shipped builtin weights among them). Only JSON and safetensors are read: no pickle.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from proxmodel.config import ModelConfig
from proxmodel.files import replace_dir, staging_dir
from proxmodel.text import frozen

INDEX_FILE = "model_index.json"
OLD_WEIGHTS, OLD_CONFIG = "model.safetensors", "config.json"
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
TEXT_WEIGHTS = "text_encoder/model.safetensors"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
EXTRA_WEIGHTS = "extra/model.safetensors"
CARD_FILE = "README.md"
PIPELINE_STUB = "from proxmodel.pipeline import ProxT2IPipeline  # noqa: F401  (ProxRL's pipeline class)\n"
PREFIXES = {UNET_WEIGHTS: "unet.", TEXT_WEIGHTS: "text.", EXTRA_WEIGHTS: ""}


def is_diffusers_layout(directory: str | Path) -> bool:
    return (Path(directory) / INDEX_FILE).is_file()


def required_files(directory: str | Path) -> list[str]:
    """The files a checkpoint folder must hold, by its layout (relative paths)."""
    if is_diffusers_layout(directory):
        return [INDEX_FILE, SCHEDULER_CONFIG, UNET_WEIGHTS, TEXT_WEIGHTS]
    return [OLD_CONFIG, OLD_WEIGHTS]


def missing_files(directory: str | Path) -> list[str]:
    directory = Path(directory)
    return [name for name in required_files(directory) if not (directory / name).is_file()]


def weight_files(directory: str | Path) -> dict[Path, str]:
    """Each safetensors file of the checkpoint -> the prefix its keys take in ProxT2I's state dict."""
    directory = Path(directory)
    if not is_diffusers_layout(directory):
        return {directory / OLD_WEIGHTS: ""}
    return {directory / name: prefix for name, prefix in PREFIXES.items() if (directory / name).is_file()}


def config_file(directory: str | Path) -> Path:
    """The file that holds the architecture (what error messages about it name)."""
    directory = Path(directory)
    return directory / (INDEX_FILE if is_diffusers_layout(directory) else OLD_CONFIG)


def read_config(directory: str | Path) -> ModelConfig:
    """The checkpoint's ModelConfig (pydantic's ValidationError, or JSONDecodeError, if the JSON is not one)."""
    from proxmodel.pipeline import model_config

    directory = Path(directory)
    if not is_diffusers_layout(directory):
        raw = json.loads((directory / OLD_CONFIG).read_text())
        if isinstance(raw, dict) and raw.get("kind", "prox") == "prox":
            raw.setdefault("prox_param", "eps")  # written before `prox_param` existed: ProxDM's eps
        return ModelConfig.model_validate(raw)
    index = json.loads((directory / INDEX_FILE).read_text())
    return model_config(index.get("proxrl_model") or {}, json.loads((directory / SCHEDULER_CONFIG).read_text()))


def tensor_shapes(directory: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every stored tensor as ProxT2I names it, from the safetensors headers only."""
    shapes = {}
    for path, prefix in weight_files(directory).items():
        with safe_open(str(path), framework="pt") as f:
            shapes.update({prefix + k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return shapes


def read_state(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every stored tensor, keyed as in ProxT2I's state dict, as stored (dtype included)."""
    state = {}
    for path, prefix in weight_files(directory).items():
        try:
            tensors = load_file(str(path))
        except Exception as e:  # truncated, or not safetensors at all
            raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from e
        state.update({prefix + k: v for k, v in tensors.items()})
    return state


def save_checkpoint(state: dict[str, torch.Tensor], cfg: ModelConfig, directory: str | Path,
                    dtype: torch.dtype = torch.float32, card: Optional[dict] = None) -> Path:
    """Write `state` (a ProxT2I state dict) with `cfg` as a diffusers-layout folder; the folder is replaced whole,
    so a reader sees the old checkpoint or the new one. `card`: what README.md says about how it was made."""
    from proxmodel.model import ProxT2I
    from proxmodel.pipeline import ProxT2IPipeline
    from proxmodel.text import ClipText

    directory = Path(directory)
    with torch.random.fork_rng(devices=[]):  # its random init is overwritten: the caller's RNG stream stays as it was
        model = ProxT2I(cfg)
    model.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in state.items()})
    model.to(dtype)
    tmp = staging_dir(directory)
    if isinstance(model.text, ClipText):
        model.text.config.architectures = ["CLIPTextModel"]
    pipe = ProxT2IPipeline.from_model(model)
    with quiet_progress_bars():  # transformers draws a "Writing model shards" bar per save
        pipe.save_pretrained(tmp, safe_serialization=True)
    if pipe.text_encoder is None:  # an open_clip text tower: its own tensors, in safetensors
        (tmp / "text_encoder").mkdir()
        save_file({k: v.contiguous() for k, v in model.text.state_dict().items()}, str(tmp / TEXT_WEIGHTS))
        (tmp / "text_encoder" / "proxrl_text.json").write_text(json.dumps(cfg.text.model_dump(), indent=2) + "\n")
    extra = {k: v for k, v in model.state_dict().items() if not k.startswith(("unet.", "text."))}
    if extra:
        (tmp / "extra").mkdir()
        save_file({k: v.contiguous() for k, v in extra.items()}, str(tmp / EXTRA_WEIGHTS))
    index = json.loads((tmp / INDEX_FILE).read_text())
    index["_class_name"] = ["pipeline", "ProxT2IPipeline"]  # DiffusionPipeline finds the class in pipeline.py
    if isinstance(model.text, ClipText):  # recorded as the transformers class it is a thin subclass of
        index["text_encoder"] = ["transformers", "CLIPTextModel"]
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "pipeline.py").write_text(PIPELINE_STUB)
    write_card(tmp, cfg, card or {})
    replace_dir(tmp, directory)
    return directory


def save_flat(model, directory: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """The flat layout the builtin weights ship in (proxmodel/weights/README.md): config.json + model.safetensors
    in `dtype`. A frozen pretrained text encoder (e.g. MiniLM from its package) is left out, since the loader rebuilds
    it from the same source: the repository stores only what training changed (the MiniLM alone is 45 MB in fp16)."""
    keep_text = not frozen(model.cfg.text)
    state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items() if keep_text or not k.startswith("text.")}
    directory = Path(directory)
    tmp = staging_dir(directory)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / OLD_WEIGHTS), metadata={"format": "proxrl"})
    (tmp / OLD_CONFIG).write_text(model.cfg.model_dump_json(indent=2) + "\n")
    replace_dir(tmp, directory)
    return directory


@contextmanager
def quiet_progress_bars():
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def write_card(directory: str | Path, cfg: ModelConfig, card: dict) -> Path:
    """README.md: what the checkpoint is, how it was made (`card`: mode, base, iterations, config fingerprint,
    rewards, held-out results, ... whatever the writer knows), and how to load it."""
    lines = ["---", "library_name: diffusers", "tags: [proxrl, proximal-diffusion, text-to-image]", "---", "",
             f"# ProxRL {cfg.kind} model ({cfg.image_size}x{cfg.image_size}, prox_param {cfg.prox_param})", "",
             "## How it was made", ""]
    lines += [f"- {k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in card.items()] or ["- unknown"]
    lines += ["", "## Loading", "", "```python",
              "from proxmodel.model import load_model            # the whole ProxT2I (pip install proxrl)",
              "model = load_model(FOLDER)",
              "from diffusers import UNet2DConditionModel         # the backbone alone",
              "unet = UNet2DConditionModel.from_pretrained(FOLDER, subfolder='unet')",
              "from proxmodel.pipeline import ProxT2IPipeline     # images, with the project's sampler",
              "pipe = ProxT2IPipeline.from_pretrained(FOLDER)     # a diffusers pipeline, no code from FOLDER",
              "image = pipe('a red circle at the top left, on a white background').images[0]",
              "```", "",
              "The U-Net takes t * 1000 as its timestep and lam * 1000 as its class label (`class_embed_type: timestep`, "
              "concatenated); its input and output are scaled as `prox_param` says (proxmodel/model.py).", ""]
    path = Path(directory) / CARD_FILE
    path.write_text("\n".join(lines))
    return path


def load_checkpoint_folder(directory: str | Path):
    """A ProxT2I from either layout; FileNotFoundError naming a missing file, ValueError for unreadable ones."""
    from proxmodel.model import ProxT2I

    directory = Path(directory)
    missing = missing_files(directory)
    if missing:
        raise FileNotFoundError(
            f"checkpoint {directory} has no {missing[0]}{' (nor ' + ', '.join(missing[1:]) + ')' if missing[1:] else ''}. "
            f"A ProxRL checkpoint is a folder with {INDEX_FILE}, unet/, text_encoder/ and scheduler/ (or, from "
            f"earlier versions, {OLD_CONFIG} and {OLD_WEIGHTS}), as written by `python -m learner.main --mode pretrain` "
            f"(its summary.json names it); copy it again whole, or convert an old one with "
            f"`python -m proxmodel.convert OLD NEW`."
        )
    try:
        cfg = read_config(directory)
    except Exception as e:
        raise ValueError(f"checkpoint {directory} could not be read ({type(e).__name__}: {e}). Restore its "
                         f"{config_file(directory)} or point init_from at another checkpoint folder.") from e
    try:
        model = ProxT2I(cfg)  # reads the folders it refers to: a pretrained text encoder's, the VAE's
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"checkpoint {directory} refers to files that are not there ({e}). Put the text encoder's or VAE's "
            f"folder back at that path, or change the path (model.text.path / model.vae) in its "
            f"{config_file(directory)}.") from None
    try:
        state = {k: v.float() for k, v in read_state(directory).items()}
        if frozen(cfg.text) and not any(k.startswith("text.") for k in state):
            # a flat checkpoint may leave a frozen pretrained encoder out (save_flat): ProxT2I(cfg) just built it
            # from its source, and those are the weights it trained with
            state.update({k: v for k, v in model.state_dict().items() if k.startswith("text.")})
        model.load_state_dict(state)
    except Exception as e:  # corrupt or foreign files: say which and what to do
        raise ValueError(
            f"checkpoint {directory} could not be read ({type(e).__name__}: {e}). Re-export it with "
            f"`python -m learner.main --mode pretrain` or point init_from at another checkpoint folder."
        ) from e
    return model
