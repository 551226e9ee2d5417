"""Checkpoints that travel through the Ray object store, so actors on other nodes need no shared filesystem.

A checkpoint folder (either layout of proxmodel/checkpoint.py: unet/, text_encoder/, scheduler/ and model_index.json,
or the earlier config.json + model.safetensors) is packed into
a mapping of relative path -> bytes on the driver; each actor unpacks it into a private temp folder just long enough
to load it. Plain bytes: nothing is pickled that an outsider could have written.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from proxmodel.files import write_files
from proxmodel.model import ProxT2I, load_model


def pack(directory: str | Path) -> dict[str, bytes]:
    """Every file under `directory`, keyed by its path relative to it."""
    root = Path(directory)
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    if not files:
        raise FileNotFoundError(f"checkpoint folder {root} is empty or missing")
    return files


def load_packed(files: dict[str, bytes]) -> ProxT2I:
    """Write a packed checkpoint to a temp folder, load it, and remove the folder."""
    with tempfile.TemporaryDirectory(prefix="proxrl-ckpt-") as tmp:
        write_files(Path(tmp), files, "packed checkpoint entry")
        return load_model(tmp)


def load_checkpoint(source: str | Path | dict[str, bytes]) -> ProxT2I:
    """A checkpoint folder on this node (tests, one machine) or a packed one from the driver (any node)."""
    return load_packed(source) if isinstance(source, dict) else load_model(source)
