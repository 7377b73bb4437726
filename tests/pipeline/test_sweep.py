"""``pseudoflow sweep``: the plan (rows, seeds, configs checked together), the table's numbers by
hand, its files, and the MLflow parent run with a stand-in pipeline (no Ray: the runs' figures are
given). Real pipeline runs of a sweep: tests/pipeline/test_sweep_runs.py."""

from __future__ import annotations

import csv
import io
import json
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.config import ConfigError, load_config
from pipeline.runner import RunSummary
from pipeline.source import source_items
from pipeline.sweep.grid import (
    dependencies,
    expand,
    parse_grid,
    row_name,
    unusable_references,
    with_sweep,
)
from pipeline.sweep.plot import sweep_plot
from pipeline.sweep.run import ROW_TAG, SWEEP_TAG, run_sweep
from pipeline.sweep.table import RunOutcome, format_table, row_metrics, summarize, to_csv
from pipeline.tracking import Tracker
from stages.core.errors import SourceError
from stages.core.storage import Storage
from tests.conftest import write_png


def _smoke(tmp_path: Path, *overrides: str) -> Any:
    return load_config("smoke", [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *overrides])


def test_grid_values_are_read_as_yaml() -> None:
    grid = parse_grid(["pseudolabel.tau=0.9,0.95", "pseudolabel.policy=s4mc,csl", "rounds=1,2"])
    assert grid == {
        "pseudolabel.tau": [0.9, 0.95],
        "pseudolabel.policy": ["s4mc", "csl"],
        "rounds": [1, 2],
    }


@pytest.mark.parametrize("item", ["pseudolabel.tau", "=1,2", "rounds=1,,2", "rounds="])
def test_a_malformed_grid_axis_is_named(item: str) -> None:
    with pytest.raises(ConfigError, match="expected KEY=V1,V2"):
        parse_grid([item])


def test_an_axis_given_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match="rounds is given twice"):
        parse_grid(["rounds=1,2", "rounds=3"])


def test_runs_are_the_cross_product_per_seed_references_first(tmp_path: Path) -> None:
    config = with_sweep(
        _smoke(tmp_path, "seed=7"),
        parse_grid(["pseudolabel.policy=threshold,s4mc", "rounds=1,2"]),
        seeds=2,
    )
    runs = expand(config, ["supervised"])
    names = [
        "supervised",
        *[f"policy={p} rounds={r}" for p in ("threshold", "s4mc") for r in (1, 2)],
    ]
    assert [(r.row, r.seed) for r in runs] == [(n, s) for s in (7, 8) for n in names]
    by_row = {(r.row, r.seed): r.config for r in runs}
    assert by_row["supervised", 8].student.alpha == 0.0
    assert by_row["supervised", 8].seed == 8
    assert by_row["policy=s4mc rounds=2", 7].pseudolabel.policy == "s4mc"
    assert by_row["policy=s4mc rounds=2", 7].rounds == 2
    assert by_row["policy=threshold rounds=1", 7].rounds == 1
    # the grid sweeps the policy: one teach (every policy's signals) serves every row
    assert {tuple(c.teach.policies) for c in by_row.values()} == {
        ("threshold", "s4mc", "csl", "wpl")
    }
    assert all(c.sweep.grid == {} for c in by_row.values())  # each run is a plain run


def test_a_set_teach_policies_is_kept(tmp_path: Path) -> None:
    config = with_sweep(
        _smoke(tmp_path, "teach.policies=[s4mc]"),
        parse_grid(["pseudolabel.policy=threshold,s4mc"]),
        references=False,
    )
    assert {tuple(r.config.teach.policies) for r in expand(config)} == {("s4mc",)}


@pytest.mark.parametrize(
    ("cores", "parallel", "given", "threads"),
    [(8, 3, None, 2), (2, 3, None, 1), (2, 1, None, None), (8, 4, "runtime.torch_threads=4", 4)],
)
def test_parallel_runs_share_the_cores_where_torch_threads_is_unset(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cores: int,
    parallel: int,
    given: str | None,
    threads: int | None,
) -> None:
    """Runs at once each get cores // parallel torch threads (at least 1); one run at a time
    keeps the default (every core), and a value given in config is kept."""
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    config = with_sweep(
        _smoke(tmp_path, *([given] if given else [])),
        parse_grid(["pseudolabel.policy=threshold,s4mc"]),
        references=False,
        parallel=parallel,
    )
    assert {r.config.runtime.torch_threads for r in expand(config)} == {threads}


def test_every_bad_row_is_reported_before_anything_runs(tmp_path: Path) -> None:
    config = with_sweep(
        _smoke(tmp_path, "detector.enabled=false"),
        parse_grid(["pseudolabel.policy=threshold,wpl", "student.lr=0.1,-1"]),
        seeds=3,
        references=False,
    )
    with pytest.raises(ConfigError) as caught:
        expand(config)
    problems = caught.value.problems
    assert len(problems) == 3, problems  # said once, not once per seed
    # pydantic checks the fields first: wpl's missing detections is said where lr is valid
    assert sum("'policy=wpl lr=0.1'" in p and "needs detections" in p for p in problems) == 1
    assert sum("lr=-1'" in p and "student.lr" in p for p in problems) == 2


def test_a_sweep_without_rows_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no rows"):
        expand(with_sweep(_smoke(tmp_path), references=False))


def test_row_names_keep_whole_keys_where_leaves_clash() -> None:
    assert row_name({"teacher.lr": 0.1, "student.lr": 0.2}) == "teacher.lr=0.1 student.lr=0.2"
    assert row_name({"pseudolabel.tau": 0.9, "rounds": 2}) == "tau=0.9 rounds=2"


def _outcome(row: str, seed: int, miou: float | None, **kw: Any) -> RunOutcome:
    return RunOutcome(
        row, row in {"supervised", "full"}, seed, f"run-{row}-{seed}", miou=miou, **kw
    )


def test_table_by_hand() -> None:
    outcomes = [
        _outcome("supervised", 0, 0.50),
        _outcome("supervised", 1, 0.54),
        _outcome("full", 0, 0.70),
        _outcome("full", 1, 0.74),
        _outcome(
            "s4mc",
            0,
            0.60,
            coverage=0.8,
            precision=0.9,
            weighted_precision=0.95,
            recall_per_class={"background": 0.7, "disc": 0.2},
            precision_per_class={"background": 0.9},
            stages_run=4,
            stages_reused=4,
        ),
        _outcome(
            "s4mc",
            1,
            0.64,
            coverage=0.6,
            precision=0.7,
            weighted_precision=0.85,
            recall_per_class={"background": 0.5, "disc": 0.4, "ring": 0.1},
            precision_per_class={"background": 0.7, "ring": 0.3},
            stages_run=3,
            stages_reused=5,
        ),
        _outcome("csl", 0, None, error="boom"),
        _outcome("csl", 1, 0.56, coverage=0.5, precision=0.5),
    ]
    rows = {row["row"]: row for row in summarize(outcomes)}
    assert list(rows) == ["supervised", "full", "s4mc", "csl"]
    s4mc = rows["s4mc"]
    assert s4mc["miou_mean"] == pytest.approx(0.62)
    assert s4mc["miou_std"] == pytest.approx(0.0282843, abs=1e-6)  # sample std of 0.60, 0.64
    assert s4mc["gap_closing"] == pytest.approx((0.62 - 0.52) / (0.72 - 0.52))  # 0.5
    assert (s4mc["coverage"], s4mc["precision"]) == (pytest.approx(0.7), pytest.approx(0.8))
    assert (s4mc["stages_run"], s4mc["stages_reused"]) == (7, 9)
    assert s4mc["weighted_precision"] == pytest.approx(0.9)
    # per class: the mean over the seeds that have the class
    assert s4mc["recall_per_class"] == pytest.approx({"background": 0.6, "disc": 0.3, "ring": 0.1})
    assert s4mc["precision_per_class"] == pytest.approx({"background": 0.8, "ring": 0.3})
    assert rows["supervised"]["recall_per_class"] == {}
    assert rows["supervised"]["gap_closing"] == pytest.approx(0.0)
    assert rows["full"]["gap_closing"] == pytest.approx(1.0)
    csl = rows["csl"]  # one seed failed: the mean is the other's, the failure named
    assert (csl["miou_mean"], csl["miou_std"], csl["seeds"]) == (0.56, 0.0, [1])
    assert csl["failed"] == {"0": "boom"}
    assert csl["gap_closing"] == pytest.approx(0.2)
    text = format_table(list(rows.values()))
    assert "0.6200 ± 0.0283" in text
    assert "0.500" in text
    assert "0.5600 ± 0.0000 (1)" in text
    table = list(csv.DictReader(io.StringIO(to_csv(list(rows.values())))))
    assert [r["row"] for r in table] == ["supervised", "full", "s4mc", "csl"]
    assert table[2]["gap_closing"] == str(s4mc["gap_closing"])
    assert table[2]["seeds"] == "2"
    assert table[0]["coverage"] == ""
    assert table[3]["failed"] == "0"
    assert table[2]["recall.ring"] == str(s4mc["recall_per_class"]["ring"])
    assert "precision.disc" not in table[2]  # no row kept a pixel labelled disc
    assert table[3]["precision.ring"] == ""
    assert (table[0]["recall.disc"], table[0]["weighted_precision"]) == ("", "")
    metrics = row_metrics([rows["s4mc"]])
    assert metrics["s4mc.miou_mean"] == pytest.approx(0.62)
    assert metrics["s4mc.weighted_precision"] == pytest.approx(0.9)
    assert metrics["s4mc.recall.disc"] == pytest.approx(0.3)
    assert row_metrics([{**rows["csl"], "row": "policy=csl rounds=2"}]).keys() >= {
        "policy-csl_rounds-2.miou_mean"
    }


def test_the_gain_over_supervised_is_paired_by_seed() -> None:
    # x - supervised per seed: +0.02, -0.01, +0.06 (seed 3 has no supervised run, seed 1's x
    # failed): mean 0.07 / 3 = 0.023333, sample std sqrt(0.0024667 / 2) = 0.035119. Unpaired, the
    # means would differ by 0.6233 - 0.5833 = 0.04.
    outcomes = [
        _outcome("supervised", 0, 0.60),
        _outcome("supervised", 1, 0.56),
        _outcome("supervised", 2, 0.64),
        _outcome("supervised", 4, 0.50),
        _outcome("x", 0, 0.62),
        _outcome("x", 1, 0.55),
        _outcome("x", 2, 0.70),
        _outcome("x", 3, 0.90),
        _outcome("y", 4, None, error="boom"),
    ]
    rows = {row["row"]: row for row in summarize(outcomes)}
    x = rows["x"]
    assert x["gain_mean"] == pytest.approx(0.0233333, abs=1e-6)
    assert x["gain_std"] == pytest.approx(0.0351188, abs=1e-6)
    assert x["gain_seeds"] == 3
    assert (rows["supervised"]["gain_mean"], rows["supervised"]["gain_seeds"]) == (None, 0)
    assert (rows["y"]["gain_mean"], rows["y"]["gain_std"]) == (None, None)
    assert "+0.0233 ± 0.0351" in format_table(list(rows.values()))
    table = list(csv.DictReader(io.StringIO(to_csv(list(rows.values())))))
    assert table[1]["gain_mean"] == str(x["gain_mean"])
    assert table[0]["gain_mean"] == ""
    metrics = row_metrics(list(rows.values()))
    assert metrics["x.gain_std"] == pytest.approx(0.0351188, abs=1e-6)
    assert "supervised.gain_mean" not in metrics
    alone = {row["row"]: row for row in summarize(outcomes[4:8])}  # no supervised row
    assert alone["x"]["gain_mean"] is None


def test_the_sweep_plot_gets_a_panel_of_paired_gains_where_supervised_ran() -> None:
    with_supervised = summarize([_outcome("supervised", 0, 0.5), _outcome("x", 0, 0.6)])
    without = summarize([_outcome("full", 0, 0.7), _outcome("x", 0, 0.6)])
    widths = [
        Image.open(io.BytesIO(sweep_plot(rows))).size[0] for rows in (with_supervised, without)
    ]
    assert widths[0] == 2 * widths[1]


def test_per_seed_figures_follow_the_seeds_not_the_order_runs_ended() -> None:
    outcomes = [_outcome("x", 2, 0.3), _outcome("x", 0, 0.1), _outcome("x", 1, 0.2)]
    (row,) = summarize(outcomes)
    assert (row["seeds"], row["miou_per_seed"]) == ([0, 1, 2], [0.1, 0.2, 0.3])
    assert row["runs"] == ["run-x-0", "run-x-1", "run-x-2"]


def test_no_gap_closing_without_a_gap() -> None:
    outcomes = [_outcome("supervised", 0, 0.6), _outcome("full", 0, 0.55), _outcome("x", 0, 0.7)]
    assert all(row["gap_closing"] is None for row in summarize(outcomes))
    assert all(row["gap_closing"] is None for row in summarize([_outcome("x", 0, 0.7)]))


def test_rows_keep_the_plans_order_whatever_ends_first() -> None:
    outcomes = [_outcome("b", 0, 0.5), _outcome("c", 0, 0.5), _outcome("a", 0, 0.5)]
    assert [r["row"] for r in summarize(outcomes, ["a", "b", "z", "c"])] == ["a", "b", "c"]


def _folder_source(root: Path, masked_unlabeled: bool) -> None:
    """A folder source with split lists: 2 labeled, 2 unlabeled (the first with a mask where
    ``masked_unlabeled``), 2 val images."""
    import numpy as np

    for split in ("labeled", "unlabeled", "val"):
        stems = [f"{split}{i}" for i in range(2)]
        (root / "splits").mkdir(parents=True, exist_ok=True)
        (root / "splits" / f"{split}.txt").write_text("\n".join(stems) + "\n")
        for i, stem in enumerate(stems):
            write_png(root / "images" / f"{stem}.png", np.full((8, 8, 3), 40 * i, np.uint8))
            if split != "unlabeled" or (masked_unlabeled and i == 0):
                write_png(root / "masks" / f"{stem}.png", np.zeros((8, 8), np.uint8))


@pytest.mark.parametrize("masked", [True, False])
def test_ground_truth_references_need_the_unlabeled_masks(tmp_path: Path, masked: bool) -> None:
    source = tmp_path / "source"
    _folder_source(source, masked)
    config = _smoke(tmp_path, "data.source=folder", f"data.root={source}", "data.num_classes=2")
    items, _ = source_items(config, Storage(str(tmp_path / "root")))
    unusable = unusable_references(config, items)
    # one or both unlabeled images have no mask: full (ground_truth) cannot run, supervised can
    assert list(unusable) == ["full"]
    missing = "1 of 2" if masked else "2 of 2"
    example = "unlabeled1" if masked else "unlabeled0"
    assert f"{missing} unlabeled images have no mask (e.g. {example!r})" in unusable["full"]


def test_ground_truth_references_run_where_every_unlabeled_image_has_a_mask(
    tmp_path: Path,
) -> None:
    config = _smoke(tmp_path)
    items, _ = source_items(config, Storage(str(tmp_path / "root")))
    assert unusable_references(config, items) == {}


def test_the_sweep_run_holds_its_pipeline_runs_and_table(tmp_path: Path) -> None:
    """A stand-in pipeline (no Ray) that logs a nested run as run_pipeline does: the sweep's
    MLflow run, its children, its files under the root and in MLflow, the failed run counted."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = with_sweep(
        _smoke(tmp_path), parse_grid(["pseudolabel.tau=0.8,0.9"]), seeds=2, references=False
    )
    figures = {(0.8, 0): 0.61, (0.8, 1): 0.63, (0.9, 0): 0.52}  # tau 0.9, seed 1 fails

    def pipeline(
        config: Any,
        root: str,
        until: str | None = None,
        *,
        parent_id: str,
        tags: dict[str, str],
        source: Any,
    ) -> RunSummary:
        tracker = Tracker(uri, config.tracking.experiment)
        run = tracker.start_run("child", tags, parent_id=parent_id)
        tracker.end_run(run)
        miou = figures.get((config.pseudolabel.tau, config.seed))
        if miou is None:
            raise RuntimeError("no figure")
        summary = RunSummary(f"p-{config.seed}", run, uri, root)
        summary.metrics = {
            "evaluate.student_miou": miou,
            "evaluate.pseudolabel_coverage": config.pseudolabel.tau,
        }
        summary.cache = {"ingest": ("k", True), "train_student": ("k2", False)}
        return summary

    result = run_sweep(config, str(tmp_path / "root"), run=pipeline)
    rows = {row["row"]: row for row in result.rows}
    assert rows["tau=0.8"]["miou_mean"] == pytest.approx(0.62)
    assert rows["tau=0.9"]["failed"] == {"1": "no figure"}
    assert rows["tau=0.9"]["seeds"] == [0]
    assert [o.seed for o in result.failed] == [1]
    client = MlflowClient(tracking_uri=uri)
    sweep_run = client.get_run(result.mlflow_run_id)
    assert sweep_run.info.status == "FAILED"  # one of its runs failed
    assert sweep_run.data.tags[SWEEP_TAG] == result.sweep_id
    assert sweep_run.data.params["grid.pseudolabel.tau"] == "0.8,0.9"
    assert sweep_run.data.metrics["tau-0.8.miou_mean"] == pytest.approx(0.62)
    assert sweep_run.data.metrics["failed_runs"] == 1.0
    children = client.search_runs(
        [sweep_run.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result.mlflow_run_id}'",
    )
    assert sorted(c.data.tags[ROW_TAG] for c in children) == ["tau=0.8"] * 2 + ["tau=0.9"] * 2
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id)}
    assert artifacts >= {"sweep.json", "sweep.csv", "sweep.txt", "sweep.png", "config.yaml"}
    folder = Path(result.folder)
    document = json.loads((folder / "sweep.json").read_text())
    assert [r["row"] for r in document["rows"]] == ["tau=0.8", "tau=0.9"]
    assert len(document["runs"]) == 4
    assert (folder / "sweep.png").read_bytes().startswith(b"\x89PNG")


def test_runs_in_parallel_wait_for_what_they_share(tmp_path: Path) -> None:
    config = with_sweep(
        _smoke(tmp_path), parse_grid(["pseudolabel.tau=0.8,0.9", "rounds=1,2"]), seeds=2
    )
    runs = expand(config, ["supervised"])
    names = [r.label for r in runs]
    assert names[:5] == [
        "supervised (seed 0)",
        "tau=0.8 rounds=1 (seed 0)",
        "tau=0.8 rounds=2 (seed 0)",
        "tau=0.9 rounds=1 (seed 0)",
        "tau=0.9 rounds=2 (seed 0)",
    ]
    waits = dependencies(runs)
    # each seed's first run (supervised) alone; round 2 after round 1 of the same settings
    assert waits[:5] == [set(), {0}, {0, 1}, {0}, {0, 3}]
    assert waits[5:] == [set(), {5}, {5, 6}, {5}, {5, 8}]


def test_a_parallel_sweep_starts_each_run_after_those_it_waits_for(tmp_path: Path) -> None:
    import threading
    import time

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = with_sweep(
        _smoke(tmp_path, "sweep.parallel=3"),
        parse_grid(["pseudolabel.tau=0.8,0.9", "rounds=1,2"]),
        seeds=2,
        references=False,
    )
    events: list[tuple[str, str]] = []
    lock = threading.Lock()
    running = [0, 0]  # now, most at once
    both_firsts = threading.Barrier(2, timeout=30)

    def pipeline(
        config: Any,
        root: str,
        until: str | None = None,
        *,
        parent_id: str,
        tags: dict[str, str],
        source: Any,
    ) -> RunSummary:
        name = "ingest" if until else f"{tags[ROW_TAG]} (seed {config.seed})"
        with lock:
            events.append(("start", name))
            running[0] += 1
            running[1] = max(running)
        if name.startswith("tau=0.8 rounds=1"):  # each seed's first: both run at once, or fail
            both_firsts.wait()
        time.sleep(0.2)
        with lock:
            events.append(("end", name))
            running[0] -= 1
        summary = RunSummary(name, "", uri, root)
        summary.metrics = {"evaluate.student_miou": 0.5}
        return summary

    result = run_sweep(config, str(tmp_path / "root"), run=pipeline)
    assert len(result.outcomes) == 8
    assert [r["row"] for r in result.rows] == [
        f"tau={t} rounds={r}" for t in (0.8, 0.9) for r in (1, 2)
    ]
    assert not result.failed
    assert events[:2] == [("start", "ingest"), ("end", "ingest")]  # shared by every run
    runs = expand(config)
    order = [name for kind, name in events if kind == "start"][1:]
    ended = {name: i for i, (kind, name) in enumerate(events) if kind == "end"}
    started = {name: i for i, (kind, name) in enumerate(events) if kind == "start"}
    assert sorted(order) == sorted(r.label for r in runs)
    for index, wait_for in enumerate(dependencies(runs)):
        for earlier in wait_for:
            assert ended[runs[earlier].label] < started[runs[index].label]
    assert running[1] <= 3  # never more than sweep.parallel at once


def test_each_data_section_is_listed_once_and_each_run_checked_against_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs get the sweep's listing of their own data (not one listing per run: at a million
    images a listing takes minutes); a grid axis over data.* gets its own listing, and its
    splits are checked against it before anything runs."""
    import pipeline.sweep.run as sweep_module

    listed: list[int] = []
    real = sweep_module.source_items

    def counting(config: Any, storage: Storage) -> Any:
        listed.append(config.data.generated.num_unlabeled)
        return real(config, storage)

    monkeypatch.setattr(sweep_module, "source_items", counting)
    given: list[tuple[int, int]] = []

    def pipeline(config: Any, root: str, until: str | None = None, **kw: Any) -> RunSummary:
        items, _ = kw["source"]
        given.append(
            (config.data.generated.num_unlabeled, sum(i.split == "unlabeled" for i in items))
        )
        summary = RunSummary("p", "", kw["tags"][SWEEP_TAG], root)
        summary.metrics = {"evaluate.student_miou": 0.5}
        return summary

    grid = parse_grid(["pseudolabel.tau=0.8,0.9", "data.generated.num_unlabeled=12,6"])
    config = with_sweep(_smoke(tmp_path), grid, seeds=2, references=False)
    run_sweep(config, str(tmp_path / "root"), run=pipeline)
    assert sorted(listed) == [6, 12]  # once per data section, not once per run (8 runs)
    assert sorted(given) == [(6, 6)] * 4 + [(12, 12)] * 4
    # a data axis that empties the unlabeled split is refused before any run, naming the row
    import shutil

    full, bare = tmp_path / "full", tmp_path / "bare"
    _folder_source(full, masked_unlabeled=True)
    shutil.copytree(full, bare)
    (bare / "splits" / "unlabeled.txt").unlink()
    folders = _smoke(tmp_path, "data.source=folder", f"data.root={full}", "data.num_classes=2")
    empty = with_sweep(folders, parse_grid([f"data.root={full},{bare}"]), references=False)
    given.clear()
    with pytest.raises(SourceError, match=r"row 'root=.*bare'\): the unlabeled split is empty"):
        run_sweep(empty, str(tmp_path / "root2"), run=pipeline)
    assert given == []


def test_parallel_runs_start_ray_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A parallel sweep whose ingest came from the cache: its first runs reach ``init_ray`` at
    once, and only one may call ``ray.init`` (a second raised "called ray.init twice" and failed
    its run)."""
    import ray

    from pipeline import runner

    calls: list[str] = []
    started = threading.Event()

    def fake_init(**kwargs: Any) -> Any:
        if started.is_set():
            raise RuntimeError("Maybe you called ray.init twice by accident?")
        calls.append(threading.current_thread().name)
        time.sleep(0.2)  # Ray takes seconds to start: every other thread arrives meanwhile
        started.set()
        return types.SimpleNamespace(dashboard_url=None)

    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "is_initialized", started.is_set)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = load_config("smoke")
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(runner.init_ray, config, "sqlite:///x.db") for _ in range(4)]
        errors = [f.exception() for f in futures]
    assert errors == [None] * 4
    assert len(calls) == 1
