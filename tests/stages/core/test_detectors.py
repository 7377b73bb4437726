"""Detector backends: one contract (build, losses, predict), the same detections table either way.

The build/losses/predict checks run for every backend importable here (detectron2 is skipped
where it is not installed; its pure conversions are tested everywhere)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from stages.core.detectors import (
    DETECTRON2_COMMIT,
    BackendUnavailable,
    available_backends,
    detector_backend,
    detectron2_image,
    detectron2_inputs,
    from_detectron2,
    resized_shape,
    split_backend,
)
from stages.core.models import (
    build_detector,
    checkpoint_bytes,
    load_checkpoint,
    make_checkpoint,
    model_from_checkpoint,
)
from stages.core.storage import Storage
from stages.detect import DETECTIONS_SCHEMA, DetectorPredictor
from stages.train_detector import (
    DetectorConfig,
    _targets,
    check_detector_backend,
    detector_args,
)
from stages.train_detector import run as train_detector_run

NUM_CLASSES = 3


@pytest.fixture(params=["torchvision", "detectron2"])
def backend_name(request: pytest.FixtureRequest) -> str:
    if request.param == "detectron2":
        pytest.importorskip("detectron2")
    name: str = request.param
    return name


def _args(backend: str) -> dict:
    cfg = DetectorConfig(backend=backend, min_size=64, proposals=32, roi_samples=16)
    return detector_args(cfg, NUM_CLASSES)


def _batch() -> dict[str, torch.Tensor]:
    """Two 64 px training rows as Ray hands them over: an image with a class-1 and a class-2
    object, and one with no object at all."""
    label = torch.zeros(2, 64, 64, dtype=torch.uint8)
    label[0, 8:24, 10:30] = 1
    label[0, 40:60, 36:50] = 2
    image = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    return {"image": image, "label": label}


# -- pure conversions (no detectron2 needed) ----------------------------------------------------


def test_resized_shape_scales_the_short_side_unless_the_long_side_is_capped() -> None:
    assert resized_shape(2, 4, 4, 8) == (4, 8)
    assert resized_shape(3, 5, 4, 100) == (4, 7)  # 5 * 4/3 = 6.67 -> 7
    assert resized_shape(10, 40, 20, 50) == (13, 50)  # scale 1.25 (capped): 12.5 -> 13
    assert resized_shape(64, 64, 64, 64) == (64, 64)


def test_detectron2_image_is_0_255_in_the_model_channel_order() -> None:
    image = torch.empty(3, 2, 3)
    image[0], image[1], image[2] = 0.2, 0.4, 1.0  # R, G, B
    bgr = detectron2_image(image, (2, 3), "BGR")
    assert bgr.shape == (3, 2, 3)
    torch.testing.assert_close(bgr[:, 0, 0], torch.tensor([255.0, 102.0, 51.0]))
    rgb = detectron2_image(image, (2, 3), "RGB")
    torch.testing.assert_close(rgb[:, 1, 2], torch.tensor([51.0, 102.0, 255.0]))
    resized = detectron2_image(torch.full((3, 2, 3), 0.5), (4, 6), "BGR")
    assert resized.shape == (3, 4, 6)
    torch.testing.assert_close(resized, torch.full((3, 4, 6), 127.5))
    with pytest.raises(ValueError, match=re.escape("INPUT.FORMAT 'YUV'")):
        detectron2_image(image, (2, 3), "YUV")


def test_detectron2_inputs_scale_boxes_and_shift_labels() -> None:
    images = [torch.zeros(3, 2, 4), torch.zeros(3, 3, 5)]
    targets = [
        {
            "boxes": torch.tensor([[1.0, 0.0, 3.0, 2.0], [0.0, 1.0, 4.0, 2.0]]),
            "labels": torch.tensor([1, 2]),
        },
        {"boxes": torch.tensor([[5.0, 3.0, 5.0, 3.0]]), "labels": torch.tensor([2])},
    ]
    first, second = detectron2_inputs(images, targets, min_size=4, max_size=8, input_format="BGR")
    assert first["image"].shape == (3, 4, 8)  # x2 both ways
    assert (first["height"], first["width"]) == (2, 4)  # predictions map back to the input
    torch.testing.assert_close(
        first["gt_boxes"], torch.tensor([[2.0, 0.0, 6.0, 4.0], [0.0, 2.0, 8.0, 4.0]])
    )
    assert first["gt_classes"].tolist() == [0, 1]
    assert first["gt_classes"].dtype == torch.int64
    assert second["image"].shape == (3, 4, 7)  # 3x5 -> 4x7: x 7/5, y 4/3
    torch.testing.assert_close(second["gt_boxes"], torch.tensor([[7.0, 4.0, 7.0, 4.0]]))
    assert second["gt_classes"].tolist() == [1]
    bare = detectron2_inputs(images, None, min_size=4, max_size=8, input_format="BGR")
    assert set(bare[0]) == {"image", "height", "width"}


def test_from_detectron2_shifts_classes_back_to_segmentation_classes() -> None:
    out = from_detectron2(
        torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 5.0, 5.0]], dtype=torch.float64),
        torch.tensor([0.9, 0.2]),
        torch.tensor([0, 2]),
    )
    assert out["labels"].tolist() == [1, 3]
    assert out["labels"].dtype == torch.int64
    assert out["boxes"].dtype == out["scores"].dtype == torch.float32
    torch.testing.assert_close(out["boxes"][0], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    torch.testing.assert_close(out["scores"], torch.tensor([0.9, 0.2]))


# -- registry and config ----------------------------------------------------------------------


def test_registry_names_the_valid_backends_and_old_checkpoints_mean_torchvision() -> None:
    assert "torchvision" in available_backends()
    assert detector_backend("torchvision").name == "torchvision"
    with pytest.raises(
        ValueError, match="unknown detector backend 'mmdet'; choose one of torchvision, detectron2"
    ):
        detector_backend("mmdet")
    backend, args = split_backend({"arch": "a", "num_classes": 3})
    assert backend.name == "torchvision"
    assert args == {"arch": "a", "num_classes": 3}
    assert split_backend({"backend": "torchvision", "arch": "a"})[1] == {"arch": "a"}


def test_unknown_backend_or_arch_is_a_validation_error_listing_the_valid_ones() -> None:
    with pytest.raises(ValidationError, match="'torchvision' or 'detectron2'"):
        DetectorConfig(backend="mmdet")  # type: ignore[arg-type]
    with pytest.raises(
        ValidationError,
        match=r"unknown torchvision detector arch 'nope'; choose one of .*"
        r"fasterrcnn_mobilenet_v3_large_fpn",
    ):
        DetectorConfig(arch="nope")
    with pytest.raises(
        ValidationError,
        match=re.escape(
            "unknown detectron2 detector arch 'fasterrcnn_mobilenet_v3_large_fpn'; choose one of "
            "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"
        ),
    ):
        DetectorConfig(backend="detectron2", arch="fasterrcnn_mobilenet_v3_large_fpn")


def test_each_backend_has_its_default_arch_and_checkpoints_record_the_backend() -> None:
    assert DetectorConfig().arch == "fasterrcnn_mobilenet_v3_large_fpn"
    d2 = DetectorConfig(backend="detectron2")
    assert d2.arch == "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"
    assert DetectorConfig.model_validate(d2.model_dump()) == d2
    assert detector_args(d2, NUM_CLASSES)["backend"] == "detectron2"
    assert detector_args(DetectorConfig(), NUM_CLASSES)["backend"] == "torchvision"


def test_detectron2_where_it_is_missing_is_a_clear_config_error() -> None:
    if "detectron2" in available_backends():
        pytest.skip("detectron2 is installed here: the backend tests below run it")
    assert re.fullmatch(r"[0-9a-f]{40}", DETECTRON2_COMMIT)
    with pytest.raises(BackendUnavailable) as caught:
        detector_backend("detectron2")
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert "detector.backend 'detectron2' needs the detectron2 package" in message
    assert "not installed in this environment" in message
    assert "docker/Dockerfile.cuda" in message
    assert f"git+https://github.com/facebookresearch/detectron2.git@{DETECTRON2_COMMIT}" in message
    assert "set detector.backend: torchvision" in message
    with pytest.raises(BackendUnavailable):
        check_detector_backend(DetectorConfig(backend="detectron2"))
    with pytest.raises(BackendUnavailable):  # a checkpoint naming it cannot be rebuilt either
        build_detector(**_args("detectron2"))
    check_detector_backend(DetectorConfig(backend="detectron2", enabled=False))
    check_detector_backend(DetectorConfig())


def test_given_weights_must_match_the_configured_backend(tmp_path: Path) -> None:
    torch.manual_seed(0)
    args = _args("torchvision")
    weights = tmp_path / "detector.pt"
    weights.write_bytes(
        checkpoint_bytes(make_checkpoint(build_detector(**args), kind="detector", model_args=args))
    )
    storage = Storage(str(tmp_path / "root"))
    common = {
        "labeled": None,
        "num_classes": NUM_CLASSES,
        "storage": storage,
        "name": "t",
        "loop_extra": {},
        "use_gpu": False,
    }
    out = storage.path("models", "detector.pt")
    metrics = train_detector_run(DetectorConfig(weights=str(weights)), out_path=out, **common)
    assert metrics == {"trained_steps": 0.0}
    assert load_checkpoint(storage.read_bytes(out), source=out)["model_args"] == args
    with pytest.raises(
        ValueError, match=re.escape("a torchvision detector; detector.backend is detectron2")
    ):
        train_detector_run(
            DetectorConfig(backend="detectron2", weights=str(weights)), out_path=out, **common
        )


# -- the contract, for every backend importable here -------------------------------------------


def test_backend_losses_are_finite_and_train_every_head(backend_name: str) -> None:
    torch.manual_seed(0)
    backend = detector_backend(backend_name)
    model = build_detector(**_args(backend_name)).train()
    images, targets = _targets(_batch(), NUM_CLASSES, min_area=4)
    assert [t["labels"].tolist() for t in targets] == [[1, 2], []]
    losses = backend.losses(model, images, targets)
    assert len(losses) == 4  # RPN objectness and box, RoI class and box
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    torch.stack(list(losses.values())).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_backend_predicts_in_input_pixel_coordinates(backend_name: str) -> None:
    torch.manual_seed(0)
    backend = detector_backend(backend_name)
    model = build_detector(**_args(backend_name)).eval()
    sizes = [(64, 64), (48, 80)]
    with torch.inference_mode():
        outputs = backend.predict(model, [torch.rand(3, h, w) for h, w in sizes])
    assert len(outputs) == 2
    for (height, width), out in zip(sizes, outputs, strict=True):
        boxes, labels, scores = out["boxes"], out["labels"], out["scores"]
        n = len(boxes)
        assert n > 0  # random heads score every class about 1/3, above the 0.05 cut
        assert (boxes.shape, labels.shape, scores.shape) == ((n, 4), (n,), (n,))
        assert (boxes.dtype, labels.dtype, scores.dtype) == (
            torch.float32,
            torch.int64,
            torch.float32,
        )
        assert set(labels.tolist()) <= set(range(1, NUM_CLASSES))
        assert ((scores >= 0) & (scores <= 1)).all()
        assert (boxes >= 0).all()
        assert (boxes[:, :2] <= boxes[:, 2:]).all()
        assert boxes[:, [0, 2]].max() <= width
        assert boxes[:, [1, 3]].max() <= height


def test_detector_predictor_rows_are_the_backend_predictions_rescaled(
    tmp_path: Path, backend_name: str
) -> None:
    torch.manual_seed(0)
    args = _args(backend_name)
    storage = Storage(str(tmp_path))
    path = storage.path("models", "detector.pt")
    model = build_detector(**args)
    storage.write_bytes(
        path, checkpoint_bytes(make_checkpoint(model, kind="detector", model_args=args))
    )
    rng = np.random.default_rng(0)
    batch = {  # decoded rows: images resized to 64 px, originally 40 x 80
        "image_id": np.array(["a", "b"]),
        "height": np.array([40, 40]),
        "width": np.array([80, 80]),
        "image": rng.integers(0, 256, (2, 3, 64, 64), dtype=np.uint8),
    }
    table = DetectorPredictor(storage.url, path, min_score=0.0)(batch)
    assert table.schema == DETECTIONS_SCHEMA
    again = model_from_checkpoint(load_checkpoint(storage.read_bytes(path), source=path))
    images = [torch.from_numpy(i).float() / 255.0 for i in batch["image"]]
    with torch.inference_mode():
        expected = detector_backend(backend_name).predict(again, images)
    scale = torch.tensor([80 / 64, 40 / 64] * 2)
    for row, want in zip(table.to_pylist(), expected, strict=True):
        assert row["num_boxes"] == len(want["boxes"]) > 0
        np.testing.assert_allclose(
            np.asarray(row["boxes"]).reshape(-1, 4), (want["boxes"] * scale).numpy(), rtol=1e-5
        )
        assert row["labels"] == want["labels"].tolist()
        np.testing.assert_allclose(row["scores"], want["scores"].numpy(), rtol=1e-6)
