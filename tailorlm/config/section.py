"""The base of every section of the run spec: unknown keys are errors, never silently ignored."""
from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")
