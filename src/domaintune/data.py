"""Training data: read JSON lines / JSON arrays → validate (with line numbers) → template → tokenize + mask.

Two row formats, detected per row:

- instruction/input/output: `{"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}`
- messages: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` (multi-turn)

Both become a list of OpenAI-style messages. Every assistant turn is trained; prompts are masked
(label -100) unless `train_on_inputs`. EOS follows each answer so the model learns to stop.

Over-length samples (more than `cutoff_len` tokens) follow `overlength`: `truncate` keeps the first
`cutoff_len` tokens, `drop` skips the sample, `error` stops. A sample left with no trainable token is
never trained on: it is dropped and counted. All counts are reported (`DataReport`).
"""
from __future__ import annotations

import json
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
MAX_ERRORS_SHOWN = 10


@dataclass
class Example:
    """One validated row: where it came from and its messages (system?, user, assistant, ...)."""

    where: str  # "file line N"
    messages: list[dict]
    index: int = 0  # row index within its file

    def prompt_and_target(self) -> tuple[list[dict], str]:
        """For prediction: everything before the last assistant turn, and that turn's text."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            return self.messages, ""
        return self.messages[:-1], self.messages[-1]["content"]


# ---------------------------------------------------------------- reading

def read_records(path: str | Path) -> list[tuple[int, Any]]:
    """(line number, parsed JSON value) for each row of a JSON-lines file or a JSON array file.

    Accepts a UTF-8 BOM, CRLF line ends and blank lines. Raises UserError naming the file and line
    for invalid UTF-8, broken JSON and an empty file.

    JSON lines are split on "\n" only (a trailing "\r" is dropped): `json.dumps(..., ensure_ascii=False)`
    writes U+2028, U+2029 and U+0085 raw inside strings, and `str.splitlines()` would break rows there.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"data file '{p}' not found")
    raw = p.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{p} line {line}: invalid UTF-8 (byte offset {e.start}); re-save the file as UTF-8") from None
    stripped = text.lstrip()
    if not stripped:
        raise UserError(f"{p}: the file is empty; it needs at least one row")
    if stripped.startswith("["):
        return _read_array(p, text)
    rows = []
    for n, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise UserError(f"{p} line {n}: not valid JSON ({e.msg} at column {e.colno}); "
                            "each line must hold one JSON object") from None
    return rows


def _read_array(p: Path, text: str) -> list[tuple[int, Any]]:
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    rows = []
    n = len(text)

    def skip_ws(j):
        while j < n and text[j] in " \t\r\n":
            j += 1
        return j

    i = skip_ws(i)
    if i < n and text[i] == "]":
        raise UserError(f"{p}: the JSON array is empty; it needs at least one row")
    while True:
        i = skip_ws(i)
        line = text.count("\n", 0, i) + 1
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise UserError(f"{p} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        rows.append((line, obj))
        i = skip_ws(i)
        if i < n and text[i] == ",":
            i += 1
            continue
        if i < n and text[i] == "]":
            break
        raise UserError(f"{p} line {text.count(chr(10), 0, i) + 1}: expected ',' or ']' in the JSON array")
    i = skip_ws(i + 1)
    if i < n:  # e.g. two arrays, or a JSON-lines file whose first row happens to be an array
        raise UserError(f"{p} line {text.count(chr(10), 0, i) + 1}: unexpected text after the closing ']' of the JSON array")
    return rows


def _type_name(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "true/false", type(None): "null"}.get(type(v), type(v).__name__)


def parse_example(obj: Any, where: str, require_answer: bool = True, template=None) -> Example:
    """Validate one row and turn it into messages. `template` joins instruction + input."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {_type_name(obj)}")
    if "messages" in obj:
        return Example(where, _parse_messages(obj["messages"], where, require_answer))
    if "instruction" not in obj:
        raise UserError(f'{where}: missing "instruction" (or "messages"); found fields {sorted(obj)}')
    for key in ("instruction", "input", "output", "system"):
        if key in obj and obj[key] is not None and not isinstance(obj[key], str):
            raise UserError(f'{where}: "{key}" must be a string, got {_type_name(obj[key])}')
    instruction, inp = obj["instruction"], obj.get("input") or ""
    if not instruction.strip():
        raise UserError(f'{where}: "instruction" is blank')
    output = obj.get("output")
    if require_answer:
        if output is None:
            raise UserError(f'{where}: missing "output"')
        if not output.strip():
            raise UserError(f'{where}: "output" is blank; every training row needs an answer')
    msgs: list[dict] = []
    if obj.get("system"):
        msgs.append({"role": "system", "content": obj["system"]})
    history = obj.get("history") or []
    if not isinstance(history, list):
        raise UserError(f'{where}: "history" must be a list of [question, answer] pairs, got {_type_name(history)}')
    for k, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise UserError(f'{where}: "history"[{k}] must be a [question, answer] pair of strings')
        if not pair[0].strip() or not pair[1].strip():
            raise UserError(f'{where}: "history"[{k}] has a blank question or answer')
        msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = template.join_instruction(instruction, inp) if template is not None else instruction + inp
    msgs.append({"role": "user", "content": user})
    if output is not None and output.strip():
        msgs.append({"role": "assistant", "content": output})
    return Example(where, msgs)


def _parse_messages(msgs: Any, where: str, require_answer: bool) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    out = []
    for k, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise UserError(f'{where}: messages[{k}] must be an object, got {_type_name(m)}')
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise UserError(f'{where}: messages[{k}].role {role!r} is not one of {"/".join(ROLES)}')
        if not isinstance(content, str):
            raise UserError(f'{where}: messages[{k}].content must be a string, got {_type_name(content)}')
        if not content.strip() and role != "system":
            raise UserError(f'{where}: messages[{k}].content is blank')
        if role == "system" and k != 0:
            raise UserError(f'{where}: messages[{k}]: a system message may only come first')
        out.append({"role": role, "content": content})
    turns = [m["role"] for m in out if m["role"] != "system"]
    for k, role in enumerate(turns):
        expected = "user" if k % 2 == 0 else "assistant"
        if role != expected:
            raise UserError(f'{where}: turns must alternate user/assistant starting with user; turn {k + 1} is {role!r}')
    if not turns:
        raise UserError(f'{where}: "messages" has no user turn')
    if require_answer and turns[-1] != "assistant":
        raise UserError(f'{where}: the last message must be an assistant answer to train on')
    return out


def load_examples(path: str | Path, require_answer: bool = True, template=None) -> list[Example]:
    """Read and validate every row; all errors (up to 10 shown) are reported together, before any training."""
    examples, errors = [], []
    for idx, (line, obj) in enumerate(read_records(path)):
        try:
            ex = parse_example(obj, f"{path} line {line}", require_answer, template)
            ex.index = idx
            examples.append(ex)
        except UserError as e:
            errors.append(str(e))
    if errors:
        more = f"\n  ... and {len(errors) - MAX_ERRORS_SHOWN} more" if len(errors) > MAX_ERRORS_SHOWN else ""
        raise UserError(f"{len(errors)} invalid row(s); fix them and run again:\n  "
                        + "\n  ".join(errors[:MAX_ERRORS_SHOWN]) + more)
    return examples


# ---------------------------------------------------------------- tokenize + mask

@dataclass
class DataReport:
    """Counts and length statistics; printed by data-check and saved in run_info.json."""

    path: str = ""
    rows: int = 0
    train_rows: int = 0
    eval_rows: int = 0
    overlength_policy: str = "truncate"
    overlength: int = 0  # samples longer than cutoff_len (truncated, dropped or rejected per policy)
    truncated: int = 0
    dropped_overlength: int = 0
    dropped_no_target: int = 0  # nothing trainable left after truncation
    lengths: list[int] = field(default_factory=list)  # token lengths before truncation

    def token_lengths(self) -> dict:
        if not self.lengths:
            return {}
        s = sorted(self.lengths)
        return {"min": s[0], "mean": round(statistics.fmean(s), 1), "median": statistics.median(s),
                "p95": s[min(len(s) - 1, int(0.95 * len(s)))], "max": s[-1]}

    def to_dict(self) -> dict:
        return {"path": self.path, "rows": self.rows, "train_rows": self.train_rows, "eval_rows": self.eval_rows,
                "overlength": {"policy": self.overlength_policy, "count": self.overlength, "truncated": self.truncated,
                               "dropped": self.dropped_overlength},
                "dropped_no_target": self.dropped_no_target, "token_lengths": self.token_lengths()}

    def summary_lines(self) -> list[str]:
        tl = self.token_lengths()
        return [
            f"data: {self.path}: {self.rows} rows -> train {self.train_rows}, validation {self.eval_rows}",
            "tokens per sample: " + ", ".join(f"{k} {v}" for k, v in tl.items()),
            f"over cutoff_len: {self.overlength} (policy {self.overlength_policy}: truncated {self.truncated}, "
            f"dropped {self.dropped_overlength}); dropped with nothing to train on: {self.dropped_no_target}",
        ]


def encode_example(ex: Example, tokenizer, template, cutoff_len: int, train_on_inputs: bool = False,
                   system: str | None = None) -> tuple[dict | None, int]:
    """(sample or None, untruncated length). The sample holds input_ids, attention_mask and labels."""
    msgs = ex.messages
    if system and (not msgs or msgs[0]["role"] != "system"):
        msgs = [{"role": "system", "content": system}] + msgs
    ids, trainable = template.encode(tokenizer, msgs, add_generation_prompt=False)
    full_len = len(ids)
    ids, trainable = ids[:cutoff_len], trainable[:cutoff_len]
    if not any(trainable):
        return None, full_len
    labels = list(ids) if train_on_inputs else [t if m else IGNORE_INDEX for t, m in zip(ids, trainable)]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}, full_len


def encode_examples(examples: list[Example], tokenizer, template, cfg, report: DataReport) -> list[dict]:
    """Tokenize and mask under the over-length policy, counting everything into `report`."""
    out, too_long = [], []
    for ex in examples:
        try:
            sample, n = encode_example(ex, tokenizer, template, cfg.cutoff_len, cfg.train_on_inputs, cfg.system)
        except UserError as e:  # e.g. a chat_template that rejects this conversation: say which row
            raise UserError(f"{ex.where}: {e}") from None
        report.lengths.append(n)
        if n > cfg.cutoff_len:
            report.overlength += 1
            too_long.append(f"{ex.where}: {n} tokens")
            if cfg.overlength == "drop":
                report.dropped_overlength += 1
                continue
            if cfg.overlength == "truncate" and sample is not None:
                report.truncated += 1
        if sample is None:
            report.dropped_no_target += 1
            continue
        out.append(sample)
    if too_long and cfg.overlength == "error":
        raise UserError(f"{len(too_long)} sample(s) exceed data.cutoff_len={cfg.cutoff_len} (data.overlength: error):\n  "
                        + "\n  ".join(too_long[:MAX_ERRORS_SHOWN])
                        + "\nRaise data.cutoff_len, or set data.overlength to truncate or drop.")
    return out


def split_validation(examples: list, val_size: int | float, val_max_rows: int | None, seed: int) -> tuple[list, list]:
    """Seeded split: val_size rows (int) or a fraction (float in (0, 1)), capped by val_max_rows."""
    n = len(examples)
    k = int(val_size) if isinstance(val_size, int) or float(val_size).is_integer() and val_size >= 1 else int(round(n * val_size))
    if val_max_rows is not None:
        k = min(k, val_max_rows)
    if k <= 0:
        return list(examples), []
    if k >= n:
        raise UserError(f"data.val_size asks for {k} validation rows but the file has only {n}; lower data.val_size")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:k])
    return [e for i, e in enumerate(examples) if i not in val_idx], [e for i, e in enumerate(examples) if i in val_idx]


@dataclass
class Datasets:
    train: list[dict]
    eval: list[dict]
    report: DataReport
    train_examples: list[Example]


def build_datasets(cfg, tokenizer, template, seed: int) -> Datasets:
    """`cfg` is the `data` config section."""
    examples = load_examples(cfg.path, template=template)
    report = DataReport(path=str(cfg.path), rows=len(examples), overlength_policy=cfg.overlength)
    if cfg.eval_path:
        train_ex, eval_ex = examples, load_examples(cfg.eval_path, template=template)
    else:
        train_ex, eval_ex = split_validation(examples, cfg.val_size, cfg.val_max_rows, seed)
    train = encode_examples(train_ex, tokenizer, template, cfg, report)
    eval_report = DataReport(overlength_policy=cfg.overlength)
    ev = encode_examples(eval_ex, tokenizer, template, cfg, eval_report) if eval_ex else []
    for k in ("overlength", "truncated", "dropped_overlength", "dropped_no_target"):
        setattr(report, k, getattr(report, k) + getattr(eval_report, k))
    report.lengths += eval_report.lengths
    report.train_rows, report.eval_rows = len(train), len(ev)
    if not train:
        raise UserError(f"{cfg.path}: no trainable sample left (see the counts above); raise data.cutoff_len")
    return Datasets(train, ev, report, train_ex)


def render_masked(tokenizer, sample: dict, color: bool = False) -> str:
    """Decode a sample, marking the trained spans: «...» (or green when `color`)."""
    out, cur, cur_train = [], [], None
    for tid, lab in zip(sample["input_ids"], sample["labels"]):
        train = lab != IGNORE_INDEX
        if cur and train != cur_train:
            out.append((cur_train, tokenizer.decode(cur)))
            cur = []
        cur.append(tid)
        cur_train = train
    if cur:
        out.append((cur_train, tokenizer.decode(cur)))
    open_, close = ("\x1b[32m", "\x1b[0m") if color else ("«", "»")
    return "".join(f"{open_}{t}{close}" if train else t for train, t in out)
