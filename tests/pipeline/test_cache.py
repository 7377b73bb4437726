"""The cache end to end on local Ray (in this process): reuse, partial reruns, new images, a run
killed during teach, ``plan`` and ``cache ls | verify | gc``.

One cold run builds a root; every test works on its own copy of that root (and of the source
folder where it changes it), so the tests do not depend on each other's order.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.cache.entries import iter_entries, output_dataset
from pipeline.cache.gc import collect_garbage
from pipeline.cache.plan import plan
from pipeline.cache.verify import verify_entry
from pipeline.config import PipelineConfig, load_config
from pipeline.provenance import git_commit
from pipeline.runner import RunSummary, run_pipeline
from pipeline.tracking import referenced_keys
from stages.core import codec
from stages.core.models import build_segmenter
from stages.core.shards import ShardPool, new_token, write_shard
from stages.core.storage import Storage
from stages.core.tables import DRIVER_SPLIT_BYTES
from stages.evaluate.config import EvaluateConfig
from stages.evaluate.models import evaluate_models
from stages.evaluate.quality import pseudolabel_quality
from stages.ingest.generated import GeneratedSpec, generate_dataset
from stages.segtrain import labeled_dataset, unlabeled_dataset
from tests.conftest import local_ray, run_cli, stage_outputs, write_png
from tests.servers import kill_with_env

pytestmark = pytest.mark.ray

STAGES = ("ingest", "train_teacher", "teach", "pseudolabel", "train_student", "evaluate")
UNLABELED = 16


@dataclass(frozen=True)
class World:
    folder: Path
    weights: Path
    root: Path
    cold: RunSummary
    splits: dict[str, list[str]]


def _config(world_or_folder: World | Path, weights: Path, *overrides: str) -> PipelineConfig:
    return load_config("smoke", [*_overrides(world_or_folder, weights), *overrides])


def _overrides(world_or_folder: World | Path, weights: Path) -> list[str]:
    folder = world_or_folder.folder if isinstance(world_or_folder, World) else world_or_folder
    return [
        "data.source=folder",
        f"data.root={folder}",
        "detector.enabled=false",
        f"teacher.weights={weights}",
        "student.steps=2",
        "teach.shard_rows=4",
        "data.max_bad_fraction=0.1",  # 2 of the 30 items are bad on purpose
    ]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    base = tmp_path_factory.mktemp("cache")
    folder = base / "data"
    spec = GeneratedSpec(
        seed=5, num_labeled=8, num_unlabeled=UNLABELED, num_val=4, image_size=32, num_classes=4
    )
    splits = generate_dataset(spec, folder)
    # Two bad items: quarantined, counted, and nothing else is lost.
    (folder / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    write_png(folder / "images" / "wrongsize.png", np.zeros((32, 32, 3), np.uint8))
    write_png(folder / "masks" / "wrongsize.png", np.zeros((16, 32), np.uint8))
    with open(folder / "splits" / "unlabeled.txt", "a") as handle:
        handle.write("corrupt\n")
    with open(folder / "splits" / "labeled.txt", "a") as handle:
        handle.write("wrongsize\n")
    weights = base / "teacher.pt"
    torch.save(
        build_segmenter(arch="lraspp_mobilenet_v3_large", num_classes=4).state_dict(), weights
    )
    root = base / "cold"
    with local_ray():
        cold = run_pipeline(_config(folder, weights), str(root))
        yield World(folder, weights, root, cold, splits)


def _expected_ids(folder: Path, stems: list[str]) -> set[str]:
    """Image ids computed here from the files: the pixel digest's first 24 hex characters."""
    return {
        codec.pixel_digest(codec.decode_png((folder / "images" / f"{stem}.png").read_bytes()))[:24]
        for stem in stems
    }


def _outputs(world: World) -> dict[str, dict]:
    return stage_outputs(world.root)


def _copy(world: World, tmp_path: Path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(world.root, root)
    return root


def _hits(summary: RunSummary) -> dict[str, bool]:
    return {stage: hit for stage, (_, hit) in summary.cache.items()}


def _stage_runs(root: Path, summary: RunSummary) -> dict[str, object]:
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs(
        [client.get_experiment_by_name("pseudoflow").experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{summary.mlflow_run_id}'",
    )
    return {r.data.tags["pseudoflow.stage"]: r for r in runs}


def test_cold_run_commits_every_stage_and_tags_its_runs(world: World) -> None:
    assert _hits(world.cold) == dict.fromkeys(STAGES, False)
    runs = _stage_runs(world.root, world.cold)
    assert set(runs) == set(STAGES)
    for stage, run in runs.items():
        assert run.data.tags["pseudoflow.cache_hit"] == "false"
        assert run.data.tags["pseudoflow.cache_key"] == world.cold.cache[stage][0]
    # The pipeline run: each stage's key as a tag (not a param), and where the code came from.
    parent = MlflowClient(tracking_uri=f"sqlite:///{world.root}/mlflow.db").get_run(
        world.cold.mlflow_run_id
    )
    assert {k: v for k, v in parent.data.tags.items() if k.startswith("pseudoflow.cache_key.")} == {
        f"pseudoflow.cache_key.{stage}": key for stage, (key, _) in world.cold.cache.items()
    }
    assert not [k for k in parent.data.params if k.startswith("cache_key")]
    # Params: the keys that are set and used, as flat scalars.
    params = parent.data.params
    assert params["data.source"] == "folder"
    assert params["pseudolabel.policy"] == "threshold"
    assert not [
        k for k in params if k.startswith(("data.voc.", "data.generated.", "pseudolabel.s4mc."))
    ]
    assert not [k for k, v in params.items() if v == "None" or "{" in v]
    student = runs["train_student"].data.params
    assert student["train_student.alpha"] == params["student.alpha"]
    assert not [k for k in student if k.startswith(("teacher.", "student."))]
    assert parent.data.tags["mlflow.source.git.commit"] == git_commit()
    assert parent.data.tags["mlflow.source.name"] == "pseudoflow run"
    entries = {e.stage: e for e in iter_entries(Storage(str(world.root)))}
    assert set(entries) == set(STAGES)
    assert entries["teach"].record["outputs"]["teacher_signals"]["rows"] == 8 + UNLABELED
    assert world.cold.metrics["teach.images_inferred"] == 8 + UNLABELED

    # The pseudo-label set and the image splits are MLflow dataset inputs of the runs using
    # them, with their content digests (those of the cache keys) and contexts.
    def inputs(stage: str) -> dict[str, tuple[str, str]]:
        return {
            d.dataset.name: (
                d.dataset.digest,
                {t.key: t.value for t in d.tags}["mlflow.data.context"],
            )
            for d in runs[stage].inputs.dataset_inputs
        }

    run_dir = world.root / "pipelines" / world.cold.run_id
    digests = stage_outputs(world.root, run_dir)["images"]["digests"]
    assert inputs("train_student") == {
        "pseudolabels-threshold": (world.cold.cache["pseudolabel"][0][:36], "train"),
        "images-labeled": (digests["labeled"][:36], "train"),
        "images-unlabeled": (digests["unlabeled"][:36], "train"),
    }
    assert inputs("evaluate") == {
        "images-val": (digests["val"][:36], "eval"),
        "images-unlabeled": (digests["unlabeled"][:36], "eval"),
    }
    assert set(inputs("teach")) == {"images-labeled", "images-unlabeled"}
    (labels,) = [
        d.dataset for d in runs["train_student"].inputs.dataset_inputs if d.dataset.name[0] == "p"
    ]
    assert json.loads(labels.profile)["rows"] == UNLABELED
    # Bad items are quarantined with their reason; every good item of every split is kept.
    storage = Storage(str(world.root))
    quarantine = output_dataset(storage, "quarantine", _outputs(world)["quarantine"])
    reasons = {r["stem"]: r["reason"] for r in quarantine.read_table().to_pylist()}
    assert set(reasons) == {"corrupt", "wrongsize"}
    assert "corrupt.png is not a readable PNG/JPEG image" in reasons["corrupt"]
    assert "wrongsize.png is 32x16 (WxH)" in reasons["wrongsize"]
    assert world.cold.metrics["ingest.quarantined_images"] == 2
    images = output_dataset(storage, "images", _outputs(world)["images"])
    rows = images.read_table(["image_id", "split"]).to_pylist()
    for split in ("labeled", "unlabeled", "val"):
        got = {r["image_id"] for r in rows if r["split"] == split}
        assert got == _expected_ids(world.folder, world.splits[split])
    # Pseudo-label quality, recomputed here by hand from the stored rows and the truth masks.
    truth = {
        r["image_id"]: codec.decode_png(r["mask"])
        for r in images.read_table(["image_id", "split", "mask"]).to_pylist()
        if r["split"] == "unlabeled"
    }
    labels = output_dataset(
        Storage(str(world.root)), "pseudolabels", _outputs(world)["pseudolabels"]
    )
    valid = kept = correct = 0
    for row in labels.read_table().to_pylist():
        mask = truth[row["image_id"]]
        keep = codec.unpack_mask(row["keep"], *mask.shape) & (mask != 255)
        valid += int((mask != 255).sum())
        kept += int(keep.sum())
        correct += int((keep & (codec.decode_png(row["label"]) == mask)).sum())
    assert world.cold.metrics["evaluate.pseudolabel_images_with_truth"] == UNLABELED
    assert world.cold.metrics["evaluate.pseudolabel_coverage"] == pytest.approx(kept / valid)
    if kept:
        assert world.cold.metrics["evaluate.pseudolabel_precision"] == pytest.approx(correct / kept)
    # Ray Train's own run folders are gone once the model is in its entry.
    train = world.root / "ray_train"
    assert (list(train.iterdir()) if train.exists() else []) == []


def test_unchanged_rerun_reuses_every_stage_with_zero_forwards(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _copy(world, tmp_path)

    def no_ray(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached rerun must not start any stage")

    def no_forward(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached rerun must not run a model")

    monkeypatch.setattr("pipeline.runner.init_ray", no_ray)
    monkeypatch.setattr(torch.nn.Module, "__call__", no_forward)
    again = run_pipeline(_config(world, world.weights), str(root))
    assert _hits(again) == dict.fromkeys(STAGES, True)
    assert {s: k for s, (k, _) in again.cache.items()} == {
        s: k for s, (k, _) in world.cold.cache.items()
    }
    assert again.metrics["evaluate.student_miou"] == world.cold.metrics["evaluate.student_miou"]
    runs = _stage_runs(root, again)
    assert {s: r.data.tags["pseudoflow.cache_hit"] for s, r in runs.items()} == dict.fromkeys(
        STAGES, "true"
    )


def test_policy_only_change_reruns_pseudolabel_and_what_follows(
    world: World, tmp_path: Path
) -> None:
    root = _copy(world, tmp_path)
    config = _config(world, world.weights, "pseudolabel.tau=0.5")
    rows = {r.stage: r for r in plan(config, str(root))}
    assert {s: rows[s].action for s in STAGES} == {
        "ingest": "reuse",
        "train_teacher": "reuse",
        "teach": "reuse",
        "pseudolabel": "run",
        "train_student": "run",
        "evaluate": "run",
    }
    assert "tau: 0.95 -> 0.5" in rows["pseudolabel"].reason
    assert (
        "its input pseudolabels comes from a stage that runs first" in rows["train_student"].reason
    )
    # Run up to the changed stage (the student's rerun is the next test's subject).
    summary = run_pipeline(config, str(root), until="pseudolabel")
    assert _hits(summary) == {
        "ingest": True,
        "train_teacher": True,
        "teach": True,
        "pseudolabel": False,
    }
    assert summary.cache["teach"][0] == world.cold.cache["teach"][0]
    assert rows["pseudolabel"].key == summary.cache["pseudolabel"][0]


def test_pseudolabel_execution_settings_reuse_every_stage(world: World, tmp_path: Path) -> None:
    root = _copy(world, tmp_path)
    config = _config(
        world, world.weights, "pseudolabel.batch_size=3", "pseudolabel.gpus_per_task=0.5"
    )
    actions = {r.stage: r.action for r in plan(config, str(root))}
    assert {s: actions[s] for s in STAGES} == dict.fromkeys(STAGES, "reuse")


def test_a_policy_reading_other_signals_reruns_teach_unless_they_are_stored(
    world: World, tmp_path: Path
) -> None:
    """The threshold run stored label and confidence only: S4MC needs its margins, so teach
    reruns; with ``teach.policies: [s4mc]`` they are stored once, and switching the policy
    to s4mc (or changing an S4MC option the teacher does not read) reuses that teach stage."""
    root = _copy(world, tmp_path)
    s4mc = _config(world, world.weights, "pseudolabel.policy=s4mc")
    rows = {r.stage: r for r in plan(s4mc, str(root))}
    assert rows["teach"].action == "run"
    assert "signals.margins: False -> True" in rows["teach"].reason
    both = _config(world, world.weights, "teach.policies=[s4mc]")
    stored = run_pipeline(both, str(root), until="teach")
    assert _hits(stored)["teach"] is False
    storage = Storage(str(root))
    signals = _signals(storage, stored)
    assert signals.num_rows == 8 + UNLABELED
    assert signals["refined_margin"].null_count == 0
    assert signals["dispersion"].null_count == signals.num_rows  # CSL's: not asked for
    switched = _config(
        world,
        world.weights,
        "teach.policies=[s4mc]",
        "pseudolabel.policy=s4mc",
        "pseudolabel.s4mc.alpha0=0.3",
    )
    summary = run_pipeline(switched, str(root), until="pseudolabel")
    assert _hits(summary)["teach"] is True
    assert summary.cache["teach"][0] == stored.cache["teach"][0]
    key = summary.cache["pseudolabel"][0]
    record = storage.read_json(storage.path("cache", "pseudolabel", key, "_ENTRY.json"))
    labels = output_dataset(storage, "pseudolabels", record["outputs"]["pseudolabels"])
    margins = labels.read_table(["margin", "refined_margin"]).to_pylist()
    assert len(margins) == UNLABELED
    assert all(r["margin"] is not None and r["refined_margin"] is not None for r in margins)
    # S4MC's refinement strength is computed by the teacher: a new beta reruns teach
    beta = _config(
        world,
        world.weights,
        "teach.policies=[s4mc]",
        "pseudolabel.policy=s4mc",
        "pseudolabel.s4mc.beta=0.5",
    )
    assert {r.stage: r.action for r in plan(beta, str(root))}["teach"] == "run"


def test_student_only_change_reruns_only_the_student(world: World, tmp_path: Path) -> None:
    root = _copy(world, tmp_path)
    changed = _config(world, world.weights, "student.lr=0.01")
    assert {r.stage: r.action for r in plan(changed, str(root))}["evaluate"] == "run"
    summary = run_pipeline(changed, str(root), until="train_student")
    assert _hits(summary) == {
        "ingest": True,
        "train_teacher": True,
        "teach": True,
        "pseudolabel": True,
        "train_student": False,
    }
    # Execution-only knobs do not change a key: this rerun of the same config reuses all.
    same = run_pipeline(
        _config(world, world.weights, "student.lr=0.01", "teach.batch_size=3", "teach.actors=2"),
        str(root),
        until="train_student",
    )
    assert all(_hits(same).values())
    assert same.cache["train_student"][0] == summary.cache["train_student"][0]
    # the gpu overlay sets only how things run: on GPUs the same run reuses every entry
    gpu = load_config("smoke,gpu", [*_overrides(world, world.weights), "student.lr=0.01"])
    assert gpu.runtime.use_gpu
    assert gpu.teach.gpus_per_actor == 1.0
    assert {r.stage: r.action for r in plan(gpu, str(root)) if r.action != "skip"} == {
        "ingest": "reuse",
        "train_teacher": "reuse",
        "teach": "reuse",
        "pseudolabel": "reuse",
        "train_student": "reuse",
        "evaluate": "run",
    }


def test_second_round_reuses_round_one_and_learns_from_its_student(
    world: World, tmp_path: Path
) -> None:
    root = _copy(world, tmp_path)
    config = _config(world, world.weights, "rounds=2")
    summary = run_pipeline(config, str(root))
    assert _hits(summary) == {
        **dict.fromkeys(STAGES[:-1], True),
        "teach_r2": False,
        "pseudolabel_r2": False,
        "train_student_r2": False,
        "evaluate": False,
    }
    outputs = stage_outputs(root, root / "pipelines" / summary.run_id)
    entries = {e.stage: e.record for e in iter_entries(Storage(str(root)))}
    # round 2's teacher is round 1's student: its teach entry is keyed on that checkpoint
    assert entries["teach_r2"]["fields"]["teacher"] == outputs["student"]["sha256"]
    assert entries["teach_r2"]["outputs"]["teacher_signals_r2"]["rows"] == 8 + UNLABELED
    assert entries["pseudolabel_r2"]["outputs"]["pseudolabels_r2"]["rows"] == UNLABELED
    assert (
        entries["train_student_r2"]["fields"]["pseudolabels"] == summary.cache["pseudolabel_r2"][0]
    )
    metrics = summary.metrics
    for name in (
        "student_miou",
        "student_r1_miou",
        "pseudolabel_coverage",
        "pseudolabel_r2_coverage",
    ):
        assert f"evaluate.{name}" in metrics
    # the round-1 student is the run with one round's student, evaluated again
    assert metrics["evaluate.student_r1_miou"] == world.cold.metrics["evaluate.student_miou"]
    runs = _stage_runs(root, summary)
    assert {"teach_r2", "pseudolabel_r2", "train_student_r2"} <= set(runs)
    inputs = runs["train_student_r2"].inputs.dataset_inputs
    assert sorted(i.dataset.name for i in inputs) == [
        "images-labeled",
        "images-unlabeled",
        "pseudolabels_r2-threshold",
    ]


def test_new_images_are_the_only_ones_inferred(world: World, tmp_path: Path) -> None:
    root = _copy(world, tmp_path)
    folder = tmp_path / "data"
    shutil.copytree(world.folder, folder)
    extra = tmp_path / "extra"
    generate_dataset(
        GeneratedSpec(seed=99, num_labeled=0, num_unlabeled=6, num_val=0, image_size=32), extra
    )
    new_stems = [f"new{n}" for n in range(6)]
    for n, path in enumerate(sorted((extra / "images").iterdir())):
        shutil.copy(path, folder / "images" / f"new{n}.png")
    with open(folder / "splits" / "unlabeled.txt", "a") as handle:
        handle.write("".join(f"{s}\n" for s in new_stems))

    summary = run_pipeline(_config(folder, world.weights), str(root), until="teach")
    assert _hits(summary) == {"ingest": False, "train_teacher": True, "teach": False}
    assert summary.metrics["teach.images_inferred"] == 6
    storage = Storage(str(root))
    old = _teach_files(storage, world.cold)
    new = _teach_files(storage, summary)
    assert summary.metrics["teach.shards_reused"] == len(old) == 6  # 24 rows / 4 per shard
    assert old < new  # the new key references every old shard, plus the new ones
    table = _signals(storage, summary)
    assert table.num_rows == 8 + UNLABELED + 6
    assert len(set(table["image_id"].to_pylist())) == table.num_rows


def _teach_record(storage: Storage, summary: RunSummary) -> dict:
    key = summary.cache["teach"][0]
    return storage.read_json(storage.path("cache", "teach", key, "_ENTRY.json"))


def _teach_files(storage: Storage, summary: RunSummary) -> set[str]:
    output = _teach_record(storage, summary)["outputs"]["teacher_signals"]
    return set(output_dataset(storage, "teacher_signals", output).files())


def _signals(storage: Storage, summary: RunSummary):
    output = _teach_record(storage, summary)["outputs"]["teacher_signals"]
    table = output_dataset(storage, "teacher_signals", output).read_table()
    return table.sort_by("image_id")


def test_run_killed_during_teach_resumes_and_ends_equal_to_a_clean_run(
    world: World, tmp_path: Path, ray_env: dict[str, str]
) -> None:
    root = _copy(world, tmp_path)
    clean_root = _copy(world, tmp_path / "clean")
    # A larger model input (a new teach family) makes each image slow enough to kill mid-stage.
    overrides = ["data.image_size=384", "teach.batch_size=1", "teach.shard_rows=1"]
    config = _config(world, world.weights, *overrides)
    args = ["run", "--config", "smoke", "--root", str(root), "--until", "teach"]
    for item in [
        "data.source=folder",
        f"data.root={world.folder}",
        "detector.enabled=false",
        f"teacher.weights={world.weights}",
        "student.steps=2",
        *overrides,
    ]:
        args += ["--set", item]
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        env=ray_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    pool_root = root / "cache" / "teach" / "pool"
    before = set(pool_root.glob("*/*.json"))  # the cold run's shards (another family)

    def new_shards() -> int:
        return len(set(pool_root.glob("*/*.json")) - before)

    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if new_shards() >= 3:
                break
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the driver and the Ray it started
        process.wait()
        kill_with_env("RAY_AUTH_TOKEN", ray_env["RAY_AUTH_TOKEN"])  # Ray outside the group
    committed = new_shards()  # no process of the killed run is left to commit another
    assert 3 <= committed < 8 + UNLABELED, "the kill must land while teach is running"
    teach_dirs = [p for p in (root / "cache" / "teach").iterdir() if p.name != "pool"]
    committed_keys = [p.name for p in teach_dirs if (p / "_ENTRY.json").exists()]
    assert committed_keys == [world.cold.cache["teach"][0]]  # the killed run committed nothing

    resumed = run_pipeline(config, str(root), until="teach")
    assert resumed.metrics["teach.shards_reused"] == committed
    assert resumed.metrics["teach.images_inferred"] == 8 + UNLABELED - committed
    clean = run_pipeline(config, str(clean_root), until="teach")
    assert clean.cache["teach"][0] == resumed.cache["teach"][0]
    assert clean.metrics["teach.images_inferred"] == 8 + UNLABELED
    got = _signals(Storage(str(root)), resumed)
    want = _signals(Storage(str(clean_root)), clean)
    assert got.num_rows == want.num_rows == 8 + UNLABELED
    assert got["image_id"].equals(want["image_id"])
    for name in ("label", "conf", "margin", "refined_margin", "dispersion"):
        assert got[name].equals(want[name]), name


def test_cache_ls_verify_and_gc(world: World, tmp_path: Path) -> None:
    root = _copy(world, tmp_path)
    storage = Storage(str(root))
    uri = f"sqlite:///{root}/mlflow.db"

    listing = run_cli("cache", "ls", "--root", str(root))
    assert listing.returncode == 0, listing.stderr
    assert f"{len(STAGES)} entries" in listing.stdout
    assert "teacher_signals (24 rows)" in listing.stdout
    assert run_cli("cache", "verify", "--root", str(root)).returncode == 0

    # Nothing is garbage while every entry's run exists (fresh leftovers are kept too).
    pool = ShardPool(storage, next((root / "cache" / "teach" / "pool").iterdir()).as_posix(), "x")
    fresh = write_shard(_rows(["zz"]), **pool.writer_kwargs(new_token()))["shard"][0].as_py()
    assert collect_garbage(storage, referenced_keys(uri), min_age_s=3600, delete=False) == []
    # An old unreferenced shard and the evaluate entry, once its runs are deleted, are garbage.
    os.utime(fresh, (time.time() - 7200, time.time() - 7200))
    client = MlflowClient(tracking_uri=uri)
    for run in client.search_runs(
        [client.get_experiment_by_name("pseudoflow").experiment_id],
        filter_string="tags.`pseudoflow.stage` = 'evaluate'",
    ):
        client.delete_run(run.info.run_id)
    evaluate_dir = storage.path("cache", "evaluate", world.cold.cache["evaluate"][0])
    # An unreferenced entry younger than --min-age is kept: a run may be reusing it.
    young = collect_garbage(storage, referenced_keys(uri), min_age_s=3600, delete=False)
    assert {g.path for g in young} == {fresh, fresh.removesuffix(".parquet") + ".json"}
    old = time.time() - 7200
    for path in [evaluate_dir, *(str(p) for p in Path(evaluate_dir).rglob("*"))]:
        os.utime(path, (old, old))
    dry = collect_garbage(storage, referenced_keys(uri), min_age_s=3600, delete=False)
    assert {g.path for g in dry} == {fresh, fresh.removesuffix(".parquet") + ".json", evaluate_dir}
    assert Path(evaluate_dir).exists()  # a dry run deletes nothing
    result = run_cli("cache", "gc", "--root", str(root), "--min-age", "1", "--delete")
    assert result.returncode == 0, result.stderr
    assert not Path(evaluate_dir).exists()
    assert not Path(fresh).exists()
    assert {e.stage for e in iter_entries(storage)} == set(STAGES) - {"evaluate"}

    # verify catches a deleted shard and a truncated one.
    assert run_cli("cache", "verify", "--root", str(root)).returncode == 0
    shards = sorted(_teach_files(storage, world.cold))
    Path(shards[0]).unlink()
    Path(shards[1]).write_bytes(Path(shards[1]).read_bytes()[:100])
    entry = next(e for e in iter_entries(storage) if e.stage == "teach")
    problems = verify_entry(storage, entry)
    assert len(problems) == 1
    assert "teacher_signals" in problems[0]
    result = run_cli("cache", "verify", "--root", str(root))
    assert result.returncode == 1
    assert "DAMAGED teach" in result.stdout
    assert "1 damaged" in result.stdout


def _rows(ids: list[str]):
    import pyarrow as pa

    return pa.table({"image_id": ids, "value": list(range(len(ids)))})


def _blocks(dataset: Any) -> list[dict[str, np.ndarray]]:
    import ray
    from ray.data.block import BlockAccessor

    refs = [ref for bundle in dataset.iter_internal_ref_bundles() for ref in bundle.block_refs]
    return [BlockAccessor.for_block(ray.get(ref)).to_batch_format("numpy") for ref in refs]


def test_small_splits_on_the_driver_give_what_ray_data_gives(world: World) -> None:
    """The labeled and the unlabeled training sets of small splits are decoded on the driver:
    the same blocks, columns and values as through Ray Data's read, join, sort and map. The val
    scores and the pseudo-label quality computed there are those of Ray Data's path too."""
    storage, outputs = Storage(str(world.root)), _outputs(world)
    images = output_dataset(storage, "images", outputs["images"])
    labels = output_dataset(storage, "pseudolabels", outputs["pseudolabels"])
    builds = {
        "labeled": functools.partial(labeled_dataset, images, 32),
        "unlabeled": functools.partial(unlabeled_dataset, images, labels, 32),
    }
    for name, build in builds.items():
        ray_data, driver = (_blocks(build(driver_bytes=b)) for b in (0, DRIVER_SPLIT_BYTES))
        rows = 8 if name == "labeled" else UNLABELED  # the bad items quarantined
        assert [len(b["image"]) for b in driver] == [len(b["image"]) for b in ray_data] == [rows]
        for ours, theirs in zip(driver, ray_data, strict=True):
            assert ours.keys() == theirs.keys(), name
            for column in ours:
                assert ours[column].dtype == theirs[column].dtype, (name, column)
                assert np.array_equal(ours[column], theirs[column]), (name, column)
    checkpoints = {n: storage.resolve(_outputs(world)[n]["path"]) for n in ("teacher", "student")}
    scores = [
        evaluate_models(
            EvaluateConfig(),
            images=images,
            checkpoints=checkpoints,
            num_classes=4,
            image_size=32,
            driver_bytes=b,
        )
        for b in (0, DRIVER_SPLIT_BYTES)
    ]
    assert scores[0] == scores[1]
    assert scores[0]["teacher"]["val_pixels"] == 4 * 32 * 32
    names = _config(world, world.weights).data.names()
    quality = [
        pseudolabel_quality(images, labels, names, driver_bytes=b) for b in (0, DRIVER_SPLIT_BYTES)
    ]
    assert quality[0] == quality[1]
    assert quality[0]["pseudolabel_images_with_truth"] == UNLABELED
    # what the run's evaluate stage logged: the totals, and per class of the ground truth
    logged = {
        k.removeprefix("evaluate."): v
        for k, v in world.cold.metrics.items()
        if k.startswith("evaluate.pseudolabel_")
    }
    assert quality[0] == logged
    assert {f"pseudolabel_recall.{n}" for n in names} <= logged.keys()
