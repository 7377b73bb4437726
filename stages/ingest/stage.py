"""The ingest stage: a source's items -> the ``images`` table (one row per distinct picture).

Reading and decoding run as Ray Data tasks. An item that cannot be used (corrupt file, mask of
the wrong size, label values out of range, a duplicate of another picture) is quarantined: it is
written to the ``quarantine`` table with the reason, counted, and every other item is kept.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, UnidentifiedImageError

from stages.core import codec
from stages.core.storage import DatasetRef
from stages.ingest.folder import SourceItem

logger = logging.getLogger(__name__)

IGNORE_INDEX = 255
ID_LENGTH = 24  # hex characters of the pixel digest used as image_id (96 bits)

IMAGES_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("stem", pa.string()),
        ("split", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("image", pa.binary()),
        ("mask", pa.binary()),
        ("content_hash", pa.string()),
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [
        ("stem", pa.string()),
        ("split", pa.string()),
        ("source", pa.string()),
        ("reason", pa.string()),
    ]
)
_LOADED_SCHEMA = IMAGES_SCHEMA.append(pa.field("source", pa.string())).append(
    pa.field("error", pa.string())
)


SCHEMA = "images/1"


@dataclass(frozen=True)
class IngestResult:
    rows: int
    quarantined: int
    per_split: dict[str, int]
    digests: dict[str, str]  # per split: the content digest downstream cache keys use


def _open_image(url: str, mode: str) -> np.ndarray:
    try:
        with fsspec.open(url, "rb") as handle, Image.open(handle) as image:
            image.load()
            return _as_array(image, url, mode)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"{url} is not a readable PNG/JPEG image ({type(exc).__name__})") from exc


def _as_array(image: Image.Image, url: str, mode: str) -> np.ndarray:
    if mode == "RGB":
        return np.asarray(image.convert("RGB"))
    if image.mode not in {"L", "P"}:
        raise ValueError(
            f"mask {url} has mode {image.mode!r}; expected a single-channel L or P PNG"
        )
    return np.asarray(image)


def load_item(item: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """Decode and validate one item; returns an images row (``error`` set if it is unusable)."""
    row: dict[str, Any] = {
        "stem": item["stem"],
        "split": item["split"],
        "source": item["image_url"],
    }
    try:
        image = _open_image(item["image_url"], "RGB")
        mask = None
        if item["mask_url"]:
            mask = _open_image(item["mask_url"], "L")
            _check_mask(mask, image, item["mask_url"], item["image_url"], num_classes)
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        return {**row, "error": f"{item['stem']}: {exc}"}
    digest = codec.pixel_digest(image)
    return {
        **row,
        "image_id": digest[:ID_LENGTH],
        "height": image.shape[0],
        "width": image.shape[1],
        "image": codec.encode_png(np.ascontiguousarray(image)),
        "mask": codec.encode_png(np.ascontiguousarray(mask)) if mask is not None else None,
        "content_hash": digest,
        "error": None,
    }


def _check_mask(
    mask: np.ndarray, image: np.ndarray, mask_url: str, image_url: str, num_classes: int
) -> None:
    if mask.shape != image.shape[:2]:
        raise ValueError(
            f"mask {mask_url} is {mask.shape[1]}x{mask.shape[0]} (WxH) but image {image_url} is "
            f"{image.shape[1]}x{image.shape[0]}; a mask must match its image's size"
        )
    bad = np.unique(mask[(mask >= num_classes) & (mask != IGNORE_INDEX)])
    if bad.size:
        raise ValueError(
            f"mask {mask_url} holds label values {bad.tolist()[:5]}; valid are 0..{num_classes - 1}"
            f" and {IGNORE_INDEX} (ignore)"
        )


def load_batch(batch: dict[str, np.ndarray], num_classes: int) -> pa.Table:
    """Ray Data batch function: items (numpy columns) -> loaded rows with a fixed schema."""
    keys = list(batch)
    items = [dict(zip(keys, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    rows = [load_item(item, num_classes) for item in items]
    columns = {f.name: [r.get(f.name) for r in rows] for f in _LOADED_SCHEMA}
    return pa.table(columns, schema=_LOADED_SCHEMA)


def _good_rows(table: pa.Table) -> pa.Table:
    return table.filter(pc.is_null(table["error"])).select(IMAGES_SCHEMA.names)


def _bad_rows(table: pa.Table) -> pa.Table:
    bad = table.filter(pc.is_valid(table["error"]))
    return pa.table(
        {
            "stem": bad["stem"],
            "split": bad["split"],
            "source": bad["source"],
            "reason": bad["error"],
        },
        schema=QUARANTINE_SCHEMA,
    )


def run(
    items: Sequence[SourceItem],
    *,
    num_classes: int,
    out: DatasetRef,
    quarantine: DatasetRef,
    num_blocks: int,
) -> IngestResult:
    """Load ``items`` with Ray Data tasks, write ``images`` and ``quarantine``; commit both."""
    import ray

    dataset: Any = ray.data.from_items([asdict(i) for i in items], override_num_blocks=num_blocks)
    loaded = dataset.map_batches(
        load_batch, fn_kwargs={"num_classes": num_classes}, batch_size=16, batch_format="numpy"
    ).materialize()
    bad = pa.concat_tables([_bad_rows(t) for t in _iter_tables(loaded)], promote_options="none")
    good = loaded.map_batches(_good_rows, batch_format="pyarrow", batch_size=None)
    duplicates = _duplicates(good)
    if duplicates:
        bad = pa.concat_tables([bad, _duplicate_rows(good, duplicates)])
        good = good.map_batches(
            _drop_duplicates, fn_kwargs={"drop": duplicates}, batch_format="pyarrow"
        )
    out.prepare()
    good.write_parquet(out.directory, filesystem=out.storage.arrow_fs(), compression="zstd")
    manifest = out.commit({"schema": SCHEMA})
    quarantine.prepare()
    quarantine.write_table(bad)
    quarantine.commit({"schema": "quarantine/1"}, id_column="stem")
    for row in bad.to_pylist():
        logger.warning("quarantined %s (%s): %s", row["stem"], row["split"], row["reason"])
    per_split, digests = split_summary(out)
    return IngestResult(
        rows=manifest["rows"], quarantined=bad.num_rows, per_split=per_split, digests=digests
    )


def _iter_tables(dataset: Any) -> list[pa.Table]:
    tables = [t for t in dataset.iter_batches(batch_format="pyarrow", batch_size=None)]
    return tables or [_LOADED_SCHEMA.empty_table()]


def _duplicates(good: Any) -> dict[str, str]:
    """Rows whose picture equals an earlier row's (by stem order): stem -> kept stem."""
    ids = pa.concat_tables(
        list(good.select_columns(["image_id", "stem"]).iter_batches(batch_format="pyarrow"))
        or [pa.table({"image_id": pa.array([], pa.string()), "stem": pa.array([], pa.string())})]
    )
    first: dict[str, str] = {}
    dropped: dict[str, str] = {}
    for image_id, stem in sorted(
        zip(ids["image_id"].to_pylist(), ids["stem"].to_pylist(), strict=True)
    ):
        kept = first.setdefault(image_id, stem)
        if kept != stem:
            dropped[stem] = kept
    return dropped


def _duplicate_rows(good: Any, duplicates: dict[str, str]) -> pa.Table:
    rows = good.filter(lambda r: r["stem"] in duplicates).select_columns(["stem", "split"])
    table = pa.Table.from_pylist(rows.take_all())
    return pa.table(
        {
            "stem": table["stem"],
            "split": table["split"],
            "source": table["stem"],
            "reason": [f"same picture as {duplicates[s]}" for s in table["stem"].to_pylist()],
        },
        schema=QUARANTINE_SCHEMA,
    )


def _drop_duplicates(table: pa.Table, drop: dict[str, str]) -> pa.Table:
    keep = pc.invert(pc.is_in(table["stem"], value_set=pa.array(list(drop), pa.string())))
    return table.filter(keep)


def split_summary(images: DatasetRef) -> tuple[dict[str, int], dict[str, str]]:
    """Per split, the image count and sha256 over the sorted (image id, mask digest) pairs. Image
    ids are digests of the pixels, so equal digests mean the same pictures with the same labels,
    however the source files were named or stored."""
    table = images.read_table(["image_id", "split", "mask"])
    lines: dict[str, list[str]] = {}
    for image_id, split, mask in zip(
        table["image_id"].to_pylist(),
        table["split"].to_pylist(),
        table["mask"].to_pylist(),
        strict=True,
    ):
        mask_digest = hashlib.sha256(mask).hexdigest() if mask is not None else "-"
        lines.setdefault(split, []).append(f"{image_id}:{mask_digest}")
    counts = {split: len(rows) for split, rows in sorted(lines.items())}
    digests = {
        split: hashlib.sha256("\n".join(sorted(rows)).encode()).hexdigest()
        for split, rows in sorted(lines.items())
    }
    return counts, digests
