"""The pseudolabel stage's settings: which policy labels the unlabeled pixels, and its options
(methods.md). Ray-free: the student's step reads them too."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, Strict, field_validator

from stages.core.config import StrictModel

# The policies computed from the teacher's signals (what a report or a benchmark compares).
SIGNAL_POLICIES = ("threshold", "s4mc", "csl", "wpl")
# Every policy a config may name: ``ground_truth`` labels from the unlabeled split's masks.
GROUND_TRUTH = "ground_truth"
POLICIES = (*SIGNAL_POLICIES, GROUND_TRUTH)


class S4MCOptions(StrictModel):
    neighborhood: Literal[4, 8] = 8
    beta: float = Field(1.0, ge=0.0, le=1.0)
    label_from: Literal["unrefined", "refined"] = "unrefined"
    alpha0: float = Field(0.4, ge=0.0, le=1.0, description="DPA quantile at step 0")


class CSLOptions(StrictModel):
    alpha: float = Field(8.0, gt=0.0, description="Gaussian width a of the weights")
    block: int = Field(32, ge=1, description="TMP grid cell, pixels")
    cover: float = Field(0.7, ge=0.0, le=1.0, description="TMP probability of covering a cell")


# A class_map key: an int, or its decimal string (a config saved as JSON-mode YAML has string keys).
_ClassKey = Annotated[int, Strict(False)]


class WPLOptions(StrictModel):
    k: int = Field(5, ge=1, description="top-k activation indices compared")
    score_thresh: float = Field(0.95, ge=0.0, le=1.0, description="detections used for boxes")
    conf_thresh: float = Field(0.95, ge=0.0, le=1.0, description="reliability / queue confidence")
    weight_form: Literal["fraction", "plus_one"] = "fraction"
    class_map: dict[_ClassKey, int] | None = Field(
        None, description="detector class -> segmentation class; null: identity on 1..C-1"
    )
    refresh_every: int = Field(20, ge=1, description="student steps between prototype refreshes")
    memory_size: int = Field(256, ge=1, description="vectors per class and queue")


class PseudolabelConfig(StrictModel):
    """Which pixels of an unlabeled image get which pseudo-label, and with what weight."""

    policy: str = Field(
        "threshold",
        description="threshold, s4mc, csl, wpl; or ground_truth: the unlabeled split's own masks "
        "(reference rows, not a method; every unlabeled image needs a mask)",
    )
    tau: float = Field(0.95, gt=0.0, le=1.0, description="confidence threshold (threshold, wpl)")
    s4mc: S4MCOptions = S4MCOptions()
    csl: CSLOptions = CSLOptions()
    wpl: WPLOptions = WPLOptions()
    batch_size: int = Field(16, ge=1, description="signal rows a task labels as one batch")
    gpus_per_task: float = Field(
        0.0, ge=0, description="GPUs per labelling task: > 0 runs the policy math on CUDA"
    )

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in POLICIES:
            raise ValueError(f"unknown policy {value!r}; choose one of {', '.join(POLICIES)}")
        return value

    def class_map(self, num_classes: int) -> dict[int, int]:
        """WPL's detector -> segmentation class map (identity on the object classes by default)."""
        if self.wpl.class_map is not None:
            return dict(self.wpl.class_map)
        return {c: c for c in range(1, num_classes)}


def weight_offset(cfg: PseudolabelConfig) -> float:
    """WPL's ``plus_one`` form trains with 1 + W; every other policy stores w as it is."""
    return 1.0 if cfg.policy == "wpl" and cfg.wpl.weight_form == "plus_one" else 0.0
