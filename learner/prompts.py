"""Where GRPO's prompts come from: the synthetic scene captions, or a text file with one prompt per line.

Both are pure functions of (seed, index), so a run's prompt stream is reproducible and can resume at any iteration.
A file's prompts are split once, by a seeded shuffle, into a held-out set (evaluation) and a training set, which is
visited in a fresh seeded order every epoch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from learner.config import ConfigError, RunConfig
from learner.data import EVAL_SEED_OFFSET
from rewards.scenes import scene_prompts


class ScenePrompts:
    def __init__(self, seed: int, omit_prob: float):
        self.seed, self.omit_prob = seed, omit_prob

    def train(self, first: int, count: int) -> list[str]:
        return scene_prompts(self.seed, first, count, self.omit_prob)

    def held_out(self, count: int) -> list[str]:
        return scene_prompts(self.seed, EVAL_SEED_OFFSET, count, self.omit_prob)


class FilePrompts:
    def __init__(self, path: str | Path, seed: int, n_held_out: int):
        lines = read_prompt_file(path)
        if len(lines) <= n_held_out:
            raise ConfigError(
                f"prompt file {path} has {len(lines)} prompt(s); {n_held_out} are held out for evaluation "
                f"(grpo.eval_prompts), so none would be left to train on. Add prompts or lower grpo.eval_prompts."
            )
        order = np.random.default_rng([seed, 0]).permutation(len(lines))
        self.eval_set = [lines[i] for i in order[:n_held_out]]
        self.train_set = [lines[i] for i in order[n_held_out:]]
        self.seed = seed

    def train(self, first: int, count: int) -> list[str]:
        n = len(self.train_set)
        orders: dict[int, np.ndarray] = {}  # one shuffle per epoch touched by this call
        out = []
        for index in range(first, first + count):
            epoch, pos = divmod(index, n)
            if epoch not in orders:
                orders[epoch] = np.random.default_rng([self.seed, 1, epoch]).permutation(n)
            out.append(self.train_set[orders[epoch][pos]])
        return out

    def held_out(self, count: int) -> list[str]:
        return self.eval_set[:count]


def read_prompt_file(path: str | Path, key: str = "grpo.prompt_file") -> list[str]:
    """Non-blank lines of a UTF-8 text file, stripped; a clear error (naming the config `key`) for a missing,
    undecodable or empty file."""
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(f"prompt file {path} {what}. Set {key} to a text file with one prompt "
                          f"per line, or to null for the built-in scene captions.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"prompt file {path} is not UTF-8 (line {line}, byte {e.start}: {raw[e.start:e.start + 1]!r}). "
                          f"Re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8`.") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"prompt file {path} has no prompts (it is empty or blank). Put one prompt per line.")
    return lines


def prompt_source(cfg: RunConfig) -> ScenePrompts | FilePrompts:
    g = cfg.grpo
    if g.prompt_file:
        return FilePrompts(g.prompt_file, g.prompt_seed, g.eval_prompts)
    return ScenePrompts(g.prompt_seed, cfg.data.omit_prob)
