"""Captioned image data for pretraining, one interface over every source (`data.kind`).

A source is an endless stream addressed by a cursor: `batch(cursor, count)` gives samples cursor..cursor+count-1 as
images [count, C, S, S] in [-1, 1] at the model's resolution and their captions. Sample i is a pure function of
(data.seed, i) (the streamed webdataset: of the seed and the order of reading), so a run that starts at
data.cursor = a previous run's data_cursor continues that run's data exactly.

  scenes      the synthetic captioned scenes (rewards/scenes.py)
  digits      scikit-learn's 1797 handwritten 8x8 digits (real data that ships offline), "a handwritten digit k"
  folder      image files + same-stem .txt captions (UTF-8), searched recursively
  webdataset  tar shards in the LAION layout: key.jpg/png/webp + key.txt [+ key.json], read with `webdataset`

digits and folder hold out a fixed fraction (data.holdout) whose captions are the evaluation prompts; every other
sample is drawn epoch by epoch, each epoch in its own seeded order. Images are resized on the short side and
centre-cropped with torchvision.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import math
import random
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2

from learner.config import DataConfig
from rewards.scenes import scene_batch, scene_prompts

EVAL_SEED_OFFSET = 10_000_000  # held-out scenes/prompts start here in every scene stream
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


class DataSource(Protocol):
    def batch(self, cursor: int, count: int) -> tuple[torch.Tensor, list[str]]:
        """Samples cursor..cursor+count-1: images [count, C, S, S] in [-1, 1] and captions."""

    def eval_prompts(self, count: int) -> list[str]:
        """`count` captions for evaluation (held out of training where the source has a split)."""


def image_transform(size: int, channels: int) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> [channels, size, size] in [-1, 1]: short side resized to `size`, then centre-cropped."""
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise ValueError(f"image data needs model.channels 1 (grey) or 3 (RGB), not {channels}.")
    tf = v2.Compose([v2.ToImage(), v2.Resize(size, antialias=True), v2.CenterCrop(size), v2.ToDtype(torch.float32, scale=True)])
    return lambda image: tf(upright_8bit(image).convert(mode)) * 2.0 - 1.0


def upright_8bit(image: Image.Image) -> Image.Image:
    """The image as it is shown: its EXIF orientation applied (phone photos are stored sideways), 16-bit grey
    scaled to 8 bits (PIL's convert clips it to white), and transparency over white, as viewers show it (PIL's
    convert drops the alpha and leaves the hidden colour, black in most files)."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16"):
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257.0).round().astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image


def drop_captions(captions: list[str], p: float, generator: torch.Generator) -> list[str]:
    """Each caption replaced by the empty caption with probability p (classifier-free guidance training)."""
    keep = torch.rand(len(captions), generator=generator) >= p
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


class ScenesSource:
    def __init__(self, cfg: DataConfig, size: int, channels: int):
        if channels != 3:
            raise ValueError(f"data.kind=scenes renders RGB images: model.channels must be 3, not {channels}.")
        self.cfg, self.size = cfg, size

    def batch(self, cursor: int, count: int) -> tuple[torch.Tensor, list[str]]:
        images, captions = scene_batch(self.cfg.seed, cursor, count, self.size, self.cfg.omit_prob,
                                       self.cfg.binding_share)
        return torch.from_numpy(images) * 2.0 - 1.0, captions

    def eval_prompts(self, count: int) -> list[str]:
        return scene_prompts(self.cfg.seed, EVAL_SEED_OFFSET, count, self.cfg.omit_prob)


def mirror_pairs(images: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, list[str]]:
    """[B, C, H, W] scenes -> [2B, ...]: each followed by its left-right mirror under the mirrored caption
    (pretrain.mirror_pairs; every scene shape is left-right symmetric, so the pair is exact)."""
    from rewards.scenes import mirror_caption

    paired = torch.stack([images, images.flip(-1)], dim=1).flatten(0, 1)
    return paired, [c for caption in captions for c in (caption, mirror_caption(caption))]


class IndexedSource:
    """A finite list of (image loader, caption), split once into train / held out, trained epoch by epoch."""

    def __init__(self, loaders: Sequence[Callable[[], torch.Tensor]], captions: Sequence[str], seed: int, holdout: float):
        self.loaders, self.captions, self.seed = loaders, list(captions), seed
        order = np.random.default_rng([seed, 0]).permutation(len(captions))
        held = math.ceil(holdout * len(captions)) if holdout > 0 else 0
        if held >= len(captions):
            raise ValueError(f"data.holdout={holdout} leaves no training sample out of {len(captions)}; lower it.")
        self.train, self.held = order[: len(order) - held], order[len(order) - held:]

    def index(self, i: int) -> int:
        """Dataset index of stream position i: epoch i // n in the seeded order of that epoch."""
        epoch, pos = divmod(i, len(self.train))
        return int(self.train[self._order(epoch)[pos]])

    @functools.lru_cache(maxsize=2)  # a batch spans at most two epochs; the shuffle of 1M indices costs ~10 ms
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 1, epoch]).permutation(len(self.train))

    def batch(self, cursor: int, count: int) -> tuple[torch.Tensor, list[str]]:
        picks = [self.index(i) for i in range(cursor, cursor + count)]
        return torch.stack([self.loaders[k]() for k in picks]), [self.captions[k] for k in picks]

    def eval_prompts(self, count: int) -> list[str]:
        pool = self.held if len(self.held) else self.train
        return [self.captions[int(pool[i % len(pool)])] for i in range(count)]


def digit_caption(k: int) -> str:
    return f"a handwritten digit {int(k)}"


def digits_source(cfg: DataConfig, size: int, channels: int) -> IndexedSource:
    from sklearn.datasets import load_digits

    digits = load_digits()
    tf = image_transform(size, channels)
    # 0..16 ink intensities -> dark ink on white paper, as a person writes them.
    paper = (255 - digits.images * (255 / 16)).round().astype(np.uint8)
    loaders = [lambda a=a: tf(Image.fromarray(a)) for a in paper]
    captions = [digit_caption(k) for k in digits.target]
    return IndexedSource(loaders, captions, cfg.seed, cfg.holdout)


def read_caption(path: Path, image: Path) -> str:
    """The UTF-8 text of a caption file; a clear error if it is missing, empty or in another encoding."""
    if not path.is_file():
        raise ValueError(
            f"image {image} has no caption file {path.name} beside it. Write its caption (UTF-8 text) into {path}, "
            f"or remove the image from {image.parent}."
        )
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig").strip()  # utf-8-sig: a byte-order mark some editors write is dropped
    except UnicodeDecodeError as e:
        raise ValueError(
            f"caption file {path} is not UTF-8 text ({e.reason} at byte {e.start}). Re-save it as UTF-8, e.g. "
            f"`iconv -f latin1 -t utf-8 '{path}' -o '{path}.new' && mv '{path}.new' '{path}'`."
        ) from None
    if not text:
        raise ValueError(f"caption file {path} is empty. Write the image's caption into it or remove {image}.")
    return text


def load_image(path: Path, tf: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    try:
        with Image.open(path) as image:
            return tf(image)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:  # (the last: above PIL's size cap)
        raise ValueError(f"image {path} cannot be read ({type(e).__name__}: {e}). Replace the file or delete it "
                         f"and its caption.") from None


def folder_source(cfg: DataConfig, size: int, channels: int) -> IndexedSource:
    root = Path(cfg.path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.path={cfg.path!r} is not a folder. Point it at a folder of images with captions.")
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not images:
        raise ValueError(
            f"data.path={cfg.path!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)}). Put images there, each with "
            f"its caption in a same-stem .txt file (cat.jpg + cat.txt)."
        )
    # Captions are read (and checked) up front; images lazily, when drawn: opening every one first costs minutes
    # on a large folder, and a bad one still fails with its name.
    captions = [read_caption(p.with_suffix(".txt"), p) for p in images]
    tf = image_transform(size, channels)
    return IndexedSource([lambda p=p: load_image(p, tf) for p in images], captions, cfg.seed, cfg.holdout)


def shard_urls(path: str) -> list[str]:
    """The .tar shards of a folder, one file, or a brace pattern (/data/{00000..00009}.tar), each checked."""
    from braceexpand import braceexpand

    root = Path(path).expanduser()
    urls = sorted(str(p) for p in root.glob("*.tar")) if root.is_dir() else [str(Path(u).expanduser()) for u in braceexpand(path)]
    if not urls:
        raise ValueError(f"data.path={path!r} is a folder with no .tar shards. Write WebDataset shards (key.jpg + "
                         f"key.txt per sample) into it, or point data.path at the shards.")
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(f"webdataset shard(s) not found: {', '.join(missing[:5])}. Check data.path={path!r}.")
    return urls


def open_shards(urls: list[str]):
    """The samples of `urls` in order, every one of them in every process: the ranks take their own slices through
    the cursor, so webdataset's own splitting by RANK/WORLD_SIZE (which refuses to run under torch.distributed
    without one) must stay off."""
    import webdataset as wds

    return wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None)


class WebDatasetSource:
    """A sequential stream over tar shards: each epoch reads the shards in a seeded order through a seeded
    shuffle buffer. Moving the cursor elsewhere re-reads the stream from its start and skips (without decoding)."""

    SHUFFLE_BUFFER = 1000

    def __init__(self, cfg: DataConfig, size: int, channels: int):
        self.urls, self.seed = shard_urls(cfg.path), cfg.seed
        self.tf = image_transform(size, channels)
        self._stream: Iterator[dict] = iter(())
        self._position = -1  # no stream open yet

    def _epoch(self, epoch: int) -> Iterator[dict]:
        order = [self.urls[i] for i in np.random.default_rng([self.seed, epoch]).permutation(len(self.urls))]
        return iter(open_shards(order).shuffle(
            self.SHUFFLE_BUFFER, rng=random.Random(f"{self.seed}-{epoch}")))

    def _samples(self) -> Iterator[dict]:
        for epoch in itertools.count():
            empty = True
            for sample in self._epoch(epoch):
                empty = False
                yield sample
            if empty:
                raise ValueError(f"the webdataset shards {self.urls[:3]}... hold no samples.")

    def decode(self, sample: dict) -> tuple[torch.Tensor, str]:
        where = f"sample {sample.get('__key__')!r} of shard {sample.get('__url__')}"
        image_key = next((k for k in WDS_IMAGE_KEYS if k in sample), None)
        if image_key is None:
            raise ValueError(f"{where} has no image ({'/'.join(WDS_IMAGE_KEYS)} member); its members are "
                             f"{sorted(k for k in sample if not k.startswith('__'))}. Rewrite the shard with key.jpg + key.txt.")
        caption = self._caption(sample, where)
        try:
            with Image.open(io.BytesIO(sample[image_key])) as image:
                return self.tf(image), caption
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
            raise ValueError(f"{where}: its .{image_key} cannot be read as an image ({e}). Rewrite the shard.") from None

    @staticmethod
    def _caption(sample: dict, where: str) -> str:
        caption = None
        try:
            if "txt" in sample:
                caption = sample["txt"].decode("utf-8").strip()
            elif "json" in sample:  # some LAION exports keep the caption only in the metadata
                meta = json.loads(sample["json"])
                caption = meta.get("caption") if isinstance(meta, dict) else None
                caption = caption.strip() if isinstance(caption, str) else None
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: its caption is not UTF-8 text ({e.reason} at byte {e.start}). Re-encode the "
                             f"captions as UTF-8 and rewrite the shard.") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: its .json is not valid JSON ({e.msg} at line {e.lineno}). Rewrite the "
                             f"shard with valid metadata, or a .txt caption.") from None
        if caption is None:
            raise ValueError(f"{where} has no caption: add a .txt member (or a .json with a 'caption' field).")
        if not caption:  # as the folder source: an empty caption would train the unconditional model unasked
            raise ValueError(f"{where} has an empty caption. Write the image's caption into it or drop the sample.")
        return caption

    def batch(self, cursor: int, count: int) -> tuple[torch.Tensor, list[str]]:
        if not 0 <= self._position <= cursor:  # behind the stream (a resume, a new run): read it again from its start
            self._stream, self._position = self._samples(), 0
        for _ in itertools.islice(self._stream, cursor - self._position):  # ahead: skip, e.g. other ranks' slices
            pass
        pairs = [self.decode(s) for s in itertools.islice(self._stream, count)]
        self._position = cursor + count
        return torch.stack([p[0] for p in pairs]), [p[1] for p in pairs]

    def eval_prompts(self, count: int) -> list[str]:
        """Captions of the first samples of the shards in order (a stream has no held-out split)."""
        samples = list(itertools.islice(iter(open_shards(self.urls)), count))
        if not samples:
            raise ValueError(f"the webdataset shards {self.urls[:3]}... hold no samples.")
        captions = [self._caption(s, f"sample {s.get('__key__')!r} of shard {s.get('__url__')}") for s in samples]
        return [captions[i % len(captions)] for i in range(count)]


def build_source(cfg: DataConfig, size: int, channels: int) -> DataSource:
    """The source `cfg.kind` names, producing images at `size` x `size` with `channels` channels."""
    builders = {"scenes": ScenesSource, "digits": digits_source, "folder": folder_source, "webdataset": WebDatasetSource}
    return builders[cfg.kind](cfg, size, channels)
