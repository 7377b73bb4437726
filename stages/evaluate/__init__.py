"""The evaluate stage, a package: ``config``, ``models`` (val mIoU of several checkpoints in one
pass), ``quality`` (pseudo-label coverage and precision against ground truth), ``plot`` and
``stage`` (``run``: the metrics named for the run)."""
