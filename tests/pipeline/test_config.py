from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pipeline.config import (
    ConfigError,
    builtin_configs,
    flatten,
    load_config,
    run_params,
    to_yaml,
)
from pipeline.graph import Round, planned, random_start_warnings
from pipeline.graph import keys as graph_keys
from tests.conftest import STAGE_NAMES, run_cli


def test_builtin_configs_load_by_name_and_path(tmp_path: Path) -> None:
    assert {"quickstart", "smoke"} <= set(builtin_configs())
    smoke = load_config("smoke")
    assert smoke.name == "smoke"
    assert smoke.data.num_classes == 4
    path = tmp_path / "copy.yaml"
    path.write_text(to_yaml(smoke))
    assert load_config(str(path)) == smoke


def test_presets_layer_left_to_right_and_say_what_they_need(tmp_path: Path) -> None:
    assert {"voc", "cityscapes", "gpu"} <= set(builtin_configs())
    voc = load_config("voc,gpu", ["data.root=/data/VOC2012"])
    assert (voc.name, voc.data.num_classes, voc.data.image_size, voc.data.crop) == (
        "voc",
        21,
        512,
        321,
    )
    assert voc.teacher.arch == voc.student.arch == "deeplabv3_resnet101"
    assert voc.teacher.backbone_lr == 0.1
    assert voc.pseudolabel.tau == 0.95
    assert voc.runtime.use_gpu
    assert voc.teach.gpus_per_actor == 1.0
    assert voc.teach.actors == "auto"
    # the overlay merges into sections key by key: the base's teach batch size survives
    assert voc.teach.batch_size == 32
    city = load_config("cityscapes", ["data.root=/c"])
    assert (city.data.num_classes, city.data.image_size, city.data.crop) == (19, 2048, 801)
    assert not city.runtime.use_gpu
    assert city.teach.gpus_per_actor == "auto"
    # a later layer and then --set win; a YAML path layers like a name
    mine = tmp_path / "mine.yaml"
    mine.write_text("data: {crop_size: 401}\nteach: {batch_size: 4}\n")
    layered = load_config(f"voc, {mine},gpu", ["data.root=/v", "teach.batch_size=2"])
    assert (layered.data.crop, layered.data.image_size, layered.teach.batch_size) == (401, 512, 2)
    with pytest.raises(ConfigError, match=r"data\.root is required when data\.source is 'voc'"):
        load_config("voc")
    with pytest.raises(
        ConfigError,
        match=r"unknown config 'vco'.*cityscapes, gpu, quality, quality-quick, quickstart",
    ):
        load_config("vco,gpu")
    with pytest.raises(ConfigError, match="empty name"):
        load_config("voc,,gpu")


def test_real_data_without_init_says_which_networks_start_from_random_weights() -> None:
    assert random_start_warnings(load_config("quickstart")) == []  # generated data: by design
    voc = load_config("voc", ["data.root=/v", "teacher.init=/w/resnet101.pth"])
    assert random_start_warnings(voc) == [
        "student trains deeplabv3_resnet101 from random weights: the semi-supervised recipes "
        "fine-tune ImageNet (detector: COCO) weights; give student.init (README: Pretrained "
        "weights)",
        "detector trains fasterrcnn_resnet50_fpn from random weights: the semi-supervised "
        "recipes fine-tune ImageNet (detector: COCO) weights; give detector.init (README: "
        "Pretrained weights)",
    ]
    given = load_config(
        "voc",
        ["data.root=/v", "teacher.init=/w", "student.weights=/s.pt", "detector.enabled=false"],
    )
    assert random_start_warnings(given) == []


def test_teach_tta_enters_the_teach_key_only_when_set() -> None:
    from types import SimpleNamespace

    def family(*overrides: str) -> dict:
        ctx = SimpleNamespace(config=load_config("smoke", list(overrides)), digest=lambda *_: "d")
        return graph_keys.teach_family(ctx, Round(1))  # type: ignore[arg-type]

    plain = family()
    assert "tta" not in plain["teach"]  # the keys of runs without TTA are what they were
    assert family("teach.tta.scales=[1.0]", "teach.tta.flip=false") == plain
    flipped = family("teach.tta.flip=true")
    assert flipped["teach"]["tta"] == {"scales": [1.0], "flip": True}
    assert family("teach.tta.scales=[0.75,1.0]")["teach"]["tta"]["scales"] == [0.75, 1.0]


def test_overrides_are_typed_and_dotted() -> None:
    cfg = load_config("smoke", ["student.steps=7", "pseudolabel.tau=0.9", "data.blocks=3"])
    assert cfg.student.steps == 7
    assert cfg.pseudolabel.tau == 0.9
    assert cfg.data.blocks == 3


def test_quoted_strings_are_not_coerced_to_numbers_or_booleans(tmp_path: Path) -> None:
    """A YAML string ('5', 'off', '0.9') where a number or a boolean belongs is an error, as
    StrictModel promises; pydantic's lax mode turned them into 5, False and 0.9."""
    path = tmp_path / "quoted.yaml"
    path.write_text(
        "name: quoted\nstudent: {steps: '5'}\nteacher: {amp: 'off'}\npseudolabel: {tau: '0.9'}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert set(caught.value.problems) == {
        "student.steps: Input should be a valid integer (got '5')",
        "teacher.amp: Input should be a valid boolean (got 'off')",
        "pseudolabel.tau: Input should be a valid number (got '0.9')",
    }


def test_lists_and_saved_class_maps_still_load(tmp_path: Path) -> None:
    """YAML lists fill tuple fields, and a class_map saved as JSON-mode YAML (string keys) loads
    back to the same config."""
    config = load_config(
        "smoke",
        [
            "data.class_names=[sky, road, car, person]",
            "pseudolabel.policy=wpl",
            "pseudolabel.wpl.class_map={1: 2, 3: 1}",
        ],
    )
    assert config.data.class_names == ("sky", "road", "car", "person")
    path = tmp_path / "saved.yaml"
    path.write_text(to_yaml(config))
    assert "'1': 2" in path.read_text()
    assert load_config(str(path)) == config
    assert load_config(str(path)).pseudolabel.wpl.class_map == {1: 2, 3: 1}


def test_all_errors_reported_together_with_dotted_paths() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("smoke", ["data.sourc=x", "student.steps=abc", "pseudolabel.policy=s4mx"])
    problems = info.value.problems
    assert len(problems) == 3
    text = "\n".join(problems)
    assert "data.sourc: unknown key; valid keys here:" in text
    assert "source" in text
    assert "student.steps:" in text
    assert "pseudolabel.policy:" in text
    assert "threshold" in text


def test_config_is_frozen() -> None:
    cfg = load_config("smoke")
    with pytest.raises(Exception, match="frozen"):
        cfg.seed = 3  # type: ignore[misc]


def test_unknown_config_name_lists_builtins() -> None:
    with pytest.raises(ConfigError, match="quickstart, smoke"):
        load_config("nosuch")


def test_folder_source_requires_root() -> None:
    with pytest.raises(ConfigError, match=r"data\.root is required"):
        load_config("smoke", ["data.source=folder"])


def test_flatten_gives_dotted_string_params() -> None:
    flat = flatten(load_config("smoke"))
    assert flat["pseudolabel.tau"] == "0.95"
    assert flat["data.generated.num_labeled"] == "8"


def test_run_params_leave_out_tau_where_the_masks_are_the_labels() -> None:
    assert run_params(load_config("smoke"))["pseudolabel.tau"] == "0.95"
    truth = run_params(load_config("smoke", ["pseudolabel.policy=ground_truth"]))
    assert truth["pseudolabel.policy"] == "ground_truth"
    assert "pseudolabel.tau" not in truth


def test_cli_unknown_key_exits_nonzero_before_work(tmp_path: Path) -> None:
    root = tmp_path / "root"
    result = run_cli("run", "--config", "smoke", "--root", str(root), "--set", "teacher.stepz=3")
    assert result.returncode == 2
    assert "teacher.stepz: unknown key" in result.stderr
    assert not root.exists()


def test_cli_detectron2_where_it_is_missing_is_a_config_error_before_work(
    tmp_path: Path,
) -> None:
    if importlib.util.find_spec("detectron2") is not None:
        pytest.skip("detectron2 is installed here: the backend is available")
    root = tmp_path / "root"
    args = ("run", "--config", "smoke", "--root", str(root))
    result = run_cli(*args, "--set", "detector.backend=detectron2")
    assert result.returncode == 2
    assert "detector.backend 'detectron2' needs the detectron2 package" in result.stderr
    assert "docker/Dockerfile.cuda" in result.stderr
    assert "Traceback" not in result.stderr
    assert not root.exists()


def test_cli_missing_data_folder_exits_nonzero_before_work(tmp_path: Path) -> None:
    root = tmp_path / "root"
    missing = tmp_path / "no-such-folder"
    result = run_cli(
        "run",
        "--config",
        "smoke",
        "--root",
        str(root),
        "--set",
        "data.source=folder",
        "--set",
        f"data.root={missing}",
    )
    assert result.returncode == 2
    assert f"data folder '{missing}' does not exist" in result.stderr
    assert not (root / "pipelines").exists()
    assert not (root / "mlflow.db").exists()


def test_cli_plan_lists_stages_in_order() -> None:
    result = run_cli("plan", "--config", "smoke")
    assert result.returncode == 0
    names = [line.split()[1] for line in result.stdout.splitlines()]
    assert tuple(names) == STAGE_NAMES


def test_policy_errors_list_what_is_valid() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(
            "smoke",
            [
                "pseudolabel.policy=s4mx",
                "pseudolabel.s4mc.neighbourhood=4",
                "pseudolabel.csl.cover=1.5",
            ],
        )
    problems = caught.value.problems
    assert "unknown policy 's4mx'; choose one of threshold, s4mc, csl, wpl" in problems[0]
    assert any(
        "pseudolabel.s4mc.neighbourhood: unknown key; valid keys here: alpha0, beta, label_from, neighborhood"
        in p
        for p in problems
    )
    assert any(p.startswith("pseudolabel.csl.cover:") for p in problems)
    assert len(problems) == 3


def test_wpl_needs_the_detector_and_a_valid_class_map() -> None:
    with pytest.raises(ConfigError, match=r"pseudolabel\.policy 'wpl' needs detections"):
        load_config("smoke", ["pseudolabel.policy=wpl", "detector.enabled=false"])
    with pytest.raises(
        ConfigError, match=r"class_map \{1: 9\}: segmentation classes must be in \[0, 4\)"
    ):
        load_config("smoke", ["pseudolabel.policy=wpl", "pseudolabel.wpl.class_map={1: 9}"])
    cfg = load_config("smoke", ["pseudolabel.policy=wpl", "pseudolabel.wpl.class_map={3: 1}"])
    assert cfg.pseudolabel.class_map(4) == {3: 1}
    assert load_config("smoke").pseudolabel.class_map(4) == {1: 1, 2: 2, 3: 3}


def test_rounds_add_teach_pseudolabel_and_student_per_round_before_evaluate() -> None:
    config = load_config("smoke", ["rounds=3"])
    names = [stage.name for stage in planned(config)]
    later = [f"{s}_r{r}" for r in (2, 3) for s in ("teach", "pseudolabel", "train_student")]
    assert names == [*STAGE_NAMES[:-1], *later, "evaluate"]
    assert [Round(r).teacher for r in (1, 2, 3)] == ["teacher", "student", "student_r2"]
    stage = {s.name: s for s in planned(config)}
    assert stage["teach_r3"].reads == ("images", "student_r2")
    assert stage["train_student_r3"].writes == ("student_r3",)
    every_round = ("student", "pseudolabels", "student_r2", "pseudolabels_r2", "student_r3")
    assert stage["evaluate"].reads == ("images", "teacher", *every_round, "pseudolabels_r3")
    assert planned(load_config("smoke"))[-1].reads == (
        "images",
        "teacher",
        "student",
        "pseudolabels",
    )
    result = run_cli("plan", "--config", "smoke", "--set", "rounds=2")
    assert [line.split()[1] for line in result.stdout.splitlines()][-4:] == [
        "teach_r2",
        "pseudolabel_r2",
        "train_student_r2",
        "evaluate",
    ]


def test_rounds_need_a_trained_student() -> None:
    with pytest.raises(ConfigError, match=r"rounds: 2 trains a student per round"):
        load_config("smoke", ["rounds=2", "student.weights=/tmp/student.pt"])
    with pytest.raises(ConfigError, match=r"rounds"):
        load_config("smoke", ["rounds=0"])
