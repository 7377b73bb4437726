"""Start training from pretrained weights (``teacher.init``, ``student.init``, ``detector.init``).

An init file is a state dict read with ``torch.load(..., weights_only=True)`` from a local path or
an fsspec URL; nothing is downloaded. Accepted:

- a whole model of the same family, as torchvision ships them: ``deeplabv3_resnet50`` with its
  ``aux_classifier`` and 21 VOC classes, ``fasterrcnn_resnet50_fpn`` with 91 COCO classes, or a
  pseudoflow checkpoint. Heads of another class count are re-initialised; tensors the network does
  not have (an aux head the pipeline does not train) are dropped; both are said.
- a backbone: the classification network the segmenter's or detector's backbone is cut from
  (``resnet50``, ``resnet101``, ``mobilenet_v3_large`` ImageNet state dicts). Everything outside
  the backbone keeps its random initialisation.

The file's keys are matched to the network's by trying each way it can be laid out (as is, under
the backbone's prefix, MobileNet's ``features.`` flattened into it) and taking the one that
matches most tensors. A tensor of another shape outside the heads, or a backbone that the file
covers only in part, is refused with the names of what does not fit: a silent partial load is
the failure that costs a user a week.

The mapping is done once on the driver (so a bad file fails before any worker starts); workers
receive the mapped tensors (:func:`encode_state` / :func:`decode_state`) and load them into their
freshly built network before its optimizer and EMA exist.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Wrappers a saved state dict may carry around the tensors.
_CONTAINERS = ("state_dict", "model", "model_state", "module")
# Per-key prefixes left by data-parallel wrappers.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class Layout:
    """Where a network keeps its backbone and its class-count-dependent heads.

    ``wrappers``: prefixes under which the network holds a whole model of the family (a
    whole-model file may be laid out under any of them); ``backbones``: the prefix of the
    classification network's trunk inside this one; ``heads``: prefixes of the layers whose shape
    follows the class count (re-initialised when the file's differs)."""

    backbones: tuple[str, ...]
    heads: tuple[str, ...]
    wrappers: tuple[str, ...] = ("",)


SEGMENTER = Layout(backbones=("backbone.",), heads=("classifier.", "aux_classifier."))
TORCHVISION_DETECTOR = Layout(backbones=("backbone.body.",), heads=("roi_heads.box_predictor.",))
DETECTRON2_DETECTOR = Layout(
    backbones=("rcnn.backbone.bottom_up.",),
    heads=("rcnn.roi_heads.box_predictor.",),
    wrappers=("rcnn.", ""),
)


@dataclass
class InitReport:
    """What an init file gave a network: ``loaded`` tensors (by the network's names), heads
    ``reinitialised`` (another shape in the file), file tensors ``dropped`` (nothing of that
    name in the network), and whether the file was a whole model or a backbone."""

    source: str
    kind: str  # "model" or "backbone"
    loaded: dict[str, torch.Tensor] = field(repr=False)
    reinitialised: list[str]
    dropped: list[str]

    def summary(self) -> str:
        parts = [f"{len(self.loaded)} tensors loaded from {self.source} (a {self.kind})"]
        if self.reinitialised:
            parts.append(
                f"{len(self.reinitialised)} re-initialised (another class count): "
                + _names(self.reinitialised)
            )
        if self.dropped:
            parts.append(
                f"{len(self.dropped)} not in this network, dropped: {_names(self.dropped)}"
            )
        return "; ".join(parts)

    def metrics(self) -> dict[str, float]:
        return {
            "init_loaded_tensors": float(len(self.loaded)),
            "init_reinitialised_tensors": float(len(self.reinitialised)),
        }


def _names(keys: Iterable[str], limit: int = 4) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def read_state(path: str) -> dict[str, torch.Tensor]:
    """The tensors of an init file (local path or fsspec URL), read with ``weights_only=True``;
    a pseudoflow checkpoint or a ``{"state_dict": ...}``/``{"model": ...}`` wrapper is opened,
    and data-parallel prefixes (``module.``) are removed."""
    import fsspec

    try:
        with fsspec.open(path, "rb") as handle:
            data = handle.read()
    except (OSError, ValueError) as exc:
        raise ValueError(f"init file {path!r} cannot be read: {exc}") from exc
    try:
        obj = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:
        raise ValueError(f"init file {path!r} is not a readable weights file: {exc}") from exc
    for _ in range(2):  # a checkpoint's state_dict, or a trainer's {"model": ...}
        if isinstance(obj, dict):
            inner = next((obj[k] for k in _CONTAINERS if isinstance(obj.get(k), dict)), None)
            if inner is not None and not _is_state(obj):
                obj = inner
    if not _is_state(obj):
        raise ValueError(
            f"init file {path!r} holds no state dict (a mapping of names to tensors, or one "
            f"under {', '.join(_CONTAINERS)})"
        )
    return {_unwrap_key(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _is_state(obj: Any) -> bool:
    return isinstance(obj, dict) and any(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap_key(key: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def _candidates(layout: Layout) -> list[tuple[str, Any]]:
    """Ways a file's keys may map to the network's: (kind, key -> network key)."""
    ways: list[tuple[str, Any]] = [
        ("model", lambda k, p=prefix: p + k) for prefix in layout.wrappers
    ]
    for prefix in layout.backbones:
        ways.append(("backbone", lambda k, p=prefix: p + k))
        ways.append(("backbone", lambda k, p=prefix: p + k.removeprefix("features.")))
    return ways


def map_state(
    model: nn.Module, state: dict[str, torch.Tensor], layout: Layout, *, source: str
) -> InitReport:
    """Match ``state``'s tensors to ``model``'s (see the module docstring); raise ``ValueError``
    naming what does not fit. ``model`` is not changed."""
    target = model.state_dict()
    best: tuple[int, str, dict[str, str]] | None = None
    for kind, rename in _candidates(layout):
        names = {key: rename(key) for key in state}
        hits = sum(1 for key, name in names.items() if name in target)
        if best is None or hits > best[0]:
            best = (hits, kind, names)
    assert best is not None
    hits, kind, names = best
    if hits == 0:
        raise ValueError(
            f"init file {source}: none of its {len(state)} tensors (e.g. {_names(sorted(state))}) "
            f"fits this network (e.g. {_names(sorted(target))}): give a state dict of the same "
            "architecture, or of the classification network its backbone is cut from"
        )
    loaded: dict[str, torch.Tensor] = {}
    reinitialised, dropped, misfits = [], [], []
    for key, name in names.items():
        if name not in target:
            dropped.append(key)
        elif state[key].shape == target[name].shape:
            loaded[name] = state[key]
        elif name.startswith(layout.heads):
            reinitialised.append(name)
        else:
            misfits.append(
                f"{key} {tuple(state[key].shape)} (the network's {name}: "
                f"{tuple(target[name].shape)})"
            )
    if misfits:
        raise ValueError(
            f"init file {source}: {len(misfits)} tensors of another shape outside the heads: "
            f"{_names(misfits, 3)}; is it another architecture?"
        )
    covered = [p for p in layout.backbones if any(n.startswith(p) for n in target)]
    trunk = [n for n in target if n.startswith(tuple(covered)) and _learned(n)]
    missing = [n for n in trunk if n not in loaded]
    if missing:
        raise ValueError(
            f"init file {source}: covers {len(trunk) - len(missing)} of the backbone's "
            f"{len(trunk)} tensors; missing {_names(missing)}. Is it another architecture?"
        )
    return InitReport(source, kind, loaded, sorted(reinitialised), sorted(dropped))


def _learned(name: str) -> bool:
    """Tensors a pretrained backbone must give (BatchNorm's step counter is not one)."""
    return not name.endswith("num_batches_tracked")


def load_init(model: nn.Module, path: str, layout: Layout) -> InitReport:
    """Read ``path`` and load what fits into ``model`` (in place); the report says what."""
    report = map_state(model, read_state(path), layout, source=path)
    apply_state(model, report.loaded)
    return report


def apply_state(model: nn.Module, loaded: dict[str, torch.Tensor]) -> None:
    """Load mapped tensors into ``model``; every one must land (the rest keep their values)."""
    result = model.load_state_dict(loaded, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"init tensors the network lacks: {_names(result.unexpected_keys)}")


def encode_state(loaded: dict[str, torch.Tensor]) -> bytes:
    """Mapped tensors as bytes for the training workers (``torch.save``: tensors only)."""
    buffer = io.BytesIO()
    torch.save({k: v.contiguous() for k, v in loaded.items()}, buffer)
    return buffer.getvalue()


def decode_state(data: bytes) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = torch.load(
        io.BytesIO(data), weights_only=True, map_location="cpu"
    )
    return state


def check_init_or_weights(init: str | None, weights: str | None) -> None:
    """A section sets at most one of ``init`` (train from) and ``weights`` (use as is)."""
    if init and weights:
        raise ValueError(
            "init and weights exclude each other: init starts training from a file, weights "
            "skips training and uses a checkpoint as it is; give one"
        )


def param_groups(model: nn.Module, backbone_lr: float) -> list[dict[str, Any]]:
    """Optimizer groups: one (every parameter at the schedule's rate) when ``backbone_lr`` is 1,
    else the backbone's parameters at ``backbone_lr`` times it (``lr_scale``) and the rest at it."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if backbone_lr == 1.0:
        return [{"params": [p for _, p in params], "lr_scale": 1.0}]
    trunk = [p for n, p in params if _unwrap_key(n).startswith("backbone.")]
    rest = [p for n, p in params if not _unwrap_key(n).startswith("backbone.")]
    return [{"params": trunk, "lr_scale": backbone_lr}, {"params": rest, "lr_scale": 1.0}]
