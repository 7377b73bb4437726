"""Values every stage and tool agrees on, defined once."""

from __future__ import annotations

SPLITS: tuple[str, ...] = ("labeled", "unlabeled", "val")  # the image splits, in this order
IGNORE_INDEX = 255  # a mask or pseudo-label pixel that no loss or metric counts
