"""The base of every settings section (:mod:`stream_distill.config`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A section of the settings tree: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")
