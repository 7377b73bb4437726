"""``pseudoflow report`` on a run root written here by hand (no Ray, no model): the numbers it shows
are checked against counts worked out below, its files against PNG signatures, its MLflow copy
against a real SQLite store, and its page in headless Chromium (Debian's package)."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from pipeline import figures
from pipeline.cache.entries import CacheEntry, cache_key, dataset_output, model_output
from pipeline.cli import main
from pipeline.config import PipelineConfig, load_config, to_yaml
from pipeline.graph import pseudolabel_key_fields
from pipeline.models import load_model
from pipeline.report import (
    ConfidenceSweep,
    ReportError,
    find_run,
    load_run,
    pictures,
    policy_quality,
    training_curves,
    val_predictions,
    write_report,
)
from pipeline.tracking import HIT_TAG, KEY_TAG, STAGE_TAG
from stages.core import codec, data
from stages.core.models import build_segmenter, checkpoint_bytes, make_checkpoint
from stages.core.storage import DatasetRef, Storage
from stages.pseudolabel import table as pseudolabel_table
from stages.pseudolabel.batches import label_batch
from stages.teach.table import SIGNALS_SCHEMA, SignalSpec, quantized_maps, stored_maps
from tests.conftest import run_cli

STORED = SignalSpec(margins=True, dispersion=True)  # what threshold, S4MC and CSL read

RUN_ID = "smoke-20261121T100000-abcdef"
OLDER = "smoke-20261120T090000-123456"
PNG = b"\x89PNG\r\n\x1a\n"
CHROMIUM = "/usr/bin/chromium"

# Two unlabeled 2x4 images: per pixel (argmax class, its probability); the other two classes
# share the rest. Truth 255 is unknown.
PIXELS = {
    "img-a": [
        [(1, 0.97), (1, 0.97), (2, 0.6), (0, 0.99)],
        [(0, 0.99), (2, 0.96), (1, 0.5), (0, 0.7)],
    ],
    "img-b": [[(2, 0.98)] * 4, [(0, 0.55)] * 4],
}
TRUTH = {
    "img-a": [[1, 2, 2, 0], [0, 2, 255, 1]],
    "img-b": [[2, 2, 2, 2], [0, 0, 1, 255]],
}
# Worked out by hand from the tables above (τ = 0.95):
#   threshold keeps conf >= 0.95: a (0,0) (0,1) (0,3) (1,0) (1,1), b the first row -> 9 of the 14
#   known pixels, 8 of them right (a (0,1) says 1, truth 2).
#   CSL keeps every pixel: 14 known, right where the argmax is: a 5 of 7, b 6 of 7 -> 11.
THRESHOLD = (9 / 14, 8 / 9)
CSL = (14 / 14, 11 / 14)
VAL = {"val-b": [[0, 1, 2, 0], [255, 1, 1, 0]], "val-a": [[1, 1, 0, 0], [2, 2, 0, 255]]}
ARCH = "lraspp_mobilenet_v3_large"
# Per-step metrics the stage runs logged (step -> value); the teacher's producing run logged
# step 2 twice (a resumed training): the later value counts.
STUDENT_CURVES = {"loss_s": [(2, 0.9), (4, 0.5)], "loss_u": [(2, 0.4), (4, 0.3)]}
STUDENT_CURVES["lr"] = [(2, 0.01), (4, 0.005)]
TEACHER_CURVES = {"loss_s": [(2, 0.7), (4, 0.2)], "lr": [(2, 0.02), (4, 0.0)]}


def _probs(pixels: list[list[tuple[int, float]]]) -> torch.Tensor:
    """float[3, H, W]: the listed class gets its probability, the others half the rest each."""
    h, w = len(pixels), len(pixels[0])
    probs = torch.zeros(3, h, w)
    for y, row in enumerate(pixels):
        for x, (cls, p) in enumerate(row):
            probs[:, y, x] = (1 - p) / 2
            probs[cls, y, x] = p
    return probs


def _config() -> PipelineConfig:
    return load_config("smoke", ["data.num_classes=3", "detector.enabled=false"])


def _commit(storage: Storage, stage: str, fields: dict, outputs: dict, **record) -> str:
    key = cache_key(stage, f"{stage}/test", fields)
    return _commit_at(storage, stage, key, fields, outputs, **record)


def _commit_at(storage: Storage, stage: str, key: str, fields: dict, outputs: dict, **record):
    entry = CacheEntry(storage, stage, key)
    full = {"fields": fields, "outputs": outputs, "metrics": {}, "results": {}, **record}
    assert entry.commit("t0", full)[1]
    return key


def _dataset(storage: Storage, name: str, rows: list[dict], schema: pa.Schema | None = None):
    ref = DatasetRef(storage, storage.path("data", name), name)
    ref.write_table(pa.Table.from_pylist(rows, schema=schema))
    ref.commit()
    return dataset_output(ref)


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (2, 4, 3), dtype=np.uint8)


def _model(storage: Storage, name: str, seed: int) -> dict:
    """A segmenter model file (random weights, 3 classes, used at 16 px) and its output."""
    torch.manual_seed(seed)
    network = build_segmenter(arch=ARCH, num_classes=3)
    checkpoint = make_checkpoint(
        network, kind="segmenter", model_args={"arch": ARCH, "num_classes": 3}
    )
    path = storage.path("models", f"{name}.pt")
    storage.write_bytes(path, checkpoint_bytes({**checkpoint, "image_size": 16}))
    return model_output(storage, path)


def _image_row(image_id: str, split: str, seed: int, truth: list[list[int]]) -> dict:
    return {
        "image_id": image_id,
        "stem": image_id,
        "split": split,
        "height": 2,
        "width": 4,
        "image": codec.encode_png(_image(seed)),
        "mask": codec.encode_png(np.asarray(truth, np.uint8)),
        "content_hash": image_id,
    }


def _stage_run(
    client: MlflowClient,
    experiment: str,
    parent: str,
    stage: str,
    key: str,
    hit: bool,
    curves: dict | None = None,
) -> str:
    tags = {STAGE_TAG: stage, KEY_TAG: key, HIT_TAG: str(hit).lower()}
    run = client.create_run(experiment, tags={**tags, "mlflow.parentRunId": parent}).info.run_id
    for name, points in (curves or {}).items():
        for step, value in points:
            client.log_metric(run, name, value, step=step)
    client.log_metric(run, "seconds", 3.0)  # what the runner logs at the end: not a curve
    client.set_terminated(run)
    return run


@dataclass(frozen=True)
class Root:
    storage: Storage
    config: PipelineConfig
    uri: str
    teacher_run: str  # the MLflow stage run that trained the (reused) teacher


def build_root(base: Path) -> Root:
    """A completed run's root: images, teacher signals, stored threshold pseudo-labels, an
    evaluate record, the run's stages.json and config, and its MLflow parent run."""
    storage, config = Storage(str(base / "root")), _config()
    images = [_image_row(i, "unlabeled", n, TRUTH[i]) for n, i in enumerate(PIXELS)]
    images += [_image_row(i, "val", 10 + n, truth) for n, (i, truth) in enumerate(VAL.items())]
    ingest = _commit(storage, "ingest", {"n": 1}, {"images": _dataset(storage, "images", images)})
    signals = []
    for image_id, pixels in PIXELS.items():
        maps = quantized_maps(_probs(pixels)[None], STORED)[:, 0].numpy()
        cells = {name: m.tobytes() for name, m in zip(stored_maps(STORED), maps, strict=True)}
        signals.append(
            {
                "image_id": image_id,
                "height": 2,
                "width": 4,
                "num_classes": 3,
                **cells,
                "split": "unlabeled",
            }
        )
    signal_output = _dataset(storage, "teacher_signals", signals, SIGNALS_SCHEMA)
    teach = _commit(storage, "teach", {"n": 2}, {"teacher_signals": signal_output})
    labels = label_batch(pa.Table.from_pylist(signals), config.pseudolabel.model_dump())
    fields = pseudolabel_key_fields(config, teach, None)
    key = cache_key("pseudolabel", pseudolabel_table.SCHEMA, fields)
    output = _dataset(
        storage, "pseudolabels", labels.to_pylist(), pseudolabel_table.PSEUDOLABELS_SCHEMA
    )
    _commit_at(storage, "pseudolabel", key, fields, {"pseudolabels": output})
    metrics = {"teacher_miou": 0.5, "student_miou": 0.625}
    per_class = {"teacher": [0.9, 0.5, 0.1], "student": [0.95, 0.6, 0.3]}
    evaluate = _commit(
        storage, "evaluate", {"n": 3}, {}, metrics=metrics, results={"per_class_iou": per_class}
    )
    teacher = _commit(storage, "train_teacher", {"n": 4}, {"teacher": _model(storage, "t", 1)})
    student = _commit(storage, "train_student", {"n": 5}, {"student": _model(storage, "s", 2)})
    used = {"ingest": (ingest, True), "train_teacher": (teacher, True), "teach": (teach, False)}
    used |= {"pseudolabel": (key, False), "train_student": (student, False)}
    used["evaluate"] = (evaluate, False)
    stages = {
        stage: {"key": k, "hit": hit, "started": 1000.0 + 10 * n, "seconds": 5.0 + n}
        for n, (stage, (k, hit)) in enumerate(used.items())
    }
    for run_id in (OLDER, RUN_ID):
        folder = storage.path("pipelines", run_id)
        storage.write_json(f"{folder}/stages.json", stages)
        storage.write_bytes(f"{folder}/config.yaml", to_yaml(config).encode())
    uri = f"sqlite:///{base}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment(
        config.tracking.experiment, artifact_location=f"{base}/mlartifacts"
    )
    # an earlier pipeline run trained the teacher; this one reused it and trained the student
    earlier = client.create_run(experiment, tags={"pseudoflow.run_id": "earlier"}).info.run_id
    resumed = {"loss_s": [(2, 9.9), *TEACHER_CURVES["loss_s"]], "lr": TEACHER_CURVES["lr"]}
    producer = _stage_run(client, experiment, earlier, "train_teacher", teacher, False, resumed)
    parent = client.create_run(experiment, tags={"pseudoflow.run_id": RUN_ID}, run_name=RUN_ID)
    _stage_run(client, experiment, parent.info.run_id, "train_teacher", teacher, True)
    _stage_run(
        client, experiment, parent.info.run_id, "train_student", student, False, STUDENT_CURVES
    )
    return Root(storage, config, uri, producer)


@pytest.fixture
def root(tmp_path: Path) -> Root:
    return build_root(tmp_path)


def test_find_run_newest_prefix_and_unknown(root: Root) -> None:
    assert find_run(root.storage, None) == RUN_ID
    assert find_run(root.storage, "smoke-20261120") == OLDER
    with pytest.raises(ReportError, match="'smoke-' matches several runs"):
        find_run(root.storage, "smoke-")
    with pytest.raises(
        ReportError, match=f"'nope' is not a run .* the newest are: {OLDER}, {RUN_ID}"
    ):
        find_run(root.storage, "nope")
    with pytest.raises(ReportError, match="no pipeline runs under"):
        find_run(Storage(str(Path(root.storage.root).parent / "empty")), None)


def test_policy_quality_matches_hand_counts(root: Root) -> None:
    quality, sweep, missing = policy_quality(root.storage, load_run(root.storage, RUN_ID))
    by_policy = {q.policy: q for q in quality}
    assert set(by_policy) == {"threshold", "s4mc", "csl"}
    assert by_policy["threshold"].source.startswith("stored (entry ")
    assert by_policy["csl"].source == "applied here to the stored teacher signals"
    assert (by_policy["threshold"].coverage, by_policy["threshold"].precision) == pytest.approx(
        THRESHOLD
    )
    assert (by_policy["csl"].coverage, by_policy["csl"].precision) == pytest.approx(CSL)
    assert by_policy["threshold"].images == by_policy["csl"].images == 2
    assert missing == {"wpl": "needs the detect stage (detector.enabled: true)"}
    # the threshold policy trains with weight 1 on its 9 kept pixels (all of them known here)
    assert by_policy["threshold"].weight_values().tolist() == [1.0] * 9
    assert by_policy["threshold"].weighted_precision == pytest.approx(8 / 9)
    # per class (truth: 4 pixels of class 0, 3 of 1, 7 of 2): threshold keeps right a (0,3)
    # (1,0); a (0,0); a (1,1) and b's first row. CSL's argmax is right on b's class-0 pixels
    # too, on a (0,2), and wrong on a (1,3) and b (1,2) (class 1) and a (0,1) (class 2).
    threshold, csl = by_policy["threshold"].counts, by_policy["csl"].counts
    np.testing.assert_allclose(threshold.class_recall(), [2 / 4, 1 / 3, 5 / 7])
    np.testing.assert_allclose(threshold.class_precision(), [1.0, 1 / 2, 1.0])
    np.testing.assert_allclose(csl.class_recall(), [4 / 4, 1 / 3, 6 / 7])
    # the sweep's every-pixel end is CSL's point; its end at conf >= 0.96 is the threshold's
    coverage, precision = sweep.curve()
    assert (coverage[0], precision[0]) == pytest.approx(CSL)
    at_96 = int(0.96 * sweep.bins)
    assert (coverage[at_96], precision[at_96]) == pytest.approx(THRESHOLD)


def test_confidence_sweep_by_hand() -> None:
    sweep = ConfidenceSweep()
    conf = np.array([0.1, 0.5, 0.9, 0.9, 0.99])
    label = np.array([1, 1, 2, 2, 0])
    truth = np.array([1, 0, 2, 0, 255])  # right, wrong, right, wrong, unknown
    sweep.add(conf, label, truth)
    coverage, precision = sweep.curve()
    assert (coverage[0], precision[0]) == pytest.approx((1.0, 0.5))
    assert (coverage[100], precision[100]) == pytest.approx((0.75, 1 / 3))  # conf >= 0.5
    assert (coverage[-1], precision[-1]) == pytest.approx((0.5, 0.5))  # conf >= 0.9
    assert len(coverage) == int(0.9 * sweep.bins) + 1


def test_report_files_and_its_copy_in_mlflow(root: Root, tmp_path: Path) -> None:
    made = write_report(root.storage, tracking_uri=root.uri)
    assert made.run_id == RUN_ID
    folder = Path(root.storage.path("reports", RUN_ID))
    assert made.location == str(folder)
    names = {"index.html", "overlays.png", "quality.png", "weights.png", "iou_per_class.png"}
    names |= {"timeline.png", "predictions.png", "training.png"}
    assert set(made.files) == names
    assert {p.name for p in folder.iterdir()} == names
    for name in names - {"index.html"}:
        data = (folder / name).read_bytes()
        assert data.startswith(PNG), name
        assert len(data) > 2000, name
    page = (folder / "index.html").read_text()
    assert f"pseudoflow report: {RUN_ID}" in page
    threshold = '<td>threshold</td><td class="num">0.6429</td><td class="num">0.8889</td>'
    assert threshold + '<td class="num">0.8889</td>' in page  # weighted: every weight 1
    # per class, the share kept with the right label (hand counts in the test above)
    assert '<td>threshold</td><td class="num">0.500</td><td class="num">0.333</td>' in page
    assert '<td>csl</td><td class="num">1.000</td><td class="num">0.333</td>' in page
    assert '<td>csl</td><td class="num">1.0000</td><td class="num">0.7857</td>' in page
    assert '<td>student mIoU (val)</td><td class="num">0.6250</td>' in page
    assert "2 of 6 stages from the cache" in page
    client = MlflowClient(tracking_uri=root.uri)
    assert made.mlflow_run_id is not None
    logged = {Path(a.path).name for a in client.list_artifacts(made.mlflow_run_id, "report")}
    assert logged == names
    # --out elsewhere, no MLflow
    out = tmp_path / "elsewhere"
    again = write_report(root.storage, OLDER, out=str(out), log=False)
    assert again.mlflow_run_id is None
    assert {p.name for p in out.iterdir()} == names
    # the root has no MLflow store of its own: no curves, and none created by looking
    assert not Path(root.storage.root, "mlflow.db").exists()


def test_cli_report_and_its_errors(root: Root) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": root.uri}
    result = run_cli("report", "--root", root.storage.root, env=env)
    assert result.returncode == 0, result.stderr
    assert f"report: {root.storage.path('reports', RUN_ID)}/index.html" in result.stdout
    line = "threshold  coverage 0.6429  precision 0.8889  weighted 0.8889  (stored (entry "
    assert line in result.stdout
    assert "logged to MLflow run" in result.stdout
    # (in this process: the same command, without a second interpreter start)
    missing = CliRunner().invoke(
        main, ["report", "nope", "--root", root.storage.root, "--no-mlflow"]
    )
    assert missing.exit_code == 2
    assert "error: 'nope' is not a run under" in missing.stderr
    assert missing.exception is None or isinstance(missing.exception, SystemExit)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium: installed with apt-get when missing and this runs as root (CI's
    fresh machine); skipped, with the command, where neither is possible."""
    if not Path(CHROMIUM).exists() and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
        subprocess.run(install, env=env, capture_output=True, timeout=900)
    if not Path(CHROMIUM).exists():
        pytest.skip("needs Debian's chromium package: apt-get install chromium")
    return CHROMIUM


def test_report_page_renders_in_headless_chromium(
    root: Root, chromium: str, tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    made = write_report(root.storage, tracking_uri=root.uri, log=False)
    page_url = Path(made.location, "index.html").as_uri()
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
        page.goto(page_url, wait_until="load")
        loaded = page.evaluate(
            "Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, "
            "i.naturalWidth, i.naturalHeight])"
        )
        title = page.title()
        headings = page.evaluate(
            "Array.from(document.querySelectorAll('h2')).map(h => h.textContent)"
        )
        legend = page.evaluate(
            "Array.from(document.querySelectorAll('ul.legend li')).map(li => [li.textContent, "
            "getComputedStyle(li.querySelector('span')).backgroundColor])"
        )
        shot = page.screenshot(full_page=True)
        browser.close()
    assert problems == []
    assert title == f"pseudoflow report: {RUN_ID}"
    assert {src for src, *_ in loaded} == set(made.files) - {"index.html"}
    assert {"predictions.png", "training.png"} <= {src for src, *_ in loaded}
    for section in ["Class colours", "Pseudo-labels on a sample", "Predictions on val"]:
        assert section in headings
    assert "Training curves" in headings
    legend_colours = [
        [name, f"rgb({r}, {g}, {b})"]
        for name, (r, g, b) in figures.class_legend(root.config.data.names(), dropped=True)
    ]
    assert legend == legend_colours
    for src, complete, width, height in loaded:
        assert complete, src
        assert min(width, height) > 100, src
    assert shot.startswith(PNG)
    assert len(shot) > 20_000
    (tmp_path / "screenshot.png").write_bytes(shot)


# ------------------------------------------------------------------ what the figures show
def test_quality_axes_fit_the_points() -> None:
    # span 0.1, a tenth of it each side
    assert figures.fit_limits([0.8, 0.9]) == pytest.approx((0.79, 0.91))
    # narrower than MIN_SPAN (0.05): widened about the middle, 0.955 +- 0.025, then padded
    assert figures.fit_limits([0.95, 0.96]) == pytest.approx((0.925, 0.985))
    # the whole range: the frame stays within [-0.01, 1.01]
    assert figures.fit_limits([0.0, 1.0]) == pytest.approx((-0.01, 1.01))
    # the sweep counts where it keeps >= 1 % of the pixels: its (0.005, 0.2) end is noise
    curve = (np.array([1.0, 0.5, 0.005]), np.array([0.8, 0.9, 0.2]))
    xlim, ylim = figures.quality_limits(curve, {"threshold": (0.6, 0.95)})
    assert xlim == pytest.approx((0.45, 1.01))
    assert ylim == pytest.approx((0.785, 0.965))
    assert figures.quality_limits(None, {}) == ((0.0, 1.01), (0.0, 1.01))


def test_weight_bins_over_the_weights_own_range() -> None:
    assert figures.weight_bins(np.ones(9, np.float32)) is None  # threshold: one value
    assert figures.weight_bins(np.zeros(0, np.float32)) is None
    edges = figures.weight_bins(np.array([0.2, 0.5, 0.8], np.float32))
    assert edges is not None
    assert len(edges) == figures.HIST_BINS + 1
    assert (edges[0], edges[-1]) == pytest.approx((0.2, 0.8))
    png = figures.weight_histograms({"threshold": np.ones(9), "s4mc": np.array([0.2, 0.8])})
    assert png.startswith(PNG)


def test_class_legend_is_the_configs_classes_in_the_palettes_colours(root: Root) -> None:
    names = root.config.data.names()
    assert len(names) == 3
    entries = figures.class_legend(names, dropped=True)
    assert [label for label, _ in entries] == [*names, "ignored", "dropped"]
    colours = figures.palette()
    for c, (_, rgb) in enumerate(entries[:3]):
        assert rgb.tolist() == colours[c].tolist()
    assert entries[3][1].tolist() == [255, 255, 255]
    assert entries[4][1].tolist() == [figures.DROPPED_GREY] * 3
    # the same colours as the label maps drawn with them
    drawn = figures.colour_labels(np.array([[0, 2]]), np.array([[True, False]]))
    assert drawn[0, 0].tolist() == entries[0][1].tolist()
    assert drawn[0, 1].tolist() == entries[4][1].tolist()


def test_training_curves_from_each_stages_mlflow_run(root: Root) -> None:
    records = load_run(root.storage, RUN_ID)
    curves, notes = training_curves(records, root.uri)
    assert set(curves) == {"train_teacher", "train_student"}
    assert curves["train_student"] == STUDENT_CURVES  # "seconds" is not a curve
    # a cache hit: the curves of the run that trained the entry, the resumed step's last value
    assert curves["train_teacher"] == TEACHER_CURVES
    assert notes == {"train_teacher": f"reused: curves of MLflow run {root.teacher_run[:12]}"}
    # a pipeline run MLflow does not know: every training stage says why
    _, older = training_curves(load_run(root.storage, OLDER), root.uri)
    assert set(older) == {"train_teacher", "train_student"}
    assert older["train_student"] == f"no MLflow run at {root.uri} is tagged with run {OLDER}"
    # the figure draws from plain numbers alone
    png = figures.training_curves(curves, notes)
    assert png.startswith(PNG)
    assert len(png) > 10_000


def test_val_predictions_are_the_students_and_teachers_forward(
    root: Root, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = load_run(root.storage, RUN_ID)
    predicted = val_predictions(root.storage, records, count=6)
    assert [p.image_id for p in predicted] == ["val-a", "val-b"]  # the val images, by id
    for row in predicted:
        assert row.truth.tolist() == VAL[row.image_id]
        assert set(row.labels) == {"teacher", "student"}
        for name, output in [("teacher", "t"), ("student", "s")]:
            path = root.storage.path("models", f"{output}.pt")
            model = load_model(path, tracking_uri=None, device=torch.device("cpu"))
            image, _, fitted = data.fit_and_pad(
                torch.from_numpy(row.image).permute(2, 0, 1), {}, 16
            )
            assert fitted == (8, 16)  # 2 x 4 scaled by 4, padded below to the 16-px canvas
            with torch.inference_mode():
                logits = model.forward(image[None])
            probs = torch.nn.functional.interpolate(
                logits.softmax(1)[:, :, :8], size=(2, 4), mode="bilinear", align_corners=False
            )
            assert row.labels[name].tolist() == probs[0].argmax(0).tolist(), name
    assert len(val_predictions(root.storage, records, count=1)) == 1
    # large images: fewer of them (here the budget is under two of data.image_size's inputs)
    size = records.config.data.image_size
    monkeypatch.setattr(pictures, "MAX_PREDICTED_PIXELS", 2 * size * size - 1)
    assert len(val_predictions(root.storage, records, count=6)) == 1
