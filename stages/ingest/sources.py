"""``data.source`` -> the items to ingest: one function maps the config to a layout's reader."""

from __future__ import annotations

from stages.ingest.cityscapes import enumerate_cityscapes
from stages.ingest.config import DataConfig
from stages.ingest.folder import SourceItem, enumerate_folder
from stages.ingest.voc import enumerate_voc


def enumerate_source(data: DataConfig, url: str) -> list[SourceItem]:
    """The items of the source at ``url`` (``data.root``, or the written generated folder),
    read in the layout ``data.source`` names. Raises ``SourceError`` before any work."""
    if data.source == "voc":
        return enumerate_voc(url, **data.voc.model_dump())
    if data.source == "cityscapes":
        return enumerate_cityscapes(url, **data.cityscapes.model_dump())
    return enumerate_folder(url, val_fraction=data.val_fraction)
