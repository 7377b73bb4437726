"""The pseudolabel stage's per-image maps, stored encoding and the student loop's live parts,
checked against hand-computed values (no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import nn

from stages.core import codec
from stages.core.inference import decode_for_inference
from stages.core.models import build_segmenter, checkpoint_bytes, make_checkpoint
from stages.core.storage import Storage
from stages.pseudolabel import batches, live, ops
from stages.pseudolabel.batches import attach_detections, label_batch
from stages.pseudolabel.config import PseudolabelConfig
from stages.pseudolabel.maps import policy_maps
from stages.pseudolabel.memory import PrototypeMemory
from stages.pseudolabel.prototypes import fill_memory, newest_images, queue_batch
from stages.pseudolabel.table import decode_pseudolabels, encode_row
from stages.segtrain import data as segdata
from stages.segtrain import step as segstep
from stages.teach.predictor import TeacherPredictor
from stages.teach.table import (
    MAPS,
    SignalSpec,
    decode_signals,
    quantized_maps,
    signal_maps,
    stored_maps,
)

# Every statistic a policy reads (S4MC's margins, CSL's dispersion, WPL's features).
ALL = SignalSpec(margins=True, dispersion=True, features=True)
QUANT = 1 / 510  # half a uint8 step: the error of one stored statistic
# What the uint8 signals cost CSL's weights, measured on nine trained-looking fields (5 and 21
# classes, 64 to 256 px): mean |Δw| <= 2.6e-3, max 0.51, trusted flipped on <= 0.8 %
# (docs/performance.md, "Stored teacher signals").
CSL_MEAN_ERROR, CSL_MAX_ERROR, CSL_TRUSTED_FLIPS = 3e-3, 0.55, 0.008

# The worked WPL example of methods.md §4: T_5(f) = {0, 2, 4, 6, 8}, T_5(μ) = {1, 2, 3, 5, 6}.
F_WORKED = [0.9, 0.1, 0.8, 0.05, 0.7, 0.3, 0.6, 0.2, 0.5, 0.0]
MU_WORKED = [0.1, 0.9, 0.8, 0.7, 0.0, 0.6, 0.5, 0.2, 0.3, 0.4]


def _probs(*pixels: tuple[float, ...]) -> torch.Tensor:
    """Pixels in a row -> float[C, 1, N]."""
    return torch.tensor(pixels, dtype=torch.float32).T[:, None, :]


def _stored(probs: torch.Tensor, spec: SignalSpec | None = None) -> dict[str, torch.Tensor]:
    """``float[C, H, W]`` -> its teacher signals as stored and decoded."""
    spec = spec or ALL
    maps = quantized_maps(probs[None], spec)[:, 0].numpy()
    row: dict = {"height": probs.shape[1], "width": probs.shape[2]}
    row |= {name: m.tobytes() for name, m in zip(stored_maps(spec), maps, strict=True)}
    return decode_signals(row)


def _peaked(classes: int, size: int, seed: int) -> torch.Tensor:
    """A trained-looking teacher output: class regions with soft borders, most pixels confident."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, classes, size // 8, size // 8, generator=generator) * 3
    top = coarse.argmax(dim=1, keepdim=True)
    coarse = coarse + 6 * torch.zeros_like(coarse).scatter_(1, top, 1.0)
    logits = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")
    return logits.softmax(dim=1)[0]


# ----------------------------------------------------------------------------- teacher signals
def test_stored_signals_are_the_exact_statistics_within_half_a_step() -> None:
    torch.manual_seed(0)
    probs = torch.distributions.Dirichlet(torch.full((6,), 0.5)).sample((9, 11)).permute(2, 0, 1)
    spec = SignalSpec(margins=True, refined_label=True, dispersion=True)
    exact = {k: v[0] for k, v in signal_maps(probs[None], spec).items()}
    back = _stored(probs, spec)
    assert set(back) == set(MAPS)
    assert torch.equal(back["label"], probs.argmax(dim=0))
    assert torch.equal(back["refined_label"], exact["refined_label"])
    for name in ("conf", "margin", "refined_margin"):
        assert (back[name] - exact[name]).abs().max() <= QUANT + 1e-7, name
    # r is stored as √(4r): its error is at most √r/255 (+ the square of half a step)
    r = exact["dispersion"]
    assert ((back["dispersion"] - r).abs() <= r.sqrt() / 255 + 1e-5).all()
    assert r.max() > 0.01  # the bound was exercised away from 0


def test_signal_statistics_hand_computed() -> None:
    # methods.md §3's worked example: P = (0.7, 0.2, 0.1) -> m = 0.7, r = 0.0025, κ = 0.5
    exact = signal_maps(_probs((0.7, 0.2, 0.1))[None], ALL)
    torch.testing.assert_close(exact["conf"], torch.tensor([[[0.7]]]))
    torch.testing.assert_close(exact["margin"], torch.tensor([[[0.5]]]))
    torch.testing.assert_close(exact["dispersion"], torch.tensor([[[0.0025]]]))
    # P = (0.6, 0.3, 0.1): m = 0.6 = 153/255; m̄ = 0.2, r = (0.1² + 0.1²)/2 = 0.01, √(4r) = 51/255
    stored = _stored(_probs((0.6, 0.3, 0.1)))
    assert stored["conf"].item() == pytest.approx(0.6, abs=1e-7)
    assert stored["dispersion"].item() == pytest.approx(0.01, abs=1e-7)
    assert stored["label"].item() == 0
    assert "refined_label" not in stored


def test_s4mc_from_stored_signals_matches_full_probabilities() -> None:
    torch.manual_seed(1)
    probs = torch.distributions.Dirichlet(torch.ones(4)).sample((12, 12)).permute(2, 0, 1)
    stored = policy_maps(PseudolabelConfig(policy="s4mc"), _stored(probs))
    full = policy_maps(PseudolabelConfig(policy="s4mc"), probs)
    assert (stored["margin"] - full["margin"]).abs().max() <= QUANT + 1e-6
    assert (stored["refined_margin"] - full["refined_margin"]).abs().max() <= QUANT + 1e-6


def test_policies_from_stored_signals_differ_from_exact_only_within_the_stated_bounds() -> None:
    """What the uint8 signals cost each policy on a trained-looking 21-class field
    (docs/performance.md, "Stored teacher signals")."""
    probs = _peaked(21, 128, seed=3)
    signals = _stored(probs)
    exact_conf = probs.max(dim=0).values
    cfg = PseudolabelConfig()
    stored, exact = policy_maps(cfg, signals), policy_maps(cfg, probs)
    assert torch.equal(stored["label"], exact["label"])
    flipped = stored["keep"] != exact["keep"]
    assert ((exact_conf[flipped] - cfg.tau).abs() <= QUANT + 1e-7).all()
    assert 0 < flipped.float().mean() < 0.005  # 0.37 % here: conf in [0.95, 0.952)
    s4mc = PseudolabelConfig(policy="s4mc")
    stored, exact = policy_maps(s4mc, signals), policy_maps(s4mc, probs)
    flipped = stored["keep"] != exact["keep"]
    gamma = ops.dpa_threshold(exact["margin"][None], torch.ones(1, 128, 128, dtype=torch.bool), 0.4)
    # γ moves by at most half a step, κ̃ too: only pixels within a step of γ can change
    assert ((exact["refined_margin"][flipped] - gamma).abs() <= 2 * QUANT + 1e-6).all()
    assert flipped.float().mean() < 0.01
    csl = PseudolabelConfig(policy="csl")
    stored, exact = policy_maps(csl, signals), policy_maps(csl, probs)
    error = (stored["weight"] - exact["weight"]).abs()
    assert error.mean() < CSL_MEAN_ERROR
    assert error.max() < CSL_MAX_ERROR
    assert (stored["trusted"] != exact["trusted"]).float().mean() < CSL_TRUSTED_FLIPS


# ------------------------------------------------------------------------------ per-image maps
def test_threshold_maps_hand_computed() -> None:
    maps = policy_maps(PseudolabelConfig(), _probs((0.96, 0.03, 0.01), (0.5, 0.3, 0.2)))
    assert maps["label"].tolist() == [[0, 0]]
    assert maps["keep"].tolist() == [[True, False]]
    assert maps["weight"].tolist() == [[1.0, 1.0]]


def test_s4mc_maps_hand_computed() -> None:
    # A's only neighbour is B and vice versa: q_A = P_B, q_B = P_A, so both refine to
    # P + q − P·q = (0.945, 0.4395, 0.183): κ̃ = 0.5055 (κ_A = 0.04, κ_B = 0.85).
    maps = policy_maps(
        PseudolabelConfig(policy="s4mc"), _probs((0.45, 0.41, 0.14), (0.90, 0.05, 0.05))
    )
    torch.testing.assert_close(maps["margin"], torch.tensor([[0.04, 0.85]]))
    torch.testing.assert_close(maps["refined_margin"], torch.tensor([[0.5055, 0.5055]]))
    # stored keep is the t = 0 view: γ_0 = 0.04 + 0.4·(0.85 − 0.04) = 0.364 < 0.5055
    assert maps["keep"].tolist() == [[True, True]]
    higher = PseudolabelConfig(policy="s4mc", s4mc={"alpha0": 1.0})  # γ_0 = 0.85
    assert policy_maps(higher, _probs((0.45, 0.41, 0.14), (0.90, 0.05, 0.05)))["keep"].tolist() == [
        [False, False]
    ]


def test_s4mc_label_from_refined_flips_the_argmax() -> None:
    # A = (0.40, 0.45, 0.15) with neighbour B = (0.95, 0.04, 0.01): refined A = (0.97, 0.472, ...)
    probs = _probs((0.40, 0.45, 0.15), (0.95, 0.04, 0.01))
    assert policy_maps(PseudolabelConfig(policy="s4mc"), probs)["label"].tolist() == [[1, 0]]
    refined = PseudolabelConfig(policy="s4mc", s4mc={"label_from": "refined"})
    assert policy_maps(refined, probs)["label"].tolist() == [[0, 0]]


def test_csl_maps_trusted_is_exactly_weight_one_and_degenerate_image() -> None:
    torch.manual_seed(2)
    probs = torch.distributions.Dirichlet(torch.ones(3)).sample((8, 8)).permute(2, 0, 1)
    maps = policy_maps(PseudolabelConfig(policy="csl"), probs)
    expected = ops.csl_weights(probs[None], torch.ones(1, 8, 8, dtype=torch.bool))[0]
    torch.testing.assert_close(maps["weight"], expected)
    assert torch.equal(maps["trusted"], expected == 1.0)
    assert 0 < int(maps["trusted"].sum()) < 64
    assert maps["keep"].all()
    flat = torch.full((3, 4, 4), 1 / 3)  # all pixels equal: s_2 = 0, one cluster, z = 0 -> w = 1
    assert policy_maps(PseudolabelConfig(policy="csl"), flat)["trusted"].all()


def _wpl_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    probs = _probs((0.97, 0.02, 0.01), (0.01, 0.98, 0.01), (0.02, 0.96, 0.02))
    boxes = ops.rasterize_boxes(
        np.array([[1.0, 0.0, 1.5, 1.0], [0.0, 0.0, 3.0, 1.0]], np.float32),
        np.array([1, 2]),
        np.array([0.99, 0.5], np.float32),  # the class-2 box is below the score threshold
        {1: 1, 2: 2},
        1,
        3,
        3,
    )
    features = torch.tensor([F_WORKED, F_WORKED, MU_WORKED]).T[:, None, :]  # [D=10, 1, 3]
    prototypes = torch.full((3, 10), float("nan"))
    prototypes[1] = torch.tensor(MU_WORKED)  # class 0 has no prototype
    return probs, boxes, features, prototypes


def test_wpl_maps_hand_computed() -> None:
    probs, boxes, features, prototypes = _wpl_inputs()
    maps = policy_maps(
        PseudolabelConfig(policy="wpl"),
        probs,
        box_masks=boxes,
        features=features,
        prototypes=prototypes,
    )
    assert maps["label"].tolist() == [[0, 1, 1]]
    assert maps["keep"].tolist() == [[True, True, True]]
    assert maps["reliable"].tolist() == [[False, True, False]]  # only pixel 1 is in a class-1 box
    torch.testing.assert_close(maps["weight"], torch.tensor([[0.0, 0.4, 1.0]]))


def test_stored_row_round_trips_to_training_maps_with_plus_one() -> None:
    probs, boxes, features, prototypes = _wpl_inputs()
    cfg = PseudolabelConfig(policy="wpl", tau=0.97, wpl={"weight_form": "plus_one"})
    maps = policy_maps(cfg, probs, box_masks=boxes, features=features, prototypes=prototypes)
    row = encode_row(cfg, "abc", maps)
    assert row["weight_offset"] == 1.0
    assert row["margin"] is None
    assert row["trusted"] is None
    assert row["coverage"] == pytest.approx(2 / 3)  # conf 0.96 < τ = 0.97 drops pixel 2
    back = segdata._stored_maps(row)
    torch.testing.assert_close(back["weight"], torch.tensor([[1.0, 1.4, 0.0]]))
    assert back["keep"].tolist() == [[1, 1, 0]]
    assert back["reliable"].tolist() == [[0, 1, 0]]
    assert back["label"].tolist() == [[0, 1, 1]]


def test_one_decoder_serves_training_evaluation_and_the_report() -> None:
    """S4MC's margins (uint16) and CSL's trusted mask come back from the row; the student's
    maps, the evaluate stage's label, keep and weight and the report's are that one decoding."""
    from pipeline.report import decode_labels
    from stages.evaluate.quality import decode_pseudolabel

    probs = _probs((0.9, 0.05, 0.05), (0.45, 0.35, 0.2), (0.1, 0.1, 0.8))
    s4mc = encode_row(
        PseudolabelConfig(policy="s4mc"), "a", policy_maps(PseudolabelConfig(policy="s4mc"), probs)
    )
    maps = decode_pseudolabels(s4mc)
    assert set(maps) == {"label", "keep", "weight", "margin", "refined_margin"}
    np.testing.assert_allclose(maps["margin"], [[0.85, 0.1, 0.7]], atol=1 / 131070)
    assert maps["label"].tolist() == [[0, 0, 2]]
    csl = PseudolabelConfig(policy="csl")
    row = encode_row(csl, "b", policy_maps(csl, probs))
    maps = decode_pseudolabels(row)
    assert maps["trusted"].dtype == np.bool_
    assert maps["keep"].tolist() == [[True, True, True]]
    assert set(decode_pseudolabels(row, ["keep"])) == {"keep"}
    student = segdata._stored_maps(row)
    for name, value in maps.items():
        np.testing.assert_array_equal(
            student[name].numpy(), value.astype(student[name].numpy().dtype)
        )
    label, keep, weight = decode_labels(row)
    np.testing.assert_array_equal(weight, maps["weight"])
    np.testing.assert_array_equal(keep, maps["keep"])
    mask = codec.encode_png(np.array([[0, 255, 2]], np.uint8))
    truth, label8, valid_keep, weight8 = decode_pseudolabel(mask, row)
    assert truth.tolist() == [[0, 255, 2]]
    assert valid_keep.tolist() == [[True, False, True]]  # the ignore pixel is not counted
    np.testing.assert_array_equal(label8, label)
    np.testing.assert_array_equal(weight8, weight)


def test_unknown_policy_lists_the_valid_ones() -> None:
    with pytest.raises(
        ValueError, match="unknown policy 's4mx'; choose one of threshold, s4mc, csl, wpl"
    ):
        PseudolabelConfig(policy="s4mx")


# ----------------------------------------------------------------------- WPL teacher prototypes
def _contribution(image_id: str, queue: str, cls: int, vectors: list[list[float]]) -> dict:
    array = np.asarray(vectors, np.float32)
    return {
        "image_id": image_id,
        "queue": queue,
        "cls": cls,
        "count": len(array),
        "features": codec.to_bytes(array),
    }


def test_fill_memory_keeps_the_newest_vectors_per_queue() -> None:
    newest_first = [
        _contribution("c", "labeled", 1, [[5.0, 0.0]]),
        _contribution("c", "unlabeled", 2, [[7.0, 7.0]]),
        _contribution("b", "labeled", 1, [[3.0, 0.0], [4.0, 0.0]]),
        _contribution("a", "labeled", 1, [[1.0, 0.0], [2.0, 0.0]]),
        _contribution("a", "unlabeled", 1, [[0.0, 9.0]]),
    ]
    prototypes = fill_memory(newest_first, size=2, num_classes=3, dim=2)
    # labeled queue of class 1: pushed 1, 2, 3, 4, 5 -> holds 4, 5; unlabeled queue holds (0, 9)
    np.testing.assert_allclose(prototypes[1], [(4 + 5 + 0) / 3, 9 / 3])
    assert np.isnan(prototypes[0]).all()
    assert np.isnan(prototypes[2]).all()  # only unlabeled vectors: no prototype


def test_attach_detections_looks_up_by_image_id_and_names_missing_ones() -> None:
    detections = pa.table(
        {
            "image_id": ["b", "a"],
            "boxes": [[1.0, 2.0, 3.0, 4.0], []],
            "labels": [[2], []],
            "scores": [[0.9], []],
        }
    )
    joined = attach_detections(pa.table({"image_id": ["a", "b"], "x": [1, 2]}), detections)
    assert joined.to_pylist() == [
        {"image_id": "a", "x": 1, "boxes": [], "labels": [], "scores": []},
        {"image_id": "b", "x": 2, "boxes": [1.0, 2.0, 3.0, 4.0], "labels": [2], "scores": [0.9]},
    ]
    with pytest.raises(ValueError, match=r"no detections row for images \['c'\]"):
        attach_detections(pa.table({"image_id": ["a", "c"]}), detections)


def test_newest_images_are_the_ones_a_fifo_still_holds() -> None:
    counts = [
        {"image_id": "a", "queue": "labeled", "cls": 1, "count": 2},
        {"image_id": "b", "queue": "labeled", "cls": 1, "count": 2},
        {"image_id": "c", "queue": "labeled", "cls": 1, "count": 1},
        {"image_id": "a", "queue": "unlabeled", "cls": 1, "count": 1},
        {"image_id": "d", "queue": "labeled", "cls": 2, "count": 0},
    ]
    # labeled/1 of size 2 holds c's vector and one of b's; unlabeled/1 holds a's; d adds nothing
    assert newest_images(counts, size=2) == {"a", "b", "c"}
    assert newest_images(counts, size=1) == {"a", "c"}


# ---------------------------------------------------------------- no forward after the teacher
def test_every_policy_is_computed_from_stored_signals_without_a_forward(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    args = {"arch": "lraspp_mobilenet_v3_large", "num_classes": 3}
    storage = Storage(str(tmp_path))
    path = storage.path("teacher.pt")
    model = build_segmenter(**args)
    storage.write_bytes(
        path, checkpoint_bytes(make_checkpoint(model, kind="segmenter", model_args=args))
    )
    rng = np.random.default_rng(0)
    batch = {
        "image_id": np.array([f"{i:024x}" for i in range(3)]),
        "height": np.array([20, 20, 20]),
        "width": np.array([28, 28, 28]),
        "image": np.array(
            [codec.encode_png(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)) for _ in range(3)],
            dtype=object,
        ),
        "split": np.array(["unlabeled"] * 3),
    }
    spec = ALL.model_dump()
    signals = TeacherPredictor(storage.url, path, spec)(decode_for_inference(batch, 32))
    detections = {
        "boxes": [[0.0, 0.0, 10.0, 10.0]] * 3,
        "labels": [[1]] * 3,
        "scores": [[0.99]] * 3,
    }
    for name, values in detections.items():
        signals = signals.append_column(name, pa.array(values))

    def no_forward(*_: object, **__: object) -> None:
        raise AssertionError("a model forward ran")

    monkeypatch.setattr(nn.Module, "__call__", no_forward)
    prototypes = np.random.default_rng(1).random((3, 128)).astype(np.float32)
    for policy in ("threshold", "s4mc", "csl", "wpl"):
        cfg = PseudolabelConfig(policy=policy).model_dump()
        table = label_batch(signals, cfg, prototypes if policy == "wpl" else None)
        assert table.num_rows == 3
        assert set(table["policy"].to_pylist()) == {policy}
    queue_batch(signals, PseudolabelConfig(policy="wpl").model_dump())


# ------------------------------------------------------------------------------- live in the loop
def test_s4mc_keep_uses_the_dpa_quantile_of_the_batch() -> None:
    margins = torch.tensor([[[0.05, 0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]]])
    valid = torch.ones_like(margins, dtype=torch.bool)
    keep = live.s4mc_keep(margins, margins + 0.1, valid, step=40, total_steps=80)
    # γ_40 = 0.18 (methods.md): κ̃ = κ + 0.1 > 0.18 drops only κ = 0.05
    assert keep.tolist() == [[[False] + [True] * 9]]
    at_end = live.s4mc_keep(margins, margins, valid, step=80, total_steps=80)
    assert at_end.sum() == 9  # γ = min κ = 0.05, strict >


def test_tmp_view_covers_only_trusted_pixels() -> None:
    images = torch.ones(2, 3, 4, 4)
    trusted = torch.zeros(2, 4, 4, dtype=torch.bool)
    trusted[0, :2] = True
    covered = live.tmp_view(images, trusted, block=2, cover=1.0)
    assert covered[0, :, :2].eq(0).all()
    assert covered[0, :, 2:].eq(1).all()
    assert covered[1].eq(1).all()
    assert torch.equal(live.tmp_view(images, trusted, block=2, cover=0.0), images)


class _Tiny(nn.Module):
    """A deterministic segmenter with a ``classifier`` head (no batch norm)."""

    def __init__(self, classes: int = 3, dim: int = 10) -> None:
        super().__init__()
        self.backbone = nn.Conv2d(3, dim, 1)
        self.classifier = nn.Conv2d(dim, classes, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.classifier(torch.relu(self.backbone(x)))}


def _unlabeled_batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    label = torch.randint(0, 3, (2, 4, 4))
    return {
        "label": label,
        "weight": torch.rand(2, 4, 4),
        "keep": torch.ones(2, 4, 4, dtype=torch.bool),
        "trusted": torch.ones(2, 4, 4, dtype=torch.bool),
        "reliable": label == 1,
        "margin": torch.rand(2, 4, 4),
        "refined_margin": torch.rand(2, 4, 4),
    }


def test_csl_loss_averages_the_strong_and_the_tmp_view() -> None:
    model, maps = _Tiny(), _unlabeled_batch()
    images = torch.randn(2, 3, 4, 4)
    cfg = PseudolabelConfig(policy="csl", csl={"block": 4, "cover": 1.0})
    tmp = live.tmp_view(images, maps["trusted"], 4, 1.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(tmp, torch.zeros_like(images))  # every pixel trusted, covered
    views, targets = [images, tmp], [maps, maps]
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    ce = [ops.pixel_cross_entropy(model(view)["out"], maps["label"], valid) for view in views]
    loss, _ = segstep._unlabeled_loss(ce, [valid, valid], [None, None], targets, cfg, None, (0, 10))
    strong = ops.weighted_unsup_loss(model(images)["out"], maps["label"], maps["weight"], valid)
    hidden = ops.weighted_unsup_loss(
        model(torch.zeros_like(images))["out"], maps["label"], maps["weight"], valid
    )
    torch.testing.assert_close(loss, (strong + hidden) / 2)


def test_s4mc_loss_uses_the_live_keep_mask() -> None:
    model, maps = _Tiny(), _unlabeled_batch()
    images = torch.randn(2, 3, 4, 4)
    cfg = PseudolabelConfig(policy="s4mc")
    targets = [maps]
    logits = [model(images)["out"]]
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    ce = [ops.pixel_cross_entropy(logits[0], maps["label"], valid)]
    loss, stats = segstep._unlabeled_loss(ce, [valid], [None], targets, cfg, None, (5, 10))
    keep = live.s4mc_keep(maps["margin"], maps["refined_margin"], valid, 5, 10)
    expected = ops.weighted_unsup_loss(logits[0], maps["label"], keep.float(), valid)
    torch.testing.assert_close(loss, expected)
    assert stats["kept_fraction"] == pytest.approx(float(keep.float().mean()))


def test_wpl_weight_stored_until_the_first_refresh_then_from_prototypes() -> None:
    model, maps = _Tiny(), _unlabeled_batch()
    images = torch.randn(2, 3, 4, 4)
    cfg = PseudolabelConfig(policy="wpl", wpl={"k": 2})
    memory = segstep._new_memory(cfg, 3, model)
    assert memory is not None
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    logits, features = segstep._forward(model, images, with_features=True)
    assert features is not None
    before = segstep._live_weight(cfg, maps, valid, features, memory, (0, 10))
    assert torch.equal(before, maps["weight"])
    labeled = {"label": logits.argmax(dim=1)}  # every labeled pixel predicted right
    segstep._feed_memory(
        memory,
        cfg.model_copy(update={"wpl": cfg.wpl.model_copy(update={"conf_thresh": 0.0})}),
        torch.Generator(),
        (features, logits, labeled),
        (features, maps),
    )
    prototypes = memory.refresh()
    after = segstep._live_weight(cfg, maps, valid, features, memory, (1, 10))
    expected = ops.topk_index_similarity(features, prototypes, maps["label"], k=2)
    torch.testing.assert_close(after, expected)
    assert not torch.equal(after, maps["weight"])
    plus_one = cfg.model_copy(
        update={"wpl": cfg.wpl.model_copy(update={"weight_form": "plus_one"})}
    )
    shifted = segstep._live_weight(plus_one, maps, valid, features, memory, (1, 10))
    torch.testing.assert_close(shifted, expected + 1)  # keep is all True here


def test_prototype_memory_matches_the_student_feature_width() -> None:
    cfg = PseudolabelConfig(policy="wpl")
    memory = segstep._new_memory(
        cfg, 3, build_segmenter(arch="lraspp_mobilenet_v3_large", num_classes=3)
    )
    assert isinstance(memory, PrototypeMemory)
    assert memory.dim == 128
    assert segstep._new_memory(PseudolabelConfig(policy="csl"), 3, _Tiny()) is None


# ------------------------------------------------------------------------- batched over images
def _mixed_size_signals() -> pa.Table:
    """Signal rows (every statistic) of five images of two sizes, interleaved, with detections."""
    torch.manual_seed(1)
    model = build_segmenter(arch="lraspp_mobilenet_v3_large", num_classes=3)
    predictor = TeacherPredictor.of_model(model, torch.device("cpu"), ALL)
    rng = np.random.default_rng(4)
    sizes = [(20, 28), (16, 24), (20, 28), (16, 24), (20, 28)]
    batch = {
        "image_id": np.array([f"{i:024x}" for i in range(5)]),
        "height": np.array([h for h, _ in sizes]),
        "width": np.array([w for _, w in sizes]),
        "image": np.array(
            [codec.encode_png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes],
            dtype=object,
        ),
        "split": np.array(["unlabeled"] * 5),
    }
    signals = predictor(decode_for_inference(batch, 32))
    detections = {
        "boxes": [[0.0, 0.0, 10.0 + i, 8.0] for i in range(5)],
        "labels": [[1 + i % 2] for i in range(5)],
        "scores": [[0.99] for _ in range(5)],
    }
    for name, values in detections.items():
        signals = signals.append_column(name, pa.array(values))
    return signals


@pytest.mark.parametrize("policy", ["threshold", "s4mc", "csl", "wpl"])
def test_label_batch_over_mixed_sizes_equals_one_image_at_a_time(
    monkeypatch: pytest.MonkeyPatch, policy: str
) -> None:
    signals = _mixed_size_signals()
    prototypes = np.random.default_rng(2).random((3, 128)).astype(np.float32)
    prototypes[0] = np.nan
    cfg = PseudolabelConfig(policy=policy).model_dump()
    protos = prototypes if policy == "wpl" else None
    one_by_one = pa.concat_tables(
        [label_batch(signals.slice(i, 1), cfg, protos) for i in range(signals.num_rows)]
    )
    # WPL in chunks of two images of the larger size (the feature budget)
    monkeypatch.setattr(batches, "FEATURE_ELEMENTS", 2 * 128 * 20 * 28)
    batched = label_batch(signals, cfg, protos)
    assert batched["image_id"].to_pylist() == signals["image_id"].to_pylist()
    assert batched["height"].to_pylist() == [20, 16, 20, 16, 20]
    assert batched.equals(one_by_one)
