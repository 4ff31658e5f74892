"""One data source of `data.path` / `data.eval_path`: what to read, in which format, and how much of it.

`data.path` takes one source or a list. A source is a string (a file, a folder or a glob; format detected; every
row once) or a mapping with the keys below. How much of a source the mix takes (data/mix.py):

- nothing given: every row once;
- `rows: N`: exactly N rows: a seeded sample when N is at most the source's rows, else every row N // n times
  plus a seeded sample of the remainder (upsampling);
- `fraction: f`: round(f x n) rows, by the same rule (a fraction above 1 upsamples);
- `weight: w`: a share of the mix among the sources that give a weight: source i takes w_i / sum(w) of their
  total, and the total is the largest at which no weighted source repeats a row (the first to run out sets it).
  With `data.streaming`, weights are the interleaving probabilities (a source without one counts 1).

The sampling is seeded by `train.seed`, so the same config mixes the same rows.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from .base import Section

FORMATS = ("auto", "alpaca", "messages", "sharegpt", "openai")


class SourceConfig(Section):
    path: str | None = Field(
        None,
        description="A local file (.jsonl, .json, .csv, .tsv, .parquet, .arrow), a folder of such files, a glob "
                    "(data/*.jsonl) or a folder written by datasets' save_to_disk.",
    )
    hub: str | None = Field(
        None, description="A Hugging Face hub data set id (org/name), read with datasets.load_dataset; instead of path."
    )
    subset: str | None = Field(None, description="Hub data sets: the subset (configuration) name.")
    split: str = Field("train", description="Hub data sets and save_to_disk folders holding several splits: the split.")
    revision: str | None = Field(None, description="Hub data sets: a branch, tag or commit; None = the default branch.")
    format: Literal["auto", "alpaca", "messages", "sharegpt", "openai"] = Field(
        "auto",
        description="Row format: auto (detected per row from its keys), alpaca (instruction/input/output), messages, "
                    "sharegpt (conversations with from/value), openai (messages with tool_calls, tools, weight).",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Column mapping, our field -> the source's column, e.g. {instruction: question, output: answer} "
                    "or {messages: dialog}; fields not named keep their own names.",
    )
    weight: float | None = Field(None, gt=0, description="Share of the mix among the weighted sources (see data.path).")
    rows: int | None = Field(None, gt=0, description="Take exactly this many rows (a seeded sample; more upsamples).")
    fraction: float | None = Field(None, gt=0, description="Take round(fraction x rows) rows (above 1 upsamples).")
    name: str | None = Field(None, description="Name in reports; None = the path or hub id.")

    @model_validator(mode="after")
    def _one_of(self) -> SourceConfig:
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of path (a local file, folder or glob) and hub (a hub data set id)")
        amounts = [k for k in ("weight", "rows", "fraction") if getattr(self, k) is not None]
        if len(amounts) > 1:
            raise ValueError(f"give at most one of weight, rows and fraction (got {' and '.join(amounts)})")
        return self

    @property
    def label(self) -> str:
        """The source's name in reports and error messages."""
        return self.name or self.path or f"hub:{self.hub}"

    @property
    def amount(self) -> str:
        """How much of the source is taken, in words: "all rows", "weight 2", "1000 rows", "fraction 0.5"."""
        if self.weight is not None:
            return f"weight {self.weight:g}"
        if self.rows is not None:
            return f"{self.rows} rows"
        if self.fraction is not None:
            return f"fraction {self.fraction:g}"
        return "all rows"


def _source_problem(e: Any) -> str:
    """One pydantic error of a data source mapping, in words."""
    where = ".".join(str(x) for x in e["loc"])
    if e["type"] == "extra_forbidden":
        return f"unknown key '{where}' (a source takes {', '.join(SourceConfig.model_fields)})"
    msg = str(e["msg"]).removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


def validate_sources(v: Any) -> Any:
    """`data.path` / `data.eval_path` before pydantic's own validation: each mapping of a source list validated here,
    so a mistake is named by its place in the list and its key, not drowned in the alternatives of the union type."""
    items = v if isinstance(v, list) else [v]
    out, problems = [], []
    for k, s in enumerate(items):
        place = f"source {k + 1} of the list: " if isinstance(v, list) else ""
        if isinstance(s, dict):
            try:
                s = SourceConfig.model_validate(s)
            except ValidationError as e:
                problems.append(place + "; ".join(_source_problem(x) for x in e.errors()))
        elif s is not None and not isinstance(s, (str, SourceConfig)):
            problems.append(f"{place}expected a path (text) or a mapping with path or hub, got {type(s).__name__}")
        out.append(s)
    if problems:
        raise ValueError(" | ".join(problems))
    return out if isinstance(v, list) else out[0]


def as_sources(v: str | SourceConfig | list[str | SourceConfig] | None) -> list[SourceConfig]:
    """`data.path` or `data.eval_path` as a list of sources (a string is a path with every row once)."""
    if v is None:
        return []
    items = v if isinstance(v, list) else [v]
    return [SourceConfig(path=s) if isinstance(s, str) else s for s in items]


Format = Literal["auto", "alpaca", "messages", "sharegpt", "openai"]
