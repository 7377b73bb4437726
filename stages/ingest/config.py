"""Configuration of the data source (the ingest stage's config model)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from stages.core.config import StrictModel
from stages.ingest import cityscapes, voc
from stages.ingest.generated import CLASS_NAMES, GeneratedSpec

# Datasets with their own classes: their names in index order, the default for a source in
# their layout. A custom dataset in the same layout gives num_classes and class_names instead.
DATASET_CLASSES: dict[str, tuple[str, ...]] = {
    "voc": voc.CLASS_NAMES,
    "cityscapes": cityscapes.CLASS_NAMES,
}
LAYOUT_NAMES = {"voc": "VOC", "cityscapes": "Cityscapes"}


class GeneratedSourceConfig(StrictModel):
    """Sizes and seed of the procedural default dataset (see ``stages.ingest.generated``)."""

    seed: int = 0
    num_labeled: int = Field(24, ge=1)
    num_unlabeled: int = Field(400, ge=1)
    num_val: int = Field(64, ge=1)
    image_size: int = Field(64, ge=16)
    max_objects: int = Field(4, ge=1)
    noise_std: float = Field(8.0, ge=0)
    colour_bias: float = Field(
        0.0, ge=0, le=1, description="weight of a class's own colour in its objects' colours"
    )

    def spec(self, num_classes: int) -> GeneratedSpec:
        return GeneratedSpec(num_classes=num_classes, **self.model_dump())


UNLABELED_MASKS = (
    "keep the unlabeled images' masks where the dataset has them, to measure pseudo-labels "
    "against (coverage, precision) and for a sweep's ground-truth reference rows; training "
    "reads them only under pseudolabel.policy ground_truth"
)


class VocSourceConfig(StrictModel):
    """Pascal VOC 2012 splits (see ``stages.ingest.voc``): each a list name under
    ImageSets/Segmentation (``train``) or a .txt path relative to data.root."""

    labeled: str = "train"
    unlabeled: str | None = Field(None, description="default: unlabeled_from less labeled")
    unlabeled_from: str = "train"
    val: str = "val"
    augmented: bool = Field(False, description="labeled masks from SegmentationClassAug")
    unlabeled_masks: bool = Field(False, description=UNLABELED_MASKS)


class CityscapesSourceConfig(StrictModel):
    """Cityscapes splits (see ``stages.ingest.cityscapes``): each a leftImg8bit split folder
    (``train``) or a .txt list relative to data.root."""

    labeled: str = "train"
    unlabeled: str | None = Field(None, description="default: the rest of the train split")
    val: str = "val"
    unlabeled_masks: bool = Field(False, description=UNLABELED_MASKS)


class DataConfig(StrictModel):
    """Where images come from and how they are presented to the models."""

    source: Literal["generated", "folder", "voc", "cityscapes"] = Field(
        "generated", description="the dataset layout (README: Data sources)"
    )
    root: str | None = Field(None, description="folder, voc, cityscapes: directory or fsspec URL")
    num_classes: int = Field(
        5,
        ge=2,
        le=255,
        description="voc and cityscapes: theirs by default; another count needs class_names "
        "(a custom dataset in their layout)",
    )
    class_names: tuple[str, ...] | None = Field(
        None,
        strict=False,
        description="names in index order (a YAML list); voc and cityscapes: theirs by default",
    )
    image_size: int = Field(
        64,
        ge=16,
        description="side of the square canvas every image is fitted to: scaled so its long "
        "side is image_size (aspect ratio kept), padded bottom and right (ignore)",
    )
    crop_size: int | None = Field(
        None,
        ge=16,
        description="side of the random training crops (after teacher/student.scale), and of "
        "the sliding window evaluate and predict use when it is smaller than image_size "
        "(None: image_size, whole images)",
    )
    val_fraction: float = Field(
        0.2,
        ge=0.0,
        lt=1.0,
        description="folder without split lists: the share of masked images kept for val",
    )
    generated: GeneratedSourceConfig = GeneratedSourceConfig()
    voc: VocSourceConfig = VocSourceConfig()
    cityscapes: CityscapesSourceConfig = CityscapesSourceConfig()
    blocks: int = Field(4, ge=1, description="Ray Data blocks for ingest (execution only)")
    max_bad_fraction: float = Field(
        0.05, ge=0.0, le=1.0, description="fail the run when more of the items are quarantined"
    )

    @model_validator(mode="before")
    @classmethod
    def _dataset_num_classes(cls, raw: Any) -> Any:
        """A dataset with its own classes sets num_classes when the config leaves it out."""
        if isinstance(raw, dict) and "num_classes" not in raw:
            source = raw.get("source")
            if isinstance(source, str) and source in DATASET_CLASSES:
                return {**raw, "num_classes": len(DATASET_CLASSES[source])}
        return raw

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        problems = []
        if self.source != "generated" and not self.root:
            problems.append(f"data.root is required when data.source is {self.source!r}")
        fixed = DATASET_CLASSES.get(self.source)
        layout = LAYOUT_NAMES.get(self.source)
        if fixed is not None and self.num_classes != len(fixed) and self.class_names is None:
            problems.append(
                f"data.num_classes must be {len(fixed)} for {self.source} ({fixed[0]}, "
                f"{fixed[1]}, ..., {fixed[-1]}); got {self.num_classes}; a custom dataset in the "
                f"{layout} layout gives data.class_names as well ({self.num_classes} names in "
                "index order)"
            )
        if self.source == "generated" and self.num_classes > len(CLASS_NAMES):
            problems.append(
                f"the generated dataset has at most {len(CLASS_NAMES)} classes "
                f"({', '.join(CLASS_NAMES)}); got num_classes={self.num_classes}"
            )
        if self.crop_size is not None and self.crop_size > self.image_size:
            problems.append(
                f"data.crop_size ({self.crop_size}) must be at most data.image_size "
                f"({self.image_size}), the canvas it is cut from"
            )
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            problem = (
                f"data.class_names has {len(self.class_names)} names for "
                f"data.num_classes={self.num_classes}"
            )
            if fixed is not None and self.num_classes == len(fixed):
                problem += (
                    f" ({self.source}'s own count); a custom dataset in the {layout} layout sets "
                    f"data.num_classes: {len(self.class_names)} as well"
                )
            problems.append(problem)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def crop(self) -> int:
        """The training crop and evaluation window: ``crop_size`` or the whole canvas."""
        return self.crop_size or self.image_size

    def names(self) -> list[str]:
        """The class names in index order: ``class_names``, else the dataset's own (voc,
        cityscapes), the generated shapes, or ``class_<i>``."""
        if self.class_names:
            return list(self.class_names)
        if self.source == "generated":
            return list(CLASS_NAMES[: self.num_classes])
        if self.source in DATASET_CLASSES:
            return list(DATASET_CLASSES[self.source])
        return [f"class_{i}" for i in range(self.num_classes)]
