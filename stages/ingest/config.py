"""Configuration of the data source (the ingest stage's config model)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from stages.core.config import StrictModel
from stages.ingest.generated import CLASS_NAMES, GeneratedSpec


class GeneratedSourceConfig(StrictModel):
    """Sizes and seed of the procedural default dataset (see ``stages.ingest.generated``)."""

    seed: int = 0
    num_labeled: int = Field(24, ge=1)
    num_unlabeled: int = Field(400, ge=1)
    num_val: int = Field(64, ge=1)
    image_size: int = Field(64, ge=16)
    max_objects: int = Field(4, ge=1)
    noise_std: float = Field(8.0, ge=0)

    def spec(self, num_classes: int) -> GeneratedSpec:
        return GeneratedSpec(num_classes=num_classes, **self.model_dump())


class DataConfig(StrictModel):
    """Where images come from and how they are presented to the models."""

    source: Literal["generated", "folder"] = "generated"
    root: str | None = Field(None, description="folder source: directory or fsspec URL")
    num_classes: int = Field(5, ge=2, le=255)
    class_names: tuple[str, ...] | None = None
    image_size: int = Field(64, ge=16, description="side of the square model input")
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    generated: GeneratedSourceConfig = GeneratedSourceConfig()
    blocks: int = Field(4, ge=1, description="Ray Data blocks for ingest (execution only)")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.source == "folder" and not self.root:
            raise ValueError("data.root is required when data.source is 'folder'")
        if self.source == "generated" and self.num_classes > len(CLASS_NAMES):
            raise ValueError(
                f"the generated dataset has at most {len(CLASS_NAMES)} classes "
                f"({', '.join(CLASS_NAMES)}); got num_classes={self.num_classes}"
            )
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"class_names has {len(self.class_names)} names for {self.num_classes} classes"
            )
        return self

    def names(self) -> list[str]:
        if self.class_names:
            return list(self.class_names)
        if self.source == "generated":
            return list(CLASS_NAMES[: self.num_classes])
        return [f"class_{i}" for i in range(self.num_classes)]
