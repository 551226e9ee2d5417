"""Convert a checkpoint folder to the diffusers layout: `python -m proxmodel.convert OLD_DIR NEW_DIR [--fp16]`.

OLD_DIR: any checkpoint ProxRL reads (the earlier config.json + model.safetensors, a builtin under
proxmodel/weights/, or one already converted). NEW_DIR gets unet/, text_encoder/, scheduler/, model_index.json and a
README.md saying where it came from; the weights are the same numbers (stored as float32, or float16 with --fp16).
Exit status 2, with the reason, if OLD_DIR is not a readable checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from proxmodel import env  # noqa: F401  (offline, no telemetry)


def convert(source: str | Path, target: str | Path, fp16: bool = False) -> Path:
    import torch

    from proxmodel.checkpoint import read_state
    from proxmodel.model import load_model, save_model

    model = load_model(source)
    stored = {v.dtype for v in read_state(source).values()}
    dtype = torch.float16 if fp16 else torch.float32
    note = f"stored as {dtype} (the source held {', '.join(sorted(str(d) for d in stored))})"
    return save_model(model, target, dtype, card={"converted_from": str(Path(source).resolve()), "weights": note})


def target_problem(source: Path, target: Path) -> str | None:
    """Why `target` may not be replaced whole by the converted checkpoint, or None: it is, or holds, the source, or
    it is a file or a folder of other things (e.g. a parent folder given by mistake), which would be deleted."""
    from proxmodel.checkpoint import missing_files

    if target == source or target in source.parents:
        return (f"the target {target} is or contains the source {source}, which replacing it would delete. "
                f"Name a new folder, e.g. {source.with_name(source.name + '-converted')}.")
    if target.is_file():
        return f"the target {target} is a file. Name a new folder, or an old checkpoint folder to replace."
    if target.is_dir() and any(target.iterdir()) and missing_files(target):
        return (f"the target {target} holds files that are not a ProxRL checkpoint; it would be replaced whole, "
                f"deleting them. Name a new folder, or an old checkpoint folder to replace.")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxmodel.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a checkpoint folder (either layout)")
    parser.add_argument("target", help="the folder to write (replaced whole if it exists)")
    parser.add_argument("--fp16", action="store_true", help="store the weights as float16 (they load as float32)")
    args = parser.parse_args(argv)
    problem = target_problem(Path(args.source).resolve(), Path(args.target).resolve())
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        path = convert(args.source, args.target, args.fp16)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
