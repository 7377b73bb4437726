"""The student's training step: schedules, CutMix boxes, the strong views' mixing of pixels and
stored maps, and whole steps of every policy on a real (tiny) torchvision network."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from stages import segtrain
from stages.core import augment, codec, data, training
from stages.core.constants import IGNORE_INDEX
from stages.core.fastconv import DilatedDepthwiseConv2d
from stages.core.models import feature_layer, load_checkpoint
from stages.core.run_config import LoopConfig
from stages.core.storage import Storage
from stages.core.training import CHECKPOINT_FILE, fit
from stages.pseudolabel import ops
from stages.pseudolabel.config import POLICIES, PseudolabelConfig
from stages.segtrain import loop as segloop
from stages.segtrain import step as segstep
from tests.conftest import local_ray


def test_schedules_by_hand() -> None:
    poly = segtrain.SegTrainConfig(lr=0.01, steps=100)
    cosine = poly.model_copy(update={"schedule": "cosine"})
    assert segtrain.learning_rate(poly, 0) == pytest.approx(0.01)
    assert segtrain.learning_rate(poly, 50) == pytest.approx(0.01 * 0.5**0.9)
    assert segtrain.learning_rate(cosine, 50) == pytest.approx(0.005)
    assert segtrain.learning_rate(cosine, 25) == pytest.approx(0.005 * (1 + math.sqrt(0.5)))
    assert segtrain.learning_rate(cosine, 100) == pytest.approx(0.0)


def test_cutmix_boxes_are_one_rectangle_of_the_drawn_size_or_none() -> None:
    generator = torch.Generator().manual_seed(0)
    assert not data.cutmix_boxes(8, 32, 32, 0.0, generator).any()
    boxes = data.cutmix_boxes(64, 32, 32, 1.0, generator)
    for box in boxes:
        rows, cols = box.any(dim=1).nonzero()[:, 0], box.any(dim=0).nonzero()[:, 0]
        h, w = len(rows), len(cols)
        assert int(box.sum()) == h * w  # filled rectangle
        assert rows.max() - rows.min() + 1 == h
        assert cols.max() - cols.min() + 1 == w
        # area in [0.02, 0.4] of the image, up to rounding each side and clipping at 32
        assert 0.02 * 1024 * 0.7 <= h * w <= 0.4 * 1024 * 1.3
    some = data.cutmix_boxes(400, 16, 16, 0.5, torch.Generator().manual_seed(1))
    assert 160 < int(some.flatten(1).any(dim=1).sum()) < 240


def _learner(
    policy: str = "threshold", cutmix: float = 1.0, size: int = 32, **student: Any
) -> segtrain.Learner:
    """A CPU learner of 4 steps, 2 labeled + 3 unlabeled images; ``student``: other settings."""
    fields = {"steps": 4, "batch_size": 2, "unlabeled_batch_size": 3, "cutmix": cutmix}
    cfg = segtrain.StudentConfig(**(fields | student))
    return segtrain.new_learner(
        cfg,
        num_classes=4,
        crop_size=size,
        seed=0,
        device=torch.device("cpu"),
        policy=PseudolabelConfig(policy=policy, wpl={"refresh_every": 2, "conf_thresh": 0.0}),
    )


def test_strong_views_mix_pixels_and_every_map_in_the_same_box() -> None:
    learner = _learner()
    learner.weak = augment.ScaleCrop(16, scale=(1.0, 1.0), flip=0.0)
    learner.photometric = augment.Photometric(jitter_chance=0.0, grayscale=0.0, blur=0.0)
    colours = torch.tensor([10, 120, 240], dtype=torch.uint8)
    batch = {
        "image": colours.view(3, 1, 1, 1).expand(3, 3, 16, 16).clone(),
        "label": torch.arange(3, dtype=torch.uint8).view(3, 1, 1).expand(3, 16, 16).clone(),
        "weight": torch.tensor([0.1, 0.5, 0.9]).view(3, 1, 1).expand(3, 16, 16).clone(),
        "keep": torch.ones(3, 16, 16, dtype=torch.uint8),
    }
    views, maps = segstep._strong_views(*segstep._weak_view(batch, learner), learner)
    assert len(views) == 2
    normalised = data.normalize(batch["image"])[:, :, 0, 0]  # [3 images, 3 channels]
    boxes = []
    for view, mixed in zip(views, maps, strict=True):
        for i in range(3):
            partner = (i - 1) % 3  # torch.roll by 1: image i mixes in image i - 1
            box = mixed["label"][i] == partner
            assert box.any()
            assert torch.equal(mixed["label"][i][~box], torch.full_like(mixed["label"][i][~box], i))
            torch.testing.assert_close(
                mixed["weight"][i][box].unique(), batch["weight"][partner, :1, 0]
            )
            pixels = view[i].permute(1, 2, 0)  # [H, W, 3]
            torch.testing.assert_close(pixels[box], normalised[partner].expand(int(box.sum()), 3))
            torch.testing.assert_close(pixels[~box], normalised[i].expand(int((~box).sum()), 3))
            boxes.append(box)
        assert mixed["label"].dtype == torch.int64
        assert mixed["keep"].dtype == torch.bool
    assert not all(torch.equal(boxes[i], boxes[i + 3]) for i in range(3))  # two independent draws


def _spy_on_the_step(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Record the batch of views that ``train_step`` forwards and the targets of L_u."""
    seen: dict[str, Any] = {}
    forward, unlabeled_loss = segstep._forward, segstep._unlabeled_loss

    def spy_forward(model: Any, images: torch.Tensor, *, with_features: bool) -> Any:
        seen["views"] = images.detach().clone()
        return forward(model, images, with_features=with_features)

    def spy_loss(ce: Any, valid: Any, features: Any, targets: Any, *rest: Any) -> Any:
        seen["targets"] = targets
        return unlabeled_loss(ce, valid, features, targets, *rest)

    monkeypatch.setattr(segstep, "_forward", spy_forward)
    monkeypatch.setattr(segstep, "_unlabeled_loss", spy_loss)
    return seen


def test_tmp_view_is_the_weak_view_recoloured_without_cutmix_or_grayscale(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Strong views: CutMix and grayscale certain. The TMP view (methods.md §3) must have neither:
    # each image keeps its own colour and pixels, trusted pixels (left half) covered with 0.
    seen = _spy_on_the_step(monkeypatch)
    colours = torch.tensor([[200, 40, 90], [30, 210, 60], [70, 100, 250]], dtype=torch.uint8)
    labels = torch.arange(3, dtype=torch.uint8).view(3, 1, 1).expand(3, 16, 16)
    unlabeled = {
        "image": colours.view(3, 3, 1, 1).expand(3, 3, 16, 16).clone(),
        "label": labels.clone(),
        "weight": torch.tensor([0.1, 0.5, 0.9]).view(3, 1, 1).expand(3, 16, 16).clone(),
        "keep": torch.ones(3, 16, 16, dtype=torch.uint8),
        "trusted": (torch.arange(16) < 8).to(torch.uint8).expand(3, 16, 16).clone(),
    }
    labeled, _ = _batches(16)
    runs = {}
    for policy in ("csl", "threshold"):
        cfg = segtrain.StudentConfig(
            steps=4,
            batch_size=2,
            unlabeled_batch_size=3,
            cutmix=1.0,
            strong={"grayscale": 1.0, "jitter_chance": 0.0, "blur": 0.0},
        )
        learner = segtrain.new_learner(
            cfg,
            num_classes=4,
            crop_size=16,
            seed=0,
            device=torch.device("cpu"),
            policy=PseudolabelConfig(policy=policy, csl={"block": 8, "cover": 1.0}),
        )
        learner.weak = augment.ScaleCrop(16, scale=(1.0, 1.0), flip=0.0)
        segtrain.train_step(learner, labeled, unlabeled, 0)
        runs[policy] = seen["views"], seen["targets"]
    views, targets = runs["csl"]
    assert len(views) == 2 + 3 * 3  # labeled, two strong views, TMP
    assert len(targets) == 3
    own = data.normalize(colours.view(3, 3, 1, 1).float() / 255.0)  # [3 images, 3, 1, 1]
    tmp = views[8:]
    torch.testing.assert_close(tmp[..., 8:], own.expand(3, 3, 16, 8))  # own colour, no box
    assert not tmp[..., :8].any()  # trusted and covered
    for i in range(3):
        assert (targets[2]["label"][i] == i).all()  # the TMP loss: the image's own maps
        assert (targets[0]["label"][i] != i).any()  # while the strong views are CutMixed
    assert torch.equal(targets[2]["trusted"], unlabeled["trusted"].bool())
    # The rest of the step is as without CSL: same labeled and strong views, same targets.
    plain_views, plain_targets = runs["threshold"]
    assert torch.equal(views[:8], plain_views)
    for mixed, plain in zip(targets[:2], plain_targets, strict=True):
        assert all(torch.equal(mixed[k], plain[k]) for k in plain)
    gray = views[2:8] * torch.tensor(data.STD).view(3, 1, 1) + torch.tensor(data.MEAN).view(3, 1, 1)
    torch.testing.assert_close(gray, gray[:, :1].expand_as(gray))  # strong views: grayscale


def _batches(
    size: int, n_labeled: int = 2, n_unlabeled: int = 3
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    labeled = {
        "image": torch.randint(
            0, 256, (n_labeled, 3, size, size), dtype=torch.uint8, generator=generator
        ),
        "label": torch.randint(
            0, 4, (n_labeled, size, size), dtype=torch.uint8, generator=generator
        ),
        "weight": torch.ones(n_labeled, size, size),
    }
    label = torch.randint(0, 4, (n_unlabeled, size, size), dtype=torch.uint8, generator=generator)
    margin = torch.rand(n_unlabeled, size, size, generator=generator)
    unlabeled = {
        "image": torch.randint(
            0, 256, (n_unlabeled, 3, size, size), dtype=torch.uint8, generator=generator
        ),
        "label": label,
        "weight": torch.rand(n_unlabeled, size, size, generator=generator),
        "keep": torch.ones(n_unlabeled, size, size, dtype=torch.uint8),
        "margin": margin,
        "refined_margin": (margin + 0.1).clamp(max=1),
        "trusted": (margin > 0.5).to(torch.uint8),
        "reliable": (label > 0).to(torch.uint8),
    }
    return labeled, unlabeled


@pytest.mark.parametrize("policy", POLICIES)
def test_train_step_of_every_policy_updates_the_network(policy: str) -> None:
    learner = _learner(policy)
    labeled, unlabeled = _batches(32)
    before = [p.detach().clone() for p in learner.model.parameters()]
    stats = [segtrain.train_step(learner, labeled, unlabeled, step) for step in range(2)]
    assert all(math.isfinite(s["loss_s"]) and s["loss_u"] > 0 for s in stats)
    assert 0 < stats[0]["kept_fraction"] <= 1
    changed = [
        not torch.equal(a, b) for a, b in zip(before, learner.model.parameters(), strict=True)
    ]
    assert sum(changed) > len(changed) // 2
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(
        segtrain.learning_rate(learner.cfg, 1)
    )
    assert ("wpl_prototypes" in stats[1]) == (policy == "wpl")  # refreshed after step 2
    assert not learner.scaler.is_enabled()  # CPU: no AMP
    # the training layout: the last stage's 3 dilated depthwise layers swapped, channels-last
    swapped = [m for m in learner.model.modules() if isinstance(m, DilatedDepthwiseConv2d)]
    assert len(swapped) == 3
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in (m.weight for m in swapped))
    stem = learner.model.backbone["0"][0].weight
    assert stem.is_contiguous(memory_format=torch.channels_last)
    assert not stem.is_contiguous()


def test_the_steps_losses_are_each_views_own_cross_entropy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The step takes one cross-entropy over every view's pixels and splits it; L_s must still be
    # the mean over the labeled view's valid pixels and L_u the mean of each strong view's
    # weighted_unsup_loss (ignored pixels in both batches, CutMixed maps in the strong views).
    seen = _spy_on_the_step(monkeypatch)
    forward = segstep._forward

    def keep_logits(model: Any, images: torch.Tensor, *, with_features: bool) -> Any:
        seen["logits"], features = forward(model, images, with_features=with_features)
        return seen["logits"], features

    monkeypatch.setattr(segstep, "_forward", keep_logits)
    learner = _learner("threshold")
    learner.weak = augment.ScaleCrop(32, scale=(1.0, 1.0), flip=0.0)  # the batch as it is
    labeled, unlabeled = _batches(32)
    labeled["label"][0, :10] = IGNORE_INDEX
    unlabeled["label"][1, :, :7] = IGNORE_INDEX
    stats = segtrain.train_step(learner, labeled, unlabeled, 0)
    logits = seen["logits"].detach().float()
    assert len(logits) == 2 + 2 * 3
    loss_s = torch.nn.functional.cross_entropy(
        logits[:2], labeled["label"].long(), ignore_index=IGNORE_INDEX
    )
    views = logits[2:].split(3)
    loss_u = sum(
        ops.weighted_unsup_loss(view, maps["label"], maps["weight"], maps["label"] != IGNORE_INDEX)
        for view, maps in zip(views, seen["targets"], strict=True)
    )
    assert any((maps["label"] == IGNORE_INDEX).any() for maps in seen["targets"])
    assert stats["loss_s"] == pytest.approx(float(loss_s), rel=1e-5)
    assert stats["loss_u"] == pytest.approx(float(loss_u) / 2, rel=1e-5)


def test_without_the_unlabeled_loss_a_student_ignores_every_unlabeled_setting() -> None:
    # pipeline.graph.keys leaves these settings (and the pseudo-labels) out of an alpha-0
    # student's key, so that a sweep's supervised row is shared: they must not move its weights.
    labeled = _batches(32)[0]
    variants = [
        (3, 0.5, {}, "threshold"),
        (5, 1.0, {"grayscale": 1.0, "blur": 1.0, "hue": 0.0}, "wpl"),
        (2, 0.0, {"jitter_chance": 0.0}, "csl"),
    ]
    weights = []
    for unlabeled_batch_size, cutmix, strong, policy in variants:
        learner = _learner(
            policy, cutmix, alpha=0.0, unlabeled_batch_size=unlabeled_batch_size, strong=strong
        )
        for step in range(3):
            segtrain.train_step(learner, labeled, None, step)
        weights.append([p.detach().clone() for p in learner.result.state_dict().values()])
    for other in weights[1:]:
        assert all(torch.equal(a, b) for a, b in zip(weights[0], other, strict=True))


def test_supervised_step_ignores_the_unlabeled_loss() -> None:
    cfg = segtrain.SegTrainConfig(steps=3, batch_size=2)
    learner = segtrain.new_learner(
        cfg, num_classes=4, crop_size=32, seed=0, device=torch.device("cpu")
    )
    assert learner.alpha == 0.0
    assert learner.memory is None
    stats = segtrain.train_step(learner, _batches(32)[0], None, 0)
    assert stats["loss_u"] == 0.0
    assert stats["loss_s"] > 0


def _wide_rows(count: int) -> dict[str, Any]:
    """Labeled rows of 20 x 40 (2:1) pictures, each with a 10 x 10 square of class 2 whose
    top-left corner moves with the row, the rest class 1 (a 2:1 Cityscapes frame in small)."""
    images, masks = [], []
    for i in range(count):
        mask = np.ones((20, 40), np.uint8)
        mask[4 + i % 4 : 14 + i % 4, 10 + 2 * i : 20 + 2 * i] = 2
        masks.append(codec.encode_png(mask))
        images.append(codec.encode_png(np.repeat(mask[..., None] * 100, 3, axis=2)))
    return {
        "image": np.array(images, dtype=object),
        "mask": np.array(masks, dtype=object),
        "height": np.array([20] * count),
        "width": np.array([40] * count),
    }


def _box(mask: torch.Tensor | np.ndarray, value: int) -> tuple[int, int]:
    where = np.asarray(mask) == value
    rows, cols = where.any(axis=1).nonzero()[0], where.any(axis=0).nonzero()[0]
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


def test_training_on_non_square_images_squashes_nothing() -> None:
    """2:1 pictures on a 32-px canvas: fitted to 16 x 32 (not squashed to 32 x 32), the padding
    below them ignored and weightless; the 10 x 10 square is 8 x 8 on the canvas and stays a
    square in every crop a training step draws; the step trains on them."""
    arrays = segtrain.labeled_rows_to_arrays(_wide_rows(8), image_size=32)
    assert arrays["image"].shape == (8, 3, 32, 32)
    assert arrays["extent"].tolist() == [[16, 32]] * 8
    for i in range(8):
        label = arrays["label"][i]
        assert (label[16:] == IGNORE_INDEX).all()
        assert set(np.unique(label[:16]).tolist()) == {1, 2}
        assert _box(label, 2) == (8, 8)
        assert (arrays["weight"][i] == (label != IGNORE_INDEX)).all()
    cfg = segtrain.SegTrainConfig(steps=2, batch_size=8, scale=(0.75, 1.25))
    learner = segtrain.new_learner(
        cfg, num_classes=3, crop_size=24, seed=0, device=torch.device("cpu")
    )
    batch = {name: torch.from_numpy(value) for name, value in arrays.items()}
    images, maps = segstep._weak_view(batch, learner)
    assert images.shape == (8, 3, 24, 24)
    whole = 0
    for i in range(8):
        square = (maps["label"][i] == 2).numpy()
        edges = square[0].any() or square[-1].any() or square[:, 0].any() or square[:, -1].any()
        if square.any() and not edges:  # inside the crop, not cut by its edge
            height, width = _box(square, True)
            assert abs(height - width) <= 1, (i, height, width)
            whole += 1
    assert whole >= 4
    stats = segtrain.train_step(learner, batch, None, 0)
    assert math.isfinite(stats["loss_s"])
    assert stats["loss_s"] > 0


def _grad_norm(model: torch.nn.Module) -> float:
    grads = [p.grad.double() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))


def test_gradients_are_clipped_to_grad_clip_and_their_norm_before_is_reported() -> None:
    batch = _batches(32)[0]
    norms = {}
    for clip in (None, 1e-3):
        cfg = segtrain.SegTrainConfig(steps=3, batch_size=2, grad_clip=clip)
        learner = segtrain.new_learner(
            cfg, num_classes=4, crop_size=32, seed=0, device=torch.device("cpu")
        )
        stats = segtrain.train_step(learner, batch, None, 0)
        norms[clip] = (stats["grad_norm"], _grad_norm(learner.model))  # grads outlive the step
    unclipped, after = norms[None]
    assert after == pytest.approx(unclipped, rel=1e-5)  # None: the gradients as computed
    assert unclipped > 1e-2
    reported, clipped = norms[1e-3]
    assert reported == pytest.approx(unclipped, rel=1e-5)  # same weights, batch and draws
    assert clipped == pytest.approx(1e-3, rel=1e-4)


def test_a_step_with_gradients_that_are_not_finite_reports_no_grad_norm() -> None:
    cfg = segtrain.SegTrainConfig(steps=3, batch_size=2)
    learner = segtrain.new_learner(
        cfg, num_classes=4, crop_size=32, seed=0, device=torch.device("cpu")
    )
    with torch.no_grad():
        feature_layer(learner.network).weight.fill_(math.inf)
    stats = segtrain.train_step(learner, _batches(32)[0], None, 0)
    assert not math.isfinite(stats["loss_s"])
    assert "grad_norm" not in stats


def test_strong_view_settings_reach_the_photometric_draw() -> None:
    cfg = segtrain.StudentConfig(strong={"hue": 0.0, "grayscale": 0.0})
    learner = segtrain.new_learner(
        cfg, num_classes=4, crop_size=16, seed=0, device=torch.device("cpu")
    )
    strong = learner.photometric
    assert (strong.hue, strong.grayscale, strong.jitter, strong.blur) == (0.0, 0.0, 0.5, 0.5)
    assert learner.weak.size == 16
    with pytest.raises(ValueError, match="hues"):
        segtrain.StudentConfig(strong={"hues": 0.0})


def _ema_learner(decay: float) -> segtrain.Learner:
    cfg = segtrain.StudentConfig(steps=4, batch_size=2, unlabeled_batch_size=3, ema=decay)
    return segtrain.new_learner(
        cfg, num_classes=4, crop_size=32, seed=0, device=torch.device("cpu")
    )


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_ema_averages_weights_and_batchnorm_statistics_by_hand() -> None:
    learner = _ema_learner(0.75)
    assert learner.result is learner.ema.module  # type: ignore[union-attr]
    labeled, unlabeled = _batches(32)
    after = []
    for step in range(2):
        segtrain.train_step(learner, labeled, unlabeled, step)
        after.append(_state(learner.model))
    ema = learner.result.state_dict()
    names = [k for k, v in after[0].items() if v.is_floating_point()]
    assert any("running_mean" in k for k in names)
    for name in names:  # first update copies, the second: 0.75 * first + 0.25 * second
        expected = 0.75 * after[0][name] + 0.25 * after[1][name]
        torch.testing.assert_close(ema[name], expected, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(ema[k], after[1][k]) for k in names)
    assert (
        segtrain.new_learner(
            segtrain.StudentConfig(),
            num_classes=4,
            crop_size=32,
            seed=0,
            device=torch.device("cpu"),
        ).ema
        is None
    )


def test_ema_checkpoint_holds_the_average_and_resumes_both(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import ray.train

    learner = _ema_learner(0.5)
    labeled, unlabeled = _batches(32)
    for step in range(2):
        segtrain.train_step(learner, labeled, unlabeled, step)
    reported: list[ray.train.Checkpoint] = []

    def report(metrics: dict, checkpoint: ray.train.Checkpoint | None = None) -> None:
        saved = tmp_path / "saved"
        shutil.copytree(checkpoint.path, saved)  # type: ignore[union-attr]
        reported.append(ray.train.Checkpoint.from_directory(str(saved)))

    monkeypatch.setattr(ray.train, "report", report)
    loop_config = LoopConfig(train=learner.cfg, num_classes=4, seed=0, image_size=32)
    segloop._report({}, learner, 2, loop_config, rank=0, save=True)
    state = torch.load(
        Path(reported[0].path) / CHECKPOINT_FILE, map_location="cpu", weights_only=True
    )
    for name, value in learner.result.state_dict().items():
        assert torch.equal(state["state_dict"][name], value)
    for name, value in learner.model.state_dict().items():
        assert torch.equal(state["trained_state_dict"][name], value)
    assert state["ema_updates"] == 2

    resumed = _ema_learner(0.5)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: reported[0])
    assert segloop._restore(resumed, rank=0) == 2
    for one, other in ((learner.model, resumed.model), (learner.result, resumed.result)):
        for (name, a), b in zip(one.state_dict().items(), other.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    assert int(resumed.ema.n_averaged) == 2  # type: ignore[union-attr]


def _rows(batch: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    return [
        {name: value[i].numpy() for name, value in batch.items()}
        for i in range(len(batch["image"]))
    ]


@pytest.mark.ray
def test_the_ray_train_loop_trains_exactly_as_train_step_in_process(tmp_path: Path) -> None:
    """``pseudoflow bench quality`` runs ``train_step`` in-process and claims the pipeline's
    numbers: the Ray Train loop (one worker, its dataset shards) must end with the weights that
    the same steps in this process reach on the same Ray Data batches."""
    import ray.data

    cfg = segtrain.StudentConfig(steps=4, batch_size=2, unlabeled_batch_size=3, log_every=2)
    threads = torch.get_num_threads()
    labeled_rows, unlabeled_rows = _batches(32, n_labeled=5, n_unlabeled=7)
    with local_ray():
        datasets = {
            "labeled": ray.data.from_items(_rows(labeled_rows)).materialize(),
            "unlabeled": ray.data.from_items(_rows(unlabeled_rows)).materialize(),
        }
        loop_config = LoopConfig(train=cfg, num_classes=4, seed=0, image_size=32)
        blob = fit(
            segtrain.train_loop,
            loop_config=loop_config,
            datasets=datasets,
            workers=1,
            use_gpu=False,
            storage=Storage(str(tmp_path)),
            name="student-equivalence",
        )
        torch.set_num_threads(1)
        try:
            learner = segtrain.new_learner(
                cfg, num_classes=4, crop_size=32, seed=0, device=torch.device("cpu")
            )
            initial = {k: v.clone() for k, v in learner.network.state_dict().items()}
            labeled = training.endless_batches(datasets["labeled"], 2, 0)  # rank 0's seeds
            unlabeled = training.endless_batches(datasets["unlabeled"], 3, 1000)
            for step in range(cfg.steps):
                segtrain.train_step(learner, next(labeled), next(unlabeled), step)
        finally:
            torch.set_num_threads(threads)
    trained = load_checkpoint(blob, source="ray train")["state_dict"]
    here = learner.result.state_dict()
    assert trained.keys() == here.keys()
    moved = 0
    for name, value in trained.items():
        torch.testing.assert_close(value, here[name], rtol=1e-4, atol=1e-5, msg=name)
        moved += int(not torch.allclose(value.float(), initial[name].float(), atol=1e-4))
    assert moved > len(trained) // 2  # four steps changed most tensors: not a vacuous match
