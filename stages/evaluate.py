"""The evaluate stage: mIoU and per-class IoU on val for each model, and pseudo-label quality
(coverage and pixel precision) against ground truth where the unlabeled images have it."""

from __future__ import annotations

import functools
import io
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch

from stages.core import data
from stages.core.constants import IGNORE_INDEX
from stages.core.inference import (
    decode_for_inference,
    label_maps,
    load_model,
    pick_device,
    predict_split,
)
from stages.core.metrics import LabelCounts, confusion, iou_from_confusion
from stages.core.models import segment_logits
from stages.core.run_config import InferenceConfig
from stages.core.storage import DatasetRef
from stages.core.tables import (
    DRIVER_SPLIT_BYTES,
    keep_ids,
    lookup_columns,
    numpy_batch,
    read_dataset,
    small_split_ids,
)
from stages.pseudolabel.table import decode_pseudolabels


class EvaluateConfig(InferenceConfig):
    pass


class ConfusionPredictor:
    """Callable class: decoded val images -> one row holding, for each model, the batch's
    confusion matrix (every model is evaluated in the same pass over the images)."""

    def __init__(
        self, storage_url: str, checkpoints: dict[str, str], num_classes: int, gpus: float = 0.0
    ):
        self.device = pick_device(gpus)
        self.models, self.windows = {}, {}
        for name, path in checkpoints.items():
            model, checkpoint = load_model(storage_url, path)
            self.models[name] = model.to(self.device)
            # its training crop: the sliding window (0, in older checkpoints: the whole canvas)
            self.windows[name] = int(checkpoint.get("window") or 0)
        self.num_classes = num_classes

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = data.normalize(torch.from_numpy(batch["image"]).to(self.device))
        sizes = [(int(h), int(w)) for h, w in zip(batch["height"], batch["width"], strict=True)]
        targets = [
            data.decode_mask(m, h, w).numpy()
            for m, (h, w) in zip(batch["mask"], sizes, strict=True)
        ]
        out = {}
        for name, model in self.models.items():
            forward = functools.partial(segment_logits, model)
            labels = label_maps(forward, images, self.windows[name], batch["extent"], sizes)
            total = np.zeros((self.num_classes, self.num_classes), np.int64)
            for pred, target in zip(labels, targets, strict=True):
                total += confusion(pred.cpu().numpy(), target, self.num_classes)
            out[f"confusion_{name}"] = total.reshape(1, -1)
        return out


def evaluate_models(
    cfg: EvaluateConfig,
    *,
    images: DatasetRef,
    checkpoints: dict[str, str],
    num_classes: int,
    image_size: int,
    driver_bytes: int = DRIVER_SPLIT_BYTES,
) -> dict[str, dict[str, Any]]:
    """Val mIoU and per-class IoU of each checkpoint (name -> storage path), in one pass: on
    this process where the val split holds at most ``driver_bytes`` (estimated) and no custom
    resources are asked for, through Ray Data's actor pool otherwise."""
    columns = ["image_id", "height", "width", "image", "mask"]
    ids = None if cfg.resources else small_split_ids(images, "val", driver_bytes)
    if ids is not None:
        table = images.read_rows(columns[1:], ids).sort_by("image_id")
        gpus = float(torch.cuda.is_available())
        predictor = ConfusionPredictor(images.storage.url, checkpoints, num_classes, gpus)
        rows = []
        for start in range(0, table.num_rows, cfg.batch_size):
            batch = numpy_batch(table.slice(start, cfg.batch_size))
            rows.append(predictor(decode_for_inference(batch, image_size)))
    else:
        rows = predict_split(
            images,
            "val",
            columns,
            ConfusionPredictor,
            {"checkpoints": checkpoints, "num_classes": num_classes},
            cfg=cfg,
            image_size=image_size,
        ).take_all()
    results = {}
    for name in checkpoints:
        parts = [np.asarray(r[f"confusion_{name}"]) for r in rows]
        matrix = np.sum(parts, axis=0).reshape(num_classes, num_classes)
        iou, miou = iou_from_confusion(matrix)
        results[name] = {"miou": miou, "iou": iou.tolist(), "val_pixels": int(matrix.sum())}
    return results


def decode_pseudolabel(
    mask: bytes, row: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's ground truth ``uint8[H, W]`` (255 = ignore), and its stored pseudo-label
    ``uint8[H, W]`` and keep map ``bool[H, W]`` from its ``pseudolabels`` row, the keep map
    restricted to the valid pixels."""
    truth = data.decode_mask(mask, int(row["height"]), int(row["width"])).numpy()
    maps = decode_pseudolabels(row, ("label", "keep"))
    return truth, maps["label"], maps["keep"] & (truth != IGNORE_INDEX)


def pseudolabel_counts(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per image: valid ground-truth pixels, kept pixels, and kept pixels whose label is right."""
    out: dict[str, list[int]] = {"valid": [], "kept": [], "correct": []}
    for i in range(len(batch["image_id"])):
        row = {name: batch[name][i] for name in ("label", "keep", "height", "width")}
        truth, label, keep = decode_pseudolabel(batch["mask"][i], row)
        counts = LabelCounts.of(label, keep, truth)
        out["valid"].append(counts.valid)
        out["kept"].append(counts.kept)
        out["correct"].append(counts.correct)
    return {k: np.asarray(v, np.int64) for k, v in out.items()}


def pseudolabel_quality(
    images: DatasetRef,
    pseudolabels: DatasetRef,
    max_images: int = 2000,
    driver_bytes: int = DRIVER_SPLIT_BYTES,
) -> dict[str, float]:
    """Coverage (kept / valid pixels) and precision (correct / kept) over the unlabeled images
    that have ground truth (generated data, benchmarks): at most ``max_images`` of them, the
    first by image id, a fixed sample. Their masks (small PNGs) are read on this process and
    looked up by id: no shuffle join. Pseudo-labels of at most ``driver_bytes`` are counted here
    too; larger ones by Ray tasks, the masks broadcast through the object store."""
    import ray

    table = images.read_table(["image_id", "split"])
    unlabeled = table.filter(pc.equal(table["split"], "unlabeled"))["image_id"].to_pylist()
    sample = set(sorted(unlabeled)[:max_images])
    if not sample:
        return {}
    masks = images.read_rows(["mask"], sample)
    truth = masks.filter(pc.is_valid(masks["mask"]))
    if truth.num_rows == 0:
        return {}
    columns = ["height", "width", "label", "keep"]
    if pseudolabels.size_bytes() <= driver_bytes:  # on this process: no Ray task to start
        labels = pseudolabels.read_rows(columns, truth["image_id"].to_pylist())
        counts = pseudolabel_counts(numpy_batch(lookup_columns(labels, truth, ["mask"])))
    else:
        labels = read_dataset(pseudolabels, ["image_id", *columns])
        counts = (
            keep_ids(labels, set(truth["image_id"].to_pylist()))
            .map_batches(
                lookup_columns,
                fn_kwargs={"source": ray.put(truth), "names": ["mask"]},
                batch_format="pyarrow",
            )
            .map_batches(pseudolabel_counts, batch_format="numpy")
            .to_pandas()
        )
        counts = {name: counts[name].to_numpy() for name in ("valid", "kept", "correct")}
    total = LabelCounts(*(int(counts[name].sum()) for name in ("valid", "kept", "correct")))
    if total.valid == 0:
        return {}
    return {
        "pseudolabel_coverage": total.coverage,
        "pseudolabel_precision": total.precision,
        "pseudolabel_images_with_truth": float(len(counts["valid"])),
    }


def run(
    cfg: EvaluateConfig,
    *,
    images: DatasetRef,
    checkpoints: dict[str, str],
    pseudolabels: dict[str, DatasetRef],
    class_names: list[str],
    image_size: int,
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """The evaluate stage: each checkpoint's (label -> storage path) val mIoU and per-class IoU,
    in one pass over the val images, and each pseudo-label set's (metric prefix -> dataset)
    coverage and precision against the unlabeled images' ground truth, where there is any.

    Returns the metrics (``<label>_miou``, ``<label>_iou.<class>`` for the classes present,
    ``<prefix>_coverage``, ``<prefix>_precision``, ``<prefix>_images_with_truth``) and each
    label's per-class IoU (NaN for an absent class), for the plot."""
    metrics: dict[str, float] = {}
    per_class: dict[str, list[float]] = {}
    results = evaluate_models(
        cfg,
        images=images,
        checkpoints=checkpoints,
        num_classes=len(class_names),
        image_size=image_size,
    )
    for model, result in results.items():
        metrics[f"{model}_miou"] = result["miou"]
        per_class[model] = result["iou"]
        for name, iou in zip(class_names, result["iou"], strict=True):
            if iou == iou:  # not NaN
                metrics[f"{model}_iou.{name}"] = iou
    for prefix, labels in pseudolabels.items():
        quality = pseudolabel_quality(images, labels)
        metrics |= {key.replace("pseudolabel", prefix, 1): v for key, v in quality.items()}
    return metrics, per_class


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
