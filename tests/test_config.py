import pytest

from learner.config import CONFIG_DIR, DEFAULT_CONFIG, OBJECTIVE_OPTIONS, ConfigError, load_config


def test_shipped_configs_validate():
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        load_config(path)


def test_overrides_are_typed_and_nested():
    cfg = load_config(DEFAULT_CONFIG, ["grpo.iterations=3", "deepspeed.zero_stage=3", "model.channel_mults=[1,2]"])
    assert cfg.grpo.iterations == 3 and cfg.deepspeed.zero_stage == 3 and cfg.model.channel_mults == [1, 2]


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("nonexistent.key=1", "unknown config key 'nonexistent'"),
        ("grpo.nonexistent=1", "unknown config key 'grpo.nonexistent'"),
        ("grpo.iterations=many", "'grpo.iterations'"),
        ("deepspeed.zero_stage=4", "'deepspeed.zero_stage'"),
        ("seed.x=1", "seed is a value, not a section"),
        ("justaword", "not a key=value override"),
        ("rewards=[{name: nope}]", "unknown reward"),
    ],
)
def test_bad_input_names_the_problem(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(DEFAULT_CONFIG, [override])
    assert fragment in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\xff\xfe: [")
    with pytest.raises(ConfigError, match="not valid UTF-8 YAML"):
        load_config(bad)


@pytest.mark.parametrize("overrides, fragment", [
    (["grpo.direct_reward=compositional"], "'compositional' is not differentiable in the pixels"),
    (["grpo.direct_reward=nope"], "unknown reward 'nope'"),
    (["grpo.direct_steps=11"], "grpo.direct_steps=11 is more than the sampler's grpo.steps=10"),
])
def test_the_direct_objective_needs_a_differentiable_reward_and_a_replay_inside_the_chain(overrides, fragment):
    load_config(DEFAULT_CONFIG, ["grpo.objective=direct", "grpo.stochastic_steps=null", "grpo.direct_steps=10"])  # the whole chain is allowed
    with pytest.raises(ConfigError) as info:
        load_config(DEFAULT_CONFIG, ["grpo.objective=direct", "grpo.stochastic_steps=null", *overrides])
    assert fragment in str(info.value)


def test_detached_replay_inputs_are_refused_outside_the_direct_objective():
    load_config(DEFAULT_CONFIG, ["grpo.objective=direct", "grpo.stochastic_steps=null", "grpo.direct_detach_inputs=true"])
    with pytest.raises(ConfigError, match="direct_detach_inputs=true shapes the gradient of grpo.objective=direct"):
        load_config(DEFAULT_CONFIG, ["grpo.objective=policy_gradient", "grpo.direct_detach_inputs=true"])
    with pytest.raises(ConfigError, match="needs grpo.direct_detach_inputs=true: through the full chain"):
        load_config(DEFAULT_CONFIG, ["grpo.objective=direct", "grpo.stochastic_steps=null", "grpo.train_step_fraction=0.5"])


@pytest.mark.parametrize("objective, option", [
    ("policy_gradient", "grpo.forward_pairs=4"),
    ("policy_gradient", "grpo.forward_loss_space=x0"),
    ("policy_gradient", "grpo.direct_steps=3"),
    ("forward", "grpo.credit_block=2"),
    ("forward", "grpo.train_step_window=[0]"),
    ("forward", "grpo.direct_reward=compositional_soft_exact"),
])
def test_an_option_of_another_objective_is_refused_instead_of_ignored(objective, option):
    """A user who sets grpo.forward_pairs=4 under the policy gradient (or tunes the direct objective's replay length
    under the forward one) got a run that never read it; the option must name the objective it belongs to."""
    owner = next(o for o, names in OBJECTIVE_OPTIONS.items() if option.split("=")[0].removeprefix("grpo.") in names)
    ok = ["grpo.stochastic_steps=null"] if owner == "direct" else []
    load_config(DEFAULT_CONFIG, [f"grpo.objective={owner}", *ok, option])  # its own objective takes it
    with pytest.raises(ConfigError, match=rf"applies to grpo.objective={owner} only, and the objective is {objective}"):
        load_config(DEFAULT_CONFIG, [f"grpo.objective={objective}", option])
    load_config(DEFAULT_CONFIG, [f"grpo.objective={objective}"])  # the options at their defaults: no complaint


def test_the_forward_objectives_x0_space_is_refused_with_the_noise_target():
    load_config(DEFAULT_CONFIG, ["grpo.objective=forward", "grpo.forward_loss_space=x0"])
    with pytest.raises(ConfigError, match="grpo.forward_loss_space=x0 needs pretrain.target=conditional"):
        load_config(DEFAULT_CONFIG, ["grpo.objective=forward", "grpo.forward_loss_space=x0", "pretrain.target=noise"])


def test_the_x0_loss_space_with_the_noise_target_is_refused_for_prox_models_only(tmp_path, tiny_model_config):
    """The target option is the prox loss's; a score model (by model.kind, or a checkpoint's kind, which wins) has
    none, so its x0-space loss must not be refused for it (it was, while the check knew only the pretrain section)."""
    from learner.main import preflight
    from proxmodel.model import ProxT2I, save_model

    x0_noise = ["pretrain.loss_space=x0", "pretrain.target=noise"]
    with pytest.raises(ConfigError, match="needs pretrain.target=conditional for a prox model"):
        preflight(load_config(DEFAULT_CONFIG, x0_noise), "pretrain")
    init_from, model = preflight(load_config(DEFAULT_CONFIG, [*x0_noise, "model.kind=score"]), "pretrain")
    assert init_from is None and model.kind == "score"
    save_model(ProxT2I(tiny_model_config.model_copy(update={"kind": "score"})), tmp_path / "score")
    init_from, model = preflight(load_config(DEFAULT_CONFIG, [*x0_noise, f"init_from={tmp_path / 'score'}"]),
                                 "pretrain")
    assert init_from == tmp_path / "score" and model.kind == "score"  # the checkpoint's config, not the section's


def test_mirror_pairs_need_scenes_and_an_even_batch():
    load_config(DEFAULT_CONFIG, ["pretrain.mirror_pairs=true"])
    with pytest.raises(ConfigError, match="batch_size \\(31\\) must be even"):
        load_config(DEFAULT_CONFIG, ["pretrain.mirror_pairs=true", "pretrain.batch_size=31"])
    with pytest.raises(ConfigError, match="data.kind=digits"):
        load_config(DEFAULT_CONFIG, ["pretrain.mirror_pairs=true", "data.kind=digits"])


def test_a_config_path_under_the_home_folder_is_expanded(tmp_path, monkeypatch):
    """`ray job submit -- ... --config '~/proxrl/configs/gpu.yaml'`: the quoted ~ reaches the run unexpanded (the head's
    home, not the submitting machine's). Would catch a path read literally ('~/...' does not exist)."""
    from learner.config import load_config

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "c.yaml").write_text("grpo: {iterations: 3}\n")
    assert load_config("~/c.yaml").grpo.iterations == 3


def test_the_forward_objectives_adv_clip_rule_blames_only_a_clip_that_binds():
    """Groups of 27+ have a success advantage sqrt(G - 1) > the default adv_clip 5: refused. A forward_adv_scale
    at or below adv_clip saturates first, so adv_clip changes nothing there and must not be blamed."""
    forward = ["grpo.objective=forward", "grpo.stochastic_steps=null", "grpo.group_size=32"]
    with pytest.raises(ConfigError, match="adv_clip=5.0 below sqrt"):
        load_config(None, forward)
    assert load_config(None, [*forward, "grpo.forward_adv_scale=2"]).grpo.forward_adv_scale == 2
    assert load_config(None, [*forward, "grpo.adv_clip=0"]).grpo.adv_clip == 0


def test_stop_on_hacking_without_evaluations_in_between_says_it_cannot_stop_early(capsys):
    """With eval_every 0 (the default) the only evaluations are the start and the end: stop_on_hacking cannot stop a
    run then, only choose the start's weights over hacked final ones, and the user is told (the docs had promised a
    stop). Would catch the warning lost, or given where evaluations in between make the stop possible."""
    from learner.main import preflight

    preflight(load_config(DEFAULT_CONFIG, ["grpo.stop_on_hacking=true", "grpo.eval_every=10"]), "grpo")
    assert "stop_on_hacking" not in capsys.readouterr().err
    preflight(load_config(DEFAULT_CONFIG, ["grpo.stop_on_hacking=true"]), "grpo")
    assert "grpo.eval_every=0 evaluates only at the start and the end" in capsys.readouterr().err
    preflight(load_config(DEFAULT_CONFIG, ["grpo.stop_on_hacking=true"]), "grpo", resuming=True)
    assert "stop_on_hacking" not in capsys.readouterr().err  # said when the run started, not again at each resume


def test_a_started_run_with_an_option_of_another_objective_still_resumes(tmp_path):
    """A run started before options of another objective were refused has one in its config.yaml: neither an
    override nor an edit of that file may change it on --resume, so refusing it there would strand the run."""
    (tmp_path / "config.yaml").write_text("grpo: {forward_pairs: 4}\n")
    with pytest.raises(ConfigError, match="applies to grpo.objective=forward only"):
        load_config(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml", resuming=True).grpo.forward_pairs == 4


@pytest.mark.parametrize("overrides", [
    ["grpo.objective=policy_gradient", "grpo.stochastic_steps=9"],  # grpo.steps 10: all 9 transitions stochastic
    ["grpo.objective=policy_gradient", "grpo.train_step_window=[0,8]"],  # the last transition is one to train
    ["grpo.prompt_stats_min_count=32"],  # as many as the buffer holds
    ["grpo.prompts_per_iteration=2", "actors.learner.count=2"],  # one group per rank
    ["redis.url=rediss://cache.example:6380/0"],  # Redis over TLS
    ["grpo.objective=forward", "grpo.stochastic_steps=null", "grpo.ema_decay=0.9"],
])
def test_values_at_the_edge_of_what_is_allowed_are_accepted(overrides):
    """Each rule's boundary value is a valid run: would catch an off-by-one refusal (>= for >, < last for <= last),
    or a scheme missing from redis.url's list."""
    load_config(DEFAULT_CONFIG, overrides)


@pytest.mark.parametrize("overrides, fragment", [
    (["grpo.objective=forward", "grpo.stochastic_steps=null", "grpo.caption_contrast=0.5"],
     "grpo.caption_contrast=0.5 needs grpo.objective=policy_gradient"),
    (["grpo.ema_decay=0.9"], "grpo.ema_decay=0.9 needs grpo.objective=forward"),
    (["grpo.lora.rank=2", "grpo.train_text=true"], "grpo.lora.rank > 0 trains adapters on the U-Net only"),
    (["grpo.time_limit_s=0"], "'grpo.time_limit_s' = 0"),  # 0 would silently mean no limit (time_limit_s or inf)
    (["grpo.hacking_saturation=1"], "'grpo.hacking_saturation' = 1"),  # the start itself at the limit
    (["grpo.hacking_diversity=1"], "'grpo.hacking_diversity' = 1"),
    (["data.kind=webdataset"], "data.kind=webdataset reads its files from data.path"),
    (["sample.prompts=[a red cube]", "sample.prompt_file=p.txt"], "set sample.prompts or sample.prompt_file, not both"),
    (["sample.prompts=[a red cube, '  ']"], "sample.prompts holds an empty caption"),
])
def test_each_refusal_of_an_unusable_setting(overrides, fragment):
    """Settings that would be ignored (an option of another objective or model part), mean something else than
    written, or read nothing: each refused naming itself. Would catch any of these rules dropped or loosened."""
    with pytest.raises(ConfigError) as info:
        load_config(DEFAULT_CONFIG, overrides)
    assert fragment in str(info.value)


def test_an_empty_config_file_is_the_defaults(tmp_path):
    """A config file with nothing in it (or only comments) sets nothing: the defaults. Would catch it refused as
    not being a mapping."""
    (tmp_path / "empty.yaml").write_text("# nothing set yet\n")
    assert load_config(tmp_path / "empty.yaml", ["grpo.iterations=3"]).grpo.iterations == 3


def test_actor_threads_follow_the_shells_omp_num_threads_unless_set_or_started_by_ray(monkeypatch, tmp_path):
    """Would catch: actors taking every core beside another job although the shell said OMP_NUM_THREADS=1 (a rollout
    actor sampled 23x slower so), Ray's own OMP_NUM_THREADS=1 in a `ray job` taken for the user's, the environment
    overriding an explicit setting, or the number used not recorded (a resume from another shell would change it)."""
    from learner.config import dump_config

    for variable in ("RAY_RAYLET_PID", "RAY_JOB_CONFIG_JSON_ENV_VAR", "OMP_NUM_THREADS"):
        monkeypatch.delenv(variable, raising=False)
    assert load_config(DEFAULT_CONFIG, []).actors.torch_threads == 0  # all cores, as before
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = load_config(DEFAULT_CONFIG, [])
    assert cfg.actors.torch_threads == 1
    assert load_config(DEFAULT_CONFIG, ["actors.torch_threads=0"]).actors.torch_threads == 0
    assert load_config(DEFAULT_CONFIG, ["actors.torch_threads=2"]).actors.torch_threads == 2
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_config(cfg))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert load_config(saved, []).actors.torch_threads == 1  # the run's own number, whatever the shell says now
    for ray_variable in ("RAY_RAYLET_PID", "RAY_JOB_CONFIG_JSON_ENV_VAR"):  # a Ray worker; a `ray job` entrypoint
        monkeypatch.setenv(ray_variable, "1234")
        assert load_config(DEFAULT_CONFIG, []).actors.torch_threads == 0
        monkeypatch.delenv(ray_variable)
    monkeypatch.setenv("OMP_NUM_THREADS", "4,2")  # a nested-levels list: not a count to use
    assert load_config(DEFAULT_CONFIG, []).actors.torch_threads == 0
