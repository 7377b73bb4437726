"""The content-addressed cache: stage outputs keyed by what determines them.

Layout under the storage root::

    cache/<stage>/<key>/_ENTRY.json                 the entry's record, created exclusively, last
    cache/<stage>/<key>/attempts/<token>/...        what one writer wrote (datasets, model files)
    cache/<stage>/pool/<family>/<shard>.parquet     inference shards shared by every key of a
    cache/<stage>/pool/<family>/<shard>.json        family (same model and settings); the shard's
                                                    manifest, created exclusively after its file

A key is sha256 over the stage name, its output schema, the package version and the stage's
``fields``: input keys or content digests, model weight digests and the semantic config fields.
Execution-only knobs never enter it.

Commit protocol (no atomic rename needed): every writer writes into its own attempt folder; a
dataset there is committed by its manifest and marker (:class:`DatasetRef`); the entry is committed
by creating ``_ENTRY.json`` only if it does not exist. Of two writers racing on one key, exactly
one creates it; the other deletes its attempt and uses the winner's record. Readers look only at
``_ENTRY.json``, so they never see a half-written entry.

Inference shards are committed one by one while a stage runs (file first, then its manifest with
row count, id set and family key), so a killed run leaves them behind and the rerun infers only
the images no committed shard covers; a new key (new images) references the old shards
(:mod:`stages.core.shards`).

A committed entry is *damaged* when its ``_ENTRY.json`` does not parse or an output it records
(a dataset's manifest and marker, a model file) is missing: it is never reused, and the next
writer of its key replaces it (:meth:`CacheEntry.commit`).

A running attempt keeps ``attempts/<token>/_ALIVE`` fresh (:class:`Heartbeat`); an attempt
whose heartbeat stopped is dead, and a rerun of the same key may take it over (same token, so
its Ray Train run resumes from its checkpoints: :meth:`CacheEntry.take_over`).

The modules: ``entries`` (keys, entries, their records and outputs), ``walk`` (a stage's fields
-> key -> committed record, shared by a run, ``plan`` and the report), ``commit`` (a stage run into its
attempt folder, then its entry committed), ``plan`` (what a run would reuse and why), ``verify``
(``cache verify`` and repair) and ``gc`` (``cache gc``). What a worker needs to write and commit
an inference shard stays in :mod:`stages.core.shards`.
"""
