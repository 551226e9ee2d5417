"""The learner's entry points import this first: the offline, no-telemetry environment of proxmodel/env.py."""

from proxmodel.env import OFFLINE_ENV  # noqa: F401  (importing it sets the environment)
