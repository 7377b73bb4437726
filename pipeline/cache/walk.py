"""One walk from a stage to its cache entry, shared by a run and ``plan``: the stage's key
fields, its key, and the committed record it may reuse."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.cache.entries import CacheEntry, cache_key
from pipeline.graph import Context, Stage


@dataclass(frozen=True)
class Lookup:
    """Where ``stage`` stands in the cache: ``record`` is the committed record it may reuse
    (``None`` when nothing usable is committed), ``damage`` why a committed one cannot be."""

    fields: dict[str, Any]
    key: str
    entry: CacheEntry
    record: dict[str, Any] | None
    damage: str | None

    def adopt(self, ctx: Context, record: dict[str, Any]) -> None:
        """The stages after this one read its outputs from ``record`` (reused or just committed)."""
        ctx.outputs.update({n: {**o, "key": self.key} for n, o in record["outputs"].items()})


def look_up(stage: Stage, ctx: Context) -> Lookup:
    """``stage``'s fields -> key -> committed record, its key noted in ``ctx.keys`` for the
    stages after it. Raises ``KeyError`` (from the fields) when an input comes from a stage that
    has not run yet. A damaged entry is never reused: its record is ``None``."""
    fields = stage.fields(ctx)
    key = cache_key(stage.name, stage.schema, fields)
    ctx.keys[stage.name] = key
    entry = CacheEntry(ctx.storage, stage.name, key)
    record, damage = entry.load()
    return Lookup(fields, key, entry, None if damage else record, damage)
