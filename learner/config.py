"""The run config: a typed schema (every field says what it is), YAML files and dotted `key=value` overrides.

Unknown keys and wrong types are rejected with a message naming the key; nothing runs on a config it cannot read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import Field, ValidationError, model_validator

from proxmodel.config import ModelConfig, Strict

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


class ConfigError(Exception):
    """A config that cannot be used; the message names the key and the fix."""


class DataConfig(Strict):
    kind: Literal["scenes", "digits", "folder", "webdataset"] = Field(
        "scenes", description="scenes: the built-in synthetic captioned scenes; digits: scikit-learn's 1797 "
        "handwritten digits ('a handwritten digit k'); folder: image files with same-stem .txt captions under "
        "data.path; webdataset: tar shards (key.jpg/png/webp + key.txt [+ key.json], the LAION layout) at data.path",
    )
    path: Optional[str] = Field(
        None, description="folder: the image folder; webdataset: a folder of .tar shards, one .tar, or a brace "
        "pattern like /data/shards/{00000..00099}.tar",
    )
    seed: int = Field(0, description="seed of the data order (scenes: scene i is a pure function of (seed, i))")
    omit_prob: float = Field(0.3, ge=0, le=1, description="scenes: chance a caption leaves out a size/position/background")
    holdout: float = Field(
        0.1, ge=0, lt=1, description="digits, folder: fraction held out of training (fixed by seed); evaluation "
        "prompts are its captions",
    )
    cursor: int = Field(
        0, ge=0, description="index in the data stream of the first training sample; a pretrain run's summary.json "
        "gives data_cursor, the value that continues where it stopped",
    )

    @model_validator(mode="after")
    def _check_path(self) -> "DataConfig":
        if self.kind in ("folder", "webdataset") and not self.path:
            raise ValueError(f"data.kind={self.kind} reads its files from data.path; set data.path=/your/data")
        return self


class PretrainConfig(Strict):
    iterations: int = Field(2000, ge=1, description="optimiser steps")
    batch_size: int = Field(32, ge=1, description="images per step (per learner rank)")
    lr: float = Field(5e-4, gt=0, description="AdamW learning rate (linear warm-up, then constant)")
    warmup: int = Field(100, ge=0, description="learning-rate warm-up steps")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, gt=0, description="gradient-norm clipping")
    step_candidates: list[int] = Field(
        [5, 10], min_length=1, description="sampler step counts N whose (t, lam) pairs are trained (weights N^1/3)"
    )
    prox_variants: list[Literal["hybrid", "backward"]] = Field(
        ["hybrid"], min_length=1, description="prox samplers whose lam values are trained (backward: lam = "
        "gamma / (1 - gamma/2), only for step candidates with every gamma < 2, i.e. N >= 10 at beta_max = 20)"
    )
    l1_warmup_frac: float = Field(0.33, ge=0, lt=1, description="fraction of training with the L1 loss")
    zeta0: float = Field(1.0, gt=0, description="proximal-matching zeta of the first stage; the second uses zeta0/2")
    log_every: int = Field(10, ge=1, description="log losses to MLflow every this many steps")
    checkpoint_every: int = Field(500, ge=1, description="overwrite run_dir/checkpoint every this many steps")
    sample_steps: int = Field(10, ge=1, description="sampler steps for the final sample grid")
    cfg_dropout: float = Field(
        0.1, ge=0, le=1, description="chance a training caption is replaced by the empty caption (for guidance)"
    )
    ema_decay: float = Field(
        0.999, ge=0, lt=1, description="EMA decay of the weights; evaluation and the exported checkpoint use the "
        "average (0 = off)"
    )
    score_t_min: float = Field(
        1e-3, gt=0, lt=1, description="kind score: training times t ~ U(score_t_min, 1) (the samplers stop there)"
    )
    eval_sampler: Optional[Literal["hybrid", "backward", "sde", "ode", "ddim"]] = Field(
        None, description="sampler of the final sample grid; null = hybrid (kind prox) or ddim (kind score)"
    )
    eval_guidance: float = Field(1.0, ge=0, description="classifier-free guidance scale w of the final samples")


class GrpoConfig(Strict):
    iterations: int = Field(30, ge=1, description="rollout + update iterations")
    prompts_per_iteration: int = Field(6, ge=1, description="prompts P drawn per iteration")
    group_size: int = Field(8, ge=2, description="images G sampled per prompt (the group of the advantage)")
    steps: int = Field(10, ge=2, description="hybrid-sampler steps N (a trajectory has N-1 policy log-probs)")
    eta: float = Field(1.0, gt=0, description="noise scale of the stochastic sampler (1 = the method)")
    guidance: float = Field(
        1.0, ge=0, description="classifier-free guidance scale w of the rollouts (1 = none); the learner re-scores "
        "actions under the same guided network, so the policy is the guided sampler",
    )
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, gt=0, description="gradient-norm clipping")
    clip_range: float = Field(
        1e-3, gt=0, description="PPO clip range of the policy ratio (log-probs are MEANS over dimensions)"
    )
    kl_coef: float = Field(
        0.0, ge=0, description="weight of the closed-form per-step KL to the frozen starting policy (0 = off)"
    )
    adv_eps: float = Field(1e-4, gt=0, description="added to the std when normalising advantages")
    adv_clip: float = Field(5.0, ge=0, description="bound on |advantage| (0 = no bound)")
    advantage_std: Literal["group", "global", "prompt"] = Field(
        "group", description="normalise by each group's std, one std over the batch, or per-prompt running stats"
    )
    reward_aggregation: Literal["reward", "advantage"] = Field(
        "reward", description="normalise the weighted reward sum, or sum weighted per-reward advantages"
    )
    prompt_stats_buffer: int = Field(32, ge=2, description="rewards remembered per prompt (advantage_std: prompt)")
    prompt_stats_min_count: int = Field(16, ge=2, description="below this many, a prompt uses its group's stats")
    drop_zero_std_groups: bool = Field(True, description="skip groups whose rewards are all equal (no signal)")
    train_step_window: Optional[list[int]] = Field(
        None, description="sampler transitions to train, 0 = the first (noisiest); null = all N-1"
    )
    train_step_fraction: float = Field(
        1.0, gt=0, le=1, description="random fraction of the window trained each iteration (timestep subsampling)"
    )
    updates_per_batch: int = Field(1, ge=1, description="optimiser steps per batch; after the first the ratio != 1")
    time_limit_s: Optional[float] = Field(
        None, gt=0, description="stop launching rollouts after this many seconds of training (the iterations in "
        "flight are still trained); null = run all iterations",
    )
    max_staleness: int = Field(
        0, ge=0, description="async mode: rollouts may run this many policy versions ahead of the learner "
        "(0 = synchronous); older groups are skipped by the learner"
    )
    prompt_file: Optional[str] = Field(
        None, description="UTF-8 text file, one prompt per line (eval_prompts of them held out); null = scene captions"
    )
    prompt_seed: int = Field(1, description="seed of the prompt stream (scene captions, or the file's shuffles)")
    eval_prompts: int = Field(32, ge=1, description="held-out prompts scored at each evaluation (fixed noise)")
    eval_every: int = Field(
        10, ge=0, description="evaluate (rewards, sample grid, hacking monitors) every K iterations; 0 = start and end only"
    )


class RewardSpec(Strict):
    name: str = Field(description="a registered reward (see rewards.available())")
    weight: float = Field(1.0, description="weight in the summed reward")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the reward's constructor")


class ActorResources(Strict):
    count: int = Field(1, ge=1, description="how many actors of this kind")
    num_cpus: float = Field(1.0, ge=0, description="Ray CPUs reserved per actor")
    num_gpus: float = Field(0.0, ge=0, description="Ray GPUs per actor (fractions allowed)")


class RewardActorConfig(ActorResources):
    batch_size: int = Field(64, ge=1, description="images scored per reward-model call")
    timeout_s: float = Field(120.0, gt=0, description="a scoring call slower than this is retried elsewhere")
    retries: int = Field(2, ge=0, description="extra attempts on other reward actors after a failure")
    cache: bool = Field(
        False, description="keep scores on the run's Redis under (reward, image hash, prompt) and reuse them "
        "instead of rescoring (worth it for slow rewards and repeated images, e.g. evaluation with fixed noise)"
    )
    cache_ttl_s: int = Field(86400, ge=1, description="seconds a cached score is kept")


class ActorsConfig(Strict):
    rollout: ActorResources = Field(default_factory=ActorResources)
    reward: RewardActorConfig = Field(default_factory=lambda: RewardActorConfig(num_cpus=0.5))
    learner: ActorResources = Field(
        default_factory=ActorResources, description="count = DeepSpeed ranks, one Ray actor each, in a placement group"
    )
    torch_threads: int = Field(
        0, ge=0, description="torch threads in each actor; 0 = all cores. Rollout and learner use the same count, "
        "so on CPU they run the same kernels and the first on-policy ratio is exactly 1",
    )


class DeepSpeedConfig(Strict):
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage of the learner")
    bf16: bool = Field(
        False, description="bf16 network in the learner (fp32 master weights), the KL reference, the rollout actors "
        "and evaluation, so rollouts and learner compute the same function; log-probs and losses stay float32",
    )


class RedisConfig(Strict):
    url: Optional[str] = Field(
        None, description="redis://host:port/db of a Redis server; null = an embedded one on a private unix socket"
    )
    password_env: str = Field("PROXRL_REDIS_PASSWORD", description="environment variable holding the password")


class RayConfig(Strict):
    address: Optional[str] = Field(None, description="a Ray cluster to join; null = RAY_ADDRESS or a local Ray")
    resource_wait_s: float = Field(
        0.0, ge=0, description="if the cluster lacks the CPUs/GPUs the actors ask for, ask the autoscaler and wait "
        "this long for new nodes before failing (0 = fail at once)",
    )


class MlflowConfig(Strict):
    tracking_uri: Optional[str] = Field(
        None, description="MLflow store; null = MLFLOW_TRACKING_URI or sqlite:///mlflow.db in the working directory"
    )
    experiment: str = Field("proxrl", description="MLflow experiment name")


class RunConfig(Strict):
    seed: int = Field(0, description="global seed (model init, noise, prompts)")
    run_dir: Optional[str] = Field(None, description="the run's directory; null = runs/<mode>-<time>")
    init_from: Optional[str] = Field(
        None,
        description="checkpoint folder to start from ('builtin:NAME' = shipped with ProxRL); "
        "null = from scratch (pretrain) or builtin:scenes-base (grpo). Its config.json sets the architecture.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    grpo: GrpoConfig = Field(default_factory=GrpoConfig)
    rewards: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec(name="compositional")], min_length=1)
    actors: ActorsConfig = Field(default_factory=ActorsConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)

    @model_validator(mode="after")
    def _check_learner_ranks(self) -> "RunConfig":
        if self.grpo.prompts_per_iteration < self.actors.learner.count:
            raise ValueError(
                f"grpo.prompts_per_iteration ({self.grpo.prompts_per_iteration}) must be at least the number of "
                f"learner ranks actors.learner.count ({self.actors.learner.count}): each rank trains whole groups"
            )
        return self

    @model_validator(mode="after")
    def _check_rewards(self) -> "RunConfig":
        from rewards import available

        names = [r.name for r in self.rewards]
        unknown = sorted(set(names) - set(available()))
        if unknown:
            raise ValueError(f"unknown reward(s) {unknown}; registered rewards are {available()}")
        if len(set(names)) != len(names):
            raise ValueError(f"a reward is listed twice in rewards: {names}")
        return self


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"command-line argument {item!r} is not a key=value override (e.g. grpo.iterations=5).")
    key, raw = item.split("=", 1)
    if not key:
        raise ConfigError(f"override {item!r} has no key; write it as section.key=value.")
    return key.split("."), yaml.safe_load(raw) if raw != "" else None


def load_config(path: Optional[str | Path] = None, overrides: tuple[str, ...] | list[str] = ()) -> RunConfig:
    """Read `path` (default: the embedded default), apply dotted overrides, validate."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist. Pass an existing YAML file with --config, e.g. configs/smoke.yaml.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid UTF-8 YAML ({e}). Fix the file and run again.") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values at the top level.")
    for item in overrides:
        keys, value = _parse_override(item)
        node = data
        for depth, k in enumerate(keys[:-1]):
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {item!r}: {'.'.join(keys[: depth + 1])} is a value, not a section, so it has no key "
                    f"{keys[depth + 1]!r}. Check the key against {path}."
                )
            node = child
        node[keys[-1]] = value
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_explain(e, path)) from None


def _explain(error: ValidationError, path: Path) -> str:
    lines = []
    for err in error.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown config key '{key}': no such setting exists. Remove it or fix its spelling.")
        else:
            lines.append(f"config key '{key}': {err['msg']} (got {err.get('input')!r}).")
    return (
        f"The config ({path} plus command-line overrides) is invalid: " + " ".join(lines)
        + " Every valid key and its meaning is in learner/config.py and configs/default.yaml."
    )


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
