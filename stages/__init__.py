"""The stages, one package each, of one shape: ``config`` (its settings, which declare their
execution-only keys), ``table`` where it stores one (the schema, its only encoder and decoder),
a Ray-free core on tensors and Arrow tables, and a thin Ray ``stage`` with ``run`` and the
stage's ``DECLARATION`` (what it reads and writes, its schema, config section and figures).
``core`` holds what every stage shares. Nothing here imports ``pipeline``."""
