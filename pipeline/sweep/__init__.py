"""``pseudoflow sweep``: many pipeline runs on one storage root, one table of what won.

A sweep is the config's ``sweep`` section (or ``--grid`` / ``--seeds`` on the command line): the
cross product of the grid's values, each run with ``sweep.seeds`` seeds, plus the reference rows
(``sweep.references``: ``supervised``, ``full``, ...) once per seed. Where the grid sweeps
``pseudolabel.policy`` and ``teach.policies`` is not set, every run's teach stores the signals of
every policy, so one teach per teacher serves them all (and any policy a later sweep adds).
Every run is an ordinary pipeline run (:func:`pipeline.runner.run_pipeline`) on the same root, so
the cache does the sharing: a teacher, a detection or a teach whose key recurs runs once, a pseudo-label set once per
policy, and a second sweep over the same root runs only what is new.

The MLflow parent run of the sweep holds every pipeline run as a child (and they their stage
runs), its table as ``sweep.json``, ``sweep.csv`` and ``sweep.txt``, and a plot. The same files go
under ``<root>/sweeps/<sweep id>/``, rewritten after each run, so a sweep stopped half-way keeps
what it measured. A run that fails is logged, counted in its row and the sweep goes on; the
sweep then ends with the runs that failed named.

The package: ``grid`` (the runs), ``run`` (running them) and ``table`` (the table and the
gap-closing ratio g).
"""
