"""Submitting a run to a Ray cluster through the Jobs API, with token authentication.

A submission ships a copy of the project (code and configs; never data, runs or virtual
environments) as the job's working directory, plus the *resolved* config as one YAML file, and
runs ``python -m pipeline run`` on the cluster. Its id is derived from what it runs (config,
root, tracking URI, environment, code), so an identical resubmission finds the first one.

Secrets never travel in a submission: the Ray token goes in the Authorization header only, and
storage or MLflow credentials are passed *by reference* (``${NAME}`` in the runtime
environment, expanded by Ray on the cluster from the nodes' own environment). What is shipped is
what git tracks (or, outside git, only the package files), never a dotfile or a credential file
(:func:`project_files`); a variable, tracking URI, root or config value that carries a secret is
refused before anything is sent, with a message that names it and never echoes its value.

The package: ``submission`` (what runs, and its id), ``shipping`` (the working directory),
``checks`` (secrets refused) and ``cluster`` (the token and the Jobs API client).
"""
