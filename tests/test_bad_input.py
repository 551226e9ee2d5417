"""The bad-input wall (issue 13 item 5): each case is a command line that must stop with exit status 2 and one short
paragraph naming the problem (no traceback, no dump of the config), before anything is written: no run directory and
no MLflow store or run.

The cases run in-process through `learner.main.main`, the CLI's own entry point, in an empty working directory (where
the default `runs/` and the MLflow store of MLFLOW_TRACKING_URI would land); `learner.tracking` is replaced by a stub
that fails the test if a run ever starts, so a case the wall lets through fails in a second instead of training. A
few cases run as real subprocesses, with the real MLflow, for the exit status and the absence of a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from learner.main import main

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "configs" / "smoke.yaml")
BASE = REPO / "proxmodel" / "weights" / "scenes-base"
GRPO = ["--mode", "grpo", "--config", SMOKE]
PRETRAIN = ["--mode", "pretrain", "--config", SMOKE]


class RunStarted(AssertionError):
    pass


class NoTracker:
    def __init__(self, *args, **kwargs):
        raise RunStarted("the bad input got past the wall: a run was about to start")


@pytest.fixture
def box(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """box/in holds a case's input files; box/work is the working directory and must stay empty."""
    (tmp_path / "in").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    monkeypatch.setitem(sys.modules, "learner.tracking", types.SimpleNamespace(Tracker=NoTracker))
    return tmp_path


def assert_rejected(code: int | str | None, err: str, box: Path, fragment: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    message = lines[-1]  # argparse prints its usage (lines starting with "usage:" or blanks) before the error
    assert all(line.startswith(("usage:", " ")) for line in lines[:-1]), err
    assert message.startswith("error:") or ": error:" in message, err
    assert len(message) < 800, f"not a short message ({len(message)} characters): {message}"
    assert fragment in message, message
    assert not any((box / "work").iterdir()), f"written: {sorted(p.name for p in (box / 'work').iterdir())}"


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int | str | None, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


# --- the command line, config files and overrides: no file other than a config is involved -----------------------

CONFIG_FILES = {  # name: (contents of box/in/NAME, expected fragment)
    "bad-yaml.yaml": (b"grpo: {iterations: [1,\n", "is not valid UTF-8 YAML"),
    "latin1.yaml": ("grpo:\n  prompt_file: caf\u00e9.txt\n".encode("latin-1"), "is not valid UTF-8 YAML"),
    "list.yaml": (b"- grpo\n- pretrain\n", "must hold a mapping"),
    "typo.yaml": (b"grpo:\n  iteratoins: 3\n", "did you mean 'grpo.iterations'"),
}


@pytest.mark.parametrize("argv, fragment", [
    ([], "--mode is required"),
    (["--mode", "train"], "invalid choice: 'train'"),
    (["--mode", "grpo", "--config", "{in}/missing.yaml"], "missing.yaml does not exist"),
    (["--mode", "grpo", "--config", "{in}"], "is a directory, not a file"),
    *[(["--mode", "grpo", "--config", f"{{in}}/{name}"], fragment) for name, (_, fragment) in CONFIG_FILES.items()],
    ([*GRPO, "justaword"], "'justaword' is not a key=value override"),
    ([*GRPO, "=5"], "'=5' has an empty key"),
    ([*GRPO, "grpo.=5"], "'grpo.=5' has an empty key"),
    ([*GRPO, "grpo=3"], "'grpo' is a section, not a value"),
    ([*GRPO, "grpo.train_step_window=[0,1"], "the value '[0,1' is not valid YAML"),
    ([*GRPO, "grpo.iterations=abc"], "'grpo.iterations' = 'abc': Input should be a valid integer"),
    ([*GRPO, "grpo.iteration=5"], "unknown config key 'grpo.iteration' (did you mean 'grpo.iterations'?)"),
    ([*GRPO, "gpro.iterations=5"], "unknown config key 'gpro' (did you mean 'grpo'?)"),
    ([*GRPO, "seed.x=1"], "seed is a value, not a section"),
    ([*GRPO, "deepspeed.zero_stage=4"], "'deepspeed.zero_stage' = 4"),
    ([*GRPO, "data.kind=imagenet"], "allowed: one of scenes|digits|folder|webdataset"),
    ([*GRPO, "rewards=3"], "'rewards' is a list of mappings with the keys name, weight, options"),
    (["--resume", "{in}", "--config", SMOKE], "--resume uses the run's own config.yaml: drop --config"),
])
def test_bad_command_lines_and_config_files(box, capsys, argv, fragment):
    for name, (data, _) in CONFIG_FILES.items():
        (box / "in" / name).write_bytes(data)
    assert_rejected(*run([a.replace("{in}", str(box / "in")) for a in argv], capsys), box, fragment)


# --- values out of range or inconsistent: the message names the key, the value and what is allowed ----------------

@pytest.mark.parametrize("argv, fragment", [
    ([*GRPO, "grpo.lr=.inf"], "'grpo.lr' = inf: Input should be a finite number; allowed: finite float > 0"),
    ([*PRETRAIN, "pretrain.lr=.nan"], "'pretrain.lr' = nan: Input should be a finite number"),
    ([*GRPO, "grpo.lr=0"], "'grpo.lr' = 0: Input should be greater than 0"),
    ([*GRPO, "grpo.lr=-1e-4"], "'grpo.lr' = '-1e-4': Input should be greater than 0"),
    ([*GRPO, "grpo.group_size=1"], "'grpo.group_size' = 1: Input should be greater than or equal to 2"),
    ([*GRPO, "grpo.steps=1"], "'grpo.steps' = 1: Input should be greater than or equal to 2"),
    ([*GRPO, "grpo.clip_range=0"], "'grpo.clip_range' = 0: Input should be greater than 0"),
    ([*GRPO, "data.omit_prob=1.5"], "'data.omit_prob' = 1.5: Input should be less than or equal to 1"),
    ([*PRETRAIN, "pretrain.cfg_dropout=-0.1"], "'pretrain.cfg_dropout' = -0.1: Input should be greater than or equal to 0"),
    ([*GRPO, "grpo.iterations=0"], "'grpo.iterations' = 0: Input should be greater than or equal to 1"),
    ([*GRPO, "actors.rollout.count=0"], "'actors.rollout.count' = 0"),
    ([*GRPO, "seed=-1"], "'seed' = -1: Input should be greater than or equal to 0"),
    ([*GRPO, "rewards=[{name: jpeg_compressibility, weight: .nan}]"], "'rewards.0.weight' = nan"),
    ([*GRPO, "grpo.train_step_window=[0,2]"], "grpo.train_step_window=[0, 2]: entries must be distinct sampler "
                                              "transitions 0..1 (grpo.steps=3 has 2)"),
    ([*GRPO, "grpo.train_step_window=[]"], "grpo.train_step_window=[]: entries must be"),
    ([*GRPO, "grpo.stochastic_steps=3"], "grpo.stochastic_steps=3: grpo.steps=3 has 2 transitions; use 1..2"),
    ([*GRPO, "grpo.stochastic_steps=0"], "'grpo.stochastic_steps' = 0: Input should be greater than or equal to 1"),
    ([*GRPO, "grpo.stochastic_steps=1", "grpo.train_step_window=[1]"],
     "transitions 0..0 (grpo.stochastic_steps=1 makes 1 of them stochastic)"),
    ([*GRPO, "grpo.stochastic_steps=1", "grpo.objective=direct"], "also set grpo.stochastic_steps=null"),
    ([*GRPO, "grpo.train_step_window=[1,1]"], "grpo.train_step_window=[1, 1]: entries must be distinct"),
    ([*GRPO, "grpo.prompts_per_iteration=1", "actors.learner.count=2"],
     "grpo.prompts_per_iteration (1) must be at least the number of learner ranks actors.learner.count (2)"),
    ([*GRPO, "grpo.prompt_stats_min_count=64"], "grpo.prompt_stats_min_count=64 must be at most grpo.prompt_stats_buffer=32"),
    ([*PRETRAIN, "data.kind=folder"], "data.kind=folder reads its files from data.path"),
    ([*PRETRAIN, "model.base_channels=12"], "the model section describes a model that cannot be built: "
                                            "model.base_channels=12 x model.channel_mults=[1, 2] gives [12] channels"),
    ([*PRETRAIN, "model.attention_levels=[]"], "no cross-attention, so it could not see its caption"),
    ([*PRETRAIN, "model.attention_levels=[2]", "model.text.pretrained=minilm"],  # not caught by the meta build
     "model.attention_levels=[2]: entries must be distinct U-Net levels 0..1"),
    ([*PRETRAIN, "model.kind=score", "pretrain.eval_sampler=flow"],  # else found out after the last training step
     "pretrain.eval_sampler=flow is not a sampler of a score model; use one of ['sde', 'ode', 'ddim']"),
    ([*PRETRAIN, "pretrain.eval_sampler=ddim"], "pretrain.eval_sampler=ddim is not a sampler of a prox model"),
    (["--mode", "sample", "sample.sampler=sde"], "sample.sampler=sde is not a sampler of a prox model"),
    # both were found after the run had started and written images
    (["--mode", "sample", "sample.sampler=backward", "sample.steps=5"],
     "sample.sampler=backward with sample.steps=5: the fully backward prox sampler needs every step size"),
    (["--mode", "sample", "sample.score=true", "sample.prompts=[a photo of a cat]"],
     "rewards[0]='compositional_strict' cannot score the prompts of sample.prompts: the prompt 'a photo of a "
     "cat'"),
    ([*GRPO, "grpo.credit_block=5"], "grpo.credit_block=5 does not divide the model's 32x32 images; use a divisor "
                                     "of 32 (e.g. 4), or 1"),
    ([*GRPO, "redis.url=redis://127.0.0.1:1/0"], "cannot reach Redis at redis://127.0.0.1:1/0 (ConnectionError"),
    ([*GRPO, "redis.url=127.0.0.1:6379"], "redis.url '127.0.0.1:6379' must start with redis://"),
    ([*GRPO, "redis.url=redis://:pw@127.0.0.1:port/0"],
     "cannot reach Redis at redis://:***@127.0.0.1:port/0 (ValueError"),
    ([*GRPO, "grpo.credit_block=0"], "'grpo.credit_block' = 0: Input should be greater than or equal to 1"),
    ([*GRPO, "grpo.train_modules=[attn2.to_k,attn2.to_kk]"], "grpo.train_modules: ['attn2.to_kk'] name no module of "
                                                            "the U-Net in"),  # found before Ray, not by the learner
    ([*GRPO, "grpo.lora.rank=2", "grpo.lora.targets=[to_qq]"], "grpo.lora.targets: ['to_qq'] name no module"),
    ([*GRPO, "grpo.objective=forward", "grpo.max_staleness=1"],
     "grpo.objective=forward with grpo.max_staleness=1: the split loss is centred on the weights that drew the batch"),
    ([*GRPO, "grpo.objective=forward", "grpo.group_size=32"],
     "grpo.objective=forward with grpo.adv_clip=5.0 below sqrt(group_size - 1) = 5.57"),
    ([*GRPO, "grpo.objective=forward", "grpo.advantage_std=prompt"],
     "grpo.objective=forward with grpo.advantage_std=prompt: the split loss needs each group's advantages centred"),
    ([*GRPO, "grpo.check_rewards=[hpsv2]"], "grpo.check_rewards[0]='hpsv2' is built by its name alone, without "
                                             "options, and cannot be"),  # it failed in every reward actor
    ([*GRPO, "grpo.train_modules=[attn2]", "grpo.train_text=true"], "grpo.train_modules trains the named U-Net "
                                                                      "modules only; grpo.train_text would train"),
    ([*GRPO, "grpo.lora.rank=2", "grpo.lora.targets=[attn2]"], "grpo.lora.targets: ['attn2'] name no module"),
    ([*GRPO, "grpo.lora.rank=2", "grpo.train_modules=[to_q]"], "grpo.lora.rank > 0 and grpo.train_modules both"),
])
def test_values_out_of_range_or_inconsistent(box, capsys, argv, fragment):
    assert_rejected(*run(argv, capsys), box, fragment)


def test_run_dir_that_is_a_file_or_a_finished_run(box, capsys):
    (box / "in" / "a-file").write_text("x")
    assert_rejected(*run([*GRPO, f"run_dir={box / 'in' / 'a-file'}"], capsys), box, "is a file, not a folder")
    finished = box / "in" / "finished"
    finished.mkdir()
    (finished / "summary.json").write_text("{}")
    assert_rejected(*run([*GRPO, f"run_dir={finished}"], capsys), box, "already holds a finished run")
    assert [p.name for p in finished.iterdir()] == ["summary.json"]
    stopped = box / "in" / "stopped"  # a run that was interrupted: only --resume continues it
    stopped.mkdir()
    (stopped / "run.json").write_text("{}")
    (stopped / "config.yaml").write_text("seed: 7\n")
    assert_rejected(*run([*GRPO, f"run_dir={stopped}"], capsys), box,
                    f"holds a run that has not finished (run.json); it is left as it is. Continue it with "
                    f"`python -m learner.main --resume {stopped}`")
    assert (stopped / "config.yaml").read_text() == "seed: 7\n"


def test_runs_started_in_the_same_second_get_their_own_default_folders(tmp_path):
    from learner.main import fresh_dir

    first, second = fresh_dir(tmp_path / "grpo-20261206-010203"), fresh_dir(tmp_path / "grpo-20261206-010203")
    assert first == tmp_path / "grpo-20261206-010203" and first.is_dir() and second.name == "grpo-20261206-010203-2"


def test_two_runs_given_the_default_run_dir_in_the_same_second_get_two_folders(tmp_path, monkeypatch):
    """Would catch the default runs/<mode>-<time> folder created with exist_ok: the second run would write its
    config.yaml into the first's folder."""
    import time

    from learner.config import load_config
    from learner.main import prepare_run_dir
    from learner.resume import release_run_dirs

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt: "20261206-010203")
    try:
        first, second = (prepare_run_dir(load_config(SMOKE), "grpo") for _ in range(2))
    finally:
        release_run_dirs()
    assert first.name == "grpo-20261206-010203" and second.name == "grpo-20261206-010203-2"
    assert (first / "config.yaml").is_file() and (second / "config.yaml").is_file()


# --- prompt files ------------------------------------------------------------------------------------------------

PROMPT_FILES = {  # name: (bytes or None for a directory, expected fragment); smoke.yaml holds out 4 prompts
    "empty.txt": (b"", "has no prompts"),
    "blank.txt": (b"\n   \n\t\n", "has no prompts"),
    "latin1.txt": ("a red circle\nna\u00efve caf\u00e9\n".encode("latin-1"), "is not UTF-8 (line 2"),
    "folder.txt": (None, "is a directory, not a file"),
    "few.txt": (b"one\ntwo\nthree\nfour\n", "has 4 prompt(s); 4 are held out"),
    "missing.txt": (False, "missing.txt does not exist"),
    # free text with the scenes' verifiers (smoke.yaml trains on compositional): it failed in every reward actor
    "free-text.txt": ("".join(f"a photo of cat number {i}\n" for i in range(8)).encode(),
                      "rewards[0]='compositional' cannot score the prompts of grpo.prompt_file: the prompt "
                      "'a photo of cat"),
}


@pytest.mark.parametrize("name", list(PROMPT_FILES))
def test_bad_prompt_files(box, capsys, name):
    data, fragment = PROMPT_FILES[name]
    path = box / "in" / name
    if data is None:
        path.mkdir()
    elif data is not False:
        path.write_bytes(data)
    assert_rejected(*run([*GRPO, f"grpo.prompt_file={path}"], capsys), box, fragment)


# --- pretraining data folders and shards -------------------------------------------------------------------------

def write_png(path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)


@pytest.mark.parametrize("case, kind, fragment", [
    ("missing", "folder", "is not a folder"),
    ("empty", "folder", "holds no image files"),
    ("no-captions", "folder", "has no caption file red.txt"),
    ("empty-caption", "folder", "red.txt is empty"),
    ("latin1-caption", "folder", "red.txt is not UTF-8"),
    ("a-file", "folder", "is not a folder"),
    ("empty", "webdataset", "is a folder with no .tar shards"),
    ("missing.tar", "webdataset", "shard(s) not found"),
])
def test_bad_data_folders(box, capsys, case, kind, fragment):
    path = box / "in" / case
    if case == "a-file":
        path.write_text("not a folder")
    elif case not in ("missing", "missing.tar"):
        path.mkdir()
    if case in ("no-captions", "empty-caption", "latin1-caption"):
        write_png(path / "red.png")
    captions = {"empty-caption": b"  \n", "latin1-caption": "a red caf\u00e9".encode("latin-1")}
    if case in captions:
        (path / "red.txt").write_bytes(captions[case])
    assert_rejected(*run([*PRETRAIN, f"data.kind={kind}", f"data.path={path}"], capsys), box, fragment)


def test_data_captions_the_final_scoring_cannot_read(box, capsys):
    """Pretraining ends by scoring samples of the data's captions with `rewards` (the smoke config's scene
    verifier): photo captions failed there, after the whole run, and --resume could not get past it."""
    path = box / "in" / "photos"
    path.mkdir()
    for name in ("cat", "dog", "fox"):
        write_png(path / f"{name}.png")
        (path / f"{name}.txt").write_text(f"a photo of a {name} on a sofa")
    assert_rejected(*run([*PRETRAIN, "data.kind=folder", f"data.path={path}"], capsys), box,
                    "rewards[0]='compositional' cannot score the prompts of data.kind=folder")
    # ... but a started run is not held to it (its rewards cannot change): refused, --resume could not finish it
    from learner.config import load_config
    from learner.main import preflight

    preflight(load_config(SMOKE, ["data.kind=folder", f"data.path={path}"]), "pretrain", resuming=True)


def test_grpos_data_anchor_checks_its_data_at_start(box, capsys):
    assert_rejected(*run([*GRPO, "grpo.data_anchor=0.5", "data.kind=folder", f"data.path={box / 'in' / 'none'}"],
                         capsys), box, "is not a folder")


# --- checkpoints given as init_from ------------------------------------------------------------------------------

def test_a_runs_folder_given_as_init_from_names_its_checkpoint(box, capsys):
    from proxmodel.model import load_model, save_model

    folder = box / "in" / "a-run"
    save_model(load_model(BASE), folder / "checkpoint")
    assert_rejected(*run([*GRPO, f"init_from={folder}"], capsys), box,
                    f"is a run's folder; its checkpoint is init_from={folder / 'checkpoint'}")


def make_checkpoint(root: Path, case: str) -> Path:
    """A copy of builtin:scenes-base, broken as `case` says."""
    ckpt = root / case
    if case == "missing":
        return ckpt
    if case.startswith("new-"):  # the diffusers layout (proxmodel/checkpoint.py), one part broken
        from proxmodel.model import load_model, save_model

        save_model(load_model(BASE), ckpt)
        if case == "new-no-text-encoder":
            shutil.rmtree(ckpt / "text_encoder")
        elif case == "new-truncated-unet":
            weights = ckpt / "unet" / "diffusion_pytorch_model.safetensors"
            weights.write_bytes(weights.read_bytes()[:4096])
        return ckpt
    ckpt.mkdir()
    weights, config = BASE / "model.safetensors", json.loads((BASE / "config.json").read_text())
    if case != "no-weights":
        shutil.copy(weights, ckpt / "model.safetensors")
    if case != "no-config":
        (ckpt / "config.json").write_text(json.dumps(config))
    if case == "truncated":
        (ckpt / "model.safetensors").write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif case == "not-safetensors":  # e.g. a torch pickle renamed: a zip archive
        (ckpt / "model.safetensors").write_bytes(b"PK\x03\x04" + os.urandom(4096))
    elif case == "wrong-architecture":
        (ckpt / "config.json").write_text(json.dumps({**config, "base_channels": config["base_channels"] // 2}))
    elif case == "config-not-json":
        (ckpt / "config.json").write_text("{'base_channels': 32,")
    elif case == "config-unknown-key":
        (ckpt / "config.json").write_text(json.dumps({**config, "base_chanels": 32}))
    return ckpt


@pytest.mark.parametrize("case, fragment", [
    ("missing", "does not exist"),
    ("no-weights", "is not a checkpoint folder (it lacks model.safetensors)"),
    ("no-config", "is not a checkpoint folder (it lacks config.json)"),
    ("truncated", "is not a readable safetensors file"),
    ("not-safetensors", "is not a readable safetensors file"),
    ("wrong-architecture", "do not fit the architecture in"),
    ("config-not-json", "is not a valid model config (Invalid JSON"),
    ("config-unknown-key", "is not a valid model config (base_chanels: Extra inputs are not permitted"),
    ("new-no-text-encoder", "is not a checkpoint folder (it lacks text_encoder/model.safetensors)"),
    ("new-truncated-unet", "is not a readable safetensors file"),
])
def test_bad_checkpoints(box, capsys, case, fragment):
    ckpt = make_checkpoint(box / "in", case)
    capsys.readouterr()  # (what making it printed)
    assert_rejected(*run([*GRPO, f"init_from={ckpt}"], capsys), box, fragment)


def test_a_partly_stochastic_policy_needs_a_model_that_learned_the_flow_step(box, capsys):
    """grpo.stochastic_steps runs the later steps as the probability-flow ODE: a model trained on the hybrid steps
    alone would run them off its training distribution, silently."""
    ckpt = make_checkpoint(box / "in", "hybrid-only")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "trained_variants": ["hybrid"]}))
    assert_rejected(*run([*GRPO, f"init_from={ckpt}", "grpo.stochastic_steps=1"], capsys), box,
                    "this model was trained on ['hybrid']")


@pytest.mark.parametrize("objective", ["forward", "direct"])
def test_a_prox_only_objective_refuses_a_score_model(box, capsys, objective):
    """The forward objective's pairs y = x_t + sqrt(lam) xi are prox pairs: a score model (lam = 0 in its network)
    would regress them onto the wrong target without a word; refused before anything starts."""
    ckpt = make_checkpoint(box / "in", "score")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "kind": "score"}))
    assert_rejected(*run([*GRPO, f"init_from={ckpt}", f"grpo.objective={objective}", "grpo.stochastic_steps=null"],
                         capsys), box, f"grpo.objective={objective} trains a prox model's proximal operator; this "
                    "model is kind score. Use grpo.objective=policy_gradient")


def test_unknown_builtin_checkpoint(box, capsys):
    assert_rejected(*run([*GRPO, "init_from=builtin:scenes-bsae"], capsys), box,
                    "the built-in ones are ['scenes-base', 'scenes-minilm', 'scenes-minilm-bind', "
                    "'scenes-minilm-bind2', 'scenes-minilm-bind3', 'scenes-minilm-mirror', 'scenes-minilm-x0', "
                    "'scenes-minilm-x0-4200']")


# --- rewards -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rewards, fragment", [
    ("[{name: hpsv3}]", "rewards[0].name='hpsv3': unknown reward (did you mean 'hpsv2'?); the registered rewards are "),
    ("[{name: jpeg_compressibility, options: {qualty: 90}}]",
     "unknown option(s) qualty (did you mean 'quality'?); jpeg_compressibility takes quality"),
    ("[{name: clip_score, options: {path: {in}/no-clip}}]", "missing the folder {in}/no-clip"),
    ("[{name: aesthetic, options: {clip_path: {in}, head_path: {in}/head.pth}}]", "open_clip_config.json"),
    ("[{name: compositional}, {name: compositional, weight: 2}]", "a reward is listed twice"),
])
def test_bad_rewards(box, capsys, rewards, fragment):
    where = str(box / "in")
    argv = [*GRPO, "rewards=" + rewards.replace("{in}", where)]
    assert_rejected(*run(argv, capsys), box, fragment.replace("{in}", where))


# --- the same wall seen from a shell: real interpreter, real MLflow store ----------------------------------------

@pytest.mark.parametrize("args, fragment", [
    ([], "--mode is required"),
    (["--mode", "grpo", "grpo.train_step_window=[0,1"], "is not valid YAML"),  # was a 49-line traceback
    (["--mode", "grpo", "grpo.lr=.inf"], "finite"),
    (["--mode", "grpo", "rewards=[{name: nope}]"], "unknown reward"),  # was a 2,180-character config dump
    (["--mode", "grpo", "init_from={in}/truncated"], "is not a readable safetensors file"),
])
def test_subprocess_exits_2_without_traceback_or_writes(tmp_path, args, fragment):
    work, inputs = tmp_path / "work", tmp_path / "in"
    work.mkdir(), inputs.mkdir()
    make_checkpoint(inputs, "truncated")
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    proc = subprocess.run([sys.executable, "-m", "learner.main", *[a.replace("{in}", str(inputs)) for a in args]],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert_rejected(proc.returncode, proc.stderr, tmp_path, fragment)
    assert proc.stdout == ""


def test_train_modules_may_name_a_container_of_weights():
    """grpo.train_modules=[attn2] (every cross-attention, as the learner's named_modules() match takes it) passed
    the learner and was refused by preflight, which knew only the modules owning tensors. Would catch that."""
    from learner.config import load_config
    from learner.main import GRPO_DEFAULT_INIT, check_module_names, resolve_checkpoint

    cfg = load_config(None, ["grpo.train_modules=[attn2, mid_block]"])
    check_module_names(cfg, resolve_checkpoint(GRPO_DEFAULT_INIT))


# --- errors once the run has started: exit status, what is kept ---------------------------------------------------

@pytest.mark.parametrize("error, code", [("config", 2), ("failed", 1), ("sigterm", 143)])
def test_an_error_after_the_start_exits_with_its_own_status(tmp_path, monkeypatch, capsys, error, code):
    """A ConfigError found once the run started (e.g. the cluster lacks GPUs) exits 2 like bad input, and the
    unstarted run's config.yaml and run.json go so the same run_dir takes the corrected command; a fault the run
    detected (RunFailed) exits 1; SIGTERM exits 128 + 15. Would catch the statuses swapped or the signal's dropped."""
    import signal

    import learner.sample
    from learner.config import ConfigError
    from learner.faults import RunFailed
    from learner.signals import Interrupted

    raised = {"config": ConfigError("not enough GPUs"), "failed": RunFailed("NaN updates"),
              "sigterm": Interrupted(signal.SIGTERM)}[error]

    def run_sample(*args):
        raise raised

    monkeypatch.setattr(learner.sample, "run_sample", run_sample)
    run_dir = tmp_path / "run"
    assert main(["--mode", "sample", "--config", SMOKE, f"run_dir={run_dir}",
                 f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "mlflow.system_metrics=false"]) == code
    if error == "config":
        assert "takes the corrected command" in capsys.readouterr().err
        assert not (run_dir / "config.yaml").exists() and not (run_dir / "run.json").exists()


def test_a_resumed_run_refused_after_its_start_keeps_its_config_and_run_file(tmp_path):
    """release_unstarted frees the run_dir of a new run refused before it saved anything; a resumed run is a started
    one: its config.yaml and run.json are what --resume needs. Would catch them deleted."""
    from learner.main import release_unstarted

    (tmp_path / "run.json").write_text("{}")
    (tmp_path / "config.yaml").write_text("seed: 7\n")
    assert release_unstarted(tmp_path, resume=object()) == ""
    assert (tmp_path / "run.json").is_file() and (tmp_path / "config.yaml").read_text() == "seed: 7\n"


def test_the_summary_never_holds_a_url_password(tmp_path, monkeypatch):
    """summary.json is shared with results (and logged to MLflow): every URL password in it is masked, wherever the
    mode's result put one. Would catch the summary written unredacted."""
    import learner.sample

    monkeypatch.setattr(learner.sample, "run_sample", lambda *args: {
        "note": "stream at redis://:hunter2@cache:6379/0", "images": 0, "prompts": 0, "grid": "-", "samples": "-",
        "rewards": {}})
    run_dir = tmp_path / "run"
    assert main(["--mode", "sample", "--config", SMOKE, f"run_dir={run_dir}",
                 f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "mlflow.system_metrics=false"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["note"] == "stream at redis://:***@cache:6379/0"


def test_preflight_checks_what_each_mode_reads_and_only_that():
    """The sample mode starts from the default checkpoint, as GRPO does (from scratch it would draw noise from random
    weights); pretraining never builds GRPO's held-out checks, so an option-less one it will not use is no reason to
    refuse it. Would catch either rule lost."""
    from learner.config import load_config
    from learner.main import GRPO_DEFAULT_INIT, preflight, resolve_checkpoint

    init_from, _ = preflight(load_config(SMOKE), "sample")
    assert init_from == resolve_checkpoint(GRPO_DEFAULT_INIT)
    preflight(load_config(SMOKE, ["grpo.check_rewards=[hpsv2]", "pretrain.iterations=1"]), "pretrain")


@pytest.mark.parametrize("argv, fragment", [
    ([*GRPO, "rewards=[{name: jpeg_compressibility}]", "grpo.check_rewards=[compositional_strict]",
      "grpo.prompt_file={file}"], "grpo.check_rewards[0]='compositional_strict' cannot score the prompts of "
                                  "grpo.prompt_file"),
    (["--mode", "sample", "sample.score=true", "sample.prompt_file={file}"],
     "rewards[0]='compositional_strict' cannot score the prompts of sample.prompt_file"),
])
def test_free_text_prompts_are_refused_by_every_reward_that_will_score_them(box, capsys, argv, fragment):
    """A held-out check scores the GRPO prompts too, and sample.score scores a sample.prompt_file's: a scene
    verifier among them failed in every reward actor, or after the images were drawn. Would catch either left out."""
    prompts = box / "in" / "free.txt"
    prompts.write_text("".join(f"a photo of cat number {i}\n" for i in range(8)))
    assert_rejected(*run([a.replace("{file}", str(prompts)) for a in argv], capsys), box, fragment)
