"""The detect stage's settings."""

from __future__ import annotations

from pydantic import Field

from stages.core.run_config import InferenceConfig


class DetectConfig(InferenceConfig):
    min_score: float = Field(0.05, ge=0.0, le=1.0, description="detections below are not stored")
