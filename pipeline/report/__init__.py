"""``pseudoflow report``: one pipeline run as a static HTML page and PNG figures, written under the
storage root (``reports/<run id>/``) and logged to the run's MLflow parent run (``report/``).

Everything comes from what the run stored: its ``stages.json`` (which entry each stage used, whether
it was a cache hit, when it ran), the entries' records (metrics, per-class IoU) and datasets
(images, teacher signals, pseudo-labels). Nothing is inferred again: the policies the run did not
use are applied to its stored teacher signals (threshold, S4MC, CSL need nothing else); WPL needs
the detector's boxes and the prototype memory, so it is shown only where a WPL entry for the same
signals is in the cache. A ``ground_truth`` run (reference rows) shows its own stored labels too.

The package: ``runs`` (a run's records), ``quality`` (the policies against the ground truth),
``pictures`` (overlays, predictions, curves), ``build`` (the report's data, figures and page,
written) and ``page`` (the HTML).
"""

from pipeline.report.build import Report, build_report, write_report
from pipeline.report.pictures import training_curves, val_predictions
from pipeline.report.quality import ConfidenceSweep, PolicyQuality, decode_labels, policy_quality
from pipeline.report.runs import ReportError, find_run, load_run

__all__ = [
    "ConfidenceSweep",
    "PolicyQuality",
    "Report",
    "ReportError",
    "build_report",
    "decode_labels",
    "find_run",
    "load_run",
    "policy_quality",
    "training_curves",
    "val_predictions",
    "write_report",
]
