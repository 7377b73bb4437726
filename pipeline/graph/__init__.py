"""The stage graph: each stage as it declares itself (``stages.<stage>.stage.DECLARATION``), with
the function that maps config to its arguments and what its cache key is computed from, wired in
one explicit list.

The package: ``model`` (Stage, Context, Outcome, Round), ``keys`` (what each key is computed from),
``checks`` (before any work), ``runs`` (what each stage does with its context) and ``stages``
(the list, checked).
"""

from pipeline.graph.checks import (
    check_splits,
    check_weights,
    needed_splits,
    random_start_warnings,
    split_counts,
    trained_sections,
)
from pipeline.graph.keys import pseudolabel_key_fields, semantic
from pipeline.graph.model import Context, Outcome, Round, Stage, StageResults, final_round
from pipeline.graph.stages import STAGES, all_stages, check_graph, planned

__all__ = [
    "STAGES",
    "Context",
    "Outcome",
    "Round",
    "Stage",
    "StageResults",
    "all_stages",
    "check_graph",
    "check_splits",
    "check_weights",
    "final_round",
    "needed_splits",
    "planned",
    "pseudolabel_key_fields",
    "random_start_warnings",
    "semantic",
    "split_counts",
    "trained_sections",
]
