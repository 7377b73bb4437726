"""The stage graph: each stage is a plain function plus the names of what it reads and writes,
wired in one explicit list. The functions here only map config to the stages' arguments.

The package: ``model`` (Stage, Context, Round), ``keys`` (what each key is computed from),
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
from pipeline.graph.model import Context, Round, Stage, final_round
from pipeline.graph.stages import STAGES, all_stages, check_graph, planned

__all__ = [
    "STAGES",
    "Context",
    "Round",
    "Stage",
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
