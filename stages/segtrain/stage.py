"""The training stage of a segmenter (teacher or student): given weights, or a Ray Train run."""

from __future__ import annotations

import logging
from typing import Any

from stages.core.declaration import Declaration
from stages.core.models import build_segmenter, finished_model, given_checkpoint
from stages.core.pretrained import SEGMENTER
from stages.core.run_config import LoopConfig
from stages.core.storage import Storage
from stages.core.training import train_and_write
from stages.segtrain.config import SegTrainConfig
from stages.segtrain.loop import train_loop

logger = logging.getLogger(__name__)


SCHEMA = "segmenter/1"

TEACHER = Declaration(
    "train_teacher",
    reads=("images",),
    writes=("teacher",),
    schema=SCHEMA,
    section="teacher",
    image_inputs=(("labeled", "train"),),
    key_figures=("trained_steps", "loss_s", "steps_per_s"),
)

STUDENT = Declaration(
    "train_student",
    reads=("images", "pseudolabels"),
    writes=("student",),
    schema=SCHEMA,
    section="student",
    image_inputs=(("labeled", "train"), ("unlabeled", "train")),
    label_input="pseudolabels",
    key_figures=("trained_steps", "loss_s", "loss_u", "steps_per_s"),
)


def run(
    cfg: SegTrainConfig,
    *,
    datasets: dict[str, Any],
    num_classes: int,
    storage: Storage,
    out_path: str,
    name: str,
    loop_extra: dict[str, Any],
    use_gpu: bool,
) -> dict[str, float]:
    """Train (or load given weights), then write the checkpoint to ``out_path`` in storage."""
    if cfg.weights:
        blob = given_checkpoint(
            cfg.weights, kind="segmenter", num_classes=num_classes, arch=cfg.arch
        )
        # as given, plus the image size it is used at (the model file's metadata)
        image_size = loop_extra["image_size"]
        storage.write_bytes(
            out_path,
            finished_model(
                blob, image_size=image_size, window=loop_extra.get("crop_size"), source=out_path
            ),
        )
        return {"trained_steps": 0.0}
    return train_and_write(
        train_loop,
        LoopConfig(train=cfg, num_classes=num_classes, **loop_extra),
        steps=cfg.steps,
        init_into=lambda: build_segmenter(arch=cfg.arch, num_classes=num_classes),
        layout=SEGMENTER,
        datasets=datasets,
        storage=storage,
        out_path=out_path,
        name=name,
        use_gpu=use_gpu,
        window=loop_extra.get("crop_size"),
    )
