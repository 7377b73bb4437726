"""The train_detector stage: given weights checked and kept, or a Ray Train run of
:func:`~stages.train_detector.loop.train_loop`; the checkpoint written."""

from __future__ import annotations

from typing import Any

from stages.core.declaration import Declaration
from stages.core.detectors import DEFAULT_BACKEND
from stages.core.models import build_detector, finished_model, given_checkpoint, load_checkpoint
from stages.core.run_config import LoopConfig
from stages.core.training import train_and_write
from stages.train_detector.config import DetectorConfig, detector_args, detector_layout
from stages.train_detector.loop import train_loop

DECLARATION = Declaration(
    "train_detector",
    reads=("images",),
    writes=("detector",),
    schema="detector/1",
    section="detector",
    image_inputs=(("labeled", "train"),),
    key_figures=("trained_steps", "loss", "steps_per_s"),
)


def run(
    cfg: DetectorConfig,
    *,
    labeled: Any,
    num_classes: int,
    storage: Any,
    out_path: str,
    name: str,
    loop_extra: dict[str, Any],
    use_gpu: bool,
) -> dict[str, float]:
    """Train the detector with Ray Train (or load given weights); write its checkpoint."""
    if cfg.weights:
        # The backend before the arch (given_checkpoint's check): the arch of another backend's
        # checkpoint differs too, and "detector.backend is ..." says what to change.
        blob = given_checkpoint(cfg.weights, kind="detector", num_classes=num_classes)
        model_args = load_checkpoint(blob, source=cfg.weights)["model_args"]
        found = model_args.get("backend") or DEFAULT_BACKEND
        if found != cfg.backend:
            raise ValueError(
                f"{cfg.weights}: a {found} detector; detector.backend is {cfg.backend}"
            )
        if model_args.get("arch") != cfg.arch:  # the cache key records the config's arch
            raise ValueError(
                f"{cfg.weights}: a {model_args.get('arch')} detector; the config's arch is "
                f"{cfg.arch}"
            )
        # as given, plus the image size it is used at (the model file's metadata)
        image_size = loop_extra["image_size"]
        storage.write_bytes(out_path, finished_model(blob, image_size=image_size, source=out_path))
        return {"trained_steps": 0.0}
    return train_and_write(
        train_loop,
        LoopConfig(train=cfg, num_classes=num_classes, **loop_extra),
        steps=cfg.steps,
        init_into=lambda: build_detector(**detector_args(cfg, num_classes)),
        layout=detector_layout(cfg.backend),
        datasets={"labeled": labeled},
        storage=storage,
        out_path=out_path,
        name=name,
        use_gpu=use_gpu,
    )
