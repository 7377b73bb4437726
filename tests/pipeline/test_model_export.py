"""Exporting trained segmenters as MLflow models from several threads at once, as a sweep's
parallel runs do in one driver (torch.export's tracing modes are process-wide)."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from pipeline.models import export_segmenter
from stages.core.models import build_segmenter, checkpoint_bytes, make_checkpoint


def test_three_exports_at_once_all_succeed(tmp_path: Path) -> None:
    args = {"arch": "lraspp_mobilenet_v3_large", "num_classes": 3}
    torch.manual_seed(0)
    model = build_segmenter(**args)
    blob = checkpoint_bytes(
        make_checkpoint(model, kind="segmenter", model_args=args, extra={"image_size": 32})
    )
    start = threading.Barrier(3)
    errors: dict[int, BaseException] = {}

    def export(index: int) -> None:
        start.wait()
        try:
            export_segmenter(blob, str(tmp_path / f"m{index}"), source=f"thread {index}")
        except BaseException as exc:  # every thread's failure is the finding
            errors[index] = exc

    threads = [threading.Thread(target=export, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # without one export at a time: "Trying to pop empty mode stack" and the like, every time
    assert errors == {}
    for index in range(3):
        assert (tmp_path / f"m{index}" / "data" / "model.pt2").is_file()
