"""Progress of long work, shown the way the console can take it.

On a terminal, a training stage draws one line in place (step, percentage, losses, steps/s, time
left), fed by rank 0 through a small Ray actor (:class:`ProgressBoard`), and Ray Data draws its own
progress bars. Not on a terminal (CI, ``nohup``, a submitted job's log), nothing is redrawn: rank 0
logs a plain line every ``log_every`` steps into its worker's log file, Ray Data and Ray Train keep
their INFO chatter in their log files, and the run ends with its summary.

What the workers print reaches the driver's console only when it is verbose (``pseudoflow -v``):
otherwise it stays in Ray's log files (``<session>/logs``), and the console shows one line as each
stage starts and one as it ends, with the warnings a user can act on.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5
POST_SECONDS = 0.5  # rank 0 posts at most this often (and always its last step)

_interactive = False
_verbose = False


def set_interactive(value: bool) -> None:
    """Say whether this driver's console is a terminal (the runner decides once per run)."""
    global _interactive
    _interactive = value


def set_verbose(value: bool) -> None:
    """Say whether the console shows everything (the CLI's ``--verbose``): the workers' output,
    Ray's own warnings, each training step."""
    global _verbose
    _verbose = value


def verbose() -> bool:
    return _verbose


def quiet_console(name: str, level: int = logging.WARNING) -> None:
    """Raise the level of logger ``name``'s console handlers; its log files keep everything."""
    for handler in logging.getLogger(name).handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        ):
            handler.setLevel(level)


WORKER_SETUP_HOOK = "stages.core.progress.quiet_worker_logs"


def quiet_worker_logs() -> None:
    """Ray ``worker_process_setup_hook``: in every worker, Ray Data's INFO lines (each dataset's
    start, plan and end: in training one set per epoch, from the split coordinators) go to the
    worker's log file only."""
    import ray.data  # noqa: F401  (its import configures the ray.data loggers)

    quiet_console("ray.data")


def format_duration(seconds: float) -> str:
    """``75.2`` -> ``1:15``; ``3725`` -> ``1:02:05``."""
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass(frozen=True)
class Step:
    """What rank 0 posts: steps done, the total, steps/s so far and a few metrics."""

    step: int
    total: int
    rate: float
    metrics: dict[str, float] = field(default_factory=dict)

    def line(self, name: str, width: int = 20) -> str:
        """``train_student [#####---------------]  25/100   25%  loss_s 0.53  1.90 step/s  eta 0:39``"""
        done = min(self.step / self.total, 1.0) if self.total else 1.0
        bar = "#" * round(done * width)
        left = (self.total - self.step) / self.rate if self.rate > 0 else None
        parts = [
            f"{name} [{bar:-<{width}}] {self.step:>{len(str(self.total))}}/{self.total}",
            f"{done:4.0%}",
            *(f"{k} {v:.3g}" for k, v in self.metrics.items()),
            f"{self.rate:.2f} step/s",
            f"eta {format_duration(left)}" if left is not None else "eta ?",
        ]
        return "  ".join(parts)


class ProgressBoard:
    """A Ray actor's class: rank 0 posts its newest :class:`Step`, the driver reads it."""

    def __init__(self) -> None:
        self._step: Step | None = None

    def post(self, step: Step) -> None:
        self._step = step

    def read(self) -> Step | None:
        return self._step


class Poster:
    """Rank 0's side: posts a step to the board (fire and forget) at most every
    ``POST_SECONDS``, and always the last one."""

    def __init__(self, board: Any, total: int, first_step: int = 0):
        self.board, self.total = board, total
        self.started, self.first_step, self.last_post = time.perf_counter(), first_step, 0.0

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        now = time.perf_counter()
        if self.board is None or (now - self.last_post < POST_SECONDS and step < self.total):
            return
        self.last_post = now
        rate = (step - self.first_step) / (now - self.started)  # this run's steps (resumes too)
        self.board.post.remote(Step(step, self.total, rate, metrics))


@contextmanager
def training_progress(name: str, stream: TextIO | None = None) -> Iterator[Any]:
    """On a terminal: a board actor for rank 0 (yielded, to pass to the workers) and a thread
    that redraws ``name``'s line from it. Otherwise yields ``None`` and draws nothing."""
    if not _interactive:
        yield None
        return
    import ray

    out = stream or sys.stderr
    board: Any = ray.remote(num_cpus=0)(ProgressBoard).remote()
    stop = threading.Event()

    def draw() -> None:
        shown, stopped = "", False
        while not stopped:
            stopped = stop.wait(POLL_SECONDS)  # after the stop, one last read
            try:
                step: Step | None = ray.get(board.read.remote(), timeout=5)
            except Exception as exc:  # the board is slow: the next poll tries again
                logger.debug("progress board of %s: %s", name, exc)
                continue
            if step is not None and (line := step.line(name)) != shown:
                out.write("\r" + line.ljust(len(shown)))
                out.flush()
                shown = line
        if shown:
            out.write("\n")
            out.flush()

    thread = threading.Thread(target=draw, name=f"progress-{name}", daemon=True)
    thread.start()
    try:
        yield board
    finally:
        stop.set()
        thread.join(timeout=10)
        ray.kill(board)
