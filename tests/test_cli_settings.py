"""Discoverable settings (issue 14 item 4): --help names every config section, --list-keys prints every key from the
schema, --print-config prints the resolved config; none of them starts or writes anything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from learner.config import RunConfig, dump_config, load_config
from learner.main import main

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "configs" / "smoke.yaml")


def leaves(data: dict, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for key, value in data.items():
        if isinstance(value, dict) and value and key != "options":
            out |= leaves(value, f"{prefix}{key}.")
        elif key == "rewards":
            out |= {f"rewards[].{k}" for k in ("name", "weight", "options")}
        else:
            out.add(prefix + key)
    return out


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def test_help_lists_every_config_section_with_its_description(capsys, empty_cwd):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name, field in RunConfig.model_fields.items():
        if name in ("seed", "run_dir", "init_from"):
            assert name in out.split("top-level keys:")[1]
        else:
            assert field.description and f"  {name}" in out and field.description in out, name
    assert "--list-keys [SECTION]" in out and "--print-config" in out
    assert not any(empty_cwd.iterdir())


def test_list_keys_prints_every_key_of_the_embedded_config_with_type_default_and_description(capsys, empty_cwd):
    assert main(["--list-keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    keys = {line.split(" ", 1)[0] for line in lines}
    assert len(keys) == len(lines)
    assert keys == leaves(yaml.safe_load(dump_config(load_config())))  # every key the resolved config holds
    assert all(line.split("): ", 1)[1].strip() for line in lines), "a key without a description"
    assert "grpo.lr (finite float > 0; default 0.0001): AdamW learning rate" in lines
    # the schema's default, and what a run without --config gets where configs/default.yaml sets another value
    assert any(line.startswith("grpo.kl_coef (finite float >= 0; default 0.0; without --config 0.5 "
                               "(configs/default.yaml)): ") for line in lines)
    assert any(line.startswith("actors.reward.num_cpus (finite float >= 0; default 0.5)") for line in lines)  # section default
    assert any(line.startswith("data.kind (one of scenes|digits|folder|webdataset; default \"scenes\")") for line in lines)
    assert any(line.startswith("rewards[].name (str; required)") for line in lines)
    assert not any(empty_cwd.iterdir())


def test_list_keys_of_one_section_and_a_misspelt_one(capsys, empty_cwd):
    assert main(["--list-keys", "actors.reward"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.startswith("actors.reward.") for line in lines)
    assert main(["--list-keys", "gpro"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'grpo'?" in err and "Traceback" not in err


def test_print_config_prints_the_resolved_config_after_overrides_and_starts_nothing(capsys, empty_cwd):
    overrides = ["grpo.lr=5e-5", "actors.learner.count=2"]
    assert main(["--print-config", "--config", SMOKE, *overrides]) == 0
    printed = RunConfig.model_validate(yaml.safe_load(capsys.readouterr().out))
    assert printed == load_config(SMOKE, overrides)
    assert printed.grpo.lr == 5e-5 and printed.actors.learner.count == 2 and printed.grpo.steps == 3
    assert main(["--print-config", "grpo.lr=.inf"]) == 2  # the same wall as a run
    assert not any(empty_cwd.iterdir())


def test_settings_and_bad_overrides_are_answered_without_importing_torch(tmp_path):
    script = (
        "import sys\nfrom learner.main import main\n"
        "codes = [main(['--list-keys', 'grpo']), main(['--mode', 'grpo', 'grpo.iteration=5']),\n"
        "         main(['--mode', 'grpo', 'grpo.train_step_window=[0,1'])]\n"
        "print(codes, 'torch' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.splitlines()[-1] == "[0, 2, 2] False", proc.stdout + proc.stderr


def test_a_run_from_a_checkpoint_records_the_checkpoints_model_and_says_model_overrides_are_ignored(
        tiny_model, tmp_path, capsys):
    """With init_from the checkpoint's config.json decides the model; config.yaml (and the MLflow params, logged
    from the same config) named the config file's model instead, and a model.* override passed silently."""
    from proxmodel.model import save_model

    checkpoint = save_model(tiny_model, tmp_path / "ckpt")
    run_dir = tmp_path / "run"
    assert main(["--mode", "sample", f"init_from={checkpoint}", "model.image_size=64", "sample.steps=2",
                 "sample.num_prompts=1", "sample.images_per_prompt=1", f"run_dir={run_dir}",
                 f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]) == 0
    assert "model.image_size=64 ignored: the model is init_from's" in capsys.readouterr().err
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]
    assert recorded["image_size"] == tiny_model.cfg.image_size and recorded["base_channels"] == 8
