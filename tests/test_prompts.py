"""GRPO prompt sources: reproducible, held-out prompts never trained on, clear errors for bad prompt files."""

from collections import Counter

import pytest

from learner.config import ConfigError, load_config
from learner.main import main
from learner.prompts import EVAL_SEED_OFFSET, FilePrompts, prompt_source
from rewards.scenes import scene_prompts


def write(tmp_path, data: bytes, name="prompts.txt"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_scene_prompts_are_the_scene_stream_and_held_out_ones_come_from_its_far_end():
    source = prompt_source(load_config(None, ["grpo.prompt_seed=3"]))
    assert source.train(5, 4) == scene_prompts(3, 5, 4)
    assert source.held_out(32) == scene_prompts(3, EVAL_SEED_OFFSET, 32)
    # data.omit_prob (how often a caption leaves a detail out) shapes the training prompts as the held-out ones
    terse = prompt_source(load_config(None, ["grpo.prompt_seed=3", "data.omit_prob=1.0"]))
    assert terse.train(5, 4) == scene_prompts(3, 5, 4, 1.0) != source.train(5, 4)
    assert terse.held_out(4) == scene_prompts(3, EVAL_SEED_OFFSET, 4, 1.0)


def test_file_prompts_hold_out_a_fixed_set_and_visit_every_other_prompt_once_per_epoch(tmp_path):
    lines = [f"a photo of thing {i}" for i in range(20)]
    path = write(tmp_path, ("\ufeff" + "\n".join(lines) + "\n\n   \n").encode())  # BOM and blank lines are fine
    source = FilePrompts(path, seed=1, n_held_out=5)
    held = source.held_out(5)
    assert len(set(held)) == 5 and set(held) <= set(lines)
    epoch0, epoch1 = source.train(0, 15), source.train(15, 15)
    assert sorted(epoch0) == sorted(epoch1) == sorted(set(lines) - set(held))
    assert epoch0 != epoch1  # reshuffled every epoch
    assert source.train(7, 10) == (epoch0 + epoch1)[7:17]  # a pure function of the index: resumable
    assert FilePrompts(path, seed=1, n_held_out=5).train(3, 30) == source.train(3, 30)
    assert Counter(source.train(0, 45)) == Counter({p: 3 for p in epoch0})


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "has no prompts"),
        (b"\n  \n", "has no prompts"),
        ("first\nna\u00efve caf\u00e9\n".encode("latin-1"), "is not UTF-8 (line 2"),
        (b"one\ntwo\n", "none would be left to train on"),
    ],
)
def test_bad_prompt_files_are_explained(tmp_path, data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        FilePrompts(write(tmp_path, data), seed=0, n_held_out=2)


def test_cli_stops_on_a_bad_prompt_file_before_anything_is_written(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["--mode", "grpo", "--config", "configs/smoke.yaml", f"grpo.prompt_file={tmp_path / 'missing.txt'}",
                 f"run_dir={run_dir}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "missing.txt does not exist" in err and "grpo.prompt_file" in err
    assert not run_dir.exists()


def test_prompt_seed_reaches_a_prompt_file(tmp_path):
    """Would catch FilePrompts seeded with cfg.seed instead of grpo.prompt_seed."""
    from learner.prompts import FilePrompts, prompt_source

    path = tmp_path / "p.txt"
    path.write_text("\n".join(f"thing {i}" for i in range(30)) + "\n")
    cfg = load_config(None, [f"grpo.prompt_file={path}", "grpo.prompt_seed=3", "seed=7", "grpo.eval_prompts=4",
                             "rewards=[{name: jpeg_compressibility}]"])
    source = prompt_source(cfg)
    assert source.train(0, 20) == FilePrompts(path, 3, cfg.grpo.eval_prompts).train(0, 20)
    assert source.train(0, 20) != FilePrompts(path, 7, cfg.grpo.eval_prompts).train(0, 20)


def test_prompts_are_stripped_and_a_home_relative_path_is_found(tmp_path, monkeypatch):
    """A prompt file written on Windows (CRLF), indented or with trailing spaces gives the same prompts, and
    grpo.prompt_file=~/prompts.txt names the file in the home folder. Would catch: prompts sampled with stray
    whitespace (another text embedding) or `~` taken literally."""
    monkeypatch.setenv("HOME", str(tmp_path))
    write(tmp_path, b"  a red cube \r\n\ta blue ball\t\r\n a green cone\r\n")
    source = FilePrompts("~/prompts.txt", seed=0, n_held_out=1)
    assert sorted(source.held_out(1) + source.train(0, 2)) == ["a blue ball", "a green cone", "a red cube"]
