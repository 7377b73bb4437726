"""Compact encodings of images and per-pixel maps stored in Parquet cells.

Images and label maps are PNG (lossless, compressed); boolean masks are bit-packed; weights and
probabilities are quantised to unsigned integers. Nothing is stored as float32 and nothing is
pickled: every cell is plain bytes that numpy can read back given the recorded shape.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image

WEIGHT_LEVELS = 255  # weights in [0, 1] stored as uint8 q = round(w * 255); error <= 1/510
PROB_LEVELS = 65535  # probabilities stored as uint16 q = round(p * 65535); error <= 1/131070


def encode_png(array: np.ndarray) -> bytes:
    """Encode ``uint8[H, W]`` (grey / label map) or ``uint8[H, W, 3]`` (RGB) losslessly as PNG."""
    if array.dtype != np.uint8:
        raise ValueError(f"encode_png expects uint8, got {array.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """Decode bytes written by :func:`encode_png` back to the same uint8 array."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image).copy()


def pixel_digest(image: np.ndarray) -> str:
    """sha256 over shape and pixels of ``uint8[H, W, 3]``: the same picture gives the same id
    whatever file format or name it came in."""
    digest = hashlib.sha256()
    digest.update(np.asarray(image.shape, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def pack_mask(mask: np.ndarray) -> bytes:
    """``bool[H, W]`` -> bit-packed bytes (1 bit per pixel, row-major)."""
    return np.packbits(mask.astype(bool), axis=None).tobytes()


def unpack_mask(data: bytes, height: int, width: int) -> np.ndarray:
    """Inverse of :func:`pack_mask`: ``bool[H, W]``."""
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=height * width)
    return bits.reshape(height, width).astype(bool)


def quantize_unit(values: np.ndarray, levels: int) -> np.ndarray:
    """Map floats in [0, 1] to integers round(v * levels) (uint8 for 255, uint16 for 65535)."""
    dtype = np.uint8 if levels <= 255 else np.uint16
    scaled = np.rint(np.clip(values, 0.0, 1.0) * levels)
    return scaled.astype(dtype)


def dequantize_unit(values: np.ndarray, levels: int) -> np.ndarray:
    """Inverse of :func:`quantize_unit`, float32."""
    return values.astype(np.float32) / np.float32(levels)


def to_bytes(array: np.ndarray) -> bytes:
    """Raw C-order bytes of a numeric array; its dtype and shape are recorded in other columns."""
    return np.ascontiguousarray(array).tobytes()


def from_bytes(data: bytes, dtype: type[np.generic], shape: tuple[int, ...]) -> np.ndarray:
    """Read back :func:`to_bytes`, checking that the size matches ``shape``."""
    array = np.frombuffer(data, dtype=dtype)
    expected = int(np.prod(shape))
    if array.size != expected:
        raise ValueError(f"cell holds {array.size} values of {dtype}, expected shape {shape}")
    return array.reshape(shape)
