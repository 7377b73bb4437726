"""Training a segmentation network with Ray Train: the teacher (labeled only) and the student
(labeled + offline pseudo-labels). One loop, top to bottom:

    L = L_s + alpha * L_u,   L_u = sum_p w_p keep_p valid_p CE_p / sum_p valid_p   (methods.md §0)

``train_step`` is the whole step (UniMatch's recipe on offline targets): the labeled batch gets a
weak view; the unlabeled batch one weak geometric draw, applied to the image and to every stored
map alike, then two strong photometric views, each CutMixed with a partner image whose maps are
mixed in the same box. The policy's live parts (methods.md §5) happen here: S4MC's keep mask from
each view's stored margins (DPA), CSL's extra TMP view of the weak view (its own photometric draw
without grayscale, no CutMix; its loss averaged with the strong views'),
WPL's prototype memory fed from the student's features and refreshed across workers every
``refresh_every`` steps. Periodic work is ``if (step + 1) % n == 0``. ``train_loop`` runs it on
Ray Train.

The package, along its seams: ``config`` (the settings), ``data`` (the training sets),
``step`` (the learner and ``train_step``), ``loop`` (the Ray Train worker loop) and ``stage``
(``run``: given weights, or a Ray Train run).
"""

from stages.segtrain.config import SegTrainConfig, StrongViewConfig, StudentConfig
from stages.segtrain.data import (
    TRAIN_BLOCK_ROWS,
    labeled_dataset,
    labeled_rows_to_arrays,
    pseudolabel_rows_to_arrays,
    unlabeled_dataset,
)
from stages.segtrain.loop import train_loop
from stages.segtrain.stage import run
from stages.segtrain.step import Learner, learning_rate, new_learner, poly_lr, train_step

__all__ = [
    "TRAIN_BLOCK_ROWS",
    "Learner",
    "SegTrainConfig",
    "StrongViewConfig",
    "StudentConfig",
    "labeled_dataset",
    "labeled_rows_to_arrays",
    "learning_rate",
    "new_learner",
    "poly_lr",
    "pseudolabel_rows_to_arrays",
    "run",
    "train_loop",
    "train_step",
    "unlabeled_dataset",
]
