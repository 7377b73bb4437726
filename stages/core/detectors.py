"""Detector backends behind one contract: torchvision (the default) and detectron2.

Whatever builds the network, the stages see the same thing:

- ``build(**model_args) -> nn.Module``: a Faster R-CNN with random weights. ``num_classes`` counts
  the background class 0, so it equals the segmentation class count C; detector class ``d`` is
  segmentation class ``d`` (1..C-1).
- ``losses(model, images, targets) -> {name: loss}`` (model in train mode), with images
  ``float[3, H, W] in [0, 1]`` (RGB) and targets ``{"boxes": float[N, 4] (x1, y1, x2, y2) in
  pixels, "labels": int64[N] in 1..C-1}``.
- ``predict(model, images) -> [{"boxes", "labels", "scores"}]`` (model in eval mode), boxes in the
  input images' pixel coordinates, labels in 1..C-1.

detectron2 is imported only inside its backend: importing ``stages`` never needs it.

Why one module of over 400 lines: the contract and both backends are read side by side, since
what one backend does (class numbering, box coordinates, train and eval modes) the other must do
the same way; each backend is a short class.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models import get_model, list_models

from stages.core.errors import ModelError

BackendName = Literal["torchvision", "detectron2"]
DEFAULT_BACKEND: BackendName = "torchvision"

# The detectron2 source commit pseudoflow is checked against (docker/Dockerfile.cuda builds it).
DETECTRON2_COMMIT = "a1ce2f956a1d2212ad672e3c47d53405c2fe4312"
DETECTRON2_PIP = (
    "pip install --no-build-isolation "
    f"'git+https://github.com/facebookresearch/detectron2.git@{DETECTRON2_COMMIT}'"
)

# Faster R-CNN configs of detectron2's model zoo (1x and 3x differ only in their schedule, which
# is not used here: pseudoflow trains with its own loop).
DETECTRON2_ARCHITECTURES = tuple(
    f"COCO-Detection/faster_rcnn_{name}.yaml"
    for name in (
        "R_50_FPN_1x",
        "R_50_FPN_3x",
        "R_50_C4_1x",
        "R_50_C4_3x",
        "R_50_DC5_1x",
        "R_50_DC5_3x",
        "R_101_FPN_3x",
        "R_101_C4_3x",
        "R_101_DC5_3x",
        "X_101_32x8d_FPN_3x",
    )
)
# torchvision's FasterRCNN options (as ``detector_args`` writes them) -> detectron2 config keys.
DETECTRON2_OPTIONS = {
    "rpn_pre_nms_top_n_train": "MODEL.RPN.PRE_NMS_TOPK_TRAIN",
    "rpn_post_nms_top_n_train": "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "rpn_pre_nms_top_n_test": "MODEL.RPN.PRE_NMS_TOPK_TEST",
    "rpn_post_nms_top_n_test": "MODEL.RPN.POST_NMS_TOPK_TEST",
    "box_batch_size_per_image": "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    "box_detections_per_img": "TEST.DETECTIONS_PER_IMAGE",
}
# ImageNet's per-channel pixel mean and std in 0-255 units, RGB order: the normalisation
# torchvision's detectors apply (in 0-1 units) and detectron2's own from-scratch configs use
# (configs/Misc/scratch_*). The model zoo's configs set PIXEL_STD to 1, a convention
# of MSRA's pretrained weights (the std folded into conv1); on random weights it feeds the network
# pixels ~58x too large, and in eval mode (BatchNorm's initial running statistics) a fresh
# network's box scores saturate: every RoI is background with probability 1 - 1e-17, no box.
IMAGENET_PIXEL_MEAN = (123.675, 116.28, 103.53)
IMAGENET_PIXEL_STD = (58.395, 57.12, 57.375)
DEFAULT_ARCHITECTURES: dict[str, str] = {
    "torchvision": "fasterrcnn_mobilenet_v3_large_fpn",
    "detectron2": "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml",
}

Target = dict[str, torch.Tensor]


class BackendUnavailable(ModelError):
    """The selected detector backend cannot be imported in this environment (a config error)."""


class DetectorBackend(Protocol):
    """The contract every detector backend keeps (see the module docstring)."""

    name: str

    def architectures(self) -> list[str]: ...

    def build(
        self, *, arch: str, num_classes: int, min_size: int, max_size: int, **options: Any
    ) -> nn.Module: ...

    def losses(
        self, model: nn.Module, images: list[torch.Tensor], targets: list[Target]
    ) -> dict[str, torch.Tensor]: ...

    def predict(self, model: nn.Module, images: list[torch.Tensor]) -> list[Target]: ...


class TorchvisionBackend:
    """torchvision's Faster R-CNN family (``weights=None``): it resizes, normalises and maps
    boxes back to the input size itself."""

    name = "torchvision"

    def architectures(self) -> list[str]:
        from torchvision.models import detection

        return sorted(m for m in list_models(module=detection) if m.startswith("fasterrcnn"))

    def build(
        self, *, arch: str, num_classes: int, min_size: int, max_size: int, **options: Any
    ) -> nn.Module:
        """``options`` go to torchvision's ``FasterRCNN`` (proposal and RoI counts)."""
        check_arch(self.name, arch)
        model: nn.Module = get_model(
            arch,
            weights=None,
            weights_backbone=None,
            num_classes=num_classes,
            min_size=min_size,
            max_size=max_size,
            **options,
        )
        return model

    def losses(
        self, model: nn.Module, images: list[torch.Tensor], targets: list[Target]
    ) -> dict[str, torch.Tensor]:
        return dict(model(images, targets))

    def predict(self, model: nn.Module, images: list[torch.Tensor]) -> list[Target]:
        return [_output(o["boxes"], o["labels"], o["scores"]) for o in model(images)]


def _output(boxes: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor) -> Target:
    return {"boxes": boxes.float(), "labels": labels.long(), "scores": scores.float()}


# ---------------------------------------------------------------------------------------------
# detectron2: pure conversions (plain tensors; the backend wraps them in Instances and Boxes)


def resized_shape(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(height, width) after scaling the short side to ``min_size`` unless that makes the long
    side exceed ``max_size`` (then the long side is ``max_size``), rounded as detectron2's
    ``ResizeShortestEdge`` does."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def detectron2_image(image: torch.Tensor, size: tuple[int, int], input_format: str) -> torch.Tensor:
    """image: float[3, H, W] in [0, 1], RGB -> float[3, h, w] in [0, 255] in ``input_format``
    channel order ("BGR" or "RGB"), bilinearly resized to ``size`` = (h, w)."""
    if input_format not in ("BGR", "RGB"):
        raise ValueError(f"detectron2 INPUT.FORMAT {input_format!r}; pseudoflow feeds BGR or RGB")
    if tuple(image.shape[-2:]) != size:
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    pixels = image * 255.0
    return pixels.flip(0) if input_format == "BGR" else pixels


def detectron2_targets(target: Target, scale_x: float, scale_y: float) -> Target:
    """Our target -> detectron2's fields: ``gt_boxes`` float[N, 4] scaled to the resized image,
    ``gt_classes`` int64[N] in 0..C-2 (detectron2 has no background class: label - 1)."""
    scale = torch.tensor([scale_x, scale_y, scale_x, scale_y], dtype=torch.float32)
    return {
        "gt_boxes": target["boxes"].float() * scale.to(target["boxes"].device),
        "gt_classes": target["labels"].long() - 1,
    }


def detectron2_inputs(
    images: list[torch.Tensor],
    targets: list[Target] | None,
    *,
    min_size: int,
    max_size: int,
    input_format: str,
) -> list[dict[str, Any]]:
    """detectron2's per-image input dicts: ``image`` (resized, 0-255, ``input_format`` order),
    ``height``/``width`` = the input image's size (detectron2 maps predictions back to it) and,
    with targets, ``gt_boxes``/``gt_classes`` in the resized image's pixels."""
    inputs = []
    for i, image in enumerate(images):
        height, width = image.shape[-2:]
        size = resized_shape(height, width, min_size, max_size)
        entry: dict[str, Any] = {
            "image": detectron2_image(image, size, input_format),
            "height": height,
            "width": width,
        }
        if targets is not None:
            entry.update(detectron2_targets(targets[i], size[1] / width, size[0] / height))
        inputs.append(entry)
    return inputs


def imagenet_pixels(input_format: str) -> tuple[list[float], list[float]]:
    """detectron2's ``MODEL.PIXEL_MEAN`` and ``MODEL.PIXEL_STD`` for ImageNet normalisation of
    0-255 pixels in ``input_format`` channel order ("BGR" or "RGB")."""
    mean, std = list(IMAGENET_PIXEL_MEAN), list(IMAGENET_PIXEL_STD)
    if input_format == "BGR":
        return mean[::-1], std[::-1]
    if input_format == "RGB":
        return mean, std
    raise ValueError(f"detectron2 INPUT.FORMAT {input_format!r}; pseudoflow feeds BGR or RGB")


def from_detectron2(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor) -> Target:
    """detectron2's ``pred_boxes.tensor`` float[N, 4], ``scores`` float[N] and ``pred_classes``
    int64[N] in 0..C-2 -> our boxes, scores and labels in 1..C-1."""
    return _output(boxes, classes.long() + 1, scores)


class Detectron2Detector(nn.Module):
    """A detectron2 ``GeneralizedRCNN`` and the resize its inputs get: GeneralizedRCNN only
    normalises and pads (detectron2's data loader resizes), so the backend resizes with these.

    The RCNN's input normalisation (``pixel_mean``, ``pixel_std``; detectron2 keeps them out of
    the state dict) is saved with the weights, so a checkpoint is rebuilt with the normalisation it
    was trained with. A checkpoint without it (written before pseudoflow normalised detectron2's
    input) loads ``legacy_pixels``: the model-zoo config's values it was trained with."""

    def __init__(
        self,
        rcnn: nn.Module,
        *,
        min_size: int,
        max_size: int,
        input_format: str,
        legacy_pixels: tuple[list[float], list[float]],
    ):
        super().__init__()
        self.rcnn = rcnn
        self.min_size = min_size
        self.max_size = max_size
        self.input_format = input_format
        self.legacy_pixels = legacy_pixels
        for name in ("pixel_mean", "pixel_std"):
            rcnn.register_buffer(name, getattr(rcnn, name), persistent=True)
        self.register_load_state_dict_pre_hook(_legacy_pixels)

    def forward(self, batched_inputs: list[dict[str, Any]]) -> Any:
        return self.rcnn(batched_inputs)


def _legacy_pixels(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """Load-state-dict pre-hook: a state dict without the RCNN's normalisation gets the values
    the model was built with before pseudoflow saved them."""
    assert isinstance(module, Detectron2Detector)
    for name, values in zip(("pixel_mean", "pixel_std"), module.legacy_pixels, strict=True):
        state_dict.setdefault(f"{prefix}rcnn.{name}", torch.tensor(values).view(-1, 1, 1))


def _detectron2(module: str) -> Any:
    """A detectron2 module, imported by name so that neither importing nor type-checking
    ``stages`` needs detectron2."""
    return importlib.import_module(f"detectron2.{module}")


def detectron2_config_file(arch: str) -> str:
    """The path of model-zoo config ``arch`` in the installed detectron2, found as
    ``detectron2.model_zoo.get_config_file`` finds it but without importing
    ``detectron2.model_zoo``: that module imports ``pkg_resources``, which setuptools 81 and later
    no longer ship."""
    spec = importlib.util.find_spec("detectron2.model_zoo")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("detectron2 is installed without its model_zoo package")
    path = Path(next(iter(spec.submodule_search_locations)), "configs", arch)
    if not path.is_file():
        raise RuntimeError(f"detectron2's model-zoo config {arch} is not installed ({path})")
    return str(path)


def _inner(model: nn.Module) -> Detectron2Detector:
    inner = getattr(model, "module", model)  # unwrap DistributedDataParallel
    assert isinstance(inner, Detectron2Detector), type(inner)
    return inner


class Detectron2Backend:
    """detectron2's ``GeneralizedRCNN`` Faster R-CNN from a model-zoo config, random weights."""

    name = "detectron2"

    def architectures(self) -> list[str]:
        return list(DETECTRON2_ARCHITECTURES)

    def build(
        self, *, arch: str, num_classes: int, min_size: int, max_size: int, **options: Any
    ) -> nn.Module:
        """The torchvision backend's arguments, mapped onto detectron2's config
        (``options``: the keys of ``DETECTRON2_OPTIONS``)."""
        check_arch(self.name, arch)
        unknown = sorted(set(options) - set(DETECTRON2_OPTIONS))
        if unknown:
            raise ValueError(
                f"detectron2 detector options {unknown}; choose from {', '.join(DETECTRON2_OPTIONS)}"
            )
        cfg = _detectron2("config").get_cfg()
        cfg.merge_from_file(detectron2_config_file(arch))
        cfg.merge_from_list(
            [item for k, v in options.items() for item in (DETECTRON2_OPTIONS[k], v)]
        )
        cfg.MODEL.WEIGHTS = ""
        cfg.MODEL.DEVICE = "cpu"
        cfg.MODEL.BACKBONE.FREEZE_AT = 0  # random weights: nothing is pretrained to keep
        cfg.MODEL.RESNETS.NORM = "BN"  # FrozenBN would freeze random statistics
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes - 1  # no background class
        # Random weights get ImageNet-normalised pixels (see IMAGENET_PIXEL_STD); the config's
        # own values are what checkpoints that saved no normalisation were trained with.
        legacy = list(cfg.MODEL.PIXEL_MEAN), list(cfg.MODEL.PIXEL_STD)
        cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = imagenet_pixels(cfg.INPUT.FORMAT)
        # Recorded for completeness: GeneralizedRCNN does not resize, Detectron2Detector does.
        cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (min_size,), max_size
        cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = min_size, max_size
        rcnn = _detectron2("modeling").build_model(cfg)
        return Detectron2Detector(
            rcnn,
            min_size=min_size,
            max_size=max_size,
            input_format=cfg.INPUT.FORMAT,
            legacy_pixels=legacy,
        )

    def _inputs(
        self, model: nn.Module, images: list[torch.Tensor], targets: list[Target] | None
    ) -> list[dict[str, Any]]:
        inner = _inner(model)
        return detectron2_inputs(
            images,
            targets,
            min_size=inner.min_size,
            max_size=inner.max_size,
            input_format=inner.input_format,
        )

    def losses(
        self, model: nn.Module, images: list[torch.Tensor], targets: list[Target]
    ) -> dict[str, torch.Tensor]:
        structures = _detectron2("structures")
        inputs = self._inputs(model, images, targets)
        for entry in inputs:
            entry["instances"] = structures.Instances(
                tuple(entry["image"].shape[-2:]),
                gt_boxes=structures.Boxes(entry.pop("gt_boxes")),
                gt_classes=entry.pop("gt_classes"),
            )
        with _detectron2("utils.events").EventStorage():  # its heads log training statistics
            return dict(model(inputs))

    def predict(self, model: nn.Module, images: list[torch.Tensor]) -> list[Target]:
        outputs = model(self._inputs(model, images, None))
        return [
            from_detectron2(i.pred_boxes.tensor, i.scores, i.pred_classes)
            for i in (o["instances"] for o in outputs)
        ]


# ---------------------------------------------------------------------------------------------
# registry

_BACKENDS: dict[str, type[DetectorBackend]] = {
    "torchvision": TorchvisionBackend,
    "detectron2": Detectron2Backend,
}


@functools.cache
def _detectron2_problem() -> str | None:
    """Why detectron2 cannot be used here, or None when it can."""
    try:
        importlib.import_module("detectron2.modeling")
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == "detectron2":
            return "which is not installed in this environment"
        return f"which cannot be imported in this environment ({exc})"
    return None


def _problem(name: str) -> str | None:
    return _detectron2_problem() if name == "detectron2" else None


def available_backends() -> list[str]:
    """The backends that can be used in this environment."""
    return [name for name in _BACKENDS if _problem(name) is None]


def architectures(name: str) -> list[str]:
    """The ``arch`` values backend ``name`` accepts (known without importing its package)."""
    return _BACKENDS[name]().architectures()


def check_arch(name: str, arch: str) -> None:
    """``ValueError`` listing the valid ones when backend ``name`` has no architecture ``arch``."""
    valid = architectures(name)
    if arch not in valid:
        raise ValueError(f"unknown {name} detector arch {arch!r}; choose one of {', '.join(valid)}")


def detector_backend(name: str) -> DetectorBackend:
    """The backend called ``name``; :class:`BackendUnavailable` when it cannot be imported here."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown detector backend {name!r}; choose one of {', '.join(_BACKENDS)}")
    problem = _problem(name)
    if problem is not None:
        raise BackendUnavailable(
            f"detector.backend {name!r} needs the {name} package, {problem}; it is not on PyPI: "
            "use the CUDA image built from docker/ (docker/Dockerfile.cuda builds it from a "
            f"pinned commit) or `{DETECTRON2_PIP}`; or set detector.backend: torchvision"
        )
    return _BACKENDS[name]()


def split_backend(model_args: dict[str, Any]) -> tuple[DetectorBackend, dict[str, Any]]:
    """The backend a checkpoint's ``model_args`` name (torchvision when absent: checkpoints from
    before backends existed) and the remaining builder arguments."""
    args = dict(model_args)
    return detector_backend(args.pop("backend", DEFAULT_BACKEND)), args
