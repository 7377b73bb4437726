"""The student's training step: schedules, CutMix boxes, the strong views' mixing of pixels and
stored maps, and whole steps of every policy on a real (tiny) torchvision network."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms import v2

from stages import segtrain
from stages.core import data
from stages.pseudolabel.stage import POLICIES, PseudolabelConfig


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


def _learner(policy: str = "threshold", cutmix: float = 1.0, size: int = 32) -> segtrain.Learner:
    cfg = segtrain.StudentConfig(steps=4, batch_size=2, unlabeled_batch_size=3, cutmix=cutmix)
    return segtrain.new_learner(
        cfg,
        num_classes=4,
        image_size=size,
        seed=0,
        device=torch.device("cpu"),
        policy=PseudolabelConfig(policy=policy, wpl={"refresh_every": 2, "conf_thresh": 0.0}),
    )


def test_strong_views_mix_pixels_and_every_map_in_the_same_box() -> None:
    learner = _learner()
    learner.weak = v2.Identity()
    learner.photometric = v2.Identity()
    colours = torch.tensor([10, 120, 240], dtype=torch.uint8)
    batch = {
        "image": colours.view(3, 1, 1, 1).expand(3, 3, 16, 16).clone(),
        "label": torch.arange(3, dtype=torch.uint8).view(3, 1, 1).expand(3, 16, 16).clone(),
        "weight": torch.tensor([0.1, 0.5, 0.9]).view(3, 1, 1).expand(3, 16, 16).clone(),
        "keep": torch.ones(3, 16, 16, dtype=torch.uint8),
    }
    views, maps = segtrain._strong_views(batch, learner)
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


def _batches(size: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    labeled = {
        "image": torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=generator),
        "label": torch.randint(0, 4, (2, size, size), dtype=torch.uint8, generator=generator),
        "weight": torch.ones(2, size, size),
    }
    label = torch.randint(0, 4, (3, size, size), dtype=torch.uint8, generator=generator)
    margin = torch.rand(3, size, size, generator=generator)
    unlabeled = {
        "image": torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8, generator=generator),
        "label": label,
        "weight": torch.rand(3, size, size, generator=generator),
        "keep": torch.ones(3, size, size, dtype=torch.uint8),
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


def test_supervised_step_ignores_the_unlabeled_loss() -> None:
    cfg = segtrain.SegTrainConfig(steps=3, batch_size=2)
    learner = segtrain.new_learner(
        cfg, num_classes=4, image_size=32, seed=0, device=torch.device("cpu")
    )
    assert learner.alpha == 0.0
    assert learner.memory is None
    stats = segtrain.train_step(learner, _batches(32)[0], None, 0)
    assert stats["loss_u"] == 0.0
    assert stats["loss_s"] > 0
