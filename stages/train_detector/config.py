"""The train_detector stage's settings, and what they make of the detector: its builder
arguments and where its backend keeps the backbone and the class-count-dependent head."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from stages.core.detectors import (
    DEFAULT_ARCHITECTURES,
    DEFAULT_BACKEND,
    BackendName,
    check_arch,
    detector_backend,
)
from stages.core.pretrained import (
    DETECTRON2_DETECTOR,
    TORCHVISION_DETECTOR,
    Layout,
)
from stages.core.run_config import TrainingRun

# ``grad_clip`` when the config gives none, per backend. detectron2's R-50 from random weights at
# the default lr 0.01 (no warm-up) diverged within ~20 steps in 3 of 4 runs on the smoke data
# (detectron2 raises FloatingPointError); clipped at 10 it trained in all. torchvision's default
# network trains unclipped, as it always has.
DEFAULT_GRAD_CLIP: dict[str, float | None] = {"torchvision": None, "detectron2": 10.0}


class DetectorConfig(TrainingRun):
    """How the object detector is trained (or which weights are loaded instead)."""

    enabled: bool = True
    backend: BackendName = Field(
        DEFAULT_BACKEND, description="torchvision, or detectron2 where it is installed"
    )
    arch: str = Field(
        DEFAULT_ARCHITECTURES[DEFAULT_BACKEND],
        description="the backend's architecture (detectron2: a model-zoo config); "
        "default: the backend's default",
    )
    steps: int = Field(200, ge=1)
    batch_size: int = Field(4, ge=1)
    lr: float = Field(0.01, gt=0)
    min_size: int = Field(128, ge=32, description="the detector's internal resize (short side)")
    min_box_area: int = Field(4, ge=1, description="smaller mask components give no box")
    proposals: int = Field(128, ge=1, description="RPN proposals kept after NMS per image")
    roi_samples: int = Field(64, ge=1, description="RoIs sampled per image for the box head")
    max_detections: int = Field(32, ge=1, description="detections returned per image")
    grad_clip: float | None = Field(
        None,
        gt=0,
        description="clip the gradients' total L2 norm to this before each step (None: never); "
        "default: the backend's (torchvision: never, detectron2: 10)",
    )
    log_every: int = Field(25, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _backend_defaults(cls, data: Any) -> Any:
        """Without an ``arch`` or ``grad_clip``, the selected backend's default."""
        if not isinstance(data, dict):
            return data
        backend = data.get("backend", DEFAULT_BACKEND)
        if isinstance(backend, str) and backend in DEFAULT_ARCHITECTURES:
            data = {"arch": DEFAULT_ARCHITECTURES[backend], **data}
        if isinstance(backend, str) and backend in DEFAULT_GRAD_CLIP:
            data = {"grad_clip": DEFAULT_GRAD_CLIP[backend], **data}
        return data

    @model_validator(mode="after")
    def _known_arch(self) -> DetectorConfig:
        check_arch(self.backend, self.arch)
        return self


def check_detector_backend(cfg: DetectorConfig) -> None:
    """Raise :class:`~stages.core.detectors.BackendUnavailable` (a ``ValueError``) when the
    detector is enabled and its backend cannot be imported here: a config error to report before
    any stage runs, not a failure inside a Ray worker."""
    if cfg.enabled:
        detector_backend(cfg.backend)


def detector_args(cfg: DetectorConfig, num_classes: int) -> dict[str, Any]:
    """Builder arguments (stored in the checkpoint, with the backend that builds them): the
    backends' proposal and RoI counts are sized for 800-pixel images; these scale them to the
    small inputs this detector sees. Both backends take the same arguments."""
    return {
        "backend": cfg.backend,
        "arch": cfg.arch,
        "num_classes": num_classes,
        "min_size": cfg.min_size,
        "max_size": cfg.min_size,
        "rpn_pre_nms_top_n_train": 4 * cfg.proposals,
        "rpn_post_nms_top_n_train": cfg.proposals,
        "rpn_pre_nms_top_n_test": 2 * cfg.proposals,
        "rpn_post_nms_top_n_test": cfg.proposals // 2 or 1,
        "box_batch_size_per_image": cfg.roi_samples,
        "box_detections_per_img": cfg.max_detections,
    }


def detector_layout(backend: str) -> Layout:
    """Where the backend's detector keeps its backbone and its class-count-dependent head."""
    return DETECTRON2_DETECTOR if backend == "detectron2" else TORCHVISION_DETECTOR
