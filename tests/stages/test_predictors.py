"""Predictors are plain callables: built and called here without Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stages.core import codec, data, inference
from stages.core.inference import decode_for_inference
from stages.core.models import (
    build_detector,
    build_segmenter,
    checkpoint_bytes,
    given_checkpoint,
    load_checkpoint,
    make_checkpoint,
    model_from_checkpoint,
    segment_logits,
)
from stages.core.storage import Storage
from stages.detect.predictor import DetectorPredictor
from stages.detect.table import DETECTIONS_SCHEMA
from stages.evaluate.models import ConfusionPredictor
from stages.teach.predictor import TeacherPredictor
from stages.teach.table import SIGNALS_SCHEMA, decode_features, decode_signals


def _rows(n: int, size: tuple[int, int]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]
    masks = [rng.integers(0, 3, size, dtype=np.uint8) for _ in range(n)]
    return {
        "image_id": np.array([f"id{i}" for i in range(n)]),
        "height": np.array([size[0]] * n),
        "width": np.array([size[1]] * n),
        "image": np.array([codec.encode_png(i) for i in images], dtype=object),
        "mask": np.array([codec.encode_png(m) for m in masks], dtype=object),
        "split": np.array(["unlabeled"] * n),
    }


# Every statistic a policy reads (stages.teach.SignalSpec).
FULL = {"margins": True, "dispersion": True, "features": True}


def _save(tmp_path: Path, model: torch.nn.Module, kind: str, args: dict) -> tuple[Storage, str]:
    storage = Storage(str(tmp_path))
    path = storage.path("models", f"{kind}.pt")
    storage.write_bytes(path, checkpoint_bytes(make_checkpoint(model, kind=kind, model_args=args)))
    return storage, path


def test_checkpoint_round_trip_rebuilds_same_network(tmp_path: Path) -> None:
    torch.manual_seed(0)
    args = {"arch": "lraspp_mobilenet_v3_large", "num_classes": 3}
    model = build_segmenter(**args).eval()
    storage, path = _save(tmp_path, model, "segmenter", args)
    again = model_from_checkpoint(load_checkpoint(storage.read_bytes(path), source=path))
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(segment_logits(again, x), segment_logits(model, x))


def test_teacher_predictor_upsamples_to_original_size(tmp_path: Path) -> None:
    torch.manual_seed(0)
    args = {"arch": "lraspp_mobilenet_v3_large", "num_classes": 3}
    storage, path = _save(tmp_path, build_segmenter(**args), "segmenter", args)
    batch = decode_for_inference(_rows(2, (20, 28)), image_size=32)
    assert batch["image"].shape == (2, 3, 32, 32)
    # long side 28 -> 32: 20 x 28 fills the canvas's top 23 rows; the rest is padding
    assert batch["extent"].tolist() == [[23, 32], [23, 32]]
    assert not batch["image"][:, :, 23:].any()
    table = TeacherPredictor(storage.url, path, FULL)(batch)
    assert table.schema == SIGNALS_SCHEMA
    assert table.num_rows == 2
    row = table.to_pylist()[0]
    signals = decode_signals(row)
    assert set(signals) == {"label", "conf", "margin", "refined_margin", "dispersion"}
    assert all(v.shape == (20, 28) for v in signals.values())
    assert (signals["conf"] >= signals["margin"]).all()
    assert (signals["conf"] >= 1 / 3 - 1 / 510).all()  # the largest of 3 probabilities
    assert row["split"] == "unlabeled"
    # lraspp's classifier input: 128 channels at stride 8 of the 32 px canvas, the 3 x 4 of
    # them over the image's fitted 23 x 32 part
    assert decode_features(row).shape == (128, 3, 4)
    # the same rows as the network's own probabilities, the fitted part upsampled, give
    model = model_from_checkpoint(load_checkpoint(storage.read_bytes(path), source=path))
    probs = segment_logits(model, data.normalize(torch.from_numpy(batch["image"]))).softmax(1)
    probs = torch.nn.functional.interpolate(probs[..., :23, :], size=(20, 28), mode="bilinear")
    conf, label = probs.max(dim=1)
    assert torch.equal(signals["label"], label[0])
    assert (signals["conf"] - conf[0]).abs().max() <= 1 / 510 + 1e-6
    bare = TeacherPredictor(storage.url, path, {})(batch).to_pylist()[0]
    assert bare["features"] is None
    assert bare["refined_label"] is None
    assert bare["margin"] is None
    assert bare["dispersion"] is None
    assert set(decode_signals(bare)) == {"label", "conf"}
    assert bare["conf"] == row["conf"]


def test_teacher_tta_averages_the_softmax_of_every_scaled_and_mirrored_view(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    args = {"arch": "lraspp_mobilenet_v3_large", "num_classes": 3}
    network = build_segmenter(**args)
    with torch.no_grad():  # confident, position-dependent outputs: views that differ
        for name, weight in network.named_parameters():
            if name.startswith("classifier"):
                weight.mul_(40)
    storage, path = _save(tmp_path, network, "segmenter", args)
    batch = decode_for_inference(_rows(2, (20, 28)), image_size=32)
    tta = {"scales": [0.75, 1.0, 1.5], "flip": True}
    row = TeacherPredictor(storage.url, path, FULL, tta=tta)(batch).to_pylist()[1]
    # by hand: six views, each softmax brought back to the 32-px canvas, unmirrored, averaged
    model = model_from_checkpoint(load_checkpoint(storage.read_bytes(path), source=path))
    images = data.normalize(torch.from_numpy(batch["image"]))
    views = []
    for side in (24, 32, 48):
        for mirrored in (False, True):
            x = images.flip(-1) if mirrored else images
            x = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear")
            probs = segment_logits(model, x).softmax(1)
            probs = torch.nn.functional.interpolate(probs, size=(32, 32), mode="bilinear")
            views.append(probs.flip(-1) if mirrored else probs)
    mean = torch.stack(views).mean(0)
    mean = torch.nn.functional.interpolate(mean[..., :23, :], size=(20, 28), mode="bilinear")
    conf, label = mean.max(dim=1)
    signals = decode_signals(row)
    plain = decode_signals(TeacherPredictor(storage.url, path, FULL)(batch).to_pylist()[1])
    assert (signals["conf"] - conf[1]).abs().max() <= 1 / 510 + 1e-6
    agree = (signals["label"] == label[1]).float().mean()
    assert agree >= 0.99  # argmax ties between near-equal classes may round apart
    assert (signals["conf"] - plain["conf"]).abs().max() > 0.01  # the views did count
    # WPL's features are the plain view's, whatever the TTA
    assert (
        row["features"]
        == TeacherPredictor(storage.url, path, FULL)(batch).to_pylist()[1]["features"]
    )


def test_tta_settings_name_what_is_valid() -> None:
    from stages.teach.config import TTAConfig

    assert not TTAConfig().enabled
    assert TTAConfig(flip=True).enabled
    with pytest.raises(ValueError, match=r"must include 1\.0"):
        TTAConfig(scales=(0.5, 2.0))
    with pytest.raises(ValueError, match="distinct and > 0"):
        TTAConfig(scales=(1.0, 1.0))


def test_teacher_predictor_groups_images_by_size(tmp_path: Path) -> None:
    """A batch of mixed original sizes: each image's maps at its own size, as if alone."""
    torch.manual_seed(0)
    args = {"arch": "lraspp_mobilenet_v3_large", "num_classes": 3}
    storage, path = _save(tmp_path, build_segmenter(**args), "segmenter", args)
    rows = _rows(3, (20, 28))
    other = _rows(2, (24, 16))
    mixed = {
        k: np.concatenate([rows[k][:2], other[k][:1], rows[k][2:], other[k][1:]]) for k in rows
    }
    mixed["image_id"] = np.array([f"m{i}" for i in range(5)])
    batch = decode_for_inference(mixed, image_size=32)
    predictor = TeacherPredictor(storage.url, path, FULL)
    together = predictor(batch).to_pylist()
    assert [(r["height"], r["width"]) for r in together] == [(20, 28)] * 2 + [(24, 16)] + [
        (20, 28)
    ] + [(24, 16)]
    for i, row in enumerate(together):
        alone = predictor({k: v[i : i + 1] for k, v in batch.items()}).to_pylist()[0]
        assert row["image_id"] == alone["image_id"] == f"m{i}"
        mine, its = decode_signals(row), decode_signals(alone)
        assert torch.equal(mine["label"], its["label"]), i
        for name in ("conf", "margin", "refined_margin"):  # a batch's numerics may round apart
            assert (mine[name] - its[name]).abs().max() <= 1 / 255 + 1e-7, (i, name)


def test_confusion_predictor_counts_every_valid_pixel(tmp_path: Path) -> None:
    args = {"arch": "lraspp_mobilenet_v3_large", "num_classes": 3}
    storage, path = _save(tmp_path, build_segmenter(**args), "segmenter", args)
    batch = decode_for_inference(_rows(3, (16, 16)), image_size=32)
    out = ConfusionPredictor(storage.url, {"a": path, "b": path}, num_classes=3)(batch)
    assert out["confusion_a"].shape == (1, 9)
    assert out["confusion_a"].sum() == 3 * 16 * 16
    np.testing.assert_array_equal(out["confusion_a"], out["confusion_b"])


def test_confusion_predictor_scores_non_square_images_at_their_own_size(tmp_path: Path) -> None:
    """2:1 images on a 32-px canvas, evaluated whole and with a 16-px sliding window: every
    valid pixel of the 20 x 40 originals is counted once, none of the padding."""
    args = {"arch": "lraspp_mobilenet_v3_large", "num_classes": 3}
    storage = Storage(str(tmp_path))
    model = build_segmenter(**args)
    for window in (32, 16):
        path = storage.path("models", f"w{window}.pt")
        checkpoint = make_checkpoint(model, kind="segmenter", model_args=args)
        storage.write_bytes(path, checkpoint_bytes({**checkpoint, "window": window}))
        batch = decode_for_inference(_rows(2, (20, 40)), image_size=32)
        assert batch["extent"].tolist() == [[16, 32], [16, 32]]
        out = ConfusionPredictor(storage.url, {"m": path}, num_classes=3)(batch)
        assert out["confusion_m"].sum() == 2 * 20 * 40


def test_sliding_window_averages_overlapping_windows_by_hand() -> None:
    """A 6-px canvas, 4-px windows at stride 2 (two thirds of 4, floored): windows start at
    0 and 2 on each axis. With a forward that returns each window's mean everywhere in it,
    a pixel's logit is the mean of its windows' means."""
    image = torch.arange(36, dtype=torch.float32).view(1, 1, 6, 6)
    out = inference.sliding_logits(
        lambda x: x.mean(dim=(2, 3), keepdim=True).expand_as(x), image, 4
    )
    means = {(t, c): image[..., t : t + 4, c : c + 4].mean().item() for t in (0, 2) for c in (0, 2)}
    assert inference.window_starts(6, 4, 2) == [0, 2]
    assert out[0, 0, 0, 0].item() == pytest.approx(means[0, 0])
    assert out[0, 0, 0, 5].item() == pytest.approx(means[0, 2])
    assert out[0, 0, 3, 3].item() == pytest.approx(sum(means.values()) / 4)
    assert out[0, 0, 1, 3].item() == pytest.approx((means[0, 0] + means[0, 2]) / 2)
    # a window that covers the canvas: the forward itself, once
    torch.testing.assert_close(inference.sliding_logits(lambda x: 2 * x, image, 6), 2 * image)
    # windows only over the fitted part the extents reach (rows 0..3 here), zeros beyond
    part = inference.sliding_logits(lambda x: x + 1, image, 4, np.array([[4, 6]]))
    torch.testing.assert_close(part[..., :4, :], image[..., :4, :] + 1)
    assert not part[..., 4:, :].any()
    assert inference.window_starts(10, 4, 3) == [0, 3, 6]


def test_detector_predictor_boxes_in_original_coordinates(tmp_path: Path) -> None:
    torch.manual_seed(0)
    args = {
        "arch": "fasterrcnn_mobilenet_v3_large_fpn",
        "num_classes": 3,
        "min_size": 64,
        "max_size": 64,
    }
    storage, path = _save(tmp_path, build_detector(**args), "detector", args)
    batch = decode_for_inference(_rows(2, (40, 80)), image_size=32)
    table = DetectorPredictor(storage.url, path, min_score=0.0)(batch)
    assert table.schema == DETECTIONS_SCHEMA
    assert table.num_rows == 2
    for row in table.to_pylist():
        boxes = np.asarray(row["boxes"]).reshape(-1, 4)
        assert len(boxes) == row["num_boxes"] == len(row["scores"]) == len(row["labels"])
        if len(boxes):
            assert boxes[:, [0, 2]].max() <= 80 + 1e-3
            assert boxes[:, [1, 3]].max() <= 40 + 1e-3


def test_given_checkpoint_accepts_state_dict_and_checks_kind_and_classes(tmp_path: Path) -> None:
    args = {"arch": "lraspp_mobilenet_v3_large", "num_classes": 3}
    model = build_segmenter(**args)
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    blob = given_checkpoint(str(plain), kind="segmenter", num_classes=3, arch=args["arch"])
    assert load_checkpoint(blob, source="blob")["model_args"] == args
    with pytest.raises(ValueError, match="does not fit"):
        given_checkpoint(
            str(plain), kind="segmenter", num_classes=3, arch="deeplabv3_mobilenet_v3_large"
        )
    _, saved = _save(tmp_path, model, "segmenter", args)
    with pytest.raises(ValueError, match="a segmenter with 3 classes; expected a segmenter with 4"):
        given_checkpoint(saved, kind="segmenter", num_classes=4)
    with pytest.raises(ValueError, match="expected a detector"):
        given_checkpoint(saved, kind="detector", num_classes=3)
    with pytest.raises(ValueError, match="detector weights must be a pseudoflow checkpoint"):
        given_checkpoint(str(plain), kind="detector", num_classes=3)
    with pytest.raises(ValueError, match="cannot be read"):
        given_checkpoint(str(tmp_path / "missing.pt"), kind="segmenter", num_classes=3, arch="x")


def test_given_pseudoflow_checkpoint_of_another_arch_is_refused(tmp_path: Path) -> None:
    """The cache key records the configured arch: a checkpoint of another network must not pass
    as it (it was accepted, and its weights used under the config's name)."""
    args = {"arch": "lraspp_mobilenet_v3_large", "num_classes": 3}
    _, saved = _save(tmp_path, build_segmenter(**args), "segmenter", args)
    with pytest.raises(ValueError) as caught:
        given_checkpoint(saved, kind="segmenter", num_classes=3, arch="fcn_resnet50")
    assert str(caught.value) == (
        f"{saved}: a lraspp_mobilenet_v3_large segmenter; the config's arch is fcn_resnet50"
    )
    blob = given_checkpoint(saved, kind="segmenter", num_classes=3, arch=args["arch"])
    assert load_checkpoint(blob, source="blob")["model_args"] == args
