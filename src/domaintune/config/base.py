"""The base class of every config section: unknown keys are errors, values are read-only after
validation, a number given to a text field is taken as text (a commit hash such as
`model.revision=12345678` stays a string), and numbers are finite (YAML's `.inf` and `.nan` are refused:
no setting means anything with them, and `num_epochs: .inf` only failed after the model had loaded)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(), coerce_numbers_to_str=True,
                              allow_inf_nan=False)
