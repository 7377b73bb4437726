"""Split lists and checks shared by the dataset layouts (``voc``, ``cityscapes``).

A split list names one image per line. Two formats are read: a bare stem (``2007_000032``, as in
VOC's ImageSets) and the UniMatch / ST++ style pair of paths relative to the dataset root
(``JPEGImages/2007_000032.jpg SegmentationClass/2007_000032.png``); the stem comes from the file
name of the first path.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterable

import fsspec

from stages.core.constants import SPLITS
from stages.core.errors import SourceError

SHOWN = 5  # names quoted in an error message


def is_list_file(value: str) -> bool:
    """A split setting is a list file when it looks like a path, else a name the layout knows."""
    return value.endswith(".txt") or "/" in value


def file_stem(token: str) -> str:
    """``JPEGImages/2007_000032.jpg`` -> ``2007_000032``; a bare stem is returned as it is."""
    name = posixpath.basename(token)
    return name.rpartition(".")[0] if "." in name else name


def read_list(
    fs: fsspec.AbstractFileSystem, path: str, stem_of: Callable[[str], str] = file_stem
) -> list[str]:
    """The stems a split list names, in file order, each once (``path`` must exist)."""
    with fs.open(path, "r") as handle:
        tokens = [line.split()[0] for line in handle if line.strip()]
    return list(dict.fromkeys(stem_of(token) for token in tokens))


def shown(names: Iterable[str]) -> str:
    """The first few names, sorted, and how many there are in all."""
    names = sorted(names)
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return f"{len(names)} ({', '.join(names[:SHOWN])}{more})"


def check_disjoint(splits: dict[str, list[str]], origins: dict[str, str]) -> None:
    """An image belongs to one split: raise naming the two lists that share images."""
    for i, first in enumerate(SPLITS):
        for second in SPLITS[i + 1 :]:
            common = set(splits[first]) & set(splits[second])
            if common:
                raise SourceError(
                    f"{shown(common)} images are in both {first} ({origins[first]}) and "
                    f"{second} ({origins[second]}); a picture belongs to one split"
                )


def url_prefix(fs: fsspec.AbstractFileSystem) -> str:
    """What turns a path inside ``fs`` back into a URL: ``""`` locally, ``s3://`` on S3."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return "" if protocol in {"file", "local"} else f"{protocol}://"
