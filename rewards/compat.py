"""Every adaptation ProxRL makes to the `hpsv2` and `image-reward` packages, in one place (one test each).

Both packages pin versions that conflict with this environment (see docs/rewards.md), so they are installed with
`--no-deps` and imported through the functions below; nothing else in ProxRL imports them directly.

hpsv2 1.2.0
  H1. Its wheel and sdist lack the CLIP BPE vocabulary its tokenizer opens at import; the identical file ships in
      open_clip and is copied beside hpsv2's tokenizer once.
  H2. Its factory.py has a stray `from turtle import forward` (unused); turtle needs tkinter, which many Pythons
      lack (Debian's python3 without python3-tk). Where turtle cannot be imported, an empty stand-in is present
      for that one import only.
image-reward 1.5 (written for transformers 4.x)
  I1. Its package __init__ imports training and baseline code (ReFL: accelerate, datasets, diffusers training utils;
      CLIP/aesthetic baselines: OpenAI's `clip`) that scoring never uses: the modules that score are imported
      without running that __init__.
  I2. Its BLIP text encoder (med.py) imports apply_chunking_to_forward, prune_linear_layer and
      find_pruneable_heads_and_indices from transformers.modeling_utils; transformers 5 moved the first two to
      transformers.pytorch_utils and dropped the third (used only to prune attention heads).
  I3. Its BertModel calls PreTrainedModel.get_head_mask and invert_attention_mask, which transformers 5 removed;
      they are added back to that class only, with transformers 4's semantics.
  I4. Its BLIP constructor loads the tokenizer from the hub id 'bert-base-uncased' and reads
      `additional_special_tokens_ids` (gone in transformers 5); the same tokenizer is built from a local folder
      instead, for the duration of the constructor only.
  I5. Its BertModel calls init_weights() in __init__; transformers 5's version needs state that only post_init()
      sets up, so that class gets transformers 4's behaviour (apply _init_weights; it has no tied weights).
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import sys
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# The PyPI packages a reward needs beyond ProxRL's own dependencies. Every shipped setup (.ci/run, deploy/) installs
# them with `pip install --no-deps -c constraints.txt ...`, where they are pinned (tests/test_deploy.py checks).
EXTRAS: dict[str, tuple[str, ...]] = {"hpsv2": ("hpsv2", "clint", "args"), "image_reward": ("image-reward", "fairscale")}


def _package_dir(name: str) -> Path:
    if name in sys.modules:
        return Path(sys.modules[name].__path__[0])
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the Python package {name!r} is not installed; install the reward extras as docs/rewards.md says "
            f"(pip install --no-deps hpsv2==1.2.0 image-reward==1.5 fairscale==0.4.13 clint==0.5.1 args==0.1.0)."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def require(name: str) -> None:
    """Fail with the install command if an optional reward package is missing (checked before any actor starts)."""
    _package_dir(name)


# --- hpsv2 -------------------------------------------------------------------------------------------------------

def ensure_hpsv2_vocab() -> Path:
    """H1: put open_clip's CLIP BPE vocabulary where hpsv2's tokenizer looks for it; return that path."""
    target = _package_dir("hpsv2") / "src" / "open_clip" / BPE_FILE
    if not target.is_file():
        source = _package_dir("open_clip") / BPE_FILE
        try:
            shutil.copyfile(source, target)
        except OSError as e:
            raise OSError(f"hpsv2 lacks {target} and it cannot be written ({e}); run: cp {source} {target}") from e
    return target


def hpsv2_open_clip() -> types.ModuleType:
    """hpsv2's fork of open_clip (`hpsv2.src.open_clip`): factory, transforms and tokenizer."""
    ensure_hpsv2_vocab()
    try:
        importlib.import_module("turtle")
    except ImportError:  # H2: Python built without tkinter (e.g. Debian's python3 without python3-tk)
        sys.modules["turtle"] = types.ModuleType("turtle")
        sys.modules["turtle"].forward = None
        try:
            return importlib.import_module("hpsv2.src.open_clip")
        finally:
            del sys.modules["turtle"]
    return importlib.import_module("hpsv2.src.open_clip")


# --- image-reward -------------------------------------------------------------------------------------------------

def _bare_package(name: str, path: Path) -> None:
    """I1: register a package by its folder without running its __init__ (a no-op if already imported)."""
    if name not in sys.modules:
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules[name] = module


def _find_pruneable_heads_and_indices(*args, **kwargs):
    raise NotImplementedError("pruning attention heads is not supported with transformers 5 (image-reward adaptation)")


def _transformers_helpers() -> None:
    """I2: the helpers med.py imports from transformers.modeling_utils, where transformers 4 had them."""
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    for name in ("apply_chunking_to_forward", "prune_linear_layer"):
        if not hasattr(modeling_utils, name):
            setattr(modeling_utils, name, getattr(pytorch_utils, name))
    if not hasattr(modeling_utils, "find_pruneable_heads_and_indices"):
        modeling_utils.find_pruneable_heads_and_indices = _find_pruneable_heads_and_indices


def get_head_mask(self, head_mask, num_hidden_layers: int, is_attention_chunked: bool = False):
    """I3: transformers 4's PreTrainedModel.get_head_mask for the case scoring uses (no head mask)."""
    if head_mask is not None:
        raise NotImplementedError("head masks are not supported in the image-reward adaptation")
    return [None] * num_hidden_layers


def invert_attention_mask(self, encoder_attention_mask: torch.Tensor) -> torch.Tensor:
    """I3: transformers 4's PreTrainedModel.invert_attention_mask: 1 = attend -> 0, 0 = masked -> dtype min."""
    if encoder_attention_mask.dim() == 3:
        extended = encoder_attention_mask[:, None, :, :]
    else:
        extended = encoder_attention_mask[:, None, None, :]
    extended = extended.to(dtype=self.dtype)
    return (1.0 - extended) * torch.finfo(self.dtype).min


def init_weights(self) -> None:
    """I5: transformers 4's PreTrainedModel.init_weights for this class (no pruned heads, no tied weights)."""
    self.apply(self._init_weights)


def imagereward_modules() -> tuple[types.ModuleType, types.ModuleType]:
    """(ImageReward.ImageReward, ImageReward.models.BLIP.blip): the scoring model and its BLIP helpers."""
    root = _package_dir("ImageReward")
    _bare_package("ImageReward", root)
    _bare_package("ImageReward.models", root / "models")
    _transformers_helpers()
    med = importlib.import_module("ImageReward.models.BLIP.med")
    for name, fn in (("get_head_mask", get_head_mask), ("invert_attention_mask", invert_attention_mask)):
        if not hasattr(med.BertModel, name):
            setattr(med.BertModel, name, fn)
    if "init_weights" not in vars(med.BertModel):
        med.BertModel.init_weights = init_weights
    return importlib.import_module("ImageReward.ImageReward"), importlib.import_module("ImageReward.models.BLIP.blip")


def blip_tokenizer(folder: str | Path):
    """I4: the package's init_tokenizer() (bert-base-uncased + '[DEC]' bos + '[ENC]'), read from a local folder.

    transformers 5 also dropped `additional_special_tokens_ids`, which the original uses for enc_token_id.
    """
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(folder))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids("[ENC]")
    return tokenizer


@contextmanager
def blip_tokenizer_from(folder: str | Path) -> Iterator[None]:
    """I4: while active, constructing the package's BLIP model reads its tokenizer from `folder`."""
    imagereward_modules()
    blip_pretrain = importlib.import_module("ImageReward.models.BLIP.blip_pretrain")
    original = blip_pretrain.init_tokenizer
    blip_pretrain.init_tokenizer = lambda: blip_tokenizer(folder)
    try:
        yield
    finally:
        blip_pretrain.init_tokenizer = original
