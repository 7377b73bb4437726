"""``pseudoflow bench ...``: ratios measured side by side in one run. ``costs``: the policies' math,
the training step's layout and the detector backends (``bench policies | step | detectors``);
``throughput`` and the modules it uses: every path against the bare network (``bench
throughput``). ``bench quality`` is the named sweep ``quality`` (:mod:`pipeline.sweep`)."""
