"""Reading sources into memory, for the data sets that are small by nature (preference pairs, checks before the
model loads), and the one error that names a source's bad rows. Training data at scale goes through prepare.py."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, TypeVar

from ..errors import UserError
from .examples import bad_rows, parse_example
from .formats import uses_tools
from .mix import SourceCount, mix
from .templates import get_template

if TYPE_CHECKING:
    from ..config import DataConfig
    from ..config.sources import SourceConfig


T = TypeVar("T")


def load_sources(srcs: list[SourceConfig], parse: Callable[[Any, str], T], seed: int,
                 what: str = "row(s)") -> tuple[list[T], list[SourceCount]]:
    """Every source's rows parsed by `parse(row, where)` and mixed (`mix`), in memory: for the data sets that are
    small by nature (preference pairs, test files, checks before the model loads). The UserErrors of a source's
    bad rows, broken JSON included, are raised together (the first MAX_ERRORS_SHOWN shown)."""
    from .sources import iter_rows

    parsed: list[list[T]] = []
    counts = []
    for src in srcs:
        bad: list[tuple[str, str]] = []
        rows: list[T] = []
        invalid = 0  # rows read but refused by `parse` (the others in `bad` could not be read)
        for where, obj in iter_rows(src, bad=bad):
            try:
                rows.append(parse(obj, where))
            except UserError as e:
                bad.append((where, str(e)))
                invalid += 1
        if bad:
            raise bad_rows(bad, what, unreadable_alone=not invalid)
        if not rows:
            raise UserError(f"{src.label}: no rows; it needs at least one")
        parsed.append(rows)
        counts.append(SourceCount(src.label, src.amount, read=len(rows), kept=len(rows)))
    taken = mix(srcs, [list(range(len(p))) for p in parsed], seed)
    for c, t in zip(counts, taken, strict=True):
        c.sampled = len(t)
    return [p[j] for p, t in zip(parsed, taken, strict=True) for j in t], counts


CHECK_ALL_BYTES = 64 * 2**20  # check_data_files reads every row of local sources up to this size in all


def check_data_files(cfg: DataConfig, seed: int = 0) -> int:
    """Validate the sources of `cfg.path` (and `cfg.eval_path`) as training does, without a tokenizer; the rows
    the training mix takes (0 when not counted).

    Raises the UserError training would raise (missing file, invalid UTF-8 or JSON, bad rows; file and line
    named), or `get_template`'s for an unknown or broken `cfg.template`. Instruction and input are joined with
    the template's format, as in training (`get_template(name, None)` works for every template, `tokenizer` too).
    Imports neither torch nor transformers: call it before loading the tokenizer. Local sources of up to
    CHECK_ALL_BYTES in all are read whole; larger ones, and hub data sets, are only resolved here (every row is
    still validated when training prepares the data, before the model loads), so a large data set is not read
    twice.
    """
    from .sources import source_files

    template = get_template(cfg.template, None)
    srcs = [*cfg.sources, *cfg.eval_sources]
    files = [f for s in srcs for f in source_files(s)]
    if any(s.hub for s in srcs) or sum(f.stat().st_size for f in files) > CHECK_ALL_BYTES:
        return 0
    parse = lambda obj, where: parse_example(obj, where, True, template)  # noqa: E731
    examples, _ = load_sources(cfg.sources, parse, seed)
    n = len(examples)
    if cfg.eval_sources:
        examples += load_sources(cfg.eval_sources, parse, seed)[0]
    for ex in examples:
        if template.kind == "format" and uses_tools(ex.messages):
            try:
                template.segments(ex.messages, False)  # refuses the row, saying what to do
            except UserError as e:
                raise UserError(f"{ex.where}: {e}") from None
    return n
