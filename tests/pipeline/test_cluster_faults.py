"""Node faults on a real two-node Ray cluster on this machine: a head (``ray start --head``) and a
second node (``ray start --address``, its own ports, the custom resource ``faultnode``), each
stopped by process id, never with ``ray stop``.

How the work gets there and when the node dies:

* The stages under test ask for the custom resource (``detect.resources``, ``teach.resources``,
  ``student.resources``: ``{faultnode: 1}``), which only the second node advertises, so their
  actors and training workers can run nowhere else.
* The second node is started with ``PSEUDOFLOW_HOLD_AT`` (``stages.core.training.hold_point``) in
  its environment: the first detect/teach actor to reach its 3rd batch, or the student's training
  worker at step 5 (after its checkpoint at step 3), writes a marker file and sleeps. The test
  waits for the marker, checks the held process belongs to the second node and SIGKILLs every
  process of that node (its process group, and anything carrying its tag).
* The head alone cannot host the work (it has no ``faultnode``), so once the head reports the node
  dead the test starts a replacement node with the same resource (and no hold), as an autoscaler
  would: Ray Data restarts the actor there and retries its lost tasks; Ray Train
  (``FailureConfig``) restarts the worker group there, which resumes from the last checkpoint.

The run must complete; every unlabeled image id is in detections, teacher_signals and
pseudolabels exactly once; and the results equal those of a clean run on the same cluster:
tables bitwise (inference is per batch, and batches are made up the same way after a retry), the
student's weights ``torch.equal`` (the checkpoint restores the step, optimizer, EMA, prototype
memory, random state and data position).

Each fault is injected ``PSEUDOFLOW_FAULT_REPEATS`` times (default 1); the counts are printed
(``-s``) and written to ``PSEUDOFLOW_FAULT_REPORT`` when set. To keep each repetition short, a
faulty run starts from a copy of the clean run's root holding only the cache entries of the
stages before the faulted ones (same keys: the copy keeps file times), so only the faulted
stages run again.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from pipeline.cache.entries import output_dataset
from stages.core.models import resumable_path
from stages.core.storage import Storage
from stages.core.training import HOLD_ENV
from tests.conftest import stage_outputs
from tests.servers import RayHead, ray_head, ray_node, wait_for_node

REPEATS = int(os.environ.get("PSEUDOFLOW_FAULT_REPEATS", "1"))
# pytest-timeout's 900 s covers an item's setup too: the first one's includes the clean run.
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600 + 300 * REPEATS)]
RESOURCE = {"faultnode": 1.0}
# The GCS declares a node dead after about 3 missed 1 s health checks (Ray's default: ~30 s).
HEALTH = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}
OVERRIDES = [
    "pseudolabel.policy=wpl",  # the student keeps a prototype memory, here never empty:
    "pseudolabel.tau=0.3",
    "pseudolabel.wpl.conf_thresh=0.3",  # labeled pixels of a weak smoke student fill its queues,
    "pseudolabel.wpl.refresh_every=2",  # refreshed into prototypes every 2 steps
    "student.ema=0.9",  # and an EMA of its weights
    "student.steps=8",
    "student.checkpoint_every=3",  # checkpoints at 3 and 6; held (and killed) at 5
    "student.log_every=1",
    "detect.batch_size=2",  # 12 unlabeled images: 6 batches, 3 shards
    "detect.shard_rows=4",
    "teach.batch_size=2",  # 20 images: 10 batches, 5 shards
    "teach.shard_rows=4",
    "detect.resources={faultnode: 1}",
    "teach.resources={faultnode: 1}",
    "student.resources={faultnode: 1}",
]
RUN_TIMEOUT = 900.0
# (stage the hold is in, the batch or step it holds at, stage the run stops after, stages whose
# cache entries a faulty run starts without)
INFERENCE_FAULTS = {
    "detect": (3, "pseudolabel", ("detect", "teach", "pseudolabel")),
    "teach": (3, "pseudolabel", ("detect", "teach", "pseudolabel")),
}
TRAINING_FAULT = ("student", 5, "train_student", ("train_student",))
IDS_TABLES = ("detections", "teacher_signals", "pseudolabels")


@dataclass
class Counts:
    injected: int = 0
    survived: int = 0
    ids_lost: int = 0
    ids_duplicated: int = 0
    equal_to_clean: int = 0
    seconds: list[float] = field(default_factory=list)


COUNTS: dict[str, Counts] = {}


@dataclass(frozen=True)
class Cluster:
    head: RayHead
    base: Path
    clean: Path  # the clean run's root


def _run_args(root: Path, base: Path, until: str) -> list[str]:
    # verbose: the workers' lines ("resumed from step 3") reach the driver's log
    args = [sys.executable, "-m", "pipeline", "-v", "run", "--config", "smoke", "--root", str(root)]
    args += ["--no-report", "--until", until, "--set", f"tracking.uri=sqlite:///{base}/mlflow.db"]
    for override in OVERRIDES:
        args += ["--set", override]
    return args


def _driver_env(head: RayHead) -> dict[str, str]:
    """A pipeline driver that joins the head (the driver attaches to the head node's raylet)."""
    return {
        **head.env,
        "RAY_AUTH_TOKEN": head.token,
        "RAY_ADDRESS": head.gcs_address,
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The head, and the clean run's root (the whole pipeline up to the student, on the head and
    a second node with the resource, nothing killed)."""
    base = tmp_path_factory.mktemp("faults")
    with ray_head(num_cpus=4, extra_env=HEALTH) as head:
        clean = base / "clean"
        with ray_node(head, num_cpus=1, resources=RESOURCE):
            log = base / "clean.log"
            with log.open("w") as out:
                done = subprocess.run(
                    _run_args(clean, base, "train_student"),
                    env=_driver_env(head),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=RUN_TIMEOUT,
                )
            assert done.returncode == 0, log.read_text()[-5000:]
        yield Cluster(head, base, clean)
    _report()


def _report() -> None:
    if not COUNTS:
        return
    figures = {kind: asdict(counts) for kind, counts in COUNTS.items()}
    print("\nnode faults:", json.dumps(figures, indent=1))
    if target := os.environ.get("PSEUDOFLOW_FAULT_REPORT"):
        Path(target).write_text(json.dumps(figures, indent=1))


def _seed_root(clean: Path, root: Path, without: tuple[str, ...]) -> None:
    """A new root holding the clean run's source and the cache entries (and shard pools) of every
    stage but ``without``: those stages run again, the ones before are cache hits."""
    shutil.copytree(clean / "sources", root / "sources")  # copy2: file times, so the ingest key
    for stage in (clean / "cache").iterdir():
        if stage.name not in without:
            shutil.copytree(stage, root / "cache" / stage.name)


@dataclass
class FaultyRun:
    log: str
    seconds: float
    held_pid: int


def _faulty_run(cluster: Cluster, name: str, kind: str, at: int, until: str) -> FaultyRun:
    """Run the pipeline under ``name`` (already seeded) with a second node holding ``kind`` at
    ``at``; once held, kill that node by process id, wait for the head to see it dead, start a
    replacement and let the run finish."""
    root, marker = cluster.base / name, cluster.base / f"{name}.hold"
    hold = {HOLD_ENV: f"{kind}:{at}:{marker}"}
    log = cluster.base / f"{name}.log"
    started = time.monotonic()
    with ray_node(cluster.head, num_cpus=1, resources=RESOURCE, extra_env=hold) as node:
        with log.open("w") as out:
            driver = subprocess.Popen(
                _run_args(root, cluster.base, until),
                env=_driver_env(cluster.head),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            held = Path(f"{marker}.{kind}")
            while not held.exists():
                if driver.poll() is not None or time.monotonic() > started + RUN_TIMEOUT:
                    raise AssertionError(f"{kind} never held:\n{log.read_text()[-5000:]}")
                time.sleep(0.2)
            held_pid = int(held.read_text())
            if kind in INFERENCE_FAULTS:  # mid-stage: a shard of the pool is committed
                _wait_for_a_shard(root / "cache" / kind / "pool", started + RUN_TIMEOUT)
            killed = node.kill()
            assert held_pid in killed, f"{kind} held on another node ({held_pid}, {killed})"
            wait_for_node(cluster.head, node.tag, "DEAD", timeout=60)
            with ray_node(cluster.head, num_cpus=1, resources=RESOURCE):
                left = started + RUN_TIMEOUT - time.monotonic()
                driver.wait(max(left, 1))
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait(10)
    text = log.read_text()
    assert driver.returncode == 0, f"{name}: exit {driver.returncode}:\n{text[-5000:]}"
    return FaultyRun(text, time.monotonic() - started, held_pid)


def _wait_for_a_shard(pool: Path, deadline: float) -> None:
    """Wait until a shard of the pool is committed (its record, written after its data)."""
    while not any(pool.glob("*/*.json")):
        assert time.monotonic() < deadline, f"no shard committed under {pool}"
        time.sleep(0.1)


def _table(root: Path, name: str, columns: list[str] | None = None) -> pa.Table:
    output = stage_outputs(root)[name]
    table = output_dataset(Storage(str(root)), name, output).read_table(columns=columns)
    return table.sort_by("image_id")


def _unlabeled_ids(root: Path) -> list[str]:
    images = _table(root, "images", ["image_id", "split"])
    unlabeled = images.filter(pc.equal(images["split"], "unlabeled"))
    return [str(i) for i in unlabeled["image_id"].to_pylist()]


def _id_faults(root: Path) -> tuple[int, int]:
    """(unlabeled ids missing, unlabeled ids present more than once) summed over the tables."""
    wanted = _unlabeled_ids(root)
    lost = duplicated = 0
    for name in IDS_TABLES:
        ids = [str(i) for i in _table(root, name, ["image_id"])["image_id"].to_pylist()]
        lost += sum(ids.count(i) == 0 for i in wanted)
        duplicated += sum(ids.count(i) > 1 for i in set(ids))
    return lost, duplicated


def _state(root: Path, name: str) -> dict:
    """The whole training state a model's training ended with (its resumable copy)."""
    path = resumable_path(Storage(str(root)).resolve(stage_outputs(root)[name]["path"]))
    return torch.load(io.BytesIO(Path(path).read_bytes()), weights_only=True)


def _unequal_state(a: dict, b: dict) -> list[str]:
    """What differs between two student checkpoints: the weights (the EMA's), the trained
    weights, the optimizer's state, the prototype memory."""
    assert a["step"] == b["step"]
    unequal = []
    for part in ("state_dict", "trained_state_dict"):
        x, y = a[part], b[part]
        assert x.keys() == y.keys()
        unequal += [f"{part}.{k}" for k in x if not torch.equal(x[k], y[k])]
    moments = zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True)
    if not all(torch.equal(x[k], y[k]) for x, y in moments for k in x):
        unequal.append("optimizer")
    memories = zip(a["memory"], b["memory"], strict=True)
    for rank, (x, y) in enumerate(memories):
        unequal += [f"memory[{rank}].{k}" for k in x if not torch.equal(x[k], y[k])]
    return unequal


def _repetitions(
    cluster: Cluster, kind: str, fault: tuple[int, str, tuple[str, ...]], counts: Counts
) -> Iterator[tuple[str, Path, FaultyRun]]:
    """Each of the ``REPEATS`` injections of ``fault`` (at, until, without): a root seeded from
    the clean run, the faulty run on it; counted (injected, survived, seconds, ids lost and
    duplicated) before the caller compares it with the clean run."""
    at, until, without = fault
    for repeat in range(REPEATS):
        name = f"{kind}-{repeat}"
        _seed_root(cluster.clean, cluster.base / name, without)
        counts.injected += 1
        run = _faulty_run(cluster, name, kind, at, until)
        counts.survived += 1
        counts.seconds.append(round(run.seconds, 1))
        _check_ids(cluster.base / name, counts)
        yield name, cluster.base / name, run


def _check_ids(root: Path, counts: Counts) -> None:
    lost, duplicated = _id_faults(root)
    counts.ids_lost += lost
    counts.ids_duplicated += duplicated


def test_node_killed_under_a_training_worker(cluster: Cluster) -> None:
    """The node of the student's Ray Train worker dies at step 5 (checkpoint at 3): Ray Train
    restarts the worker group on a replacement node, it resumes from step 3, and the student
    ends with exactly the clean run's step, weights (the EMA's and the trained ones), optimizer
    state and prototype memory (not empty: the overrides make sure it holds features)."""
    kind, at, until, without = TRAINING_FAULT
    counts = COUNTS.setdefault(kind, Counts())
    problems: list[str] = []
    clean = _state(cluster.clean, "student")
    assert clean["ema_updates"] > 0
    # The labeled queues fill (and refresh prototypes); the unlabeled ones stay empty here: the
    # smoke detector's scores keep no pixel of the 12 unlabeled images reliable.
    assert clean["memory"][0]["labeled_count"].sum() > 0
    for name, root, run in _repetitions(cluster, kind, (at, until, without), counts):
        assert "resumed from step 3" in run.log, run.log[-5000:]
        faulty = _state(root, "student")
        assert faulty["step"] == 8
        if unequal := _unequal_state(clean, faulty):
            problems.append(f"{name}: {unequal[:5]} differ from the clean run")
        else:
            counts.equal_to_clean += 1
    assert (counts.ids_lost, counts.ids_duplicated) == (0, 0), asdict(counts)
    assert problems == []


@pytest.mark.parametrize("kind", sorted(INFERENCE_FAULTS))
def test_node_killed_under_inference_actors(cluster: Cluster, kind: str) -> None:
    """The node holding the detect (or teach) actors dies mid-stage, after some shards are
    committed: the actor is restarted on a replacement node, every image is labeled exactly
    once, and the tables equal the clean run's."""
    counts = COUNTS.setdefault(kind, Counts())
    problems: list[str] = []
    for name, root, _ in _repetitions(cluster, kind, INFERENCE_FAULTS[kind], counts):
        unequal = [
            table
            for table in IDS_TABLES
            if not _table(root, table).equals(_table(cluster.clean, table))
        ]
        if unequal:
            problems.append(f"{name}: {unequal} differ from the clean run")
        else:
            counts.equal_to_clean += 1
    assert (counts.ids_lost, counts.ids_duplicated) == (0, 0), asdict(counts)
    assert problems == []
