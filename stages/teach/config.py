"""The teach stage's settings: precision, the policies it stores signals for, test-time
augmentation."""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import Field, field_validator

from stages.core.config import StrictModel
from stages.core.run_config import InferenceConfig

logger = logging.getLogger(__name__)


POLICY_NAMES = ("threshold", "s4mc", "csl", "wpl")


class TTAConfig(StrictModel):
    """Test-time augmentation of the teacher: its softmax averaged over the canvas scaled by each
    factor of ``scales`` and, with ``flip``, each of those mirrored (``len(scales) * (1 + flip)``
    forwards an image). WPL's features come from the plain view (scale 1, not flipped)."""

    scales: tuple[float, ...] = Field(
        (1.0,),
        strict=False,
        min_length=1,
        description="canvas scale factors (1.0 must be one of them), e.g. [0.75, 1.0, 1.25]",
    )
    flip: bool = Field(False, description="also each scale mirrored left to right")

    @field_validator("scales")
    @classmethod
    def _has_plain_view(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if 1.0 not in value:
            raise ValueError(f"teach.tta.scales must include 1.0 (the plain view); got {value}")
        if any(v <= 0 for v in value) or len(set(value)) != len(value):
            raise ValueError(f"teach.tta.scales must be distinct and > 0; got {value}")
        return value

    @property
    def enabled(self) -> bool:
        return self.scales != (1.0,) or self.flip


class TeachConfig(InferenceConfig):
    # policies counts in the teach key through the signals it makes the stage store
    EXECUTION = InferenceConfig.EXECUTION | {"policies"}

    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "bf16",
        description="the teacher's forward on CUDA: bfloat16 or float16 autocast (with "
        "channels-last), or float32; CPUs always run float32. Softmax and every statistic are "
        "float32",
    )
    policies: list[Literal["threshold", "s4mc", "csl", "wpl", "ground_truth"]] = Field(
        default_factory=list,
        description="policies whose signals are stored besides pseudolabel.policy's, so that "
        "switching to one reuses this teach stage and the report compares them (ground_truth "
        "needs none)",
    )
    tta: TTAConfig = Field(default_factory=TTAConfig)
