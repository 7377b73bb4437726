"""The errors pseudoflow reports to its user, one hierarchy: each names the item at fault and
what is valid, and carries the exit code the CLI ends with (2: what the user gave is wrong; 1:
storage failed under a run). Anything else escaping a command is a bug, shown with its traceback.
"""

from __future__ import annotations


class PseudoflowError(Exception):
    """Base of every error the CLI reports as one line, ``error: <message>``."""

    exit_code = 1


class ConfigError(PseudoflowError, ValueError):
    """A setting, or a command's argument, that is not valid."""

    exit_code = 2


class SourceError(PseudoflowError, ValueError):
    """The data source cannot be used (missing folder, bad split list, empty split, too many
    unreadable items): the run fails before work, or after ingest's quarantine count."""

    exit_code = 2


class ModelError(PseudoflowError, ValueError):
    """Weights, a checkpoint or a detector backend that cannot be used as given."""

    exit_code = 2


class StorageError(PseudoflowError, RuntimeError):
    """A dataset is missing, uncommitted or inconsistent with its manifest."""

    exit_code = 1
