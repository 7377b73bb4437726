"""Detector backends: one contract (build, losses, predict), the same detections table either way.

The build/losses/predict checks run for every backend importable here (detectron2 is skipped
where it is not installed; its pure conversions are tested everywhere)."""

from __future__ import annotations

import re
import sys
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
    detectron2_config_file,
    detectron2_image,
    detectron2_inputs,
    from_detectron2,
    imagenet_pixels,
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
from stages.detect.predictor import DetectorPredictor
from stages.detect.table import DETECTIONS_SCHEMA
from stages.train_detector.boxes import flipped_targets
from stages.train_detector.config import DetectorConfig, check_detector_backend, detector_args
from stages.train_detector.stage import run as train_detector_run
from stages.train_detector.step import detector_step, new_detector_learner

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


# The box classifier of every built detector is set to ignore its features (see
# _fix_class_scores): every RoI scores class 1 at 0.5 and class 2 at 0.3 (background 0.2), both
# above the backends' 0.05 cut, so boxes exist whatever random weights the network has.
CLASS_SCORES = {1: 0.5, 2: 0.3}
BACKGROUND_SCORE = 0.2


def _box_classifier(model: torch.nn.Module, backend: str) -> torch.nn.Linear:
    """The RoI head's class logits layer: torchvision puts background first (column d is class
    d), detectron2 last (column d - 1 is class d)."""
    if backend == "torchvision":
        layer = model.roi_heads.box_predictor.cls_score
    else:
        layer = model.rcnn.roi_heads.box_predictor.cls_score
    assert isinstance(layer, torch.nn.Linear)
    assert layer.out_features == NUM_CLASSES
    return layer


def _fix_class_scores(model: torch.nn.Module, backend: str) -> None:
    """Zero weights and log-probability biases: softmax gives every RoI ``CLASS_SCORES``."""
    probs = [CLASS_SCORES[d] for d in range(1, NUM_CLASSES)]
    columns = [BACKGROUND_SCORE, *probs] if backend == "torchvision" else [*probs, BACKGROUND_SCORE]
    layer = _box_classifier(model, backend)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.tensor(columns).log())


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


def test_imagenet_pixels_in_the_model_channel_order() -> None:
    mean, std = imagenet_pixels("RGB")
    # torchvision's detectors normalise [0, 1] pixels with ImageNet's mean and std: the same
    # values in 0-255 units.
    np.testing.assert_allclose(np.array(mean) / 255, [0.485, 0.456, 0.406])
    np.testing.assert_allclose(np.array(std) / 255, [0.229, 0.224, 0.225])
    assert imagenet_pixels("BGR") == (mean[::-1], std[::-1])
    with pytest.raises(ValueError, match=re.escape("INPUT.FORMAT 'YUV'")):
        imagenet_pixels("YUV")


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


def test_each_backend_has_its_default_gradient_clipping() -> None:
    assert DetectorConfig().grad_clip is None
    assert DetectorConfig(backend="detectron2").grad_clip == 10.0
    assert DetectorConfig(backend="detectron2", grad_clip=None).grad_clip is None
    assert DetectorConfig(grad_clip=2.0).grad_clip == 2.0
    with pytest.raises(ValidationError, match="grad_clip"):
        DetectorConfig(grad_clip=0)


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
        "loop_extra": {"image_size": 64},
        "use_gpu": False,
    }
    out = storage.path("models", "detector.pt")
    metrics = train_detector_run(DetectorConfig(weights=str(weights)), out_path=out, **common)
    assert metrics == {"trained_steps": 0.0}
    written = load_checkpoint(storage.read_bytes(out), source=out)
    assert written["model_args"] == args
    assert written["image_size"] == 64  # the size the detect stage uses it at
    with pytest.raises(
        ValueError, match=re.escape("a torchvision detector; detector.backend is detectron2")
    ):
        train_detector_run(
            DetectorConfig(backend="detectron2", weights=str(weights)), out_path=out, **common
        )
    with pytest.raises(
        ValueError,
        match=re.escape(
            "a fasterrcnn_mobilenet_v3_large_fpn detector; the config's arch is "
            "fasterrcnn_resnet50_fpn"
        ),
    ):
        train_detector_run(
            DetectorConfig(arch="fasterrcnn_resnet50_fpn", weights=str(weights)),
            out_path=out,
            **common,
        )


# -- the contract, for every backend importable here -------------------------------------------


def test_backend_losses_are_finite_and_train_every_head(backend_name: str) -> None:
    torch.manual_seed(0)
    backend = detector_backend(backend_name)
    model = build_detector(**_args(backend_name)).train()
    images, targets = flipped_targets(_batch(), NUM_CLASSES, min_area=4)
    assert [t["labels"].tolist() for t in targets] == [[1, 2], []]
    losses = backend.losses(model, images, targets)
    assert len(losses) == 4  # RPN objectness and box, RoI class and box
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    torch.stack(list(losses.values())).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("clip", [0.5, None])
def test_detector_step_clips_the_gradient_norm(backend_name: str, clip: float | None) -> None:
    """Unclipped, detectron2's R-50 from random weights diverged at lr 0.01 (its first step's
    gradient norm is ~460): ``grad_clip`` bounds every step."""
    cfg = DetectorConfig(backend=backend_name, min_size=64, proposals=32, roi_samples=16)
    cfg = cfg.model_copy(update={"grad_clip": clip})
    learner = new_detector_learner(cfg, num_classes=NUM_CLASSES, seed=0, device=torch.device("cpu"))
    learner.model.train()
    loss = detector_step(learner, _batch(), 0)
    assert np.isfinite(loss)
    grads = [p.grad for p in learner.model.parameters() if p.grad is not None]
    norm = float(
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    )
    if clip is None:
        assert norm > 1.0  # what the clipped case brings down to 0.5
    else:
        assert norm == pytest.approx(clip, rel=1e-4)


def test_backends_feed_the_backbone_imagenet_normalised_pixels(backend_name: str) -> None:
    """Both backends normalise like torchvision: (pixel - ImageNet mean) / ImageNet std. With
    detectron2's model-zoo value PIXEL_STD = 1 (for MSRA's pretrained weights), a randomly
    initialised detectron2 network got pixels ~58x too large and, in eval mode, scored every RoI
    as background with probability 1 - 1e-17: no box at all."""
    torch.manual_seed(0)
    model = build_detector(**_args(backend_name)).eval()
    z = torch.tensor([1.0, 2.0, -1.0])  # wanted normalised value of R, G, B
    rgb = torch.tensor([0.485, 0.456, 0.406]) + z * torch.tensor([0.229, 0.224, 0.225])
    image = rgb[:, None, None].expand(3, 64, 64).contiguous()  # 64 px: no resize, no padding
    seen: list[torch.Tensor] = []
    backbone = model.backbone if backend_name == "torchvision" else model.rcnn.backbone
    hook = backbone.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
    try:
        with torch.inference_mode():
            detector_backend(backend_name).predict(model, [image])
    finally:
        hook.remove()
    (pixels,) = seen
    channels = z if backend_name == "torchvision" else z.flip(0)  # detectron2 takes BGR
    torch.testing.assert_close(pixels, channels[None, :, None, None].expand(1, 3, 64, 64))


@pytest.mark.parametrize("small", [(64, 64), (32, 64)])
def test_backend_predicts_in_input_pixel_coordinates(
    backend_name: str, small: tuple[int, int]
) -> None:
    """The same picture at its detector size and at twice that (nearest-upsampled, which the
    backend's bilinear resize maps back to exactly the same network input): the same
    detections, with boxes twice as large for the larger input."""
    torch.manual_seed(0)
    backend = detector_backend(backend_name)
    model = build_detector(**_args(backend_name)).eval()
    _fix_class_scores(model, backend_name)
    height, width = small
    picture = torch.rand(3, height, width)
    double = picture.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    with torch.inference_mode():
        outputs = backend.predict(model, [picture, double])
    assert len(outputs) == 2
    for scale, out in zip((1, 2), outputs, strict=True):
        boxes, labels, scores = out["boxes"], out["labels"], out["scores"]
        n = len(boxes)
        assert n > 0  # every RoI scores 0.5 and 0.3: a box is only lost if the backend drops it
        assert (boxes.shape, labels.shape, scores.shape) == ((n, 4), (n,), (n,))
        assert (boxes.dtype, labels.dtype, scores.dtype) == (
            torch.float32,
            torch.int64,
            torch.float32,
        )
        assert set(labels.tolist()) <= set(range(1, NUM_CLASSES))
        # each label carries its own class's score (not background's, not a shifted class's)
        torch.testing.assert_close(scores, torch.tensor([CLASS_SCORES[d] for d in labels.tolist()]))
        assert (boxes >= 0).all()
        assert (boxes[:, :2] <= boxes[:, 2:]).all()
        assert boxes[:, [0, 2]].max() <= width * scale
        assert boxes[:, [1, 3]].max() <= height * scale
    first, second = outputs
    assert second["labels"].tolist() == first["labels"].tolist()
    torch.testing.assert_close(second["scores"], first["scores"])
    torch.testing.assert_close(second["boxes"], first["boxes"] * 2)
    assert first["boxes"][:, 2].max() > width / 2  # not all squeezed into a corner


def test_detector_predictor_rows_are_the_backend_predictions_rescaled(
    tmp_path: Path, backend_name: str
) -> None:
    torch.manual_seed(0)
    args = _args(backend_name)
    storage = Storage(str(tmp_path))
    path = storage.path("models", "detector.pt")
    model = build_detector(**args)
    _fix_class_scores(model, backend_name)  # boxes exist (saved with the weights)
    storage.write_bytes(
        path, checkpoint_bytes(make_checkpoint(model, kind="detector", model_args=args))
    )
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    image[:, :, 32:] = 0  # decoded rows: 40 x 80 images fitted to 32 x 64, padded below
    batch = {
        "image_id": np.array(["a", "b"]),
        "height": np.array([40, 40]),
        "width": np.array([80, 80]),
        "extent": np.array([[32, 64], [32, 64]], dtype=np.int32),
        "image": image,
    }
    table = DetectorPredictor(storage.url, path, min_score=0.0)(batch)
    assert table.schema == DETECTIONS_SCHEMA
    again = model_from_checkpoint(load_checkpoint(storage.read_bytes(path), source=path))
    images = [torch.from_numpy(i).float() / 255.0 for i in batch["image"]]
    with torch.inference_mode():
        expected = detector_backend(backend_name).predict(again, images)
    limit = torch.tensor([64.0, 32.0] * 2)  # boxes end where the image does, not the padding
    for row, want in zip(table.to_pylist(), expected, strict=True):
        assert row["num_boxes"] == len(want["boxes"]) > 0
        clipped = torch.minimum(want["boxes"], limit)
        assert (clipped < want["boxes"]).any()  # some box did reach into the padding
        np.testing.assert_allclose(
            np.asarray(row["boxes"]).reshape(-1, 4), (clipped * 1.25).numpy(), rtol=1e-5
        )
        assert row["labels"] == want["labels"].tolist()
        np.testing.assert_allclose(row["scores"], want["scores"].numpy(), rtol=1e-6)


# -- detectron2 only ---------------------------------------------------------------------------


@pytest.fixture
def detectron2() -> None:
    pytest.importorskip("detectron2")


@pytest.mark.usefixtures("detectron2")
def test_detectron2_checkpoints_keep_the_normalisation_they_were_trained_with() -> None:
    torch.manual_seed(0)
    args = _args("detectron2")
    checkpoint = make_checkpoint(build_detector(**args), kind="detector", model_args=args)
    bgr_mean, bgr_std = imagenet_pixels("BGR")
    state = checkpoint["state_dict"]
    torch.testing.assert_close(state["rcnn.pixel_std"].flatten(), torch.tensor(bgr_std))
    torch.testing.assert_close(state["rcnn.pixel_mean"].flatten(), torch.tensor(bgr_mean))
    state["rcnn.pixel_std"] = torch.full((3, 1, 1), 2.0)
    assert model_from_checkpoint(checkpoint).rcnn.pixel_std.flatten().tolist() == [2.0] * 3
    # A checkpoint written before the normalisation was saved: the R_50 config's own values,
    # which that model was trained with.
    del state["rcnn.pixel_std"], state["rcnn.pixel_mean"]
    legacy = model_from_checkpoint(checkpoint).rcnn
    assert legacy.pixel_std.flatten().tolist() == [1.0, 1.0, 1.0]
    torch.testing.assert_close(legacy.pixel_mean.flatten(), torch.tensor(bgr_mean))


@pytest.mark.usefixtures("detectron2")
def test_detectron2_backend_needs_no_pkg_resources(monkeypatch: pytest.MonkeyPatch) -> None:
    """detectron2.model_zoo imports pkg_resources, which setuptools 81+ no longer ships: the
    backend finds the model-zoo configs without importing it."""
    monkeypatch.setitem(sys.modules, "pkg_resources", None)  # `import pkg_resources` fails
    for name in [m for m in sys.modules if m.startswith("detectron2.model_zoo")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError):
        import detectron2.model_zoo  # noqa: F401
    for name in [m for m in sys.modules if m.startswith("detectron2.model_zoo")]:
        monkeypatch.delitem(sys.modules, name)
    arch = "COCO-Detection/faster_rcnn_R_50_C4_1x.yaml"
    path = Path(detectron2_config_file(arch))
    assert path.is_file()
    assert path.parts[-4:] == ("model_zoo", "configs", *arch.split("/"))
    model = build_detector(**{**_args("detectron2"), "arch": arch})
    assert type(model.rcnn.roi_heads).__name__ == "Res5ROIHeads"  # the C4 config was read
    assert "detectron2.model_zoo" not in sys.modules
