"""The flat JSON configs of BLOOM LoRA projects (`model_name_or_path`, `data_path`, `batch_size`, ...,
plus a LoRA file with `lora_r`, ...), converted into domaintune's nested layout (`domaintune config --from-json`)."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError

FLAT_RUN_KEYS = {
    "model_name_or_path", "data_path", "output_dir", "batch_size", "per_device_train_batch_size", "num_epochs",
    "learning_rate", "cutoff_len", "val_set_size", "val_set_rate", "save_steps", "eval_steps", "warmup_steps",
    "warmup_rate", "logging_steps", "gradient_accumulation_steps",
}
FLAT_LORA_KEYS = {"lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"}


def config_from_flat(run: dict, lora: dict | None = None, source: str = "run.json") -> dict:
    """Convert the flat JSON layout (run config + LoRA file) into our nested YAML layout.

    Meanings kept: batch_size is the global batch (train.batch_size); gradient accumulation is left to be
    derived at train time (batch_size / (per_device x processes)), so the global batch stays batch_size under
    torchrun too, unless the file gives gradient_accumulation_steps; validation size = min(val_set_size,
    val_set_rate x rows) (-> data.val_size = rate, data.val_max_rows = size).
    """
    unknown = set(run) - FLAT_RUN_KEYS
    if unknown:
        raise UserError(f"{source}: unknown key(s) {sorted(unknown)}; known: {sorted(FLAT_RUN_KEYS)}")
    lora = lora or {}
    unknown = set(lora) - FLAT_LORA_KEYS
    if unknown:
        raise UserError(f"LoRA file: unknown key(s) {sorted(unknown)}; known: {sorted(FLAT_LORA_KEYS)}")
    out: dict[str, dict] = {"model": {}, "lora": {}, "data": {}, "train": {}}
    m, d, t, lo = out["model"], out["data"], out["train"], out["lora"]
    if "model_name_or_path" in run:
        m["name_or_path"] = run["model_name_or_path"]
    if "data_path" in run:
        d["path"] = run["data_path"]
    if "cutoff_len" in run:
        d["cutoff_len"] = run["cutoff_len"]
    rate, size = run.get("val_set_rate"), run.get("val_set_size")
    if rate is not None:
        d["val_size"] = float(rate)
        if size is not None:
            d["val_max_rows"] = int(size)
    elif size is not None:
        d["val_size"] = int(size)
    for src, dst in [("output_dir", "output_dir"), ("batch_size", "batch_size"),
                     ("per_device_train_batch_size", "per_device_batch_size"), ("num_epochs", "num_epochs"),
                     ("learning_rate", "learning_rate"), ("save_steps", "save_steps"), ("eval_steps", "eval_steps"),
                     ("logging_steps", "logging_steps"), ("gradient_accumulation_steps", "gradient_accumulation_steps"),
                     ("warmup_steps", "warmup_steps")]:
        if src in run:
            t[dst] = run[src]
    if "warmup_rate" in run:
        t["warmup_ratio"] = run["warmup_rate"]
    # Checked here so the error names the flat file; the accumulation itself is derived at train time.
    if "batch_size" in run and "per_device_train_batch_size" in run and "gradient_accumulation_steps" not in run:
        bs, per = int(run["batch_size"]), int(run["per_device_train_batch_size"])
        if bs % per:
            raise UserError(f"{source}: batch_size {bs} is not a multiple of per_device_train_batch_size {per}")
    for src, dst in [("lora_r", "r"), ("lora_alpha", "alpha"), ("lora_dropout", "dropout"),
                     ("lora_target_modules", "target_modules")]:
        if src in lora:
            lo[dst] = lora[src]
    lo["enabled"] = True
    return {k: v for k, v in out.items() if v}


def read_json_file(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"'{p}' not found")
    try:
        obj = json.loads(p.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise UserError(f"{p} line {e.lineno}: not valid JSON: {e.msg}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{p}: expected a JSON object at the top level")
    return obj
