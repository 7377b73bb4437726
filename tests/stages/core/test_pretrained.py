"""Fine-tuning from pretrained weights (``*.init``): torchvision-shaped state dicts built here
(whole models with an aux head and another class count, classification backbones), mapped onto
the pipeline's networks, refused with the names of what does not fit, and carried into a Ray
Train worker."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torchvision.models import get_model

from pipeline.graph import keys as graph_keys
from stages import segtrain
from stages.core import pretrained
from stages.core.models import build_detector, build_segmenter, load_checkpoint
from stages.core.pretrained import (
    SEGMENTER,
    TORCHVISION_DETECTOR,
    decode_state,
    encode_state,
    load_init,
    map_state,
)
from stages.core.shards import file_digest
from stages.core.storage import Storage
from stages.pseudolabel.config import PseudolabelConfig
from stages.train_detector.config import DetectorConfig, detector_args, detector_layout
from stages.train_detector.step import new_detector_learner
from tests.conftest import local_ray

CPU = torch.device("cpu")


def _tv_state(arch: str, seed: int, **kwargs: Any) -> dict[str, torch.Tensor]:
    """A torchvision network's state dict as torchvision ships it (random, seeded weights)."""
    torch.manual_seed(seed)
    model = get_model(arch, weights=None, **kwargs)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _save(state: dict[str, torch.Tensor], path: Path) -> str:
    torch.save(state, path)
    return str(path)


def _voc_deeplab(tmp_path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """deeplabv3_mobilenet_v3_large as torchvision ships its VOC weights: 21 classes, aux head."""
    state = _tv_state(
        "deeplabv3_mobilenet_v3_large", 7, weights_backbone=None, num_classes=21, aux_loss=True
    )
    return state, _save(state, tmp_path / "voc.pth")


def _first_loss(learner: segtrain.Learner) -> float:
    torch.manual_seed(11)  # the ASPP head's dropout draws from the global generator
    generator = torch.Generator().manual_seed(3)
    labeled = {
        "image": torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=generator),
        "label": torch.randint(0, 4, (2, 64, 64), dtype=torch.uint8, generator=generator),
        "weight": torch.ones(2, 64, 64),
    }
    return segtrain.train_step(learner, labeled, None, 0)["loss_s"]


def test_fine_tuning_from_a_whole_model_with_an_aux_head_and_another_class_count(
    tmp_path: Path,
) -> None:
    state, path = _voc_deeplab(tmp_path)
    cfg = segtrain.SegTrainConfig(arch="deeplabv3_mobilenet_v3_large", steps=4, batch_size=2)
    network = build_segmenter(arch=cfg.arch, num_classes=4)
    report = load_init(network, path, SEGMENTER)
    aux = sorted(k for k in state if k.startswith("aux_classifier."))
    assert report.kind == "model"
    assert report.reinitialised == ["classifier.4.bias", "classifier.4.weight"]  # 21 -> 4
    assert report.dropped == aux
    assert len(aux) == 8  # conv, BatchNorm (5), classifier conv and bias
    assert len(report.loaded) == len(state) - len(aux) - 2
    assert "2 re-initialised (another class count)" in report.summary()
    assert torch.equal(network.backbone["0"][0].weight, state["backbone.0.0.weight"])

    def learner(init: dict[str, torch.Tensor] | None) -> segtrain.Learner:
        return segtrain.new_learner(cfg, num_classes=4, crop_size=64, seed=0, device=CPU, init=init)

    fine_tuned = learner(report.loaded)
    # The reference: the same seeded network with the file's tensors copied in by hand, by name.
    by_hand = learner(None)
    target = by_hand.network.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            if not key.startswith(("aux_classifier.", "classifier.4.")):
                target[key].copy_(value)
    random = learner(None)
    # The class-count head keeps its seeded random initialisation, the same in both.
    head = fine_tuned.network.classifier[4].weight
    assert torch.equal(head, random.network.classifier[4].weight)
    first = _first_loss(fine_tuned)
    assert first == _first_loss(by_hand)  # the loaded weights' loss, to the bit
    assert abs(first - _first_loss(random)) > 1e-3  # not the random network's


def test_a_classification_backbone_initialises_only_the_backbone(tmp_path: Path) -> None:
    resnet = _tv_state("resnet50", 1)
    torch.manual_seed(0)
    network = build_segmenter(arch="deeplabv3_resnet50", num_classes=4)
    head_before = network.classifier[4].weight.clone()
    report = load_init(network, _save(resnet, tmp_path / "r50.pth"), SEGMENTER)
    assert (report.kind, report.dropped, report.reinitialised) == (
        "backbone",
        ["fc.bias", "fc.weight"],
        [],
    )
    assert len(report.loaded) == len(resnet) - 2
    assert torch.equal(network.backbone.layer4[2].conv3.weight, resnet["layer4.2.conv3.weight"])
    assert torch.equal(network.classifier[4].weight, head_before)  # the head stays random
    # MobileNet's trunk is its `features`, flattened into the segmenter's backbone.
    mobilenet = _tv_state("mobilenet_v3_large", 2)
    lraspp = build_segmenter(arch="lraspp_mobilenet_v3_large", num_classes=4)
    report = load_init(lraspp, _save(mobilenet, tmp_path / "mnv3.pth"), SEGMENTER)
    assert report.kind == "backbone"
    assert sorted({k.split(".")[0] for k in report.dropped}) == ["classifier"]
    assert torch.equal(lraspp.backbone["16"][0].weight, mobilenet["features.16.0.weight"])


def test_wrapped_and_data_parallel_files_load_the_same(tmp_path: Path) -> None:
    state, _ = _voc_deeplab(tmp_path)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    path = _save(wrapped, tmp_path / "ddp.pth")
    read = pretrained.read_state(path)
    assert read.keys() == state.keys()
    assert all(torch.equal(read[k], state[k]) for k in state)


def test_files_that_do_not_fit_are_refused_naming_what(tmp_path: Path) -> None:
    network = build_segmenter(arch="deeplabv3_resnet50", num_classes=4)
    resnet18 = _tv_state("resnet18", 0)
    with pytest.raises(ValueError, match=r"another shape outside the heads: layer1\.0\.conv1"):
        load_init(network, _save(resnet18, tmp_path / "r18.pth"), SEGMENTER)
    partial = {k: v for k, v in _tv_state("resnet50", 0).items() if not k.startswith("layer4.")}
    with pytest.raises(ValueError, match=r"missing backbone\.layer4\.0\.conv1\.weight"):
        load_init(network, _save(partial, tmp_path / "part.pth"), SEGMENTER)
    with pytest.raises(ValueError, match="none of its 1 tensors"):
        load_init(network, _save({"w": torch.ones(1)}, tmp_path / "x.pth"), SEGMENTER)
    (tmp_path / "text.pth").write_text("not weights")
    with pytest.raises(ValueError, match="is not a readable weights file"):
        load_init(network, str(tmp_path / "text.pth"), SEGMENTER)
    with pytest.raises(ValueError, match="cannot be read"):
        load_init(network, str(tmp_path / "absent.pth"), SEGMENTER)
    with pytest.raises(ValueError, match="init and weights exclude each other"):
        segtrain.SegTrainConfig(init="a.pth", weights="b.pt")


def test_a_coco_detector_gets_its_box_predictor_reinitialised(tmp_path: Path) -> None:
    coco = _tv_state("fasterrcnn_mobilenet_v3_large_fpn", 4, weights_backbone=None, num_classes=91)
    cfg = DetectorConfig()
    assert detector_layout(cfg.backend) is TORCHVISION_DETECTOR
    detector = build_detector(**detector_args(cfg, 5))
    report = load_init(detector, _save(coco, tmp_path / "coco.pth"), TORCHVISION_DETECTOR)
    assert report.kind == "model"
    assert report.dropped == []
    assert report.reinitialised == [
        f"roi_heads.box_predictor.{layer}.{p}"
        for layer in ("bbox_pred", "cls_score")
        for p in ("bias", "weight")
    ]
    assert torch.equal(detector.rpn.head.conv[0][0].weight, coco["rpn.head.conv.0.0.weight"])
    # What a training worker does with the mapped tensors it receives.
    learner = new_detector_learner(
        cfg, num_classes=5, seed=0, device=CPU, init=decode_state(encode_state(report.loaded))
    )
    trained = learner.model.state_dict()
    assert all(torch.equal(trained[k], v) for k, v in report.loaded.items())
    # An ImageNet MobileNet initialises the detector's trunk only.
    mobilenet = _tv_state("mobilenet_v3_large", 5)
    fresh = build_detector(**detector_args(cfg, 5))
    report = map_state(fresh, mobilenet, TORCHVISION_DETECTOR, source="mnv3")
    assert report.kind == "backbone"
    assert all(k.startswith("backbone.body.") for k in report.loaded)
    with pytest.raises(ValueError, match="init and weights exclude each other"):
        DetectorConfig(init="a.pth", weights="b.pt")


def test_backbone_learning_rate_is_a_fraction_of_the_schedule() -> None:
    cfg = segtrain.SegTrainConfig(steps=10, lr=0.01, backbone_lr=0.1)
    learner = segtrain.new_learner(cfg, num_classes=4, crop_size=64, seed=0, device=CPU)
    trunk, rest = learner.optimizer.param_groups
    names = {id(p): n for n, p in learner.network.named_parameters()}
    assert {names[id(p)].split(".")[0] for p in trunk["params"]} == {"backbone"}
    assert "backbone" not in {names[id(p)].split(".")[0] for p in rest["params"]}
    assert len(trunk["params"]) + len(rest["params"]) == len(names)
    _first_loss(learner)
    assert trunk["lr"] == pytest.approx(0.001)
    assert rest["lr"] == pytest.approx(0.01)
    single = segtrain.new_learner(
        cfg.model_copy(update={"backbone_lr": 1.0}),
        num_classes=4,
        crop_size=64,
        seed=0,
        device=CPU,
    )
    assert len(single.optimizer.param_groups) == 1


def test_the_init_file_is_in_the_cache_key_by_content_not_by_path(tmp_path: Path) -> None:
    state = _tv_state("mobilenet_v3_large", 2)
    here = _save(state, tmp_path / "a.pth")
    there = str(shutil.copy(here, tmp_path / "b.pth"))  # torch.save records the file's name
    other = _save(_tv_state("mobilenet_v3_large", 3), tmp_path / "c.pth")
    ctx = SimpleNamespace(
        config=SimpleNamespace(data=SimpleNamespace(num_classes=4, image_size=64, crop=64), seed=0),
        digest=lambda *_: "images-digest",
    )

    def fields(init: str | None) -> dict[str, Any]:
        section = segtrain.SegTrainConfig(init=init)
        return graph_keys.train_fields(ctx, section, None)  # type: ignore[arg-type]

    assert fields(here)["init"] == file_digest(Storage(str(tmp_path)).fs, here)
    assert fields(here) == fields(there)  # moved, same bytes: same key
    assert fields(here) != fields(other)
    assert "init" not in fields(None)
    assert "init" not in fields(here)["train"]


@pytest.mark.ray
def test_a_ray_train_worker_starts_from_the_init_file(tmp_path: Path) -> None:
    import ray

    mobilenet = _tv_state("mobilenet_v3_large", 2)
    path = _save(mobilenet, tmp_path / "mnv3.pth")
    cfg = segtrain.SegTrainConfig(steps=1, batch_size=2, lr=1e-9, weight_decay=0.0, init=path)
    generator = torch.Generator().manual_seed(0)
    storage = Storage(str(tmp_path / "root"))
    with local_ray():
        labeled = ray.data.from_items(
            [
                {
                    "image": torch.randint(
                        0, 256, (3, 32, 32), dtype=torch.uint8, generator=generator
                    ).numpy(),
                    "label": torch.randint(
                        0, 4, (32, 32), dtype=torch.uint8, generator=generator
                    ).numpy(),
                    "weight": torch.ones(32, 32).numpy(),
                }
                for _ in range(4)
            ]
        ).materialize()
        metrics = segtrain.run(
            cfg,
            datasets={"labeled": labeled},
            num_classes=4,
            storage=storage,
            out_path=storage.path("teacher.pt"),
            name="init-teacher",
            loop_extra={
                "image_size": 32,
                "seed": 0,
                "torch_threads": 1,
                "resolved_config": "",
                "policy": PseudolabelConfig(),
            },
            use_gpu=False,
        )
    assert metrics["init_loaded_tensors"] == len(mobilenet) - 4  # the classifier's 4 dropped
    trained = load_checkpoint(storage.read_bytes(storage.path("teacher.pt")), source="teacher")
    weights = trained["state_dict"]
    for key, value in mobilenet.items():
        name = "backbone." + key.removeprefix("features.")
        if key.startswith("features.") and value.is_floating_point() and "running" not in key:
            # one step at lr 1e-9 from the file's weights: the file's weights
            torch.testing.assert_close(weights[name], value, atol=1e-6, rtol=0, msg=name)


def test_a_detectron2_detector_starts_from_its_own_state_dict(tmp_path: Path) -> None:
    """detectron2 where it is installed: a GeneralizedRCNN state dict (bare, or as pseudoflow
    wraps it) of another class count loads with the box predictor re-initialised."""
    pytest.importorskip("detectron2")
    cfg = DetectorConfig(backend="detectron2")
    torch.manual_seed(0)
    source = build_detector(**detector_args(cfg, 9))
    head = [
        f"rcnn.roi_heads.box_predictor.{layer}.{p}"
        for layer in ("bbox_pred", "cls_score")
        for p in ("bias", "weight")
    ]
    for name, state in (("wrapped", source.state_dict()), ("bare", source.rcnn.state_dict())):
        target = build_detector(**detector_args(cfg, 5))
        report = load_init(
            target, _save(state, tmp_path / f"{name}.pth"), detector_layout("detectron2")
        )
        assert (report.kind, report.reinitialised, report.dropped) == ("model", head, [])
        conv = "rcnn.backbone.bottom_up.stem.conv1.weight"
        assert torch.equal(target.state_dict()[conv], source.state_dict()[conv])
