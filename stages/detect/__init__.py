"""The detect stage, a package: ``table`` (the ``detections`` table), ``config``, ``predictor``
(the detector over a batch) and ``stage`` (the actor pool over the unlabeled images)."""
