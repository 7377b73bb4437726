"""The evaluate stage's settings."""

from __future__ import annotations

from stages.core.run_config import InferenceConfig


class EvaluateConfig(InferenceConfig):
    pass
