"""A sweep's runs: the grid (from the config's ``sweep`` section or ``--grid``), its cross product
with the seeds, the reference rows, and which run must finish before which."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from pipeline.config import ConfigError, PipelineConfig, apply_overrides, validate
from stages.ingest.folder import SourceItem
from stages.pseudolabel.config import GROUND_TRUTH, SIGNAL_POLICIES

POLICY_KEY = "pseudolabel.policy"


_REFERENCE_ORDER = {"supervised": 0, "full": 1}


# ------------------------------------------------------------------------------- the plan
def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``--grid KEY=V1,V2,...`` (each value read as YAML, as ``--set`` reads it) -> axes."""
    grid: dict[str, list[Any]] = {}
    problems = []
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        parts = [v.strip() for v in values.split(",")]
        if not sep or not key or not all(parts):
            problems.append(
                f"--grid {item!r}: expected KEY=V1,V2,... (e.g. pseudolabel.tau=0.9,0.95)"
            )
        elif key in grid:
            problems.append(f"--grid {item!r}: {key} is given twice")
        else:
            grid[key] = [yaml.safe_load(v) for v in parts]
    if problems:
        raise ConfigError(problems)
    return grid


def with_sweep(
    config: PipelineConfig,
    grid: dict[str, list[Any]] | None = None,
    seeds: int | None = None,
    references: bool = True,
    parallel: int | None = None,
) -> PipelineConfig:
    """``config`` with its ``sweep`` section changed from the command line: ``grid`` axes added
    (or replacing the config's axis of the same key), ``seeds``, references dropped,
    ``parallel``."""
    raw = config.model_dump(mode="json")
    section = raw["sweep"]
    section["grid"] = {**section["grid"], **(grid or {})}
    if seeds is not None:
        section["seeds"] = seeds
    if parallel is not None:
        section["parallel"] = parallel
    if not references:
        section["references"] = {}
    return validate(raw)


@dataclass(frozen=True)
class SweepRun:
    """One pipeline run of a sweep: its table row, seed, the overrides that make it, its config."""

    row: str
    reference: bool
    seed: int
    overrides: dict[str, Any]
    config: PipelineConfig

    @property
    def label(self) -> str:
        return f"{self.row} (seed {self.seed})"


def row_name(point: dict[str, Any]) -> str:
    """``policy=s4mc rounds=2``: each axis by its last key part (the whole key where two axes
    share one)."""
    leaves = [key.rsplit(".", 1)[-1] for key in point]
    return " ".join(
        f"{leaf if leaves.count(leaf) == 1 else key}={_show(value)}"
        for leaf, (key, value) in zip(leaves, point.items(), strict=True)
    )


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def expand(config: PipelineConfig, references: Sequence[str] | None = None) -> list[SweepRun]:
    """Every run of the sweep, seed by seed (its references first, then the grid points), each
    config validated: every problem of every run is reported together, before anything runs.
    ``references``: the reference rows to keep (default: all of ``sweep.references``)."""
    sweep = config.sweep
    keep = set(sweep.references if references is None else references)
    axes = list(sweep.grid.items())
    points = [dict(zip([k for k, _ in axes], combo, strict=True)) for combo in _product(axes)]
    # supervised and full first (g's two ends), then the others (YAML keeps no key order)
    ordered = sorted(sweep.references.items(), key=lambda kv: _REFERENCE_ORDER.get(kv[0], 2))
    rows: list[tuple[str, bool, dict[str, Any]]] = [
        (name, True, overrides) for name, overrides in ordered if name in keep
    ]
    rows += [(row_name(point), False, point) for point in points if point]
    if not rows:
        raise ConfigError(["the sweep has no rows: give --grid KEY=V1,V2 or sweep.references"])
    base = config.model_dump(mode="json")
    del base["sweep"]  # each run is a plain run
    if base["runtime"]["torch_threads"] is None and sweep.parallel > 1:
        # runs at once share this machine's cores: a torch thread pool of every core in each of
        # them oversubscribes it (3 quickstarts at 2 threads on 2 cores: a teacher 14 times slower)
        base["runtime"]["torch_threads"] = max(1, (os.cpu_count() or 1) // sweep.parallel)
    if POLICY_KEY in sweep.grid and not base["teach"]["policies"]:
        # one teach serves every policy of this sweep and of any later one on the same root
        base["teach"]["policies"] = list(SIGNAL_POLICIES)
    runs: list[SweepRun] = []
    problems: dict[str, None] = {}  # a problem of every seed is said once
    for seed in range(config.seed, config.seed + sweep.seeds):
        for name, reference, overrides in rows:
            settings = [f"{k}={json.dumps(v)}" for k, v in {**overrides, "seed": seed}.items()]
            try:
                run_config = validate(apply_overrides(base, settings))
            except ConfigError as exc:
                problems |= dict.fromkeys(f"row {name!r}: {p}" for p in exc.problems)
                continue
            runs.append(SweepRun(name, reference, seed, overrides, run_config))
    if problems:
        raise ConfigError(list(problems))
    return runs


def _product(axes: list[tuple[str, list[Any]]]) -> list[tuple[Any, ...]]:
    return list(itertools.product(*[values for _, values in axes])) if axes else []


def _earlier_round(earlier: SweepRun, later: SweepRun) -> bool:
    """``earlier`` is ``later`` with fewer rounds: its stages are the first rounds of ``later``."""
    a, b = earlier.config, later.config
    return a.rounds < b.rounds and a.model_copy(update={"rounds": b.rounds}) == b


def dependencies(runs: Sequence[SweepRun]) -> list[set[int]]:
    """For each run, the earlier runs it waits for when runs go in parallel, so that no two runs
    at once train what the cache would share: each seed's first run (its teacher, detector and
    teach) before the seed's other runs, and a run with fewer rounds before the same run with
    more (its first rounds)."""
    first_of_seed: dict[int, int] = {}
    waits: list[set[int]] = []
    for index, item in enumerate(runs):
        wait = {j for j in range(index) if _earlier_round(runs[j], item)}
        first = first_of_seed.setdefault(item.seed, index)
        if first != index:
            wait.add(first)
        waits.append(wait)
    return waits


def unusable_references(config: PipelineConfig, items: Sequence[SourceItem]) -> dict[str, str]:
    """Reference rows this source (its ``items``) cannot run, and why: a ground_truth row where
    some unlabeled image has no mask."""
    wanting = [
        name
        for name, overrides in config.sweep.references.items()
        if overrides.get(POLICY_KEY) == GROUND_TRUTH
    ]
    if not wanting:
        return {}
    unlabeled = [item for item in items if item.split == "unlabeled"]
    missing = [item.stem for item in unlabeled if item.mask_url is None]
    if not missing:
        return {}
    why = (
        f"{len(missing)} of {len(unlabeled)} unlabeled images have no mask (e.g. {missing[0]!r}); "
        "the ground_truth policy needs the unlabeled split's masks"
    )
    if config.data.source in {"voc", "cityscapes"}:
        why += f" (set data.{config.data.source}.unlabeled_masks: true)"
    return {name: why for name in wanting}
