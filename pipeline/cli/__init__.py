"""The ``pseudoflow`` command line: the group and its shared options in ``base``, the commands by
what they act on (``runs``, ``cluster``, ``tools``, ``benchmarks``); importing a command module
adds its commands to the group."""

from pipeline.cli import benchmarks, cluster, runs, tools
from pipeline.cli.base import _setup_logging, main
from pipeline.cli.runs import format_summary

__all__ = ["_setup_logging", "benchmarks", "cluster", "format_summary", "main", "runs", "tools"]
