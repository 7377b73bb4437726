"""The detect stage: the detector over the unlabeled images -> ``detections`` (an actor pool of
:class:`~stages.detect.predictor.DetectorPredictor`, a committed shard at a time)."""

from __future__ import annotations

from stages.core.declaration import Declaration
from stages.core.inference import predict_into_pool
from stages.core.shards import ShardPool
from stages.core.storage import DatasetRef
from stages.detect.config import DetectConfig
from stages.detect.predictor import DetectorPredictor
from stages.detect.table import SCHEMA

DECLARATION = Declaration(
    "detect",
    reads=("images", "detector"),
    writes=("detections",),
    schema=SCHEMA,
    section="detect",
    image_inputs=(("unlabeled", "inference"),),
    key_figures=("images_inferred", "shards_reused", "boxes_per_image"),
)


def run(
    cfg: DetectConfig,
    *,
    images: DatasetRef,
    checkpoint_path: str,
    image_size: int,
    out: DatasetRef,
    pool: ShardPool,
) -> dict[str, float]:
    """Run the detector over the unlabeled images ``pool`` does not hold yet (actor pool, a
    shard committed at a time); commit ``out`` over all of them."""
    metrics = predict_into_pool(
        images,
        "unlabeled",
        ["image_id", "height", "width", "image"],
        DetectorPredictor,
        {"checkpoint_path": checkpoint_path, "min_score": cfg.min_score},
        cfg=cfg,
        image_size=image_size,
        pool=pool,
        out=out,
        schema=SCHEMA,
    )
    counts = out.read_table(columns=["num_boxes"])["num_boxes"].to_numpy()
    return {**metrics, "boxes_per_image": float(counts.mean())}
