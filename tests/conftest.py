from learner import env  # noqa: F401  (importing it sets the offline, no-telemetry environment)

import pytest
import torch

from proxmodel.config import ModelConfig, TextConfig


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
