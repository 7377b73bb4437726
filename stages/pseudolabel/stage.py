"""The pseudolabel stage: ``teacher_signals`` (+ ``detections``) -> ``pseudolabels`` for one policy.

Ray Data tasks, batched per image size on the CPU or, with ``pseudolabel.gpus_per_task``, on a GPU;
no model runs here, so changing the policy never triggers inference. Each row holds,
at the image's own resolution, what the student's loop needs (methods.md §5):

* ``label`` (PNG), ``keep`` (bit-packed) and ``weight`` (uint8, ``w = weight_offset + q / 255``);
* S4MC: the unrefined and refined margins κ and κ̃ (uint16), from which the loop makes its keep
  mask per batch; the stored ``keep`` is the t = 0 view (per-image γ at α_0), for reports only;
* CSL: the trusted mask (w == 1, exact, before quantisation) that TMP covers;
* WPL: the reliability mask R and the first weight map W from the teacher-feature prototypes.

``ground_truth`` is no method but the reference rows of a comparison (``full`` / ``oracle``: the
student loop on perfect labels): it reads the unlabeled images' own masks instead of the teacher
signals (label = the mask, keep = mask != 255, weight exactly 1), and fails before writing
anything when an unlabeled image has no mask.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from stages.core import codec
from stages.core.constants import IGNORE_INDEX
from stages.core.errors import SourceError
from stages.core.inference import pick_device, write_committed
from stages.core.storage import DatasetRef
from stages.core.tables import lookup_columns, read_split, split_ids
from stages.pseudolabel import ops
from stages.pseudolabel.config import (
    GROUND_TRUTH,
    PseudolabelConfig,
    S4MCOptions,
    weight_offset,
)
from stages.pseudolabel.memory import PrototypeMemory, select_confident, select_reliable
from stages.teach import (
    MAPS,
    SIGNAL_LEVELS,
    SignalSpec,
    decode_feature_batch,
    decode_signal_batch,
    decode_signals,
    quantize,
    signal_maps,
    size_groups,
)

logger = logging.getLogger(__name__)

PSEUDOLABELS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("policy", pa.string()),
        ("label", pa.binary()),  # PNG uint8[H, W]
        ("keep", pa.binary()),  # bit-packed bool[H, W]
        ("weight", pa.binary()),  # uint8[H, W], w = weight_offset + q / 255 (where kept)
        ("weight_offset", pa.float32()),
        ("margin", pa.binary()),  # S4MC κ, uint16[H, W], q / 65535
        ("refined_margin", pa.binary()),  # S4MC κ̃, uint16[H, W], q / 65535
        ("trusted", pa.binary()),  # CSL, bit-packed bool[H, W]
        ("reliable", pa.binary()),  # WPL R, bit-packed bool[H, W]
        ("coverage", pa.float32()),
    ]
)
PROTOTYPE_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("queue", pa.string()),
        ("cls", pa.int32()),
        ("count", pa.int32()),
        ("features", pa.binary()),  # float32[count, D], in push order
    ]
)


def signal_spec(cfg: PseudolabelConfig, also: Iterable[str] = ()) -> SignalSpec:
    """What the teach stage must store for ``cfg.policy`` and the policies ``also`` (and so its
    cache key): S4MC's margins with its refinement settings (and argmax P̃ under
    ``label_from: refined``), CSL's dispersion, WPL's decoder features. Threshold and
    ground_truth (which reads no signals) need only what is always stored."""
    served = {cfg.policy, *also}
    s4mc = "s4mc" in served
    return SignalSpec(
        margins=s4mc,
        neighborhood=cfg.s4mc.neighborhood if s4mc else 8,
        beta=cfg.s4mc.beta if s4mc else 1.0,
        refined_label=s4mc and cfg.s4mc.label_from == "refined",
        dispersion="csl" in served,
        features="wpl" in served,
    )


def missing_signals(cfg: PseudolabelConfig, signals: Mapping[str, Any]) -> str | None:
    """Why ``cfg.policy`` cannot be computed from a row's signals (None: it can)."""
    need = {"s4mc": "refined_margin", "csl": "dispersion"}.get(cfg.policy)
    if cfg.policy == "s4mc" and cfg.s4mc.label_from == "refined":
        need = "refined_label"
    if need is None or signals.get(need) is not None:
        return None
    return (
        f"the stored teacher signals hold no {need} ({cfg.policy}): run with "
        f"pseudolabel.policy={cfg.policy}, or list it in teach.policies"
    )


# ---------------------------------------------------------------------------------- policy maps
def policy_maps(
    cfg: PseudolabelConfig,
    signals: torch.Tensor | Mapping[str, torch.Tensor],
    *,
    box_masks: torch.Tensor | None = None,
    features: torch.Tensor | None = None,
    prototypes: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The stored maps of one image under ``cfg.policy`` (:func:`batch_policy_maps` of a batch
    of one).

    signals: the image's teacher signals as :func:`stages.teach.decode_signals` returns them
    (``[H, W]`` maps), or exact probabilities ``float[C, H, W]`` (their signals are computed
    here without quantisation); box_masks: bool[C, H, W] (WPL); features: float[D, H, W] teacher
    features at pixel resolution (WPL); prototypes: float[C, D], NaN rows for classes without
    one (WPL). Returns ``label`` int64[H, W], ``keep`` bool[H, W], ``weight`` float[H, W] in
    [0, 1] (before ``weight_offset``), plus the policy's extra maps.
    """
    if isinstance(signals, torch.Tensor):
        signals = signal_maps(signals[None].float(), signal_spec(cfg))
    else:
        signals = {name: value[None] for name, value in signals.items()}
    maps = batch_policy_maps(
        cfg,
        signals,
        box_masks=None if box_masks is None else box_masks[None],
        features=None if features is None else features[None],
        prototypes=prototypes,
    )
    return {name: value[0] for name, value in maps.items()}


def batch_policy_maps(
    cfg: PseudolabelConfig,
    signals: Mapping[str, torch.Tensor],
    *,
    box_masks: torch.Tensor | None = None,
    features: torch.Tensor | None = None,
    prototypes: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The stored maps of a batch of images of one size, computed on the signals' device.

    signals: ``[B, H, W]`` maps as :func:`stages.teach.decode_signal_batch` returns them;
    box_masks: bool[B, C, H, W], features: float[B, D, H, W] at pixel resolution and
    prototypes: float[C, D] (WPL). Every statistic is per image (S4MC's γ is each image's own
    α_0 quantile), so a batch gives each image what a batch of one would. Returns ``[B, H, W]``
    maps: ``label`` int64, ``keep`` bool, ``weight`` float in [0, 1] (before
    ``weight_offset``), and the policy's extra maps.
    """
    if cfg.policy == GROUND_TRUTH:
        raise ValueError(
            "the ground_truth policy labels from the unlabeled images' masks, not from teacher "
            "signals: see ground_truth_maps"
        )
    if reason := missing_signals(cfg, signals):
        raise ValueError(reason)
    conf, label = signals["conf"], signals["label"]
    valid = torch.ones_like(conf, dtype=torch.bool)  # stored signals have no padding
    if cfg.policy == "threshold":
        keep = ops.threshold_keep(conf, valid, cfg.tau)
        return {"label": label, "keep": keep, "weight": torch.ones_like(conf)}
    if cfg.policy == "s4mc":
        return _s4mc_maps(cfg.s4mc, signals)
    if cfg.policy == "csl":
        weight = ops.csl_weights_of(
            torch.stack([conf, signals["dispersion"]], dim=1), valid, cfg.csl.alpha
        )
        return {"label": label, "keep": valid, "weight": weight, "trusted": weight == 1.0}
    if box_masks is None or features is None or prototypes is None:
        raise ValueError("the wpl policy needs box masks, features and prototypes")
    return {
        "label": label,
        "keep": ops.threshold_keep(conf, valid, cfg.tau),
        "weight": ops.topk_index_similarity(
            features, prototypes.to(features.device), label, k=cfg.wpl.k
        ),
        "reliable": wpl_reliable(cfg, label, conf, box_masks),
    }


def ground_truth_maps(masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """The ground_truth policy's maps of a batch of masks ``[B, H, W]`` (uint8 or int64, 255 =
    ignore): ``label`` int64 = the mask, ``keep`` bool = mask != 255, ``weight`` float 1 (with
    ``weight_offset`` 0, stored as q = 255: decoded exactly 1.0 where kept)."""
    label = masks.long()
    return {
        "label": label,
        "keep": label != IGNORE_INDEX,
        "weight": torch.ones(label.shape, dtype=torch.float32, device=label.device),
    }


def wpl_reliable(
    cfg: PseudolabelConfig, label: torch.Tensor, conf: torch.Tensor, box_masks: torch.Tensor
) -> torch.Tensor:
    """WPL's R: label int64[B, H, W], conf float[B, H, W], box_masks bool[B, C, H, W] ->
    bool[B, H, W] (every pixel valid: stored signals have no padding)."""
    return ops.detector_reliability(label, conf, box_masks, conf_thresh=cfg.wpl.conf_thresh)


def _s4mc_maps(cfg: S4MCOptions, s: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    kappa, kappa_refined = s["margin"], s["refined_margin"]
    # α_t at t = 0 is α_0, per image; stored margins are multiples of 1/255
    gamma0 = ops.dpa_thresholds(kappa, cfg.alpha0, levels=SIGNAL_LEVELS)
    return {
        "label": s["refined_label"] if cfg.label_from == "refined" else s["label"],
        "keep": kappa_refined > gamma0[:, None, None],
        "weight": torch.ones_like(kappa),
        "margin": kappa,
        "refined_margin": kappa_refined,
    }


def encode_row(
    cfg: PseudolabelConfig, image_id: str, maps: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """Per-image maps ``[H, W]`` -> one ``pseudolabels`` row (:func:`encode_rows` of one)."""
    return encode_rows(cfg, [image_id], {name: value[None] for name, value in maps.items()})[0]


def encode_rows(
    cfg: PseudolabelConfig, image_ids: list[str], maps: Mapping[str, torch.Tensor]
) -> list[dict[str, Any]]:
    """The table's only encoder: maps ``[B, H, W]`` of :func:`batch_policy_maps` -> ``pseudolabels``
    rows. Quantisation and coverage run batched on the maps' device; the host gets one copy of
    the uint8 maps (and one of the margins), then packs bits and encodes the label PNG per row."""
    batch, h, w = maps["keep"].shape
    if len(image_ids) != batch:
        raise ValueError(f"{len(image_ids)} image ids for a batch of {batch} maps")
    keep = maps["keep"].bool()
    weight = maps["weight"].float() * keep
    offset = weight_offset(cfg)
    masks = [name for name in ("trusted", "reliable") if name in maps]
    margins = [name for name in ("margin", "refined_margin") if name in maps]
    small = torch.stack(
        [
            maps["label"].to(torch.uint8),
            keep.to(torch.uint8),
            quantize(weight, codec.WEIGHT_LEVELS),
            *(maps[name].to(torch.uint8) for name in masks),
        ]
    ).cpu()
    wide = {
        name: quantize(maps[name], codec.PROB_LEVELS).cpu().numpy().astype(np.uint16)
        for name in margins
    }
    coverage = (((weight + offset * keep) > 0).sum(dim=(1, 2)).cpu() / float(h * w)).tolist()
    host = dict(zip(["label", "keep", "weight", *masks], small.numpy(), strict=True))
    rows = []
    for i, image_id in enumerate(image_ids):
        row: dict[str, Any] = dict.fromkeys(PSEUDOLABELS_SCHEMA.names)
        row |= {
            "image_id": image_id,
            "height": h,
            "width": w,
            "policy": cfg.policy,
            "label": codec.encode_png(host["label"][i]),
            "keep": codec.pack_mask(host["keep"][i]),
            "weight": codec.to_bytes(host["weight"][i]),
            "weight_offset": offset,
            "coverage": coverage[i],
        }
        row |= {name: codec.pack_mask(host[name][i]) for name in masks}
        row |= {name: codec.to_bytes(wide[name][i]) for name in margins}
        rows.append(row)
    return rows


MASKS = ("keep", "trusted", "reliable")
PSEUDOLABEL_MAPS = ("label", "keep", "weight", "margin", "refined_margin", "trusted", "reliable")


def decode_pseudolabels(
    row: Mapping[str, Any], names: Iterable[str] = PSEUDOLABEL_MAPS
) -> dict[str, np.ndarray]:
    """The only decoder of a ``pseudolabels`` row (:func:`encode_row` is its encoder): the maps
    of ``names`` that the row holds, ``[H, W]`` each: ``label`` uint8, ``keep``, ``trusted`` and
    ``reliable`` bool, ``weight`` float32 (the training weight: ``weight_offset`` added where
    kept, 0 elsewhere), ``margin`` and ``refined_margin`` float32."""
    h, w = int(row["height"]), int(row["width"])
    wanted = set(names)
    out: dict[str, np.ndarray] = {}
    if "label" in wanted:
        out["label"] = codec.decode_png(row["label"])
    for name in MASKS:
        if name in wanted and row.get(name) is not None:
            out[name] = codec.unpack_mask(row[name], h, w)
    if "weight" in wanted:
        keep = out["keep"] if "keep" in out else codec.unpack_mask(row["keep"], h, w)
        unit = codec.dequantize_unit(
            codec.from_bytes(row["weight"], np.uint8, (h, w)), codec.WEIGHT_LEVELS
        )
        out["weight"] = ((unit + float(row["weight_offset"])) * keep).astype(np.float32)
    for name in ("margin", "refined_margin"):
        if name in wanted and row.get(name) is not None:
            values = codec.from_bytes(row[name], np.uint16, (h, w))
            out[name] = codec.dequantize_unit(values, codec.PROB_LEVELS).astype(np.float32)
    return out


# ------------------------------------------------------------------------------- Ray Data steps
def pixel_features(row: dict[str, Any]) -> torch.Tensor:
    """The row's teacher features upsampled (bilinear) to the image: ``float32[D, H, W]``."""
    return pixel_feature_batch([row])[0]


def pixel_feature_batch(
    rows: list[dict[str, Any]], device: torch.device | None = None
) -> torch.Tensor:
    """Rows of one size -> their teacher features upsampled (bilinear) to the image on
    ``device``: ``float32[B, D, H, W]``."""
    features = decode_feature_batch(rows, device)
    size = (int(rows[0]["height"]), int(rows[0]["width"]))
    return F.interpolate(features, size=size, mode="bilinear", align_corners=False)


def box_masks_of(row: dict[str, Any], cfg: PseudolabelConfig, num_classes: int) -> torch.Tensor:
    """A joined detections row -> WPL box masks ``bool[C, H, W]``."""
    return box_mask_batch([row], cfg, num_classes)[0]


def box_mask_batch(
    rows: list[dict[str, Any]],
    cfg: PseudolabelConfig,
    num_classes: int,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Joined detections rows of one size -> WPL box masks ``bool[B, C, H, W]`` on ``device``,
    rasterised in one pass."""
    boxes = [np.asarray(r["boxes"] or [], np.float32).reshape(-1, 4) for r in rows]
    labels = [np.asarray(r["labels"] or [], np.int64) for r in rows]
    scores = [np.asarray(r["scores"] or [], np.float32) for r in rows]
    image = np.repeat(np.arange(len(rows)), [len(b) for b in boxes])
    return ops.rasterize_box_batch(
        np.concatenate(boxes),
        image,
        np.concatenate(labels),
        np.concatenate(scores),
        cfg.class_map(num_classes),
        len(rows),
        int(rows[0]["height"]),
        int(rows[0]["width"]),
        num_classes,
        score_thresh=cfg.wpl.score_thresh,
        device=device,
    )


# Upper bound on the elements of one chunk's WPL features at pixel resolution (float32: 1 GiB),
# so a batch of large images is labelled in pieces instead of running out of memory.
FEATURE_ELEMENTS = 1 << 28


def label_batch(
    table: pa.Table,
    cfg: dict[str, Any],
    prototypes: np.ndarray | None = None,
    detections: Any = None,
    device: str = "cpu",
) -> pa.Table:
    """Ray Data batch function: signal rows -> pseudo-label rows, in input order. WPL also takes
    ``detections`` (a table, or an object-store reference to one, see
    :func:`attach_detections`).

    The rows of each image size are decoded into one batch on ``device`` (``"cuda"`` where the
    task was given a GPU; CPU where the worker has no CUDA), labelled there by
    :func:`batch_policy_maps` and quantised by :func:`encode_rows` with one copy back to the host.
    """
    policy = PseudolabelConfig.model_validate(cfg)
    if detections is not None:
        table = attach_detections(table, detections)
    target = pick_device(1.0) if device == "cuda" else torch.device("cpu")
    protos = None if prototypes is None else torch.from_numpy(np.array(prototypes)).to(target)
    rows = table.to_pylist()
    out: list[dict[str, Any]] = [{} for _ in rows]
    heights, widths = table["height"].to_numpy(), table["width"].to_numpy()
    for h, w, group in size_groups(heights, widths):
        classes = {int(rows[i]["num_classes"]) for i in group}
        if len(classes) != 1:
            raise ValueError(f"signal rows of {h}x{w} images disagree on num_classes: {classes}")
        (num_classes,) = classes
        step = len(group)
        if policy.policy == "wpl":
            step = max(1, FEATURE_ELEMENTS // (int(rows[group[0]]["feature_dim"]) * h * w))
        for start in range(0, len(group), step):
            index = group[start : start + step]
            chunk = [rows[i] for i in index]
            extras: dict[str, torch.Tensor] = {}
            if policy.policy == "wpl":
                extras = {
                    "box_masks": box_mask_batch(chunk, policy, num_classes, target),
                    "features": pixel_feature_batch(chunk, target),
                }
            signals = decode_signal_batch(chunk, target)
            maps = batch_policy_maps(policy, signals, prototypes=protos, **extras)
            encoded = encode_rows(policy, [r["image_id"] for r in chunk], maps)
            for i, row in zip(index, encoded, strict=True):
                out[i] = row
    return pa.Table.from_pylist(out, schema=PSEUDOLABELS_SCHEMA)


def ground_truth_batch(table: pa.Table, cfg: dict[str, Any]) -> pa.Table:
    """Ray Data batch function: unlabeled image rows (``image_id``, ``height``, ``width``,
    ``mask``) -> the ground_truth policy's pseudo-label rows, in input order. The masks of each
    image size are decoded into one batch, mapped by :func:`ground_truth_maps` and encoded by
    :func:`encode_rows` (the table's only encoder), at the image's own resolution."""
    policy = PseudolabelConfig.model_validate(cfg)
    rows = table.to_pylist()
    out: list[dict[str, Any]] = [{} for _ in rows]
    heights, widths = table["height"].to_numpy(), table["width"].to_numpy()
    for _, _, group in size_groups(heights, widths):
        chunk = [rows[i] for i in group]
        if any(r["mask"] is None for r in chunk):  # run() checks first; never a silent hole
            missing = next(r["image_id"] for r in chunk if r["mask"] is None)
            raise ValueError(f"the ground_truth policy: unlabeled image {missing} has no mask")
        masks = torch.from_numpy(np.stack([codec.decode_png(r["mask"]) for r in chunk]))
        encoded = encode_rows(policy, [r["image_id"] for r in chunk], ground_truth_maps(masks))
        for i, row in zip(group, encoded, strict=True):
            out[i] = row
    return pa.Table.from_pylist(out, schema=PSEUDOLABELS_SCHEMA)


def _without_mask(table: pa.Table) -> pa.Table:
    return table.filter(pc.is_null(table["mask"])).select(["image_id", "stem"])


def check_masks(images: DatasetRef) -> int:
    """The number of unlabeled images, after checking (with Ray Data tasks; only the ids of
    images without a mask come to the driver) that every one has a ground-truth mask, as the
    ground_truth policy needs. Raises ``SourceError`` naming how many lack one and an example."""
    total = len(split_ids(images, "unlabeled"))
    missing = (
        read_split(images, "unlabeled", ["image_id", "stem", "mask"])
        .map_batches(_without_mask, batch_format="pyarrow")
        .take_all()
    )
    if missing:
        first = min(missing, key=lambda row: row["image_id"])
        raise SourceError(
            f"pseudolabel.policy=ground_truth: {len(missing)} of {total} unlabeled images have "
            f"no ground-truth mask (e.g. image {first['image_id']}, stem {first['stem']!r}); "
            "the ground_truth policy needs masks for the whole unlabeled split: give every "
            "unlabeled image its mask, or choose another pseudolabel.policy"
        )
    return total


def attach_detections(table: pa.Table, detections: Any) -> pa.Table:
    """Add each row's ``boxes``, ``labels`` and ``scores`` from the ``detections`` table.

    Detections are boxes only (tens of bytes per image), so they are broadcast to the tasks through
    the object store (``detections`` may be an ``ObjectRef``) and looked up by ``image_id`` with a
    vectorised index, instead of a hash join that would shuffle the much larger signal rows.
    """
    table = lookup_columns(table, detections, ["boxes", "labels", "scores"])
    if table["boxes"].null_count:  # an image without boxes has an empty list, never null
        missing = table["image_id"].filter(pc.is_null(table["boxes"])).to_pylist()
        raise ValueError(f"no detections row for images {missing[:5]}: run the detect stage again")
    return table


def queue_batch(table: pa.Table, cfg: dict[str, Any], detections: Any = None) -> pa.Table:
    """Ray Data batch function: per image, the teacher features that enter WPL's queues.

    Labeled rows (carrying their ground-truth ``mask``) feed the ``labeled`` queue with pixels
    the teacher predicts correctly with conf > conf_thresh; unlabeled rows (with ``detections``
    attached) feed the ``unlabeled`` queue with reliable pixels (R = 1). Pixels enter in an order
    shuffled by a generator seeded from the image id; at most ``memory_size`` per class are kept.
    """
    policy = PseudolabelConfig.model_validate(cfg)
    if detections is not None:
        table = attach_detections(table, detections)
    rows = []
    for row in table.to_pylist():
        num_classes = int(row["num_classes"])
        signals = decode_signals(row)
        conf, label = signals["conf"][None], signals["label"][None]
        features = pixel_features(row)[None]
        if row["split"] == "labeled":
            target = torch.from_numpy(codec.decode_png(row["mask"]).astype(np.int64))[None]
            vectors, classes = select_confident(
                features, label, conf, target, policy.wpl.conf_thresh
            )
        else:
            reliable = wpl_reliable(
                policy, label, conf, box_masks_of(row, policy, num_classes)[None]
            )
            vectors, classes = select_reliable(features, label, reliable)
        generator = torch.Generator().manual_seed(int(row["image_id"][:15], 16))
        order = torch.randperm(len(classes), generator=generator)
        vectors, classes = vectors[order], classes[order]
        for c in classes.unique().tolist():
            chosen = vectors[classes == c][-policy.wpl.memory_size :]
            rows.append(
                {
                    "image_id": row["image_id"],
                    "queue": "labeled" if row["split"] == "labeled" else "unlabeled",
                    "cls": c,
                    "count": len(chosen),
                    "features": codec.to_bytes(chosen.numpy().astype(np.float32)),
                }
            )
    return pa.Table.from_pylist(rows, schema=PROTOTYPE_SCHEMA)


def teacher_prototypes(
    cfg: PseudolabelConfig,
    *,
    labeled: Any,
    unlabeled: Any,
    detections: Any,
    num_classes: int,
    dim: int,
) -> np.ndarray:
    """WPL's offline prototypes ``float32[C, D]`` (NaN rows: no prototype) from teacher features.

    ``labeled``: labeled signal rows (with their masks); ``unlabeled``: unlabeled signal rows;
    ``detections``: the detections table (or a reference to it). Images are pushed in ``image_id`` order, so a queue holds the newest
    ``memory_size`` vectors of its class (FIFO). Only the contributions' counts come to the
    driver first; then only the vectors of the images that end up in a queue.
    """
    common = {"batch_format": "pyarrow", "batch_size": 8}
    contributions = (
        labeled.map_batches(queue_batch, fn_kwargs={"cfg": cfg.model_dump()}, **common)
        .union(
            unlabeled.map_batches(
                queue_batch,
                fn_kwargs={"cfg": cfg.model_dump(), "detections": detections},
                **common,
            )
        )
        .materialize()
    )
    counts = contributions.select_columns(["image_id", "queue", "cls", "count"]).take_all()
    wanted = newest_images(counts, cfg.wpl.memory_size)
    chosen = contributions.map_batches(
        _rows_of, fn_kwargs={"image_ids": sorted(wanted)}, batch_format="pyarrow"
    ).take_all()
    chosen.sort(key=lambda row: row["image_id"], reverse=True)
    return fill_memory(chosen, cfg.wpl.memory_size, num_classes, dim)


def newest_images(counts: Iterable[dict[str, Any]], size: int) -> set[str]:
    """The images whose vectors a FIFO queue of ``size`` still holds after every image was pushed
    in ``image_id`` order (``counts``: rows with image_id, queue, cls, count)."""
    remaining: dict[tuple[str, int], int] = {}
    wanted = set()
    for row in sorted(counts, key=lambda r: r["image_id"], reverse=True):
        key = (row["queue"], int(row["cls"]))
        left = remaining.get(key, size)
        if left > 0 and row["count"] > 0:
            wanted.add(row["image_id"])
            remaining[key] = left - int(row["count"])
    return wanted


def _rows_of(table: pa.Table, image_ids: list[str]) -> pa.Table:
    return table.filter(pc.is_in(table["image_id"], value_set=pa.array(image_ids, pa.string())))


def fill_memory(
    newest_first: Iterable[dict[str, Any]], size: int, num_classes: int, dim: int
) -> np.ndarray:
    """Queue contributions (``PROTOTYPE_SCHEMA`` rows, newest image first) -> prototypes
    ``float32[C, D]``: each queue holds the newest ``size`` vectors of its class, as if every
    image had been pushed oldest first."""
    newest: dict[tuple[str, int], list[np.ndarray]] = {}
    for row in newest_first:
        key = (row["queue"], int(row["cls"]))
        have = sum(len(v) for v in newest.get(key, []))
        if have >= size or row["count"] == 0:
            continue
        vectors = codec.from_bytes(row["features"], np.float32, (row["count"], dim))
        newest.setdefault(key, []).append(vectors)
    memory = PrototypeMemory(num_classes, dim, size=size)
    for (queue, cls), chunks in sorted(newest.items()):
        stacked = torch.from_numpy(np.concatenate(chunks[::-1]))
        memory.push(queue, stacked, torch.full((len(stacked),), cls, dtype=torch.int64))
    prototypes = memory.refresh().numpy()
    found = int((~np.isnan(prototypes).any(axis=1)).sum())
    logger.info("wpl: teacher prototypes for %d of %d classes", found, num_classes)
    return prototypes


SCHEMA = "pseudolabels/2"


def run(
    cfg: PseudolabelConfig,
    *,
    signals: DatasetRef,
    out: DatasetRef,
    detections: DatasetRef | None = None,
    images: DatasetRef | None = None,
) -> dict[str, float]:
    """Apply the policy to every unlabeled signal row with Ray Data tasks; write and commit.

    WPL also needs ``detections``, put once into the object store for both of its passes.
    ground_truth reads the unlabeled rows of ``images`` (their masks) instead of ``signals``,
    on the CPU (there is no math to speed up), after checking that every one has a mask.
    """
    import ray

    if cfg.policy == GROUND_TRUTH:
        if images is None:
            raise ValueError("the ground_truth policy needs the images dataset (their masks)")
        check_masks(images)
        labelled = read_split(images, "unlabeled", ["image_id", "height", "width", "mask"])
        return _write(
            labelled.map_batches(
                ground_truth_batch,
                fn_kwargs={"cfg": cfg.model_dump()},
                batch_format="pyarrow",
                batch_size=cfg.batch_size,
            ),
            out,
        )
    columns = ["image_id", "height", "width", "num_classes", *MAPS]
    prototypes, boxes = None, None
    if cfg.policy == "wpl":
        if detections is None:
            raise ValueError("the wpl policy needs the detect stage (detector.enabled: true)")
        columns += ["split", "feature_dim", "feature_height", "feature_width", "features"]
        boxes = ray.put(detections.read_table(["image_id", "boxes", "labels", "scores"]))
        shape = signals.read_table(["num_classes", "feature_dim"]).slice(0, 1).to_pylist()[0]
        prototypes = teacher_prototypes(
            cfg,
            labeled=read_split(signals, "labeled", [*columns, "mask"]),
            unlabeled=read_split(signals, "unlabeled", columns),
            detections=boxes,
            num_classes=int(shape["num_classes"]),
            dim=int(shape["feature_dim"]),
        )
    dataset = read_split(signals, "unlabeled", columns).map_batches(
        label_batch,
        fn_kwargs={
            "cfg": cfg.model_dump(),
            "prototypes": prototypes,
            "detections": boxes,
            "device": "cuda" if cfg.gpus_per_task > 0 else "cpu",
        },
        batch_format="pyarrow",
        batch_size=cfg.batch_size,
        num_gpus=cfg.gpus_per_task,
    )
    metrics = _write(dataset, out)
    if prototypes is not None:
        metrics["teacher_prototypes"] = float((~np.isnan(prototypes).any(axis=1)).sum())
    return metrics


def _write(dataset: Any, out: DatasetRef) -> dict[str, float]:
    """Write and commit the pseudo-label rows; the stage's metrics."""
    manifest = write_committed(dataset, out, SCHEMA)
    coverage = out.read_table(columns=["coverage"])["coverage"].to_numpy()
    return {"images": float(manifest["rows"]), "mean_image_coverage": float(coverage.mean())}
