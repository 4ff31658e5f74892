"""The base class of every config section: unknown keys are errors, values are read-only after
validation, a number given to a text field is taken as text (a commit hash such as
`model.revision=12345678` stays a string), and numbers are finite (YAML's `.inf` and `.nan` are refused:
no setting means anything with them, and `num_epochs: .inf` only failed after the model had loaded)."""
from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(), coerce_numbers_to_str=True,
                              allow_inf_nan=False)


def _endpoint(url: str) -> str:
    if not url.strip().lower().startswith(("http://", "https://")):
        raise ValueError("not an endpoint: give an http:// or https:// URL ending in /v1, such as "
                         "https://api.openai.com/v1 or http://127.0.0.1:8000/v1 (an empty value is often an unset "
                         "shell variable)")
    return url.strip()


# The URL of an OpenAI-compatible endpoint (gen-data's teacher, judge): checked when the config loads, not after
# six connection attempts.
EndpointURL = Annotated[str, AfterValidator(_endpoint)]
