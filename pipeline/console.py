"""The driver's standard output without the Ray notices a user cannot act on.

Ray prints what its raylet pushes to the driver (``(raylet) WARNING: 8 PYTHON worker processes
have been started ... 4x the maximum expected startup concurrency (2)``) straight to
``sys.stdout``, with no switch to turn it off (ray-project/ray#63800). On a small machine every
run of Ray Data actor pools and Ray Train workers trips it, and nothing in a pseudoflow config
changes that: :class:`QuietNotices` moves exactly those lines to the debug log (``-v`` shows
them) and passes every other write through untouched.
"""

from __future__ import annotations

import logging
import re
from typing import Any, TextIO

logger = logging.getLogger("ray.notices")

NOTICES = (
    re.compile(r"^\(raylet[^)]*\) WARNING: \d+ \w+ worker processes have been started on node"),
)


class QuietNotices:
    """A text stream around ``stream`` that drops the lines :data:`NOTICES` match (each written
    by one ``print``: the line, then its end) and forwards everything else as it comes."""

    def __init__(self, stream: TextIO):
        self._stream = stream
        self._swallow_end = False

    def write(self, text: str) -> int:
        if self._swallow_end and text == "\n":
            self._swallow_end = False
            return len(text)
        self._swallow_end = False
        stripped = text.rstrip("\n")
        if stripped and "\n" not in stripped and any(n.match(stripped) for n in NOTICES):
            logger.debug("%s", stripped)
            self._swallow_end = not text.endswith("\n")
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:  # flush, isatty, fileno, encoding, ...
        return getattr(self._stream, name)
