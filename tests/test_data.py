"""Pretraining data sources: real files the tests write (image folders, WebDataset shards) and sklearn's digits."""

import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from learner.config import DataConfig
from learner.data import build_source

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255),
           "black": (0, 0, 0), "yellow": (255, 255, 0)}


def expected_pixel(name: str) -> torch.Tensor:
    return torch.tensor(COLOURS[name], dtype=torch.float32) / 255 * 2 - 1


def centre_colour(image: torch.Tensor) -> torch.Tensor:
    return image[:, image.shape[1] // 2, image.shape[2] // 2]


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def colour_card(name: str, size=(32, 16)) -> Image.Image:
    """A wide card in colour `name` with black bars at the left/right ends (cropped away by the centre crop)."""
    card = Image.new("RGB", size, COLOURS[name])
    card.paste((0, 0, 0), (0, 0, 4, size[1]))
    card.paste((0, 0, 0), (size[0] - 4, 0, size[0], size[1]))
    return card


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "images"
    (root / "nested").mkdir(parents=True)
    for i, name in enumerate(COLOURS):
        where = root / "nested" if i % 2 else root
        colour_card(name).save(where / f"{name}.{'png' if i % 3 else 'jpg'}")
        (where / f"{name}.txt").write_text(f"a {name} card\n", encoding="utf-8")
    return root


def write_shards(root, shards=3, per_shard=5):
    root.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    for s in range(shards):
        with wds.TarWriter(str(root / f"shard-{s:05d}.tar")) as sink:
            for j in range(per_shard):
                name = names[(s * per_shard + j) % len(names)]
                sample = {"__key__": f"{s:05d}{j:04d}", "png": png_bytes(colour_card(name)),
                          "txt": f"a {name} card #{s * per_shard + j}",
                          "json": json.dumps({"width": 24, "height": 16})}
                sink.write(sample)
    return root


def test_digits_are_real_captioned_deterministic_and_split():
    from sklearn.datasets import load_digits

    cfg = DataConfig(kind="digits", seed=3, holdout=0.1)
    source = build_source(cfg, 16, 3)
    images, captions = source.batch(0, 64)
    assert images.shape == (64, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    digits = load_digits()
    # Each sample is the sklearn digit its caption names: its downscaled image matches that very digit.
    for image, caption, k in zip(images, captions, [source.index(i) for i in range(64)]):
        assert caption == f"a handwritten digit {digits.target[k]}"
        ink = torch.nn.functional.adaptive_avg_pool2d((1 - image[0:1]) / 2, 8)[0]  # white paper = 0 ink
        reference = torch.from_numpy(digits.images[k] / 16).float()
        assert torch.corrcoef(torch.stack([ink.flatten(), reference.flatten()]))[0, 1] > 0.9
    # Deterministic in (seed, cursor); another seed gives another order.
    again, again_captions = build_source(cfg, 16, 3).batch(0, 64)
    assert torch.equal(images, again) and captions == again_captions
    assert build_source(DataConfig(kind="digits", seed=4), 16, 3).batch(0, 64)[1] != captions
    # An epoch visits every training digit once; the held-out split is never trained and feeds the prompts.
    n = len(source.train)
    epoch = [source.index(i) for i in range(n)]
    assert sorted(epoch) == sorted(source.train.tolist()) and n == 1797 - 180
    assert [source.index(i) for i in range(n, 2 * n)] != epoch  # each epoch in its own order
    assert set(source.held.tolist()).isdisjoint(epoch + [source.index(i) for i in range(n, 2 * n)])
    prompts = source.eval_prompts(16)
    assert prompts == [f"a handwritten digit {digits.target[k]}" for k in source.held[:16]]


def test_folder_round_trips_images_and_captions_and_crops_the_centre(folder):
    source = build_source(DataConfig(kind="folder", path=str(folder), holdout=0.0), 8, 3)
    images, captions = source.batch(0, 12)  # two epochs of the six images
    assert images.shape == (12, 3, 8, 8)
    assert sorted(captions[:6]) == sorted(f"a {n} card" for n in COLOURS) and sorted(captions[6:]) == sorted(captions[:6])
    for image, caption in zip(images, captions):
        name = caption.split()[1]
        # The centre crop removed the black bars: the whole square is the card's colour (JPEG: nearly).
        assert torch.allclose(image, expected_pixel(name).view(3, 1, 1).expand_as(image), atol=0.1), caption
    assert set(source.eval_prompts(8)) == set(captions)  # no held-out split: prompts cycle the training captions
    # Resuming at a cursor gives exactly what the uninterrupted stream gave there.
    assert torch.equal(build_source(DataConfig(kind="folder", path=str(folder), holdout=0.0), 8, 3).batch(5, 4)[0], images[5:9])


def test_folder_errors_name_the_file_and_the_fix(folder, tmp_path):
    def build(path):
        return build_source(DataConfig(kind="folder", path=str(path)), 8, 3)

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no image files.*same-stem \.txt"):
        build(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        build(tmp_path / "nowhere")
    (folder / "red.txt").unlink()
    with pytest.raises(ValueError, match=r"red\.(png|jpg) has no caption file red\.txt"):
        build(folder)
    (folder / "red.txt").write_bytes("a café card".encode("latin-1"))
    with pytest.raises(ValueError, match=r"red\.txt is not UTF-8.*iconv"):
        build(folder)
    (folder / "red.txt").write_text("\ufeffa red card", encoding="utf-8")  # a BOM is fine
    assert "a red card" in build(folder).captions
    (folder / "red.txt").write_text(" \n\t\n", encoding="utf-8")  # blank: would train the unconditional model
    with pytest.raises(ValueError, match=r"red\.txt is empty"):
        build(folder)
    (folder / "red.txt").write_text("a red card")
    with pytest.raises(ValueError, match=r"data\.holdout=0\.9 leaves no training sample out of 6"):
        build_source(DataConfig(kind="folder", path=str(folder), holdout=0.9), 8, 3)  # ceil(0.9 * 6) = 6 held
    bad = folder / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    (folder / "broken.txt").write_text("a broken card")
    source = build_source(DataConfig(kind="folder", path=str(folder), holdout=0.0), 8, 3)
    with pytest.raises(ValueError, match=r"broken\.png cannot be read.*Replace the file"):
        source.batch(0, 7)


def test_folder_order_does_not_depend_on_the_filesystem_and_upper_case_extensions_count(tmp_path, monkeypatch):
    """Sample i is a pure function of (data.seed, i) in every copy of the folder, whatever order its filesystem
    lists the files in (ext4 lists by a per-filesystem hash: a copy on another disk, a resumed run on another
    machine), and camera files named IMG_0001.JPG are images too. Would catch: files taken in listing order, or
    suffixes compared case-sensitively."""
    from pathlib import Path

    for k in range(4):
        for name in COLOURS:
            colour_card(name).save(tmp_path / f"{name}-{k}.png")
            (tmp_path / f"{name}-{k}.txt").write_text(f"a {name} card, copy {k}")
    cfg = DataConfig(kind="folder", path=str(tmp_path), seed=5)
    listed = build_source(cfg, 8, 3).batch(0, 40)[1]
    real = Path.rglob
    monkeypatch.setattr(Path, "rglob", lambda self, pattern: reversed(list(real(self, pattern))))  # another disk
    assert build_source(cfg, 8, 3).batch(0, 40)[1] == listed
    monkeypatch.undo()
    (tmp_path / "camera").mkdir()
    colour_card("red").save(tmp_path / "camera" / "IMG_0001.JPG", format="PNG")
    (tmp_path / "camera" / "IMG_0001.txt").write_text("a red card")
    source = build_source(DataConfig(kind="folder", path=str(tmp_path / "camera"), holdout=0.0), 8, 3)
    assert source.batch(0, 1)[1] == ["a red card"]


def test_webdataset_round_trips_covers_each_epoch_and_resumes(tmp_path):
    root = write_shards(tmp_path / "shards")
    cfg = DataConfig(kind="webdataset", path=str(root), seed=1)
    source = build_source(cfg, 8, 3)
    images, captions = source.batch(0, 15)
    assert images.shape == (15, 3, 8, 8)
    assert sorted(captions) == sorted(f"a {list(COLOURS)[i % 6]} card #{i}" for i in range(15))  # one epoch: all once
    for image, caption in zip(images, captions):
        assert torch.allclose(centre_colour(image), expected_pixel(caption.split()[1]), atol=0.02)
    more = source.batch(15, 15)[1]
    assert sorted(more) == sorted(captions) and more != captions  # the next epoch, in another order
    # A fresh source started at a cursor (a resumed run) continues the stream exactly; seeds and patterns agree.
    resumed = build_source(cfg, 8, 3).batch(10, 10)
    assert resumed[1] == (captions + more)[10:20] and torch.equal(resumed[0][:5], images[10:])
    pattern = DataConfig(kind="webdataset", path=str(root / "shard-{00000..00002}.tar"), seed=1)
    assert build_source(pattern, 8, 3).batch(0, 15)[1] == captions
    assert build_source(DataConfig(kind="webdataset", path=str(root), seed=2), 8, 3).batch(0, 15)[1] != captions
    assert source.eval_prompts(3) == ["a red card #0", "a green card #1", "a blue card #2"]


def test_webdataset_reads_its_stream_once_forward_and_finds_home_relative_shards(tmp_path, monkeypatch):
    """One reader taking consecutive batches (a single learner rank) opens the stream once: re-reading it from its
    start every step costs time quadratic in the run's length. data.path=~/... patterns name the home folder."""
    monkeypatch.setenv("HOME", str(tmp_path))
    write_shards(tmp_path / "shards")
    source = build_source(DataConfig(kind="webdataset", path="~/shards/shard-{00000..00002}.tar", seed=1), 8, 3)
    opened = []
    real = source._samples
    monkeypatch.setattr(source, "_samples", lambda: opened.append(1) or real())
    captions = [c for step in range(4) for c in source.batch(step * 6, 6)[1]]
    assert len(opened) == 1 and len(captions) == 24
    assert captions == build_source(DataConfig(kind="webdataset", path=str(tmp_path / "shards"), seed=1), 8, 3
                                    ).batch(0, 24)[1]


def test_webdataset_epochs_read_the_shards_in_different_orders(tmp_path):
    """A dataset far larger than the shuffle buffer is only shuffled within the buffer's reach: the order in which
    the shards are read must change every epoch too, or every epoch starts with the same shard's images. (A buffer
    of one sample here, so each epoch's stream shows its shard order.) Would catch the shard order seeded once."""
    root = write_shards(tmp_path / "shards", shards=4, per_shard=2)
    source = build_source(DataConfig(kind="webdataset", path=str(root), seed=1), 8, 3)
    source.SHUFFLE_BUFFER = 1
    captions = source.batch(0, 8 * 4)[1]
    orders = [[int(c.split("#")[1]) // 2 for c in captions[e * 8:(e + 1) * 8:2]] for e in range(4)]
    assert all(sorted(order) == [0, 1, 2, 3] for order in orders)  # every shard once per epoch, whole
    assert len({tuple(order) for order in orders}) > 1, orders


def test_webdataset_shards_without_any_sample_are_an_error_not_a_hang(tmp_path):
    """Valid tar files that hold no sample (an export that failed): every epoch is empty, and the reader would skip
    from epoch to epoch forever. Would catch the emptiness check dropped."""
    (tmp_path / "shards").mkdir()
    for s in range(2):
        with wds.TarWriter(str(tmp_path / "shards" / f"shard-{s}.tar")):
            pass
    source = build_source(DataConfig(kind="webdataset", path=str(tmp_path / "shards")), 8, 3)
    with pytest.raises(ValueError, match="hold no samples"):
        source.batch(0, 4)


def test_webdataset_ranks_read_their_own_slices_of_one_stream(tmp_path, monkeypatch):
    """Two ranks (RANK/WORLD_SIZE set, as under the learner's process group) take alternating slices of the same
    stream, together what one reader gets, and each reads it once forward: webdataset's own node splitting refused
    to run there, and every step re-read the stream from its start (quadratic). An empty first shard does not
    leave the evaluation without captions."""
    root = write_shards(tmp_path / "shards")
    cfg = DataConfig(kind="webdataset", path=str(root), seed=1)
    single = build_source(cfg, 8, 3).batch(0, 24)[1]
    monkeypatch.setenv("WORLD_SIZE", "2")
    slices = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        source = build_source(cfg, 8, 3)
        opened = []
        real = source._samples
        monkeypatch.setattr(source, "_samples", lambda: opened.append(1) or real())
        slices[rank] = [c for step in range(3) for c in source.batch((step * 2 + rank) * 4, 4)[1]]
        assert len(opened) == 1, f"rank {rank} opened the stream {len(opened)} times for 3 steps"
    assert [c for step in range(3) for r in (0, 1) for c in slices[r][step * 4:(step + 1) * 4]] == single
    with wds.TarWriter(str(root / "shard-0000-empty.tar")):
        pass  # sorts first: a valid tar with no member
    assert build_source(cfg, 8, 3).eval_prompts(2) == ["a red card #0", "a green card #1"]


def test_webdataset_caption_from_json_and_clear_errors(tmp_path):
    root = tmp_path / "a"
    root.mkdir()
    with wds.TarWriter(str(root / "s.tar")) as sink:
        sink.write({"__key__": "k0", "jpg": png_bytes(colour_card("blue"), "JPEG"), "json": json.dumps({"caption": "a blue card"})})
        sink.write({"__key__": "k1", "png": png_bytes(colour_card("red")), "json": json.dumps({"width": 24})})
        sink.write({"__key__": "k2", "txt": "no image here"})
        sink.write({"__key__": "k3", "png": png_bytes(colour_card("red")), "json": "{'caption': 'single quotes'}"})
        sink.write({"__key__": "k4", "png": png_bytes(colour_card("red")), "txt": " \n"})
        sink.write({"__key__": "k5", "png": png_bytes(colour_card("red")), "json": json.dumps({"caption": " \t"})})
        sink.write({"__key__": "k6", "png": png_bytes(colour_card("red")),
                    "json": json.dumps({"caption": " a red card\n"})})
    source = build_source(DataConfig(kind="webdataset", path=str(root / "s.tar")), 8, 3)
    assert source.decode(next(iter(wds.WebDataset(str(root / "s.tar"), shardshuffle=False))))[1] == "a blue card"
    samples = list(wds.WebDataset(str(root / "s.tar"), shardshuffle=False))
    with pytest.raises(ValueError, match=r"'k1' of shard .*s\.tar has no caption: add a \.txt"):
        source.decode(samples[1])
    with pytest.raises(ValueError, match=r"'k2' .* has no image .*key\.jpg \+ key\.txt"):
        source.decode(samples[2])
    with pytest.raises(ValueError, match=r"'k3' .* its \.json is not valid JSON"):
        source.decode(samples[3])
    with pytest.raises(ValueError, match=r"'k4' .* has an empty caption"):
        source.decode(samples[4])
    with pytest.raises(ValueError, match=r"'k5' .* has an empty caption"):  # a blank one in the metadata too
        source.decode(samples[5])
    assert source.decode(samples[6])[1] == "a red card"
    with pytest.raises(ValueError, match="no .tar shards"):
        build_source(DataConfig(kind="webdataset", path=str(tmp_path)), 8, 3)
    with pytest.raises(FileNotFoundError, match=r"shard\(s\) not found"):
        build_source(DataConfig(kind="webdataset", path=str(root / "x-{0..1}.tar")), 8, 3)


def test_data_config_needs_a_path_for_files():
    with pytest.raises(ValueError, match="data.path"):
        DataConfig(kind="folder")
    assert np.isclose(DataConfig(kind="digits").holdout, 0.1)


def test_binding_share_is_for_the_synthetic_scenes_and_reaches_their_batches():
    """data.binding_share draws scenes: with files it would be silently ignored, so it is refused; with scenes it
    changes the training batches (here all bound: two colours at two stated places) and not the evaluation
    captions. Would catch the source not passing it on, or the evaluation prompts drawn with it."""
    with pytest.raises(ValueError, match="binding_share"):
        DataConfig(kind="digits", binding_share=0.5)
    from rewards.scenes import parse_caption

    plain = build_source(DataConfig(kind="scenes"), 32, 3)
    bound = build_source(DataConfig(kind="scenes", binding_share=1.0), 32, 3)
    _, captions = bound.batch(0, 40)
    assert all(len(parse_caption(c).objects) == 2 and all(o.position for o in parse_caption(c).objects)
               for c in captions)
    assert captions != plain.batch(0, 40)[1]
    assert bound.eval_prompts(16) == plain.eval_prompts(16)


def test_mirror_pairs_put_each_scene_beside_its_mirror_under_the_mirrored_caption():
    """pretrain.mirror_pairs: the second of each pair is the first flipped left-right, and the verifier scores it
    under its caption as the first under its own (an exact symmetry), while the first under the second's caption
    loses every placed object's place. Would catch a vertical flip, captions left unmirrored, or pairs misaligned."""
    from learner.data import mirror_pairs
    from rewards.compositional import verify
    from rewards.scenes import parse_caption, scene_batch

    raw, captions = scene_batch(0, 0, 24, 32)
    images, paired = mirror_pairs(torch.from_numpy(raw), captions)
    assert images.shape[0] == 48 and len(paired) == 48
    assert torch.equal(images[0::2], torch.from_numpy(raw)) and torch.equal(images[1::2], torch.from_numpy(raw).flip(-1))
    sided = 0
    for i, caption in enumerate(captions):
        own, mirrored = images[2 * i].numpy(), images[2 * i + 1].numpy()
        assert paired[2 * i] == caption
        assert verify(mirrored, parse_caption(paired[2 * i + 1])) == pytest.approx(verify(own, parse_caption(caption)))
        if any(o.position for o in parse_caption(caption).objects):
            sided += 1
            assert paired[2 * i + 1] != caption
            assert verify(own, parse_caption(paired[2 * i + 1])) < verify(own, parse_caption(caption))
    assert sided >= 8  # most scenes state a place, so the pairs differ in their captions


def test_images_are_read_as_shown_upright_16_bit_grey_unclipped_and_transparency_over_white(tmp_path):
    """Would catch: a phone JPEG (stored sideways, EXIF orientation 6) trained on rotated under its caption, a
    16-bit grey PNG clipped to white by PIL's convert, and a transparent PNG's hidden colour trained on."""
    from learner.data import image_transform

    pixels = np.zeros((16, 32, 3), dtype=np.uint8)
    pixels[:, :16] = 255  # stored: white left half, black right half
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: the white half on top
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    shown = image_transform(16, 3)(Image.open(tmp_path / "phone.jpg"))  # [3, 16, 16] of the 16 x 32 upright image
    assert shown[:, :4].mean() > 0.9 and shown[:, -4:].mean() < -0.9

    grey = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1024)  # 0 .. 64512 of 65535
    Image.fromarray(grey).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    loaded = image_transform(8, 1)(Image.open(tmp_path / "deep.png"))
    expected = torch.from_numpy(np.round(grey / 257.0) / 255.0 * 2.0 - 1.0).float()
    assert torch.allclose(loaded[0], expected, atol=1e-6)

    # A transparent PNG is shown over white: its hidden colour (black here, as most editors store it) is not trained.
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:, :4] = (200, 30, 30, 255)  # opaque red left half; the right half fully transparent black
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "cut-out.png")
    shown = image_transform(8, 3)(Image.open(tmp_path / "cut-out.png"))
    assert torch.allclose(shown[:, :, -2:], torch.ones(3, 8, 2)) and shown[0, :, :2].mean() > 0.5
