"""The ``detections`` table: boxes in the image's own pixel coordinates as (x1, y1, x2, y2),
flattened; the same whichever backend (torchvision, detectron2) the checkpoint names. Ray-free."""

from __future__ import annotations

import pyarrow as pa

DETECTIONS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("boxes", pa.list_(pa.float32())),  # N * 4 values: x1, y1, x2, y2 per box
        ("labels", pa.list_(pa.int32())),  # detector classes = segmentation classes 1..C-1
        ("scores", pa.list_(pa.float32())),
        ("num_boxes", pa.int32()),
    ]
)


SCHEMA = "detections/1"
