"""Process environment every ProxRL process (driver, actors, tests, tools) runs with.

In proxmodel, the package every other one may import: rewards' tools set it without importing the learner.
"""

import os

# Nothing may be fetched from a model hub at run time; library telemetry stays off.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}
for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)
