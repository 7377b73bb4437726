"""The evaluate stage's figure: per-class IoU of each model."""

from __future__ import annotations

import io

import numpy as np


def iou_plot(class_names: list[str], results: dict[str, list[float]]) -> bytes:
    """Grouped bar chart of per-class IoU for each model, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(class_names) + 2, 3.5))
    width = 0.8 / max(len(results), 1)
    for n, (name, iou) in enumerate(results.items()):
        x = np.arange(len(class_names)) + n * width
        ax.bar(x, np.nan_to_num(np.asarray(iou, float)), width, label=name)
    ax.set_xticks(np.arange(len(class_names)) + 0.4 - width / 2, class_names, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("IoU (val)")
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
