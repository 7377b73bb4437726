"""WPL class-prototype memory (methods.md §4): per-class FIFO feature queues and their prototypes.

Each class has two FIFO queues of at most ``size`` feature vectors: ``"labeled"`` (labeled pixels
the model predicts correctly with conf > 0.95, see ``select_labeled``) and ``"unlabeled"``
(reliable unlabeled pixels, see ``select_reliable``). The prototype ``μ_c`` is the mean of all
vectors in both queues of class c over all ranks; a class whose labeled queue is empty on every
rank has no prototype (a NaN row, as ``ops.topk_index_similarity`` expects).

Each rank keeps its own queues. ``refresh`` is a collective: it all-reduces the per-class sums and
counts over the ``torch.distributed`` group (when one is initialised), so every rank gets the same
prototypes. ``gather_states`` / ``restore_state`` carry every rank's queues through a checkpoint.

Pure torch and torch.distributed: no ray, no mlflow.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import Tensor

from stages.core.constants import IGNORE_INDEX

logger = logging.getLogger(__name__)

QUEUES = ("labeled", "unlabeled")
_CONFIG_KEYS = ("num_classes", "dim", "size")


class PrototypeMemory:
    """Two FIFO queues per class and the prototypes of the last ``refresh``.

    Storage: per queue a ring buffer float32[C, size, D] with int64[C] fill counts and write
    positions. The buffers are allocated on the CPU and move to the device of the first ``push``
    (later pushes from another device are copied to it); ``prototypes`` live on that device too.
    ``state_dict`` always returns CPU tensors.

    Args:
        num_classes: C >= 1.
        dim: D >= 1, the length of a feature vector.
        size: capacity of each queue, >= 1 (256 in methods.md).
    """

    def __init__(self, num_classes: int, dim: int, size: int = 256) -> None:
        if num_classes < 1 or dim < 1 or size < 1:
            raise ValueError(
                f"num_classes, dim, size must be >= 1, got {num_classes}, {dim}, {size}"
            )
        self.num_classes = num_classes
        self.dim = dim
        self.size = size
        self.prototypes: Tensor | None = None
        self._placed = False
        self._features = {q: torch.zeros(num_classes, size, dim) for q in QUEUES}
        self._count = {q: torch.zeros(num_classes, dtype=torch.long) for q in QUEUES}
        self._next = {q: torch.zeros(num_classes, dtype=torch.long) for q in QUEUES}

    @property
    def device(self) -> torch.device:
        """Where the queues live: CPU until the first ``push``, then that push's device."""
        return self._features[QUEUES[0]].device

    def push(self, queue: str, features: Tensor, labels: Tensor) -> None:
        """Append vectors to their classes' queues in the given order, keeping the last ``size``.

        Vectorised over all vectors and classes (a stable sort by class, then one scatter).

        Args:
            queue: one of ``QUEUES``.
            features: float[N, D], any float dtype (stored detached as float32).
            labels: int64[N] in [0, C), the class of each vector.
        """
        _check_queue(queue)
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be [N, {self.dim}], got {tuple(features.shape)}")
        if labels.shape != features.shape[:1]:
            raise ValueError(
                f"labels must be [N] with N={features.shape[0]}, got {tuple(labels.shape)}"
            )
        if not self._placed:
            self._move_to(features.device)
        if labels.numel() == 0:
            return
        labels = labels.to(self.device, torch.long)
        if bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise ValueError(f"labels must be in [0, {self.num_classes})")
        self._write(queue, features.detach().to(self.device, torch.float32), labels)

    def _write(self, queue: str, features: Tensor, labels: Tensor) -> None:
        """Ring-buffer scatter of float32[N, D] with int64[N] labels already on ``self.device``."""
        order = torch.argsort(labels, stable=True)
        cls = labels[order]
        added = torch.bincount(labels, minlength=self.num_classes)  # [C]
        first = added.cumsum(0) - added  # index in `order` of each class's first vector
        rank = torch.arange(labels.numel(), device=labels.device) - first[cls]
        # Only the last `size` vectors of a class survive; their slots are then all distinct.
        keep = rank >= added[cls] - self.size
        slot = (self._next[queue][cls] + rank) % self.size
        self._features[queue][cls[keep], slot[keep]] = features[order[keep]]
        self._next[queue] = (self._next[queue] + added) % self.size
        self._count[queue] = (self._count[queue] + added).clamp(max=self.size)

    def _move_to(self, device: torch.device) -> None:
        for q in QUEUES:
            self._features[q] = self._features[q].to(device)
            self._count[q] = self._count[q].to(device)
            self._next[q] = self._next[q].to(device)
        if self.prototypes is not None:
            self.prototypes = self.prototypes.to(device)
        self._placed = True

    def refresh(self) -> Tensor:
        """Recompute the prototypes from both queues of every rank (a collective when distributed).

        Every rank must call it at the same step. Sums and counts are reduced in float64 in one
        ``all_reduce`` (on CPU, or on CUDA for a pure NCCL group).

        Returns:
            float32[C, D] on ``self.device`` (also stored as ``self.prototypes``):
            ``μ_c = Σ(both queues, all ranks) / count(both queues, all ranks)``; NaN rows for classes
            whose labeled queue is empty on every rank.
        """
        stats = torch.cat([self._local_sums(), self._local_counts()], dim=1)  # [C, D + 2]
        stats = _all_reduce_sum(stats)
        sums, total, labeled = stats[:, : self.dim], stats[:, self.dim], stats[:, self.dim + 1]
        means = sums / total.clamp(min=1.0)[:, None]
        means[labeled == 0] = torch.nan
        self.prototypes = means.to(torch.float32)
        return self.prototypes

    def _local_sums(self) -> Tensor:
        """float64[C, D]: sum of the filled slots of both queues of this rank."""
        slots = torch.arange(self.size, device=self.device)
        total = torch.zeros(self.num_classes, self.dim, dtype=torch.float64, device=self.device)
        for q in QUEUES:
            filled = (slots[None, :] < self._count[q][:, None]).to(torch.float64)  # [C, S]
            total += torch.einsum("cs,csd->cd", filled, self._features[q].to(torch.float64))
        return total

    def _local_counts(self) -> Tensor:
        """float64[C, 2]: (count over both queues, count of the labeled queue) of this rank."""
        both = self._count["labeled"] + self._count["unlabeled"]
        return torch.stack([both, self._count["labeled"]], dim=1).to(torch.float64)

    def state_dict(self) -> dict[str, Tensor]:
        """Queues, configuration and last prototypes as CPU tensors (``torch.load(weights_only=True)``
        safe). ``"prototypes"`` is absent before the first ``refresh``."""
        state = {key: torch.tensor(getattr(self, key)) for key in _CONFIG_KEYS}
        for q in QUEUES:
            state[f"{q}_features"] = self._features[q].detach().cpu().clone()
            state[f"{q}_count"] = self._count[q].cpu().clone()
            state[f"{q}_next"] = self._next[q].cpu().clone()
        if self.prototypes is not None:
            state["prototypes"] = self.prototypes.cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Replace queues and prototypes with ``state`` (from ``state_dict``), on ``self.device``.

        Raises:
            ValueError: keys missing, or num_classes / dim / size differ from this memory's.
        """
        missing = [k for k in self._state_keys() if k not in state]
        if missing:
            raise ValueError(f"prototype memory state lacks keys {missing}")
        found = {key: int(state[key]) for key in _CONFIG_KEYS}
        expected = {key: getattr(self, key) for key in _CONFIG_KEYS}
        if found != expected:
            raise ValueError(f"prototype memory state has {found}, this memory has {expected}")
        for q in QUEUES:
            self._features[q] = state[f"{q}_features"].to(self.device, torch.float32).clone()
            self._count[q] = state[f"{q}_count"].to(self.device, torch.long).clone()
            self._next[q] = state[f"{q}_next"].to(self.device, torch.long).clone()
        prototypes = state.get("prototypes")
        self.prototypes = None if prototypes is None else prototypes.to(self.device).clone()

    def _state_keys(self) -> list[str]:
        return [
            *_CONFIG_KEYS,
            *(f"{q}_{part}" for q in QUEUES for part in ("features", "count", "next")),
        ]


def _check_queue(queue: str) -> None:
    if queue not in QUEUES:
        raise ValueError(f"unknown queue {queue!r}; choose one of {', '.join(QUEUES)}")


def _all_reduce_sum(stats: Tensor) -> Tensor:
    """SUM-all-reduce ``stats`` over the default group when one is initialised; else unchanged."""
    if not (dist.is_available() and dist.is_initialized()):
        return stats
    if dist.get_backend() == "nccl":
        device = (
            stats.device if stats.is_cuda else torch.device("cuda", torch.cuda.current_device())
        )
    else:
        device = torch.device("cpu")
    reduced = stats.to(device)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(stats.device)


# -------------------------------------------------------------------------------- pixel selection
def select_labeled(
    features: Tensor, probs: Tensor, target: Tensor, conf_thresh: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Labeled pixels for the ``"labeled"`` queue: predicted correctly with conf > ``conf_thresh``.

    Args:
        features: float[B, D, H, W], decoder features (same H, W as ``target``; resize first).
        probs: float[B, C, H, W] in [0, 1], the model's softmax on the labeled view.
        target: int64[B, H, W] ground truth, ``IGNORE_INDEX`` (255) = ignore.
        conf_thresh: a pixel at exactly the threshold is NOT selected (strict >).

    Returns:
        (float[N, D] in the dtype of ``features``, int64[N] classes), pixels in raster order
        (image, row, column).
    """
    _check_spatial(features, probs.shape[0:1] + probs.shape[2:], "probs")
    conf, pred = probs.max(dim=1)
    return select_confident(features, pred, conf, target, conf_thresh)


def select_confident(
    features: Tensor, pred: Tensor, conf: Tensor, target: Tensor, conf_thresh: float = 0.95
) -> tuple[Tensor, Tensor]:
    """:func:`select_labeled` from the prediction ``pred: int64[B, H, W]`` and its confidence
    ``conf: float[B, H, W]`` instead of the probabilities (stored teacher signals)."""
    _check_spatial(features, pred.shape, "pred")
    chosen = (pred == target) & (conf > conf_thresh) & (target != IGNORE_INDEX)
    return _pixels_at(features, target, chosen)


def select_reliable(features: Tensor, labels: Tensor, reliable: Tensor) -> tuple[Tensor, Tensor]:
    """Unlabeled pixels for the ``"unlabeled"`` queue: those with ``reliable`` set (WPL R = 1).

    Args:
        features: float[B, D, H, W], decoder features (same H, W as ``labels``).
        labels: int64[B, H, W], pseudo-labels ŷ.
        reliable: bool[B, H, W], e.g. ``ops.detector_reliability``.

    Returns:
        (float[N, D] in the dtype of ``features``, int64[N] classes), pixels in raster order.
    """
    return _pixels_at(features, labels, reliable.to(torch.bool))


def _pixels_at(features: Tensor, labels: Tensor, chosen: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of features float[B, D, H, W] and labels int[B, H, W] where chosen bool[B, H, W]."""
    _check_spatial(features, labels.shape, "labels")
    _check_spatial(features, chosen.shape, "mask")
    return features.permute(0, 2, 3, 1)[chosen], labels[chosen].long()


def _check_spatial(features: Tensor, shape: torch.Size, name: str) -> None:
    expected = features.shape[0:1] + features.shape[2:]
    if features.ndim != 4 or tuple(shape) != tuple(expected):
        raise ValueError(
            f"{name} must be [B, H, W] = {tuple(expected)} to match features "
            f"{tuple(features.shape)}, got {tuple(shape)}; resize the features first"
        )


# -------------------------------------------------------------------------------------- checkpoint
def gather_states(memory: PrototypeMemory) -> list[dict[str, Tensor]]:
    """Every rank's ``state_dict``, in rank order, on every rank (a collective when distributed).

    Returns:
        ``[memory.state_dict()]`` without an initialised process group.
    """
    state = memory.state_dict()
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    states: list[dict[str, Tensor] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return [s for s in states if s is not None]


def restore_state(memory: PrototypeMemory, states: list[dict[str, Tensor]], rank: int) -> None:
    """Load rank ``rank``'s queues from ``gather_states`` output; prototypes from ``states[0]``.

    When the world size differs from ``len(states)``, rank r loads ``states[r % len(states)]``
    (queues are dropped or duplicated) and a warning is logged. Prototypes come from one state for
    every rank, so all ranks hold identical prototypes until the next ``refresh``.
    """
    if not states:
        raise ValueError("no prototype memory states to restore")
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world != len(states):
        logger.warning(
            "prototype memory saved by %d ranks, restored on %d: rank %d loads the queues of rank %d",
            len(states),
            world,
            rank,
            rank % len(states),
        )
    memory.load_state_dict(states[rank % len(states)])
    prototypes = states[0].get("prototypes")
    memory.prototypes = None if prototypes is None else prototypes.to(memory.device).clone()
