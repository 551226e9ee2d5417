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


def restore_interrupted(parent: Path) -> None:
    """Undo a replace_dir killed between its two renames: an `.old-NAME-PID` folder whose NAME is missing goes back
    to NAME (the new copy, never swapped in, stays a leftover its writer's next cleanup removes)."""
    for old in Path(parent).glob(".old-*"):
        name = old.name.removeprefix(".old-").rpartition("-")[0]
        if name and not (old.parent / name).exists():
            os.replace(old, old.parent / name)


def write_files(root: Path, files: dict[str, bytes], what: str, durable: bool = False) -> None:
    """Write `files` (relative path -> bytes: a packed checkpoint, a run state) under `root`, refusing a name that
    would land outside it (`what` names the entries in the error); `durable`: fsync each file, and each folder
    holding one (a new file's name lives in its folder), before returning."""
    base = Path(root).resolve()
    folders = set()
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
        folders.update(p for p in path.parents if p == base or base in p.parents)
    if durable:
        for folder in folders:
            fsync_dir(folder)


def fsync_dir(path: Path) -> None:
    """Make the names in folder `path` durable (after a power loss a file fsynced alone may have no name)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
