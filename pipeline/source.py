"""Where a run's images come from: the source folder of ``data.source`` (for the generated
source, written under the storage root first) and its listing, whose digest is the ingest key's
source field. Used by the runner and by ``cache plan``."""

from __future__ import annotations

import hashlib
import json
import tempfile

from pipeline.config import PipelineConfig
from stages.core.storage import Storage
from stages.ingest.folder import SourceItem, listing_digest
from stages.ingest.generated import generate_dataset
from stages.ingest.sources import enumerate_source


def source_folder(config: PipelineConfig, storage: Storage, create: bool = True) -> str | None:
    """The source folder's URL: ``data.root`` for folder, voc and cityscapes; the generated source
    is written under the root first (unless ``create`` is false: then ``None`` when it does not
    exist yet)."""
    data = config.data
    if data.source != "generated":
        assert data.root is not None  # checked by DataConfig
        return data.root
    spec = data.generated.spec(data.num_classes)
    key = hashlib.sha256(json.dumps(spec.__dict__, sort_keys=True).encode()).hexdigest()[:16]
    folder = storage.path("sources", f"generated-{key}")
    marker = f"{folder}/_COMPLETE"
    if not storage.fs.exists(marker):
        if not create:
            return None
        if storage.is_local:
            generate_dataset(spec, folder)
        else:  # generated on local disk, then uploaded under the root
            with tempfile.TemporaryDirectory() as local:
                generate_dataset(spec, local)
                storage.fs.put(f"{local}/", f"{folder}/", recursive=True)
        storage.write_json(marker, {"spec": spec.__dict__})
    return folder if storage.is_local else f"{_protocol(storage)}://{folder}"


def _protocol(storage: Storage) -> str:
    protocol = storage.fs.protocol
    return protocol if isinstance(protocol, str) else protocol[0]


def source_items(config: PipelineConfig, storage: Storage) -> tuple[list[SourceItem], str]:
    """Enumerate (and for the generated source, first write) the input images in the layout of
    ``data.source``, and digest their listing (so a changed split list, or a changed, added or
    removed file of an item, changes the ingest key). Raises :class:`SourceError` before any
    other work when the source is unusable."""
    folder = source_folder(config, storage)
    assert folder is not None
    items = enumerate_source(config.data, folder)
    return items, listing_digest(folder, items)
