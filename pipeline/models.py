"""The trained segmenters out of pseudoflow: as MLflow models, and as label maps of new images.

**MLflow model.** Each trained teacher and student is saved with MLflow's pytorch flavour in the
``pt2`` format (``torch.export``: a traced graph and its weights, no pickle of any Python class),
with a signature and an input example. Its input is what a user has: ``uint8[B, 3, H, W]`` RGB
images of any batch size and size; its output the logits ``float32[B, C, H, W]`` at the input's
size. The export is written into the stage's cache entry (``<name>_mlflow/``) and every run that
trains or reuses the model logs it as its ``model`` artifact, so
``mlflow.pytorch.load_model("runs:/<run>/model")`` works in any process with torch, without
pseudoflow. The metadata says how the pipeline feeds it: ``image_size``, the square canvas a
picture is fitted to (long side, aspect ratio kept, padded bottom and right), and ``window``, the
sliding window it is evaluated with (its training crop). Doing the same (as
:func:`predict_images` does) reproduces the pipeline's numbers.

**Predict.** :func:`predict_images` runs a model on image files exactly as the evaluate stage
does (fit to the canvas, logits over sliding windows where the window is smaller, softmax, the
fitted part bilinear back to the picture's size, argmax) and writes a label PNG (class indices)
and a colour overlay per image.
"""

from __future__ import annotations

import logging
import os
import posixpath
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from stages.core import data
from stages.core.models import load_checkpoint, model_from_checkpoint, segment_logits
from stages.core.storage import Storage

logger = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
MODEL_TAG = "pseudoflow.model_uri"  # a stage run's logged model
STUDENT_TAG = "pseudoflow.student_model"  # on a pipeline run: its final student's
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# torch.export keeps its tracing modes on one process-wide stack: two exports at once (a sweep's
# parallel runs share the driver) pop each other's modes and fail. One export at a time.
_EXPORT_LOCK = threading.Lock()


class Segmenter(nn.Module):
    """What is exported: uint8 RGB images -> logits at their size (ImageNet normalisation
    inside, so a user feeds pictures as they are)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network
        # data.normalize's constants as buffers: they follow the module to a device
        self.register_buffer("mean", torch.tensor(data.MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(data.STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = self.get_buffer("mean"), self.get_buffer("std")
        x = images.float() / 255.0  # the same operations as data.normalize
        return segment_logits(self.network, (x - mean) / std)


def export_segmenter(checkpoint_bytes: bytes, directory: str, *, source: str) -> None:
    """Save a segmenter checkpoint as an MLflow pytorch model (``pt2``) in local ``directory``."""
    import mlflow.pytorch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    checkpoint = load_checkpoint(checkpoint_bytes, source=source)
    args = checkpoint["model_args"]
    size = int(checkpoint.get("image_size") or 0)
    window = int(checkpoint.get("window") or size)
    if checkpoint["kind"] != "segmenter" or size <= 0:
        raise ValueError(f"{source}: not a finished segmenter model (kind, image_size)")
    module = Segmenter(model_from_checkpoint(checkpoint)).eval()
    # Batch 2 and the trained size: export keeps batch, height and width dynamic (size-1 dims
    # would be specialised).
    generator = torch.Generator().manual_seed(0)
    example = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=generator)
    classes = int(args["num_classes"])
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 3, -1, -1), "images")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes, -1, -1), "logits")]),
    )
    with _EXPORT_LOCK:
        mlflow.pytorch.save_model(
            module,
            directory,
            signature=signature,
            input_example=example.numpy(),
            serialization_format="pt2",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            metadata={
                "arch": args["arch"],
                "num_classes": classes,
                "image_size": size,
                "window": window,
                "input": "uint8 RGB [B, 3, H, W]; for the pipeline's results fit pictures to an"
                " image_size canvas (long side, aspect kept, padded) and slide window-sized windows",
                "output": "logits float32 [B, num_classes, H, W]",
            },
        )


def store_export(storage: Storage, checkpoint_path: str, directory: str) -> None:
    """Export the checkpoint at ``checkpoint_path`` (storage) into ``directory`` (storage)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "model")
        blob = storage.read_bytes(checkpoint_path)
        export_segmenter(blob, local, source=checkpoint_path)
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                relative = path.relative_to(local).as_posix()
                storage.write_bytes(posixpath.join(directory, relative), path.read_bytes())


def download_folder(storage: Storage, directory: str, local: str) -> None:
    """Copy a stored folder's files to the local folder ``local``."""
    for path in storage.fs.find(directory):
        relative = posixpath.relpath(path, directory)
        target = Path(local, relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.read_bytes(path))


# ---------------------------------------------------------------------------------- predict
@dataclass
class LoadedModel:
    """A segmenter ready to predict: ``forward(uint8 images) -> logits``, its canvas size,
    classes, and its sliding window (0: the whole canvas)."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    image_size: int
    num_classes: int
    source: str
    window: int = 0


def load_model(ref: str, *, tracking_uri: str | None, device: torch.device) -> LoadedModel:
    """``ref``: a pseudoflow model file (``.pt``, local or URL), a local MLflow model folder,
    an MLflow URI (``runs:/<id>/model``, ``models:/...``), or a run id: a stage run's logged
    model, or a pipeline run's final student."""
    if ref.endswith(".pt"):
        return _from_checkpoint(ref, device)
    uri = ref
    if Path(ref).is_dir():
        uri = str(Path(ref).resolve())
    elif ":/" not in ref:
        uri = _run_model_uri(ref, tracking_uri)
    return _from_mlflow(uri, tracking_uri, device)


def _from_checkpoint(path: str, device: torch.device) -> LoadedModel:
    import fsspec

    with fsspec.open(path, "rb") as handle:
        return model_from_bytes(handle.read(), source=path, device=device)


def model_from_bytes(blob: bytes, *, source: str, device: torch.device) -> LoadedModel:
    """A pseudoflow segmenter model file's bytes (read from wherever it is stored) -> a model
    ready to predict on ``device``."""
    checkpoint = load_checkpoint(blob, source=source)
    if checkpoint["kind"] != "segmenter":
        raise ValueError(f"{source}: a {checkpoint['kind']} checkpoint; predict needs a segmenter")
    size = int(checkpoint.get("image_size") or 0)
    if size <= 0:
        raise ValueError(f"{source}: records no image_size; give a model pseudoflow trained")
    module = Segmenter(model_from_checkpoint(checkpoint)).to(device).eval()
    classes = int(checkpoint["model_args"]["num_classes"])
    return LoadedModel(module, size, classes, source, int(checkpoint.get("window") or 0))


def _from_mlflow(uri: str, tracking_uri: str | None, device: torch.device) -> LoadedModel:
    import mlflow
    import mlflow.pytorch
    from mlflow.models import Model

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    info = Model.load(uri)
    metadata = info.metadata or {}
    if "image_size" not in metadata:
        raise ValueError(f"{uri}: not a pseudoflow segmenter (no image_size in its metadata)")
    module = mlflow.pytorch.load_model(uri).to(device)
    return LoadedModel(
        module,
        int(metadata["image_size"]),
        int(metadata["num_classes"]),
        uri,
        int(metadata.get("window") or 0),
    )


def _run_model_uri(run_id: str, tracking_uri: str | None) -> str:
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
    tags = run.data.tags
    if STUDENT_TAG in tags:
        return str(tags[STUDENT_TAG])
    if MODEL_TAG in tags:
        return str(tags[MODEL_TAG])
    raise ValueError(
        f"run {run_id} has no logged model (tags {STUDENT_TAG} or {MODEL_TAG}): give a "
        "train_teacher / train_student run, a pipeline run, or a model URI"
    )


def image_files(paths: Sequence[str]) -> list[Path]:
    """The PNG/JPEG files named, and those in named folders (sorted, not recursive)."""
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"{name}: no such image file or folder")
    return files


@dataclass
class Prediction:
    path: Path
    picture: np.ndarray  # uint8[H, W, 3], as read
    labels: np.ndarray  # int64[H, W]


def predict_images(
    model: LoadedModel, files: Sequence[Path], *, batch_size: int, device: torch.device
) -> Iterator[Prediction | tuple[Path, str]]:
    """Label maps of ``files`` at their own size, as the evaluate stage computes them: fit to
    the model's canvas, logits (sliding window), softmax, the fitted part bilinear back to the
    picture's size, argmax. A file that is not a readable picture yields ``(path, reason)`` and
    the rest go on."""
    from stages.ingest.stage import read_rgb

    batch: list[tuple[Path, np.ndarray, torch.Tensor, tuple[int, int]]] = []
    for index, path in enumerate(files):
        try:
            picture = np.array(read_rgb(str(path)))  # a writable copy for torch
        except ValueError as exc:
            yield path, str(exc)
        else:
            image = torch.from_numpy(picture).permute(2, 0, 1)
            canvas, _, fitted = data.fit_and_pad(image, {}, model.image_size)
            batch.append((path, picture, canvas, fitted))
        if batch and (len(batch) == batch_size or index == len(files) - 1):
            yield from _predict_batch(model, batch, device)
            batch = []


def predict_pictures(
    model: LoadedModel, pictures: Sequence[np.ndarray], *, device: torch.device
) -> list[np.ndarray]:
    """Label maps ``int64[H, W]`` of decoded pictures ``uint8[H, W, 3]`` (each at its own
    size), in one batch, computed as :func:`predict_images` computes them."""
    batch = []
    for n, picture in enumerate(pictures):
        image = torch.from_numpy(np.array(picture)).permute(2, 0, 1)
        canvas, _, fitted = data.fit_and_pad(image, {}, model.image_size)
        batch.append((Path(str(n)), picture, canvas, fitted))
    return [done.labels for done in _predict_batch(model, batch, device)] if batch else []


@torch.inference_mode()
def _predict_batch(
    model: LoadedModel,
    batch: list[tuple[Path, np.ndarray, torch.Tensor, tuple[int, int]]],
    device: torch.device,
) -> Iterator[Prediction]:
    from stages.core.inference import label_maps

    images = torch.stack([image for _, _, image, _ in batch]).to(device)
    extents = np.asarray([fitted for *_, fitted in batch], np.int64)
    sizes = [picture.shape[:2] for _, picture, _, _ in batch]
    labels = label_maps(model.forward, images, model.window, extents, sizes)
    for (path, picture, _, _), found in zip(batch, labels, strict=True):
        yield Prediction(path, picture, found.cpu().numpy())


def write_prediction(prediction: Prediction, out: Path, *, overlay: bool) -> None:
    """``<stem>.png`` (class index per pixel, 8-bit) and ``<stem>_overlay.png`` (the picture
    with the classes' colours at half opacity, as in the report)."""
    from pipeline.figures import colour_labels

    out.mkdir(parents=True, exist_ok=True)
    stem = prediction.path.stem
    Image.fromarray(prediction.labels.astype(np.uint8), mode="L").save(out / f"{stem}.png")
    if overlay:
        colours = colour_labels(prediction.labels).astype(np.float32)
        blended = 0.5 * prediction.picture.astype(np.float32) + 0.5 * colours
        Image.fromarray(blended.round().astype(np.uint8)).save(out / f"{stem}_overlay.png")


def parse_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here")
    return torch.device(name)
