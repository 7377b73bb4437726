"""Tests of the pure pseudo-label math: methods.md worked examples plus hand-computed cases."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from stages.core.constants import IGNORE_INDEX
from stages.pseudolabel import ops
from stages.pseudolabel.ops import (
    csl_features,
    csl_weights,
    detector_reliability,
    dpa_alpha,
    dpa_threshold,
    dpa_thresholds,
    margin,
    rasterize_box_batch,
    rasterize_boxes,
    s4mc_refine,
    threshold_keep,
    tmp_block_mask,
    topk_index_similarity,
    weighted_unsup_loss,
)

DTYPES = [torch.float32, torch.float64]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _pixels(*rows: tuple[float, ...], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """One image of one row of pixels: each argument is one pixel's class vector -> [1, C, 1, W]."""
    return torch.tensor(rows, dtype=dtype).T[None, :, None, :]


# ------------------------------------------------------------------------------------------- loss
@pytest.mark.parametrize("dtype", DTYPES)
def test_weighted_unsup_loss_hand_computed(dtype: torch.dtype) -> None:
    # pixel 0: logits (0, 0), target 0  -> CE = ln 2            = 0.6931471806, weight 1
    # pixel 1: logits (2, 0), target 1  -> CE = ln(1 + e^2)     = 2.1269280110, weight 0.5
    # pixel 2: invalid, target 255 (must not crash nor count), weight 1
    # pixel 3: valid but not kept (weight 0)
    # L = (0.6931471806 + 0.5 * 2.1269280110 + 0) / 3 valid pixels = 0.5855370620
    # (dividing by the 2 kept pixels would give 0.878, by all 4 pixels 0.439)
    logits = _pixels((0.0, 0.0), (2.0, 0.0), (100.0, -100.0), (0.0, 3.0), dtype=dtype).clone()
    logits.requires_grad_(True)
    target = torch.tensor([[[0, 1, IGNORE_INDEX, 0]]])
    weight = torch.tensor([[[1.0, 0.5, 1.0, 0.0]]], dtype=dtype)
    valid = torch.tensor([[[True, True, False, True]]])
    loss = weighted_unsup_loss(logits, target, weight, valid)
    assert loss.dtype == dtype
    assert loss.shape == ()
    assert_close(loss, torch.tensor(0.5855370620, dtype=dtype), atol=1e-6, rtol=1e-6)
    loss.backward()
    assert logits.grad is not None
    assert_close(logits.grad[0, :, 0, 2], torch.zeros(2, dtype=dtype))  # invalid: no gradient
    assert_close(logits.grad[0, :, 0, 3], torch.zeros(2, dtype=dtype))  # weight 0: no gradient


def test_weighted_unsup_loss_without_valid_pixels_is_zero_with_grad() -> None:
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), IGNORE_INDEX)
    loss = weighted_unsup_loss(
        logits, target, torch.ones(2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.bool)
    )
    assert loss.requires_grad
    assert_close(loss, torch.tensor(0.0))
    loss.backward()
    assert logits.grad is not None
    assert_close(logits.grad, torch.zeros_like(logits))


# -------------------------------------------------------------------------------------- threshold
def test_threshold_keep_at_exactly_tau() -> None:
    # 0.95 >= 0.95 is kept (float32 conf: torch compares in the tensor's dtype, so float32(0.95)
    # equals tau); 0.9499 is not; 1.0 is kept; an invalid pixel is never kept.
    conf = torch.tensor([[[0.95, 0.9499, 1.0, 0.99]]])
    valid = torch.tensor([[[True, True, True, False]]])
    expected = torch.tensor([[[True, False, True, False]]])
    assert torch.equal(threshold_keep(conf, valid), expected)
    assert torch.equal(threshold_keep(conf, valid, tau=0.9), torch.tensor([[[True] * 3 + [False]]]))


# -------------------------------------------------------------------------------------------- S4MC
@pytest.mark.parametrize("dtype", DTYPES)
def test_s4mc_worked_example(dtype: torch.dtype) -> None:
    # Row of three pixels [a, x, b]; x's neighbours are a and b (the rest is zero padding), so
    # q(x) = max(a, b) = (0.9, 0.3, 0.2), the methods.md example.
    probs = _pixels((0.9, 0.05, 0.05), (0.45, 0.41, 0.14), (0.5, 0.3, 0.2), dtype=dtype)
    refined = s4mc_refine(probs)
    assert refined.dtype == dtype
    assert_close(
        refined[0, :, 0, 1], torch.tensor([0.945, 0.587, 0.312], dtype=dtype), atol=1e-6, rtol=1e-6
    )
    assert_close(margin(refined)[0, 0, 1], torch.tensor(0.358, dtype=dtype), atol=1e-6, rtol=1e-6)
    assert_close(margin(probs)[0, 0, 1], torch.tensor(0.04, dtype=dtype), atol=1e-6, rtol=1e-6)


def test_s4mc_zero_padded_borders_no_wraparound() -> None:
    # Same row [a, x, b]. a = (0.9, 0.05, 0.05) only sees x = (0.45, 0.41, 0.14):
    #   0.9 + 0.45 - 0.405 = 0.945;  0.05 + 0.41 - 0.0205 = 0.4395;  0.05 + 0.14 - 0.007 = 0.183
    # b = (0.5, 0.3, 0.2) only sees x:
    #   0.5 + 0.45 - 0.225 = 0.725;  0.3 + 0.41 - 0.123 = 0.587;     0.2 + 0.14 - 0.028 = 0.312
    # (a wrap-around shift would let a see b: q = (0.5, 0.41, 0.2) -> different numbers)
    probs = _pixels((0.9, 0.05, 0.05), (0.45, 0.41, 0.14), (0.5, 0.3, 0.2))
    refined = s4mc_refine(probs)
    assert_close(refined[0, :, 0, 0], torch.tensor([0.945, 0.4395, 0.183], dtype=torch.float64))
    assert_close(refined[0, :, 0, 2], torch.tensor([0.725, 0.587, 0.312], dtype=torch.float64))


def test_s4mc_single_pixel_has_no_neighbours() -> None:
    # Only zero padding around: q = 0, so P̃ = P + β·(0 − 0) = P.
    probs = _pixels((0.6, 0.3, 0.1))
    assert_close(s4mc_refine(probs), probs)
    assert_close(s4mc_refine(probs, neighborhood=4, beta=0.5), probs)


def _two_by_two() -> torch.Tensor:
    # 2×2 image, 2 classes:  a=(0.2, 0.8) b=(0.6, 0.4)
    #                        c=(0.7, 0.3) d=(0.9, 0.1)
    class0 = torch.tensor([[0.2, 0.6], [0.7, 0.9]], dtype=torch.float64)
    return torch.stack([class0, 1.0 - class0])[None]


def test_s4mc_four_vs_eight_neighbourhood_and_argmax_flip() -> None:
    probs = _two_by_two()
    # pixel a: 4-neighbours {b, c} -> q = (0.7, 0.4); 8-neighbours {b, c, d} -> q = (0.9, 0.4)
    # 4: (0.2 + 0.7 - 0.14, 0.8 + 0.4 - 0.32) = (0.76, 0.88) -> margin 0.12, argmax stays 1
    # 8: (0.2 + 0.9 - 0.18, 0.88)             = (0.92, 0.88) -> margin 0.04, argmax flips to 0
    four = s4mc_refine(probs, neighborhood=4)
    eight = s4mc_refine(probs, neighborhood=8)
    assert_close(four[0, :, 0, 0], torch.tensor([0.76, 0.88], dtype=torch.float64))
    assert_close(eight[0, :, 0, 0], torch.tensor([0.92, 0.88], dtype=torch.float64))
    assert_close(margin(four)[0, 0, 0], torch.tensor(0.12, dtype=torch.float64))
    assert_close(margin(eight)[0, 0, 0], torch.tensor(0.04, dtype=torch.float64))
    assert probs.argmax(1)[0, 0, 0] == 1
    assert four.argmax(1)[0, 0, 0] == 1
    assert eight.argmax(1)[0, 0, 0] == 0


def test_s4mc_beta_half() -> None:
    probs = _two_by_two()
    refined = s4mc_refine(probs, beta=0.5)
    # a: q = (0.9, 0.4): (0.2 + 0.5·(0.9 − 0.18), 0.8 + 0.5·(0.4 − 0.32)) = (0.56, 0.84)
    # d: neighbours {a, b, c}, q = (0.7, 0.8):
    #    (0.9 + 0.5·(0.7 − 0.63), 0.1 + 0.5·(0.8 − 0.08)) = (0.935, 0.46)
    assert_close(refined[0, :, 0, 0], torch.tensor([0.56, 0.84], dtype=torch.float64))
    assert_close(refined[0, :, 1, 1], torch.tensor([0.935, 0.46], dtype=torch.float64))
    assert_close(s4mc_refine(probs, beta=0.0), probs)


def test_s4mc_rejects_unknown_neighbourhood() -> None:
    with pytest.raises(ValueError, match="choose one of 4, 8"):
        s4mc_refine(_two_by_two(), neighborhood=6)


def test_margin_shape_and_values() -> None:
    probs = _pixels((0.5, 0.3, 0.2), (0.1, 0.1, 0.8), (0.4, 0.4, 0.2))
    # margins: 0.5 − 0.3 = 0.2; 0.8 − 0.1 = 0.7; tie 0.4 − 0.4 = 0
    assert_close(margin(probs), torch.tensor([[[0.2, 0.7, 0.0]]], dtype=torch.float64))


# --------------------------------------------------------------------------------------------- DPA
def test_dpa_alpha_schedule() -> None:
    assert dpa_alpha(0, 80) == pytest.approx(0.4)
    assert dpa_alpha(40, 80) == pytest.approx(0.2)
    assert dpa_alpha(79, 80) == pytest.approx(0.005)
    assert dpa_alpha(80, 80) == pytest.approx(0.0)
    assert dpa_alpha(10, 20, alpha0=0.6) == pytest.approx(0.3)


@pytest.mark.parametrize(("step", "gamma"), [(0, 0.42), (40, 0.18), (79, 0.05225)])
def test_dpa_threshold_worked_example(step: int, gamma: float) -> None:
    kappa = [0.05, 0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    # Two invalid pixels whose values would move every quantile if they were counted.
    margins = torch.tensor([[[0.0, *kappa[:5]], [*kappa[5:], 1.0]]])
    valid = torch.ones_like(margins, dtype=torch.bool)
    valid[0, 0, 0] = valid[0, 1, 5] = False
    gamma_t = dpa_threshold(margins, valid, dpa_alpha(step, 80))
    assert isinstance(gamma_t, float)
    assert gamma_t == pytest.approx(gamma, abs=1e-6)


def test_dpa_threshold_matches_numpy_on_more_than_16m_elements() -> None:
    gen = torch.Generator().manual_seed(0)
    margins = torch.rand(1, 4100, 4100, generator=gen)  # 16.81M elements
    valid = torch.ones_like(margins, dtype=torch.bool)
    valid[0, 0] = False  # first row invalid: 16 805 900 valid values remain
    values = margins.numpy()[valid.numpy()].astype(np.float64)
    assert values.size > 2**24  # torch.quantile refuses more than 2**24 = 16 777 216 elements
    alphas = (0.123456, 0.9)  # both fall between two order statistics
    expected = np.quantile(values, alphas)
    for alpha, gamma in zip(alphas, expected, strict=True):
        assert dpa_threshold(margins, valid, alpha) == pytest.approx(float(gamma), abs=1e-7)


def test_dpa_threshold_edge_cases() -> None:
    margins = torch.tensor([[[0.3, 0.1, 0.7]]])
    assert dpa_threshold(margins, torch.zeros(1, 1, 3, dtype=torch.bool), 0.4) == math.inf
    # one valid pixel: every quantile is that value
    assert dpa_threshold(margins, torch.tensor([[[False, False, True]]]), 0.4) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="alpha_t"):
        dpa_threshold(margins, torch.ones(1, 1, 3, dtype=torch.bool), 1.5)


# --------------------------------------------------------------------------------------------- CSL
@pytest.mark.parametrize("dtype", DTYPES)
def test_csl_features_worked_examples(dtype: torch.dtype) -> None:
    # (0.7, 0.2, 0.1): m̄ = 0.15, r = (0.05² + 0.05²)/2 = 0.0025; (0.7, 0.15, 0.15): r = 0
    # (0.4, 0.3, 0.2, 0.1): m̄ = 0.2, r = (0.1² + 0² + 0.1²)/3 = 0.02/3
    feats = csl_features(_pixels((0.7, 0.2, 0.1), (0.7, 0.15, 0.15), dtype=dtype))
    assert feats.dtype == dtype
    assert feats.shape == (1, 2, 1, 2)
    expected = torch.tensor([[[[0.7, 0.7]], [[0.0025, 0.0]]]], dtype=dtype)
    assert_close(feats, expected, atol=1e-7, rtol=1e-6)
    four = csl_features(_pixels((0.4, 0.3, 0.2, 0.1), dtype=dtype))
    assert_close(four[0, :, 0, 0], torch.tensor([0.4, 0.02 / 3], dtype=dtype), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_csl_weights_rank_one_hand_computed(dtype: torch.dtype) -> None:
    # Two classes -> r = 0 for every pixel (dyadic probabilities keep it exactly 0), so X has rank
    # one, s_2 = 0 and every pixel joins cluster 1. m = (15, 13, 11, 9)/16:
    #   μ_m = 0.75, deviations ±0.1875, ±0.0625, σ²_m = (2·0.03515625 + 2·0.00390625)/3 = 0.0260417
    #   μ_r = 0, σ²_r = 0 -> z_r = 0 everywhere (never > 0)
    #   z_m > 0 for m = 15/16, 13/16 -> w = 1
    #   m = 11/16: z_m² = 0.00390625 / 0.0260417 = 0.15 -> w = exp(−0.15/8) = 0.9814247
    #   m = 9/16:  z_m² = 0.03515625 / 0.0260417 = 1.35 -> w = exp(−1.35/8) = 0.8447180
    # The fifth pixel is invalid: w = 0 and it does not enter the statistics.
    m = torch.tensor([15 / 16, 13 / 16, 11 / 16, 9 / 16, 1 / 2], dtype=dtype)
    probs = torch.stack([m, 1 - m])[None, :, None, :]
    valid = torch.tensor([[[True, True, True, True, False]]])
    expected = torch.tensor(
        [[[1.0, 1.0, math.exp(-0.15 / 8), math.exp(-1.35 / 8), 0.0]]], dtype=dtype
    )
    weights = csl_weights(probs, valid)
    assert weights.dtype == dtype
    assert_close(weights, expected, atol=1e-6, rtol=1e-5)
    # alpha = 2: exp(−0.15/2) = 0.9277435, exp(−1.35/2) = 0.5091564
    expected[0, 0, 2:4] = torch.tensor([math.exp(-0.075), math.exp(-0.675)], dtype=dtype)
    assert_close(csl_weights(probs, valid, alpha=2.0), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_csl_weights_degenerate_empty_and_single_pixel_images(dtype: torch.dtype) -> None:
    probs = torch.zeros(3, 3, 2, 3, dtype=dtype)
    probs[:] = torch.tensor([0.5, 0.3, 0.2], dtype=dtype)[:, None, None]  # every pixel equal
    valid = torch.ones(3, 2, 3, dtype=torch.bool)
    valid[1] = False  # image 1: no valid pixel
    valid[2] = False
    valid[2, 1, 1] = True  # image 2: a single valid pixel
    probs[1] = float("nan")  # garbage under invalid pixels must not leak into the statistics
    probs[2, :, 0] = float("nan")
    weights = csl_weights(probs, valid)
    # image 0: identical rows -> s_2 = 0, one cluster with σ² = 0; every z = 0/√ε = 0 -> w = 1
    # image 1: all 0; image 2: the single pixel has variance 0, z = 0 -> w = 1, the rest 0
    expected = torch.zeros(3, 2, 3, dtype=dtype)
    expected[0] = 1.0
    expected[2, 1, 1] = 1.0
    assert_close(weights, expected, atol=1e-6, rtol=0.0)


def _csl_reference(probs: np.ndarray, valid: np.ndarray, alpha: float = 8.0) -> np.ndarray:
    """methods.md §3 written independently: numpy SVD of each image's N×2 matrix, loops welcome."""
    batch, classes, height, width = probs.shape
    out = np.zeros((batch, height * width))
    for i in range(batch):
        mask = valid[i].reshape(-1)
        p = probs[i].reshape(classes, -1).T[mask]
        if len(p) == 0:
            continue
        m = p.max(axis=1)
        others = np.array([np.delete(row, j) for row, j in zip(p, p.argmax(axis=1), strict=True)])
        r = ((others - ((1 - m) / (classes - 1))[:, None]) ** 2).sum(axis=1) / (classes - 1)
        out[i, mask] = _csl_reference_of(np.stack([m, r], axis=1), alpha)[1]
    return out.reshape(batch, height, width)


def _csl_reference_of(x: np.ndarray, alpha: float = 8.0) -> tuple[np.ndarray, np.ndarray]:
    """One image's clusters (0 or 1) and weights from its rows x = (m, r), float64[N, 2]."""
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    rank_two = len(s) == 2 and s[1] > 1e-6 * s[0]
    cluster = np.abs(u).argmax(axis=1) if rank_two else np.zeros(len(x), dtype=int)
    means, variances = [], []
    for k in (0, 1):
        sel = x[cluster == k]
        means.append(sel.mean(axis=0) if len(sel) else np.zeros(2))
        variances.append(sel.var(axis=0, ddof=1) if len(sel) > 1 else np.zeros(2))
    best = int(np.argmax([mu[0] for mu in means]))
    mu, sd = means[best], np.sqrt(variances[best] + 1e-8)
    z_m, z_r = (x[:, 0] - mu[0]) / sd[0], (mu[1] - x[:, 1]) / sd[1]
    w = np.where((z_m > 0) | (z_r > 0), 1.0, np.exp(-(z_m**2) / alpha - (z_r**2) / alpha))
    return cluster, w


def _two_cluster_probs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images, 4 classes, 6×6: left half confident (one dominant logit), right half unsure."""
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 4, 6, 6, generator=gen, dtype=torch.float64) * 0.5
    winner = torch.randint(0, 4, (2, 1, 6, 3), generator=gen)
    logits[..., :3] += 4.0 * torch.zeros(2, 4, 6, 3, dtype=torch.float64).scatter_(1, winner, 1.0)
    valid = torch.rand(2, 6, 6, generator=gen) > 0.2
    return logits.softmax(dim=1).to(dtype), valid


@pytest.mark.parametrize("dtype", DTYPES)
def test_csl_weights_two_clusters_match_numpy_svd_reference(dtype: torch.dtype) -> None:
    probs, valid = _two_cluster_probs(dtype)
    expected = _csl_reference(probs.double().numpy(), valid.numpy())
    weights = csl_weights(probs, valid)
    assert weights.dtype == dtype
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    assert_close(weights, torch.from_numpy(expected).to(dtype), atol=tol, rtol=tol)
    # The case is not trivial: both images have soft weights strictly inside (0, 1).
    inside = (weights > 0) & (weights < 1)
    assert inside.flatten(1).any(dim=1).all()
    # Batched == one image at a time (no statistics leak across images).
    single = torch.cat([csl_weights(probs[i : i + 1], valid[i : i + 1]) for i in range(2)])
    assert_close(weights, single, atol=1e-6, rtol=1e-6)


def test_csl_split_uses_both_clusters_on_the_reference_case() -> None:
    probs, valid = _two_cluster_probs(torch.float64)
    feats = csl_features(probs).flatten(2)
    second = ops._csl_second_cluster(feats, valid.flatten(1))
    for i in range(2):
        assert 0 < int(second[i].sum()) < int(valid[i].sum())
    assert not (second & ~valid.flatten(1)).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_csl_split_rank_one_up_to_rounding_is_one_cluster(dtype: torch.dtype) -> None:
    # Rows (m, m/π): X has rank one in exact arithmetic, so s_2 = 0 and every pixel joins
    # cluster 1; in floating point s_2 is rounding noise (~1e-8·s_1), which must not split.
    # (Weights cannot show this: with r ∝ m one of z_m, z_r is > 0 for every pixel, so w = 1.)
    m = torch.linspace(0.4, 1.0, 50, dtype=dtype)
    feats = torch.stack([m, m / math.pi])[None]  # [1, 2, 50]
    second = ops._csl_second_cluster(feats, torch.ones(1, 50, dtype=torch.bool))
    assert not second.any()


def _near_rank_one_features(ratios: list[float]) -> torch.Tensor:
    """One 8×8 image per ratio: rows (m, m/4 + ε·e) with m in [0.9, 1] (all confident), e ⟂ m, ε
    set so that s_2/s_1 of X is the ratio; a direction that is not an axis, so X^T X is not
    graded and its eigenvalues carry round-off of s_1² into s_2². Returns float64[B, 2, 8, 8]."""
    gen = torch.Generator().manual_seed(11)
    images = []
    for ratio in ratios:
        m = 0.9 + 0.1 * torch.rand(64, generator=gen, dtype=torch.float64)
        e = torch.randn(64, generator=gen, dtype=torch.float64)
        e = e - (e @ m) / (m @ m) * m
        # X^T X = [[M, M/4], [M/4, M/16 + ε²E]]: s_1·s_2 = ε·√(ME), s_1² + s_2² = 17M/16 + ε²E
        mm, ee = float(m @ m), float(e @ e)
        s1 = math.sqrt(17 * mm / 16)  # to first order in ε
        eps = ratio * s1 * s1 / math.sqrt(mm * ee)
        images.append(torch.stack([m, m / 4 + eps * e]).reshape(2, 8, 8))
    return torch.stack(images)


def test_csl_rank_rule_matches_an_exact_float64_svd_of_x() -> None:
    # methods.md §3: "s_2 = 0" means s_2 <= 1e-6·s_1 from X itself. Images just either side of
    # the rule (ratio 1e-6·(1 ± 5e-6)) where eigh of X^T X misjudged 7 of the 32 splits, plus a
    # real all-confident image (softmax of one dominant logit). Near rank one every weight is ~1
    # whichever split is taken (r ∝ m), so the splits are what this checks.
    ratios = [1e-6 * (1 + sign * 5e-6) for sign in (1, -1) for _ in range(16)]
    feats = _near_rank_one_features(ratios)
    logits = torch.randn(
        1, 5, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    logits[:, 0] += 10.0
    feats = torch.cat([feats, csl_features(logits.softmax(dim=1))])
    valid = torch.ones(len(feats), 8, 8, dtype=torch.bool)
    second = ops._csl_second_cluster(feats.flatten(2), valid.flatten(1))
    weights = ops.csl_weights_of(feats, valid)
    for i, x in enumerate(feats.flatten(2).transpose(1, 2).numpy()):
        s = np.linalg.svd(x, compute_uv=False)
        if i < len(ratios):  # the construction hits its ratio, on the intended side of 1e-6
            assert s[1] / s[0] == pytest.approx(ratios[i], rel=1e-6)
        cluster, expected = _csl_reference_of(x)
        assert second[i].numpy().tolist() == (cluster == 1).tolist(), f"image {i}"
        assert_close(weights[i].flatten(), torch.from_numpy(expected), atol=1e-12, rtol=0.0)
    # both sides occur: split images above the rule, one cluster below it
    assert second[:16].any(dim=1).all()
    assert not second[16:].any()


# --------------------------------------------------------------------------------------------- TMP
def test_tmp_block_mask_grid_upsampled_and_cropped() -> None:
    mask = tmp_block_mask(70, 100, generator=torch.Generator().manual_seed(3))
    grid = torch.rand(3, 4, generator=torch.Generator().manual_seed(3)) < 0.7  # ⌈70/32⌉×⌈100/32⌉
    assert mask.dtype == torch.bool
    assert mask.shape == (70, 100)
    rows = torch.arange(70)[:, None] // 32
    cols = torch.arange(100)[None, :] // 32
    assert torch.equal(mask, grid[rows, cols])


def test_tmp_block_mask_cover_probability() -> None:
    assert not tmp_block_mask(40, 40, cover=0.0).any()
    assert tmp_block_mask(40, 40, cover=1.0).all()
    mask = tmp_block_mask(200, 200, block=1, cover=0.7, generator=torch.Generator().manual_seed(0))
    assert abs(mask.float().mean().item() - 0.7) < 0.01  # 40 000 cells, σ ≈ 0.0023


# --------------------------------------------------------------------------------------------- WPL
def _detections() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    boxes = np.array(
        [
            [1.2, 0.5, 3.1, 2.0],  # class 10 -> seg 1: x in {1,2,3}, y in {0,1}
            [6.5, 4.2, 12.0, 9.0],  # class 20 -> seg 2, score exactly 0.95: x {6,7}, y {4,5}
            [-3.0, -2.0, 1.0, 1.0],  # class 20 -> seg 2, partly outside: x {0}, y {0}
            [0.0, 0.0, 8.0, 6.0],  # class 10, score 0.94 < 0.95: ignored
            [0.0, 0.0, 8.0, 6.0],  # class 30 not in class_map: ignored
            [2.0, 1.0, 5.0, 3.0],  # class 10 -> seg 1, overlaps the first: x {2,3,4}, y {1,2}
            [9.0, 0.0, 12.0, 3.0],  # class 10, entirely right of the image: nothing
        ]
    )
    labels = np.array([10, 20, 20, 10, 30, 10, 10])
    scores = np.array([0.99, 0.95, 0.97, 0.94, 0.99, 0.99, 0.99])
    return boxes, labels, scores


def _expected_box_masks() -> torch.Tensor:
    expected = torch.zeros(3, 6, 8, dtype=torch.bool)
    expected[1, 0:2, 1:4] = True
    expected[1, 1:3, 2:5] = True
    expected[2, 4:6, 6:8] = True
    expected[2, 0, 0] = True
    return expected


def test_rasterize_boxes_numpy_and_torch_inputs() -> None:
    boxes, labels, scores = _detections()
    class_map = {10: 1, 20: 2}
    from_numpy = rasterize_boxes(boxes, labels, scores, class_map, 6, 8, 3)
    assert from_numpy.dtype == torch.bool
    assert torch.equal(from_numpy, _expected_box_masks())
    from_torch = rasterize_boxes(
        torch.from_numpy(boxes).float(),
        torch.from_numpy(labels),
        torch.from_numpy(scores),
        class_map,
        6,
        8,
        3,
    )
    assert torch.equal(from_torch, _expected_box_masks())


def test_rasterize_boxes_threshold_empty_and_bad_map() -> None:
    boxes, labels, scores = _detections()
    # Lower threshold: the 0.94 full-image box of class 10 now fills channel 1 entirely.
    low = rasterize_boxes(boxes, labels, scores, {10: 1, 20: 2}, 6, 8, 3, score_thresh=0.9)
    assert low[1].all()
    assert torch.equal(low[2], _expected_box_masks()[2])
    empty = rasterize_boxes(np.zeros((0, 4)), np.zeros(0, int), np.zeros(0), {10: 1}, 6, 8, 3)
    assert empty.shape == (3, 6, 8)
    assert not empty.any()
    with pytest.raises(ValueError, match="class_map"):
        rasterize_boxes(boxes, labels, scores, {10: 3}, 6, 8, 3)


def test_detector_reliability_with_and_without_valid() -> None:
    box_masks = torch.zeros(1, 3, 2, 3, dtype=torch.bool)
    box_masks[0, 1, 0, :] = True  # class 1 boxes cover the top row
    box_masks[0, 2, :, 2] = True  # class 2 boxes cover the right column
    labels = torch.tensor([[[1, 1, 2], [1, 0, IGNORE_INDEX]]])
    conf = torch.tensor([[[0.95, 0.90, 0.99], [0.99, 0.99, 0.99]]])
    # (0,0): class 1 in box, conf exactly 0.95            -> reliable
    # (0,1): class 1 in box, conf 0.90                    -> no
    # (0,2): class 2 in box (right column)                -> reliable
    # (1,0): class 1, bottom row not in a class-1 box     -> no
    # (1,1): class 0 never has boxes                      -> no
    # (1,2): IGNORE_INDEX label                           -> no
    expected = torch.tensor([[[True, False, True], [False, False, False]]])
    assert torch.equal(detector_reliability(labels, conf, box_masks), expected)
    valid = torch.tensor([[[False, True, True], [True, True, True]]])
    expected[0, 0, 0] = False
    assert torch.equal(detector_reliability(labels, conf, box_masks, valid=valid), expected)


F_EXAMPLE = [0.9, 0.1, 0.8, 0.05, 0.7, 0.3, 0.6, 0.2, 0.5, 0.0]  # T_5 = {0, 2, 4, 6, 8}
MU_EXAMPLE = [0.1, 0.9, 0.8, 0.7, 0.0, 0.6, 0.5, 0.2, 0.3, 0.4]  # T_5 = {1, 2, 3, 5, 6}


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_index_similarity_worked_example_and_missing_prototypes(dtype: torch.dtype) -> None:
    f, mu = torch.tensor(F_EXAMPLE, dtype=dtype), torch.tensor(MU_EXAMPLE, dtype=dtype)
    prototypes = torch.stack([mu, torch.full_like(mu, float("nan"))])  # class 1: no prototype
    # pixels: f with class 0 (s = 2 -> 0.4); f with class 1 (no prototype -> 0);
    #         f with IGNORE_INDEX (-> 0); μ itself with class 0 (s = 5 -> 1);
    #         −μ with class 0: T_5(−μ) = {4, 0, 7, 8, 9}, disjoint from T_5(μ) -> exactly 0
    features = torch.stack([f, f, f, mu, -mu], dim=1)[None, :, None, :]  # [1, 10, 1, 5]
    labels = torch.tensor([[[0, 1, IGNORE_INDEX, 0, 0]]])
    weights = topk_index_similarity(features, prototypes, labels)
    assert weights.dtype == dtype
    assert_close(
        weights, torch.tensor([[[0.4, 0.0, 0.0, 1.0, 0.0]]], dtype=dtype), atol=1e-6, rtol=1e-6
    )
    # k = 3: T_3(f) = {0, 2, 4}, T_3(μ) = {1, 2, 3} -> s = 1, W = 1/3
    w3 = topk_index_similarity(features[..., :1], prototypes, labels[..., :1], k=3)
    assert_close(w3, torch.full((1, 1, 1), 1 / 3, dtype=dtype), atol=1e-6, rtol=1e-6)


def test_weight_form_is_a_config_option_not_an_ops_parameter() -> None:
    # The paper form W = s/k is what ops computes (a disjoint pixel above got exactly 0, where
    # the "plus_one" form would give 1); choosing 1 + W is left to the policy config.
    assert "weight_form" not in inspect.signature(topk_index_similarity).parameters
    assert not hasattr(ops, "weight_form")


def test_topk_index_similarity_batched_random_matches_sets() -> None:
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(2, 12, 3, 4, generator=gen)
    prototypes = torch.randn(4, 12, generator=gen)
    prototypes[2] = float("nan")
    labels = torch.randint(0, 4, (2, 3, 4), generator=gen)
    weights = topk_index_similarity(features, prototypes, labels, k=4)
    for b, y, x in np.ndindex(2, 3, 4):
        c = int(labels[b, y, x])
        if c == 2:
            assert weights[b, y, x] == 0
            continue
        f_set = set(features[b, :, y, x].topk(4).indices.tolist())
        p_set = set(prototypes[c].topk(4).indices.tolist())
        assert weights[b, y, x].item() == pytest.approx(len(f_set & p_set) / 4)


# ------------------------------------------------------------------------------------------ device
@pytest.mark.parametrize("device", DEVICES)
def test_ops_run_on_device_and_keep_it(device: str) -> None:
    probs, valid = _two_cluster_probs(torch.float32)
    probs, valid = probs.to(device), valid.to(device)
    weights = csl_weights(probs, valid)
    assert weights.device.type == device
    assert_close(weights.cpu(), csl_weights(probs.cpu(), valid.cpu()), atol=1e-5, rtol=1e-5)
    refined = s4mc_refine(probs)
    assert refined.device.type == device
    kappa = margin(probs)
    assert dpa_threshold(kappa, valid, 0.3) == pytest.approx(
        dpa_threshold(kappa.cpu(), valid.cpu(), 0.3), abs=1e-7
    )
    masks = rasterize_boxes(
        torch.tensor([[0.0, 0.0, 3.0, 2.0]], device=device),
        torch.tensor([0]),
        torch.tensor([1.0]),
        {0: 1},
        6,
        6,
        4,
    )
    assert masks.device.type == device
    assert int(masks.sum()) == 3 * 2  # x in {0,1,2}, y in {0,1}, channel 1
    labels = probs.argmax(dim=1)
    reliable = detector_reliability(labels, probs.amax(dim=1), masks[None].expand(2, -1, -1, -1))
    assert reliable.device.type == device
    protos = torch.randn(4, 4, device=device)
    sim = topk_index_similarity(probs, protos, labels, k=2)
    assert sim.device.type == device
    logits = probs.log().requires_grad_(True)
    loss = weighted_unsup_loss(logits, labels, torch.ones_like(kappa), valid)
    assert loss.device.type == device


@pytest.mark.parametrize("levels", [None, 255])
@pytest.mark.parametrize("alpha", [0.0, 0.4, 0.5, 0.77, 1.0])
def test_dpa_thresholds_give_each_image_its_own_quantile(alpha: float, levels: int | None) -> None:
    generator = torch.Generator().manual_seed(3)
    # stored margins sit on the uint8 grid (many ties), refined ones too
    margins = torch.randint(0, 256, (4, 9, 7), generator=generator).float() / 255
    refined = torch.randint(0, 256, (4, 9, 7), generator=generator).float() / 255
    margins[2] = margins[2] * 0.1  # one image far lower than the others
    gammas = dpa_thresholds(margins, alpha, levels)
    assert gammas.shape == (4,)
    assert gammas.dtype == torch.float32
    for i in range(4):
        one = margins[i : i + 1]
        gamma = dpa_threshold(one, torch.ones_like(one, dtype=torch.bool), alpha)
        assert float(gammas[i]) == pytest.approx(gamma, abs=1e-7)
        assert torch.equal(refined[i] > gammas[i], refined[i] > gamma)
    if alpha >= 0.4:  # not the batch's quantile: image 2's threshold is its own
        assert float(gammas[2]) < 0.1 < float(gammas[0])


def test_rasterize_box_batch_equals_rasterize_boxes_per_image() -> None:
    boxes, labels, scores = _detections()
    class_map = {10: 1, 20: 2}
    image = np.array([1, 0, 1, 1, 0, 1, 0])
    batch = rasterize_box_batch(boxes, image, labels, scores, class_map, 3, 6, 8, 3)
    assert batch.shape == (3, 3, 6, 8)
    for i in range(3):
        mine = image == i
        one = rasterize_boxes(boxes[mine], labels[mine], scores[mine], class_map, 6, 8, 3)
        assert torch.equal(batch[i], one)
    assert [bool(image.any()) for image in batch] == [True, True, False]


def test_dpa_thresholds_count_levels_only_for_margins_on_the_grid() -> None:
    generator = torch.Generator().manual_seed(5)
    on_grid = torch.randint(0, 256, (3, 40, 30), generator=generator).float() / 255
    off_grid = torch.rand(3, 40, 30, generator=generator)
    for margins in (on_grid, off_grid):
        for alpha in (0.1, 0.4, 0.9):
            assert torch.equal(
                dpa_thresholds(margins, alpha, levels=255), dpa_thresholds(margins, alpha)
            )
