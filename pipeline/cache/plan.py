"""What a run would reuse and why (``pseudoflow plan``): reads only manifests and records."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pipeline.cache.entries import (
    iter_entries,
)
from pipeline.cache.walk import look_up
from pipeline.config import PipelineConfig
from pipeline.graph import Context, all_stages
from pipeline.source import source_folder
from stages.core.storage import Storage
from stages.ingest.folder import listing_digest
from stages.ingest.sources import enumerate_source

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlanRow:
    stage: str
    action: str  # reuse | run | skip
    key: str | None
    reason: str


# --------------------------------------------------------------------------------------- plan
def plan(config: PipelineConfig, root: str) -> list[PlanRow]:
    """For each stage: reuse (the committed key) or run, and why: the config fields or inputs
    that differ from the newest entry of that stage, or the upstream stage that must run first.
    Reads only manifests and records; writes nothing (not even the generated source)."""
    storage = Storage(root)
    folder = source_folder(config, storage, create=False)
    rows: list[PlanRow] = []
    ctx = Context(config, storage, "plan", [])
    if folder is not None:
        items = enumerate_source(config.data, folder)
        ctx.source_digest = listing_digest(folder, items)
    for stage in all_stages(config):
        if not stage.enabled(config):
            rows.append(PlanRow(stage.name, "skip", None, "disabled in the config"))
            continue
        if "source" in stage.reads and folder is None:
            rows.append(PlanRow(stage.name, "run", None, "the generated source is not written yet"))
            continue
        try:
            found = look_up(stage, ctx)
        except KeyError as missing:
            reason = f"its input {missing.args[0]} comes from a stage that runs first"
            rows.append(PlanRow(stage.name, "run", None, reason))
            continue
        key = found.key
        if found.damage is not None:
            reason = f"its committed entry is damaged ({found.damage}): it is recomputed"
            rows.append(PlanRow(stage.name, "run", key, reason))
            continue
        if found.record is None:
            rows.append(PlanRow(stage.name, "run", key, explain(storage, stage.name, found.fields)))
            continue
        found.adopt(ctx, found.record)
        rows.append(PlanRow(stage.name, "reuse", key, f"committed {found.record['created']}"))
    return rows


def explain(storage: Storage, stage: str, fields: dict[str, Any]) -> str:
    """Why ``fields`` miss the cache: how they differ from the newest committed entry."""
    usable = (e for e in iter_entries(storage, stage) if e.damage is None)
    entries = sorted(usable, key=lambda e: e.record["created"])
    if not entries:
        return "no entry of this stage in the cache yet"
    changed = _diff(entries[-1].record["fields"], fields)
    if not changed:
        return "package version changed since the newest entry"
    shown = [f"{k}: {_short(old)} -> {_short(new)}" for k, old, new in changed[:4]]
    more = f" (+{len(changed) - 4} more)" if len(changed) > 4 else ""
    return "changed since the newest entry: " + "; ".join(shown) + more


def _diff(before: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[tuple]:
    """(dotted key, old, new) for every difference; a section present on one side only is one
    difference, a section on both sides is compared key by key."""
    changed: list[tuple] = []
    for key in sorted(set(before) | set(now)):
        old, new = before.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += _diff(old, new, f"{prefix}{key}.")
        elif old != new:
            changed.append((f"{prefix}{key}", old, new))
    return changed


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return "{...}"
    text = "(none)" if value is None else str(value)
    return f"{text[:12]}…" if len(text) > 16 else text
