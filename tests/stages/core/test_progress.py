"""Progress: the line's text worked out by hand, rank 0's throttled posting, quiet consoles, and
the in-place line drawn from a real board actor on a local Ray."""

from __future__ import annotations

import io
import logging

import pytest

from stages.core import progress
from stages.core.progress import Poster, Step, format_duration, training_progress
from tests.conftest import local_ray


def test_format_duration() -> None:
    assert format_duration(0.4) == "0:00"
    assert format_duration(75.2) == "1:15"
    assert format_duration(3725) == "1:02:05"


def test_step_line_by_hand() -> None:
    # 25 of 100 steps at 2 step/s: a quarter of the 20-wide bar, 75 steps left = 37.5 s -> 0:38
    line = Step(25, 100, 2.0, {"loss_s": 0.53125, "loss_u": 0.0}).line("train_student")
    assert line == (
        "train_student [#####---------------]  25/100   25%  loss_s 0.531  loss_u 0  "
        "2.00 step/s  eta 0:38"
    )
    assert Step(3, 3, 0.0).line("x", width=4).endswith("[####] 3/3  100%  0.00 step/s  eta ?")


class FakeBoard:
    """Stands in for the actor handle: ``board.post.remote(step)`` records the step."""

    def __init__(self) -> None:
        self.posted: list[Step] = []
        self.post = self

    def remote(self, step: Step) -> None:
        self.posted.append(step)


def test_poster_throttles_but_always_posts_the_last_step(monkeypatch: pytest.MonkeyPatch) -> None:
    Poster(None, total=5)(5, {})  # no board (not rank 0, not a terminal): nothing to do
    clock = iter([100.0, 100.1, 100.2, 100.7, 100.8, 101.0])  # started, then one per call
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    board = FakeBoard()
    post = Poster(board, total=5, first_step=0)
    for step in range(1, 6):
        post(step, {"loss": float(step)})
    # 100.1 posts (first), 100.2 is too soon, 100.7 posts, 100.8 too soon, 101.0 is the last step
    assert [s.step for s in board.posted] == [1, 3, 5]
    assert board.posted[0].rate == pytest.approx(1 / 0.1)
    assert board.posted[-1].rate == pytest.approx(5 / 1.0)
    assert board.posted[-1].metrics == {"loss": 5.0}


def test_quiet_console_raises_only_console_handlers(tmp_path) -> None:
    log = logging.getLogger("pseudoflow-test-quiet")
    console, file = logging.StreamHandler(io.StringIO()), logging.FileHandler(tmp_path / "x.log")
    log.addHandler(console)
    log.addHandler(file)
    try:
        progress.quiet_console("pseudoflow-test-quiet")
        assert console.level == logging.WARNING
        assert file.level == logging.NOTSET
    finally:
        log.removeHandler(console)
        log.removeHandler(file)
        file.close()


def test_not_interactive_draws_nothing() -> None:
    progress.set_interactive(False)
    out = io.StringIO()
    with training_progress("train_student", stream=out) as board:
        assert board is None
    assert out.getvalue() == ""


@pytest.mark.ray
def test_interactive_line_is_redrawn_in_place_from_the_board() -> None:
    out = io.StringIO()
    with local_ray():
        progress.set_interactive(True)
        try:
            with training_progress("train_teacher", stream=out) as board:
                import ray

                ray.get(board.post.remote(Step(1, 4, 1.0, {"loss_s": 2.0})))
                progress.time.sleep(3 * progress.POLL_SECONDS)
                ray.get(board.post.remote(Step(4, 4, 2.0, {"loss_s": 1.5})))
        finally:
            progress.set_interactive(False)
    text = out.getvalue()
    first = Step(1, 4, 1.0, {"loss_s": 2.0}).line("train_teacher")
    last = Step(4, 4, 2.0, {"loss_s": 1.5}).line("train_teacher")
    assert text.startswith("\r" + first)
    assert text.endswith("\r" + last.ljust(len(first)) + "\n")  # the last step, then a newline
    assert text.count("\n") == 1
