"""Base class for every configuration model: frozen, strict, unknown keys rejected."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A frozen pydantic model that refuses unknown keys and silent type coercion of strings."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, strict=True)
