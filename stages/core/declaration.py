"""What a stage declares about itself, for the pipeline that runs it (Ray-free data): its name,
what it reads and writes, the schema of its output, and how a run presents it. The pipeline
adds how its config maps to the stage's arguments and what its cache key is computed from
(``pipeline.graph``), and reads nothing else about a stage: it knows no stage by name."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Declaration:
    """A stage's declaration.

    ``reads`` and ``writes`` name outputs (``source``: the data source); a stage of the
    teach -> pseudolabel -> train_student rounds uses round 1's names, and the pipeline renames
    them for later rounds. ``schema`` is its output's schema name (part of its cache key). The
    rest is how a run presents it: its config ``section`` (the stage run's params), the image
    splits it reads (``image_inputs``: split and MLflow context, logged as dataset inputs), the
    pseudo-label set it trains on (``label_input``), the figures its "done" line shows
    (``key_figures``), its metrics the pipeline run logs as its own (``summary``), and the outputs
    whose entry records the run's per-split image digests (``split_digests``)."""

    name: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    schema: str
    section: str | None = None
    image_inputs: tuple[tuple[str, str], ...] = ()
    label_input: str | None = None
    key_figures: tuple[str, ...] = ()
    summary: tuple[str, ...] = ()
    split_digests: tuple[str, ...] = ()
