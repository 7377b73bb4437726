"""Model builders: torchvision architectures, built with ``weights=None`` (detectors through the
backend a config or checkpoint names, :mod:`stages.core.detectors`); local weights by path.

A checkpoint is a plain dict of tensors and primitives (loadable with ``weights_only=True``) that
carries the builder arguments, so loading it rebuilds the same network without the original YAML.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import get_model, list_models
from torchvision.models import segmentation as tv_segmentation

from stages.core.detectors import split_backend

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "pseudoflow.checkpoint/1"


def segmentation_architectures() -> list[str]:
    """Names of torchvision segmentation builders usable as ``arch``."""
    return sorted(list_models(module=tv_segmentation))


def check_arch(arch: str) -> None:
    """Raise ``ValueError`` naming the valid architectures unless ``arch`` is one."""
    valid = segmentation_architectures()
    if arch not in valid:
        raise ValueError(f"unknown segmentation arch {arch!r}; choose one of {', '.join(valid)}")


def build_segmenter(*, arch: str, num_classes: int) -> nn.Module:
    """A torchvision segmentation network with random weights (``weights=None``, no download)."""
    check_arch(arch)
    kwargs: dict[str, Any] = {"weights": None, "weights_backbone": None, "num_classes": num_classes}
    if "aux_loss" in _builder_params(arch):
        kwargs["aux_loss"] = False
    model: nn.Module = get_model(arch, **kwargs)
    return model


def _builder_params(arch: str) -> set[str]:
    import inspect

    from torchvision.models import get_model_builder

    return set(inspect.signature(get_model_builder(arch)).parameters)


def segment_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Logits ``float[B, C, H, W]`` for normalised images ``float[B, 3, H, W]``.

    torchvision segmentation models return a dict with ``"out"`` already at input resolution.
    """
    output = model(images)
    logits: torch.Tensor = output["out"] if isinstance(output, dict) else output
    return logits


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a data-parallel wrapper (Ray Train's ``prepare_model``), or itself."""
    inner: nn.Module = getattr(model, "module", model)
    return inner


def feature_layer(model: nn.Module) -> nn.Module:
    """The segmenter's final classifier convolution, whose input is the decoder feature just
    before the classifier (methods.md §4). torchvision heads: LRASPP's ``high_classifier``,
    otherwise the last ``Conv2d`` of ``model.classifier`` (DeepLabV3, FCN)."""
    inner = unwrap(model)
    head = getattr(inner, "classifier", None)
    if head is None:
        raise ValueError(f"{type(inner).__name__} has no 'classifier' head to take features from")
    if hasattr(head, "high_classifier"):
        layer: nn.Module = head.high_classifier
        return layer
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(head).__name__} has no Conv2d classifier layer")
    return convs[-1]


def segment_with_features(
    model: nn.Module, images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``float[B, C, H, W]`` and the classifier's input features ``float[B, D, h, w]``
    (at the head's own stride) for normalised images ``float[B, 3, H, W]``, in one forward."""
    captured: list[torch.Tensor] = []
    handle = feature_layer(model).register_forward_pre_hook(
        lambda _module, args: captured.append(args[0])
    )
    try:
        logits = segment_logits(model, images)
    finally:
        handle.remove()
    return logits, captured[-1]


def build_detector(**model_args: Any) -> nn.Module:
    """A detector with random weights from a checkpoint's ``model_args``, built by the backend
    they name (``"backend"``; torchvision when absent). See :mod:`stages.core.detectors`."""
    backend, args = split_backend(model_args)
    return backend.build(**args)


def file_digest(path: str | Path) -> str:
    """sha256 of a weights file, recorded in configs and cache keys."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def make_checkpoint(
    model: nn.Module, *, kind: str, model_args: dict[str, Any], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The dict saved for a trained model (unwrapped): format tag, kind, builder arguments,
    weights."""
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    return {
        "format": CHECKPOINT_FORMAT,
        "kind": kind,
        "model_args": dict(model_args),
        "state_dict": state,
        **(extra or {}),
    }


# What a model file a user loads holds; the rest (optimizer, step, random state, prototype
# memory, the trained weights beside an EMA) is in its resumable copy (``resumable_path``).
MODEL_KEYS = ("format", "kind", "model_args", "state_dict", "image_size", "window", "config")


def resumable_path(path: str) -> str:
    """Where the full training state of the model at ``path`` is kept: ``student.pt`` ->
    ``student.state.pt`` (continue training from it; load ``path`` to use the model)."""
    return path.removesuffix(".pt") + ".state.pt"


def finished_model(
    blob: bytes, *, image_size: int, source: str, window: int | None = None
) -> bytes:
    """A finished training's checkpoint as the model file users load: the network's weights,
    builder arguments, the canvas side images are fitted to (``image_size``) and the sliding
    window it is evaluated with (``window``: its training crop; the whole canvas when None or
    not smaller), the resolved config."""
    checkpoint = load_checkpoint(blob, source=source)
    model = {k: checkpoint[k] for k in MODEL_KEYS if k in checkpoint}
    model["image_size"] = int(image_size)
    model["window"] = int(min(window or image_size, image_size))
    return checkpoint_bytes(model)


def write_trained(
    storage: Any, out_path: str, blob: bytes, *, image_size: int, window: int | None = None
) -> None:
    """Write a finished training's model (``out_path``) and its resumable copy beside it."""
    storage.write_bytes(resumable_path(out_path), blob)
    model = finished_model(blob, image_size=image_size, window=window, source=out_path)
    storage.write_bytes(out_path, model)


def checkpoint_bytes(checkpoint: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getvalue()


def _torch_load(data: bytes, source: str) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and primitives only, never code."""
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:
        raise ValueError(f"{source}: not a readable weights file: {exc}") from exc


def _is_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT


def load_checkpoint(data: bytes, *, source: str) -> dict[str, Any]:
    """Read a pseudoflow checkpoint safely (``weights_only=True``)."""
    checkpoint = _torch_load(data, source)
    if not _is_checkpoint(checkpoint):
        raise ValueError(f"{source}: not a pseudoflow checkpoint (format {CHECKPOINT_FORMAT})")
    result: dict[str, Any] = checkpoint
    return result


def given_checkpoint(path: str, *, kind: str, num_classes: int, arch: str | None = None) -> bytes:
    """Checkpoint bytes for weights a user points to (local path or fsspec URL).

    Accepted: a pseudoflow checkpoint of ``kind`` with ``num_classes`` classes (and of ``arch``,
    when given), or, for a segmenter, a plain state dict of ``arch``. The network is built once to
    check it loads.
    """
    import fsspec

    try:
        with fsspec.open(path, "rb") as handle:
            data = handle.read()
    except (OSError, ValueError) as exc:
        raise ValueError(f"weights file {path!r} cannot be read: {exc}") from exc
    obj = _torch_load(data, path)
    if _is_checkpoint(obj):
        checkpoint: dict[str, Any] = obj
    elif kind == "segmenter" and arch is not None:
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "kind": kind,
            "state_dict": obj,
            "model_args": {"arch": arch, "num_classes": num_classes},
        }
    else:
        raise ValueError(f"{path}: {kind} weights must be a pseudoflow checkpoint")
    found = (checkpoint.get("kind"), checkpoint["model_args"].get("num_classes"))
    if found != (kind, num_classes):
        raise ValueError(
            f"{path}: a {found[0]} with {found[1]} classes; expected a {kind} "
            f"with {num_classes} classes"
        )
    found_arch = checkpoint["model_args"].get("arch")
    if arch is not None and found_arch != arch:
        # The cache key records the configured arch: a different network must not pass as it.
        raise ValueError(f"{path}: a {found_arch} {kind}; the config's arch is {arch}")
    try:
        model_from_checkpoint(checkpoint)
    except (RuntimeError, TypeError, KeyError) as exc:
        raise ValueError(
            f"weights file {path!r} does not fit {checkpoint['model_args']}: {exc}"
        ) from exc
    return checkpoint_bytes(checkpoint)


def model_from_checkpoint(checkpoint: dict[str, Any]) -> nn.Module:
    """Rebuild the network a checkpoint describes and load its weights (eval mode)."""
    args = checkpoint["model_args"]
    build = build_detector if checkpoint["kind"] == "detector" else build_segmenter
    model = build(**args)
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    return model
