"""Folder operations shared by checkpoints and run states, free of torch (the CLI's settings answer without it)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def staging_dir(directory: Path) -> Path:
    """The sibling a folder is written to before `replace_dir` swaps it in; a leftover from a crashed write is removed."""
    tmp = directory.with_name(directory.name + ".writing")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def replace_dir(new: Path, directory: Path) -> None:
    """Put folder `new` at `directory` with renames only: a reader finds the old folder or the new one, never a mix.
    The old one goes to a hidden sibling first (no glob for `directory`'s pattern matches it), then is deleted."""
    old = directory.with_name(f".old-{directory.name}-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(new, directory)
    shutil.rmtree(old, ignore_errors=True)


def write_files(root: Path, files: dict[str, bytes], what: str, durable: bool = False) -> None:
    """Write `files` (relative path -> bytes: a packed checkpoint, a run state) under `root`, refusing a name that
    would land outside it (`what` names the entries in the error); `durable`: fsync each file before returning."""
    base = Path(root).resolve()
    for name, data in files.items():
        path = base / name
        if base not in path.resolve().parents:
            raise ValueError(f"{what} {name!r} points outside its folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
