from __future__ import annotations

import numpy as np

from stages.core import codec


def test_mask_bitpacking_round_trip_and_size() -> None:
    mask = np.zeros((5, 7), bool)
    mask[1, 2] = mask[4, 6] = True
    data = codec.pack_mask(mask)
    assert len(data) == 5  # ceil(35 / 8) bytes
    np.testing.assert_array_equal(codec.unpack_mask(data, 5, 7), mask)


def test_quantisation_error_bounds() -> None:
    values = np.linspace(0, 1, 10001, dtype=np.float32)
    w = codec.dequantize_unit(codec.quantize_unit(values, codec.WEIGHT_LEVELS), codec.WEIGHT_LEVELS)
    p = codec.dequantize_unit(codec.quantize_unit(values, codec.PROB_LEVELS), codec.PROB_LEVELS)
    assert np.abs(w - values).max() <= 1 / 510 + 1e-7
    assert np.abs(p - values).max() <= 1 / 131070 + 1e-7
    assert codec.quantize_unit(np.array([0.95]), codec.WEIGHT_LEVELS)[0] == 242  # 242.25 -> 242


def test_png_round_trip_and_pixel_digest_ignores_format() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    assert np.array_equal(codec.decode_png(codec.encode_png(image)), image)
    assert codec.pixel_digest(image) == codec.pixel_digest(image.copy())
    other = image.copy()
    other[0, 0, 0] ^= 1
    assert codec.pixel_digest(other) != codec.pixel_digest(image)
    # same bytes, different shape -> different id
    assert codec.pixel_digest(image.reshape(9, 6, 3)) != codec.pixel_digest(image)
