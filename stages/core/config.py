"""Base class for every configuration model: frozen, strict, unknown keys rejected."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A frozen pydantic model that refuses unknown keys and silent type coercion of strings."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, strict=True)

    # The settings that change how a stage runs but never what it produces: a section declares
    # them, and its stage's cache key is computed from the others.
    EXECUTION: ClassVar[frozenset[str]] = frozenset()
