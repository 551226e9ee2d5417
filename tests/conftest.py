import os

# Tests never reach a model hub and never phone home; DeepSpeed uses its CPU accelerator where there is no GPU.
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)

import pytest  # noqa: E402
import torch  # noqa: E402

from proxmodel.config import ModelConfig, TextConfig  # noqa: E402


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
