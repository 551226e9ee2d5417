from learner import env  # noqa: F401  (importing it sets the offline, no-telemetry environment)

import pytest
import torch

from proxmodel.config import ModelConfig, TextConfig

# A CLIP of open_clip's real architecture, small enough to build in a test (its scores depend on the caption).
TINY_CLIP = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    },
    "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
}


@pytest.fixture(scope="session")
def ipv6_loopback() -> str:
    """"::1", or a skip where the machine has no IPv6 loopback (some containers disable IPv6)."""
    import socket

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here ({e})")
    return "::1"


@pytest.fixture(scope="session")
def tiny_model_config() -> ModelConfig:
    return ModelConfig(
        image_size=8, base_channels=8, channel_mults=[1, 2], attention_levels=[1], attention_head_dim=8,
        text=TextConfig(max_length=16, width=16, layers=1, heads=2),
    )


@pytest.fixture(scope="session")
def tiny_model(tiny_model_config):
    from proxmodel.model import ProxT2I

    torch.manual_seed(0)
    return ProxT2I(tiny_model_config)


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    """TINY_CLIP's random weights saved the way open_clip hub repos are (config JSON + safetensors)."""
    import json

    import open_clip
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("clip")
    (folder / "open_clip_config.json").write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY_CLIP["model_cfg"])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    """A folder and an MLflow sqlite store in it, shared by the CLI tests of the whole session."""
    root = tmp_path_factory.mktemp("cli")
    return root, f"sqlite:///{root / 'mlflow.db'}"


@pytest.fixture(scope="session")
def pretrained(store):
    """The summary of one smoke pretraining run (6 steps, run states after steps 3 and 6), shared by the end-to-end
    and resume tests: it is their starting checkpoint, and the resume tests' uninterrupted reference."""
    from tests.cli import SMOKE, run_cli, summary_of

    root, uri = store
    proc = run_cli("--mode", "pretrain", "--config", str(SMOKE), f"run_dir={root / 'pretrain'}",
                   f"mlflow.tracking_uri={uri}", "pretrain.checkpoint_every=3", "mlflow.system_metrics_interval_s=1")
    (root / "pretrain.stdout").write_text(proc.stdout)  # what it printed, for the test of its report
    return summary_of(proc)


@pytest.fixture(scope="session")
def grpo_reference(pretrained, store):
    """The summary of one uninterrupted smoke GRPO run (ZeRO-2, synchronous, 2 iterations, a run state after each)
    from `pretrained`: what a resumed, or a fault-surviving, run of the same arguments must equal."""
    from tests.cli import grpo_args, run_cli, summary_of

    root, uri = store
    return summary_of(run_cli(*grpo_args(root, uri, pretrained, "g2-full")))


@pytest.fixture()
def one_thread():
    """torch on one thread for the test: rollout and learner run the same kernels only with the same thread count
    (the learner sets actors.torch_threads=1), so the first ratio is exactly 1; tiny tensors also run faster so."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture()
def server():
    """A real embedded redis-server for one test."""
    from actors.stream import EmbeddedRedis

    with EmbeddedRedis() as s:
        yield s
