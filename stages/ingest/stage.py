"""The ingest stage: a source's items -> the ``images`` table (one row per distinct picture).

Reading and decoding run as Ray Data tasks. An item that cannot be used (corrupt file, mask of
the wrong size, label values out of range, a duplicate of another picture) is quarantined: it is
written to the ``quarantine`` table with the reason, counted, and every other item is kept.
"""

from __future__ import annotations

import hashlib
import itertools
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
from stages.core.constants import IGNORE_INDEX
from stages.core.declaration import Declaration
from stages.core.storage import DatasetRef
from stages.ingest.folder import SourceItem

logger = logging.getLogger(__name__)

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
# The items handed to the loading tasks. ``mask_url`` is a nullable string column: most items
# of a semi-supervised split have no mask, and a block of only such items must still carry a
# string column (inferred from Python values it would become Arrow's null type, which reaches a
# numpy batch as float NaN, a truthy "path").
ITEMS_SCHEMA = pa.schema(
    [
        ("stem", pa.string()),
        ("split", pa.string()),
        ("image_url", pa.string()),
        ("mask_url", pa.string()),
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
_LOADED_SCHEMA = (
    IMAGES_SCHEMA.append(pa.field("source", pa.string()))
    .append(pa.field("error", pa.string()))
    .append(pa.field("note", pa.string()))
)

# What loading did to a usable picture besides decoding it (the ``note`` column): counted per
# kind in the stage's result and logged, so nothing is changed silently.
ALPHA_DROPPED = "alpha_dropped"  # RGBA / LA / PA / transparency: the colour channels are kept
SCALED_16BIT = "scaled_16bit"  # 16-bit grayscale: scaled to 0..255, not clipped
NOTES = (ALPHA_DROPPED, SCALED_16BIT)
_16BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


SCHEMA = "images/1"


@dataclass(frozen=True)
class IngestResult:
    rows: int
    quarantined: int
    per_split: dict[str, int]
    digests: dict[str, str]  # per split: the content digest downstream cache keys use
    notes: dict[str, int]  # NOTES kind -> images it applies to (kept, changed as it says)


def read_rgb(url: str) -> np.ndarray:
    """An image file (local path or URL) as the pipeline reads it: ``uint8[H, W, 3]`` (16-bit
    scaled, alpha dropped, palette/CMYK/grayscale converted); ``ValueError`` naming it if it is
    not a readable PNG/JPEG picture."""
    return _open_image(url, "RGB", [])


def _open_image(url: str, mode: str, notes: list[str]) -> np.ndarray:
    try:
        with fsspec.open(url, "rb") as handle, Image.open(handle) as image:
            image.load()
            return _as_array(image, url, mode, notes)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"{url} is not a readable PNG/JPEG image ({type(exc).__name__})") from exc


def _as_array(image: Image.Image, url: str, mode: str, notes: list[str]) -> np.ndarray:
    if mode == "RGB":
        return _as_rgb(image, url, notes)
    if image.mode not in {"L", "P"}:
        raise ValueError(
            f"mask {url} has mode {image.mode!r}; expected a single-channel L or P PNG"
        )
    return np.asarray(image)


def _as_rgb(image: Image.Image, url: str, notes: list[str]) -> np.ndarray:
    """Any PNG/JPEG picture -> ``uint8[H, W, 3]``. 16-bit grayscale is scaled to 8 bits
    (PIL's own conversion would clip everything above 255 to white); an alpha channel is dropped
    (the colour underneath is kept) and noted."""
    if image.mode in _16BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(
                f"{url} has {image.mode} pixel values outside 0..65535; expected an 8- or 16-bit "
                "image"
            )
        notes.append(SCALED_16BIT)
        gray = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode == "F":
        raise ValueError(f"{url} holds floating-point pixels; expected an 8- or 16-bit image")
    if image.mode in {"RGBA", "LA", "PA", "RGBa", "La"} or "transparency" in image.info:
        notes.append(ALPHA_DROPPED)
    return np.asarray(image.convert("RGB"))


def load_item(item: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """Decode and validate one item; returns an images row (``error`` set if it is unusable).

    ``item["mask_url"]`` is ``None`` for an item without a mask. Any exception while loading one
    item makes that item's row an error row (quarantined with the reason), never the batch's."""
    row: dict[str, Any] = {
        "stem": item["stem"],
        "split": item["split"],
        "source": item["image_url"],
    }
    notes: list[str] = []
    try:
        image = _open_image(item["image_url"], "RGB", notes)
        mask = None
        mask_url = item["mask_url"]
        if mask_url is not None:
            if not isinstance(mask_url, str):
                raise ValueError(f"mask location {mask_url!r} is not a path or URL string")
            mask = _open_image(mask_url, "L", [])
            _check_mask(mask, image, mask_url, item["image_url"], num_classes)
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        return {**row, "error": f"{item['stem']}: {exc}"}
    except Exception as exc:  # one unusable item must never end the run: quarantine it
        logger.exception("unexpected error loading %s", item["stem"])
        return {**row, "error": f"{item['stem']}: unexpected {type(exc).__name__}: {exc}"}
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
        "note": ",".join(notes) or None,
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


def items_table(items: Sequence[SourceItem]) -> pa.Table:
    """The source's items as a typed table (``mask_url`` a string column with nulls)."""
    return pa.Table.from_pylist([asdict(i) for i in items], schema=ITEMS_SCHEMA)


def load_batch(batch: pa.Table, num_classes: int) -> pa.Table:
    """Ray Data batch function: items (an Arrow table of ``ITEMS_SCHEMA``) -> loaded rows with a
    fixed schema. Items stay Arrow rows, so a missing mask is ``None``, whatever the batch holds."""
    rows = [load_item(item, num_classes) for item in batch.to_pylist()]
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


DECLARATION = Declaration(
    "ingest",
    reads=("source",),
    writes=("images", "quarantine"),
    schema=SCHEMA,
    key_figures=("images", "quarantined_images"),
    summary=("quarantined_images",),
    split_digests=("images",),
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

    dataset: Any = ray.data.from_arrow(item_blocks(items_table(items), num_blocks))
    loaded = dataset.map_batches(
        load_batch, fn_kwargs={"num_classes": num_classes}, batch_size=16, batch_format="pyarrow"
    ).materialize()
    # One pass on the driver over the small columns only (never the encoded images): the
    # quarantine rows and the note counts.
    outcome = _iter_tables(loaded.select_columns(["stem", "split", "source", "error", "note"]))
    notes = _count_notes(outcome)
    bad = pa.concat_tables([_bad_rows(t) for t in outcome], promote_options="none")
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
    for kind, count in notes.items():
        if count:
            logger.warning("%d images: %s", count, _NOTE_TEXT[kind])
    per_split, digests = split_summary(out)
    return IngestResult(
        rows=manifest["rows"],
        quarantined=bad.num_rows,
        per_split=per_split,
        digests=digests,
        notes=notes,
    )


_NOTE_TEXT = {
    ALPHA_DROPPED: "alpha channel dropped (the colour channels are kept, not composited)",
    SCALED_16BIT: "16-bit grayscale scaled to 8 bits (value * 255 / 65535)",
}


def item_blocks(table: pa.Table, num_blocks: int) -> list[pa.Table]:
    """``table`` cut into ``num_blocks`` consecutive slices of near-equal size (in the source's
    order: a block may hold only one split's items), each keeping the full schema."""
    count = max(1, min(num_blocks, table.num_rows))
    bounds = [i * table.num_rows // count for i in range(count + 1)]
    return [table.slice(a, b - a) for a, b in itertools.pairwise(bounds)]


def _count_notes(tables: list[pa.Table]) -> dict[str, int]:
    """NOTES kind -> usable images it applies to, from loaded rows' ``note`` and ``error``."""
    counts = dict.fromkeys(NOTES, 0)
    for table in tables:
        usable = table.filter(pc.is_null(table["error"]))
        for note in usable["note"].to_pylist():
            for kind in (note or "").split(","):
                if kind:
                    counts[kind] += 1
    return counts


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
