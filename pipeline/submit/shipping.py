"""What a submission ships: the project's tracked files (or, outside git, only the package
files), never data, runs, virtual environments, dotfiles or credential files, plus the resolved
config; staged into the job's working directory and digested."""

from __future__ import annotations

import fnmatch
import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from pipeline.submit.checks import SubmitError

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig


SUBMITTED_CONFIG = "pseudoflow-submitted.yaml"


# Never part of a job's working directory: data, outputs, environments, caches, VCS.
EXCLUDED = (
    ".git",
    ".gitignore",
    ".venv",
    "venv",
    "runs",
    "data",
    "mlruns",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    ".import_linter_cache",
    "*.db",
    "*.pt",
    "*.pth",
    "*.parquet",
)


# Never shipped, whatever lists them (git included): credential and key files by name. Dotfiles
# and dot-folders (.env, .aws/, .ray/auth_token, .ssh/, .netrc, ...) are never shipped either.
SECRET_FILES = (
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "*.jks",
    "*.keystore",
    "*.kdbx",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    "*credentials*",
    "*.env",
    "*.env.*",
    "*auth_token*",
    "*.token",
    "*.secret",
    "*.secrets",
    "*.netrc",
    "*.pgpass",
    "*.tfstate*",
)


# Outside a git checkout only the package is shipped: these top-level files and folders.
PACKAGE_PATHS = ("pyproject.toml", "pipeline", "stages")


MAX_WORKING_DIR_BYTES = 50 * 2**20


def project_root() -> Path:
    """The source checkout this package runs from (the folder with its pyproject.toml): the
    parent of the ``pipeline`` package, wherever this module sits inside it."""
    import pipeline

    root = Path(pipeline.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file() or not (root / "stages").is_dir():
        raise SubmitError(
            f"{root} is not a pseudoflow source checkout: submit from a clone of the project "
            "(its code is shipped to the cluster as the job's working directory)"
        )
    return root


def project_files(source: Path) -> list[Path]:
    """The files of the checkout a job needs, as relative paths: in a git checkout, the files git
    tracks (never untracked or ignored ones); elsewhere only the package (:data:`PACKAGE_PATHS`).
    Whatever the source, never a dotfile or dot-folder, a :data:`SECRET_FILES` credential file, an
    :data:`EXCLUDED` one or a symlink."""
    if (source / ".git").exists() and shutil.which("git"):
        tracked = set(_git_ls(source, "--cached"))
        # tracked, yet ignored (added with --force): not shipped either
        ignored = set(_git_ls(source, "--cached", "--ignored", "--exclude-standard"))
        candidates = [Path(p) for p in tracked - ignored]
    else:
        candidates = [
            p.relative_to(source)
            for top in PACKAGE_PATHS
            for p in ([source / top] if (source / top).is_file() else (source / top).rglob("*"))
        ]
    return sorted(p for p in candidates if _shippable(source, p))


def untracked_package_files(source: Path) -> list[Path]:
    """Files of the package (:data:`PACKAGE_PATHS`) that git neither tracks nor ignores: a new
    module not yet added is not shipped, and the job would miss it (``submit`` says so)."""
    if not ((source / ".git").exists() and shutil.which("git")):
        return []
    untracked = map(Path, _git_ls(source, "--others", "--exclude-standard"))
    return sorted(p for p in untracked if p.parts[0] in PACKAGE_PATHS and _shippable(source, p))


def _git_ls(source: Path, *options: str) -> list[str]:
    command = ["git", "-C", str(source), "ls-files", "-z", *options]
    listed = subprocess.run(command, capture_output=True, check=True).stdout.decode()
    return [p for p in listed.split("\0") if p]


def _shippable(source: Path, relative: Path) -> bool:
    path = source / relative
    if not path.is_file() or path.is_symlink():
        return False
    return not any(
        part.startswith(".")
        or any(fnmatch.fnmatch(part.lower(), pattern) for pattern in (*EXCLUDED, *SECRET_FILES))
        for part in relative.parts
    )


def stage_working_dir(source: Path, dest: Path, config: PipelineConfig) -> list[tuple[str, int]]:
    """Copy the project into ``dest`` (only :func:`project_files`), write the resolved config
    there as :data:`SUBMITTED_CONFIG`, and return what was staged: (relative path, bytes)."""
    for relative in project_files(source):
        (dest / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / relative, dest / relative)
    (dest / SUBMITTED_CONFIG).write_text(resolved_yaml(config))
    staged = sorted(
        (p.relative_to(dest).as_posix(), p.stat().st_size) for p in dest.rglob("*") if p.is_file()
    )
    size = sum(n for _, n in staged)
    if size > MAX_WORKING_DIR_BYTES:
        raise SubmitError(
            f"the job's working directory would be {size / 2**20:.0f} MiB (limit "
            f"{MAX_WORKING_DIR_BYTES / 2**20:.0f} MiB): data and weights belong under the "
            "storage root, not in the source checkout"
        )
    return staged


def human_size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    return f"{size / 1024:.1f} KiB" if size < 2**20 else f"{size / 2**20:.1f} MiB"


def resolved_yaml(config: PipelineConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=True)


def tree_digest(folder: Path) -> str:
    """sha256 over the relative paths and contents of every file under ``folder``."""
    from fsspec.implementations.local import LocalFileSystem

    from stages.core.shards import file_digest

    fs, digest = LocalFileSystem(), hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(
            f"{path.relative_to(folder).as_posix()}\0{file_digest(fs, str(path))}\n".encode()
        )
    return digest.hexdigest()
