"""The teach stage, a package: ``table`` (the ``teacher_signals`` table, Ray-free), ``config``,
``predictor`` (the teacher over a batch) and ``stage`` (the actor pool over the images)."""
