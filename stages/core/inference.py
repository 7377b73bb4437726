"""Shared pieces of the Ray Data inference stages (teach, detect, evaluate).

Decoding and resizing run as a CPU task step; the model runs in a callable class on an actor pool.
Predictors are plain callables: they can be built and called without Ray.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from stages.core import data
from stages.core.errors import StorageError
from stages.core.models import load_checkpoint, model_from_checkpoint
from stages.core.run_config import CPUS_PER_CPU_ACTOR, InferenceConfig
from stages.core.shards import ShardPool, new_token, write_shard
from stages.core.storage import DatasetRef, Storage
from stages.core.tables import keep_ids, ordered, read_split, split_ids

logger = logging.getLogger(__name__)


"""``actors: auto`` without GPUs: one actor per this many of the cluster's CPUs (each actor's
torch uses several threads; the decode tasks need CPUs too)."""


def decode_for_inference(batch: dict[str, np.ndarray], image_size: int) -> dict[str, Any]:
    """CPU step: stored rows -> ``image: uint8[B, 3, S, S]`` (each fitted to the canvas, aspect
    ratio kept: ``data.fit_and_pad``), ``extent: int32[B, 2]`` (the fitted part), id and
    original size."""
    images, extents = [], []
    for png in batch["image"]:
        image, _, fitted = data.fit_and_pad(data.decode_image(png), {}, image_size)
        images.append(image.numpy())
        extents.append(fitted)
    out: dict[str, Any] = {
        "image_id": batch["image_id"],
        "height": batch["height"],
        "width": batch["width"],
        "image": np.stack(images),
        "extent": np.asarray(extents, np.int32).reshape(-1, 2),
    }
    for passthrough in ("mask", "split"):
        if passthrough in batch:
            out[passthrough] = batch[passthrough]
    return out


def window_starts(reach: int, window: int, stride: int) -> list[int]:
    """Where windows of ``window`` pixels start to cover ``[0, reach)`` with steps of at most
    ``stride`` (the last one flush with ``reach``); one window when it covers everything."""
    if reach <= window:
        return [0]
    return [*range(0, reach - window, stride), reach - window]


def sliding_logits(
    forward: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    window: int,
    extents: torch.Tensor | np.ndarray | None = None,
) -> torch.Tensor:
    """Logits ``float[B, C, H, W]`` of ``images`` ``[B, 3, H, W]``: ``forward`` on the whole
    canvas when ``window`` covers it (or is 0), else averaged over ``window`` x ``window`` windows at
    strides of two thirds of a window (UniMatch's sliding evaluation), over the part the images'
    ``extents`` (``[B, 2]`` fitted height and width) reach; outside it the logits are 0."""
    height, width = images.shape[-2:]
    if not window or window >= max(height, width):
        return forward(images)
    reach_h, reach_w = height, width
    if extents is not None:
        reach = np.asarray(extents).reshape(-1, 2).max(axis=0)
        reach_h, reach_w = max(int(reach[0]), window), max(int(reach[1]), window)
    stride = max(1, window * 2 // 3)
    total: torch.Tensor | None = None
    count = torch.zeros((1, 1, height, width), device=images.device)
    for top in window_starts(min(reach_h, height), window, stride):
        for left in window_starts(min(reach_w, width), window, stride):
            part = forward(images[..., top : top + window, left : left + window]).float()
            if total is None:
                total = part.new_zeros((len(images), part.shape[1], height, width))
            total[..., top : top + window, left : left + window] += part
            count[..., top : top + window, left : left + window] += 1
    assert total is not None
    return total / count.clamp(min=1)


def to_image(probs: torch.Tensor, extent: tuple[int, int], height: int, width: int) -> torch.Tensor:
    """``float[..., C, S, S]`` on the canvas -> ``float[..., C, height, width]``: the fitted part
    (``extent``), resized bilinearly to the image's own size (no-op at the same size)."""
    part = probs[..., : extent[0], : extent[1]]
    if part.shape[-2:] == (height, width):
        return part
    flat = part.reshape(-1, *part.shape[-3:])
    resized = torch.nn.functional.interpolate(
        flat, size=(height, width), mode="bilinear", align_corners=False
    )
    return resized.reshape(*part.shape[:-2], height, width)


def label_maps(
    forward: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    window: int,
    extents: np.ndarray,
    sizes: list[tuple[int, int]],
) -> list[torch.Tensor]:
    """Each image's labels ``int64[h, w]`` at its own size ``sizes[i]``, as evaluate scores and
    ``pseudoflow predict`` writes them: logits over the canvas (:func:`sliding_logits`; window 0
    is the whole canvas), softmax, the fitted part ``extents[i]`` bilinear to the image's size,
    argmax."""
    probs = sliding_logits(forward, images, window, extents).float().softmax(dim=1)
    return [
        to_image(probs[i], (int(extents[i][0]), int(extents[i][1])), h, w).argmax(0)
        for i, (h, w) in enumerate(sizes)
    ]


ConfigT = TypeVar("ConfigT", bound=InferenceConfig)


@dataclass(frozen=True)
class PoolSize:
    """An inference actor pool sized for a cluster: :func:`pool_size`."""

    gpus: float
    min_actors: int
    initial: int
    max_actors: int | None  # None: no bound but the cluster's resources

    def strategy(self) -> Any:
        import ray

        if self.max_actors == self.min_actors:
            return ray.data.ActorPoolStrategy(size=self.min_actors)
        return ray.data.ActorPoolStrategy(
            min_size=self.min_actors, max_size=self.max_actors, initial_size=self.initial
        )

    def describe(self) -> str:
        actors = (
            str(self.min_actors)
            if self.max_actors == self.min_actors
            else f"{self.min_actors} to {self.max_actors or 'as many as fit'}"
            f" (starting with {self.initial})"
        )
        return f"{actors} actors, {self.gpus:g} GPU each"


def resolve_gpus(cfg: ConfigT, use_gpu: bool) -> ConfigT:
    """``gpus_per_actor: auto`` -> 1 with ``runtime.use_gpu``, else 0."""
    if cfg.gpus_per_actor != "auto":
        return cfg
    return cfg.model_copy(update={"gpus_per_actor": 1.0 if use_gpu else 0.0})


def pool_size(cfg: InferenceConfig, cluster: dict[str, float]) -> PoolSize:
    """The actor pool of ``cfg`` on a cluster with ``cluster`` resources (``ray.cluster_resources()``:
    ``{"CPU": 16.0, "GPU": 4.0, ...}``). ``gpus_per_actor: auto`` left unresolved (a caller
    without a pipeline config) means 1 where the cluster has a GPU."""
    have_gpus = float(cluster.get("GPU", 0.0))
    gpus = cfg.gpus_per_actor
    if gpus == "auto":
        gpus = 1.0 if have_gpus >= 1 else 0.0
    if cfg.actors != "auto":
        return PoolSize(gpus, cfg.actors, cfg.actors, cfg.actors)
    if gpus > 0:
        fit = max(1, math.floor(have_gpus / gpus + 1e-9))
        return PoolSize(gpus, 1, fit, None)
    count = max(1, int(cluster.get("CPU", 1.0)) // CPUS_PER_CPU_ACTOR)
    return PoolSize(gpus, count, count, count)


def load_model(storage_url: str, path: str) -> tuple[nn.Module, dict[str, Any]]:
    """Read a checkpoint from storage and rebuild its model (eval mode, CPU)."""
    checkpoint = load_checkpoint(Storage(storage_url).read_bytes(path), source=path)
    return model_from_checkpoint(checkpoint), checkpoint


def pick_device(gpus: float) -> torch.device:
    return torch.device("cuda") if gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def predict_split(
    images: DatasetRef,
    split: str | tuple[str, ...],
    columns: list[str],
    predictor: type,
    predictor_kwargs: dict[str, Any],
    *,
    cfg: InferenceConfig,
    image_size: int,
    only: set[str] | None = None,
    shard_rows: int | None = None,
) -> Any:
    """A lazy Ray Dataset: one split's (or several splits') images (only the ids in ``only`` if
    given), decoded and resized by CPU tasks, then passed through ``predictor`` (a callable
    class) on an actor pool sized by :func:`pool_size`. Rows keep their order (:func:`ordered`):
    batches are made up the same way in every run, and a network's output on an image can depend
    on its batch's make-up (kernels chosen by batch size), so results are reproducible."""
    import ray

    size = pool_size(cfg, ray.cluster_resources())
    logger.debug("%s: %s", predictor.__name__, size.describe())
    with ordered():
        rows = read_split(images, split, columns)
        if only is not None:
            rows = keep_ids(rows, only)
        if shard_rows is not None:
            # Blocks of about one shard each: predictions then stream to the shard writer (and
            # commit) as they are made, instead of once per input file.
            rows = rows.repartition(target_num_rows_per_block=shard_rows)
        decoded = rows.map_batches(
            decode_for_inference, fn_kwargs={"image_size": image_size}, batch_size=cfg.batch_size
        )
        return decoded.map_batches(
            predictor,
            fn_constructor_kwargs={
                "storage_url": images.storage.url,
                "gpus": size.gpus,
                **predictor_kwargs,
            },
            compute=size.strategy(),
            num_gpus=size.gpus,
            batch_size=cfg.batch_size,
            batch_format="numpy",
            **({"resources": dict(cfg.resources)} if cfg.resources else {}),
        )


def predict_into_pool(
    images: DatasetRef,
    split: str | tuple[str, ...],
    columns: list[str],
    predictor: type,
    predictor_kwargs: dict[str, Any],
    *,
    cfg: InferenceConfig,
    image_size: int,
    pool: ShardPool,
    out: DatasetRef,
    schema: str,
) -> dict[str, float]:
    """Infer the images of ``split`` that no committed shard of ``pool`` covers, committing a
    shard every ``cfg.shard_rows`` rows, then commit ``out`` as the reused plus the new shards.

    A rerun after a crash, or a run over a source with new images, infers only what is missing.
    """
    wanted = split_ids(images, split)
    reused, missing = pool.cover(wanted)
    new: list[str] = []
    if missing:
        predictions = predict_split(
            images,
            split,
            columns,
            predictor,
            predictor_kwargs,
            cfg=cfg,
            image_size=image_size,
            only=missing if reused else None,
            shard_rows=cfg.shard_rows,
        )
        written = predictions.map_batches(
            write_shard,
            fn_kwargs=pool.writer_kwargs(new_token()),
            batch_size=cfg.shard_rows,
            batch_format="pyarrow",
        ).take_all()
        new = [row["shard"] for row in written]
    out.prepare()
    manifest = out.commit_files([s["path"] for s in reused] + new, {"schema": schema})
    if manifest["rows"] != len(wanted):
        raise StorageError(
            f"{out.name}: {manifest['rows']} rows committed for {len(wanted)} images"
        )
    return {
        "images": float(manifest["rows"]),
        "images_inferred": float(len(missing)),
        "shards_reused": float(len(reused)),
    }


def write_committed(dataset: Any, out: DatasetRef, schema: str) -> dict[str, Any]:
    """Write a Ray Dataset as zstd Parquet shards into ``out`` and commit it (manifest last)."""
    out.prepare()
    dataset.write_parquet(out.directory, filesystem=out.storage.arrow_fs(), compression="zstd")
    return out.commit({"schema": schema})
