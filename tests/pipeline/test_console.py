"""The driver's stdout filter: Ray's worker-pool notice goes to the debug log, all else through."""

from __future__ import annotations

import io
import logging

import pytest

from pipeline.console import QuietNotices

NOTICE = (
    "(raylet) WARNING: 8 PYTHON worker processes have been started on node: 7ffdb15 with "
    "address: 192.0.2.2, which is 4x the maximum expected startup concurrency (2). This could be "
    "a result of using a large number of actors, tasks blocked in ray.get() calls, or tasks with "
    "fractional CPU requests (e.g., num_cpus=0.1) allowing high concurrency. See "
    "https://github.com/ray-project/ray/issues/3644 for some discussion of workarounds."
)


def test_the_notice_goes_to_the_debug_log_and_the_rest_through(
    caplog: pytest.LogCaptureFixture,
) -> None:
    out = io.StringIO()
    quiet = QuietNotices(out)
    caplog.set_level(logging.DEBUG, logger="ray.notices")
    print("stage teach: running", file=quiet)
    print(NOTICE, file=quiet)  # print: the line, then "\n" on its own
    print("(raylet) WARNING: something a user can act on", file=quiet)
    quiet.write(NOTICE.replace("8 PYTHON", "10 PYTHON") + "\n")  # one write with its end
    quiet.write("\rtrain_student [###---]  3/30")  # a progress line redrawn in place
    quiet.write("\n")
    print("(raylet) WARNING: 8 PYTHON worker processes have been started\nand more", file=quiet)
    assert out.getvalue() == (
        "stage teach: running\n"
        "(raylet) WARNING: something a user can act on\n"
        "\rtrain_student [###---]  3/30\n"
        "(raylet) WARNING: 8 PYTHON worker processes have been started\nand more\n"
    )
    assert [r.getMessage()[:40] for r in caplog.records] == [
        "(raylet) WARNING: 8 PYTHON worker proces",
        "(raylet) WARNING: 10 PYTHON worker proce",
    ]
    assert quiet.getvalue() == out.getvalue()  # everything else is the stream's own
