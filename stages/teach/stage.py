"""The teach stage: the teacher over the labeled and unlabeled images -> ``teacher_signals``
(:mod:`stages.teach.table`), by an actor pool of :class:`~stages.teach.predictor.TeacherPredictor`,
a committed shard at a time."""

from __future__ import annotations

import logging

from stages.core.declaration import Declaration
from stages.core.inference import predict_into_pool
from stages.core.shards import ShardPool
from stages.core.storage import DatasetRef
from stages.teach.config import TeachConfig
from stages.teach.predictor import TeacherPredictor
from stages.teach.table import SCHEMA, SignalSpec

logger = logging.getLogger(__name__)


TEACH_SPLITS = ("labeled", "unlabeled")  # the splits a teach stage labels


# reads "teacher": the round's teacher (a later round's is the round before's student)
DECLARATION = Declaration(
    "teach",
    reads=("images", "teacher"),
    writes=("teacher_signals",),
    schema=SCHEMA,
    section="teach",
    image_inputs=(("labeled", "inference"), ("unlabeled", "inference")),
    key_figures=("images_inferred", "shards_reused"),
)


def run(
    cfg: TeachConfig,
    *,
    spec: SignalSpec,
    images: DatasetRef,
    checkpoint_path: str,
    image_size: int,
    out: DatasetRef,
    pool: ShardPool,
) -> dict[str, float]:
    """Run the teacher over the labeled and unlabeled images that ``pool`` does not hold yet
    (actor pool, a shard committed at a time); commit ``out`` over all of them."""
    return predict_into_pool(
        images,
        TEACH_SPLITS,
        ["image_id", "height", "width", "image", "split", "mask"],
        TeacherPredictor,
        {
            "checkpoint_path": checkpoint_path,
            "spec": spec.model_dump(),
            "precision": cfg.precision,
            "tta": cfg.tta.model_dump(mode="json"),
        },
        cfg=cfg,
        image_size=image_size,
        pool=pool,
        out=out,
        schema=SCHEMA,
    )
