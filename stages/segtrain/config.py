"""How a segmentation network is trained: the teacher's settings (``SegTrainConfig``) and the
student's (``StudentConfig``, with its strong views)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from stages.core.config import StrictModel
from stages.core.models import check_arch
from stages.core.run_config import TrainingRun


class SegTrainConfig(TrainingRun):
    """How a segmentation network is trained (teacher or student)."""

    arch: str = Field(
        "lraspp_mobilenet_v3_large",
        description="a torchvision segmentation builder: deeplabv3_resnet50/101, "
        "deeplabv3_mobilenet_v3_large, fcn_resnet50/101, lraspp_mobilenet_v3_large",
    )
    steps: int = Field(300, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="labeled images a step (per worker)")
    lr: float = Field(2e-3, gt=0, description="AdamW's peak learning rate (the heads')")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW's decoupled weight decay")
    log_every: int = Field(25, ge=1, description="steps between logged metrics and lines")
    backbone_lr: float = Field(
        1.0,
        gt=0,
        description="the backbone's learning rate as a fraction of lr (fine-tuning recipes: "
        "UniMatch's heads learn at 10 times the backbone's rate, i.e. 0.1)",
    )
    schedule: Literal["poly", "cosine"] = Field("poly", description="learning-rate decay to 0")
    scale: tuple[float, float] = Field(
        (0.5, 2.0),
        strict=False,
        description="range of the random factor each training image is scaled by (aspect "
        "ratio kept) before its data.crop_size crop: UniMatch's [0.5, 2.0]",
    )
    amp: bool = Field(True, description="float16 autocast and loss scaling on CUDA (CPU: off)")
    grad_clip: float | None = Field(
        1.0,
        gt=0,
        description="clip the gradients' total L2 norm to this before each step (None: never)",
    )

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        check_arch(value)  # at config time, not after ingest
        return value


class StrongViewConfig(StrictModel):
    """The strong views' photometric draw (``augment.Photometric``); UniMatch's values by
    default. Where colour is what tells classes apart, ``hue`` and ``grayscale`` erase it."""

    jitter: float = Field(0.5, ge=0, le=1, description="brightness, contrast, saturation")
    hue: float = Field(0.25, ge=0, le=0.5)
    jitter_chance: float = Field(0.8, ge=0, le=1)
    grayscale: float = Field(0.2, ge=0, le=1, description="chance of a grayscale view")
    blur: float = Field(0.5, ge=0, le=1, description="chance of a Gaussian blur")


class StudentConfig(SegTrainConfig):
    alpha: float = Field(
        1.0, ge=0, description="weight of the unlabeled loss: L = L_s + alpha * L_u"
    )
    unlabeled_batch_size: int = Field(8, ge=1, description="unlabeled images a step (per worker)")
    cutmix: float = Field(0.5, ge=0, le=1, description="chance a strong view gets a CutMix box")
    strong: StrongViewConfig = Field(default_factory=StrongViewConfig)
    ema: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="decay of an exponential moving average of the weights (0: none); with one,"
        " the saved student (what evaluate scores and the next round's teacher) is the EMA",
    )
