"""`train.report_to: swanlab`: SwanLab tracking by domaintune's own Trainer callback.

Why not transformers' SwanLabCallback: transformers 5's `integration_utils.SwanLabCallback.setup` calls
`swanlab.get_run()` and expects None before `swanlab.init()`; swanlab 0.8.0 and later raise
`RuntimeError("No active Run. Call swanlab.init() first.")` there (checked: 0.8.0, 0.8.5, 0.9.7, 0.10.3 raise;
0.7.20 returns None), so a run with `report_to: swanlab` failed as training began. Pinning swanlab<0.8 would tie
users to a swanlab two minor series old and break again with the next change on either side; this callback uses
only swanlab's public API (`init`, `log`, `finish`), on the main process only, and `swanlab` is taken out of what
TrainingArguments.report_to gets (`hf_report_to`) so transformers' callback never runs.

swanlab itself reads its environment: SWANLAB_MODE (local = offline, files only; cloud needs `swanlab login`),
SWANLAB_LOG_DIR (default here: `swanlog/` in the run directory), SWANLAB_PROJECT (default here: domaintune).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

# The trackers domaintune logs to itself, never through transformers' callback.
OWN = ("swanlab",)


def _wanted(report_to: list[str], name: str) -> bool:
    """`name` is asked for by name, or by `all` when it is installed (transformers' meaning of all)."""
    return name in report_to or ("all" in report_to and importlib.util.find_spec(name) is not None)


def hf_report_to(report_to: list[str]) -> list[str]:
    """What TrainingArguments.report_to gets for train.report_to: the trackers transformers logs to, without
    domaintune's own (`all` becomes the installed integrations transformers knows, less those)."""
    if report_to == ["none"]:
        return []
    if "all" in report_to:
        from transformers.integrations import get_available_reporting_integrations

        names = [*get_available_reporting_integrations(), *(n for n in report_to if n != "all")]
        return [n for n in dict.fromkeys(names) if n not in OWN]
    return [n for n in report_to if n not in OWN]


def check_swanlab_login() -> None:
    """UserError, before the model loads, when SwanLab would refuse to start: cloud mode (swanlab's default) with no
    API key (`swanlab login`'s .netrc, SWANLAB_API_KEY) and no terminal to ask for one. Without this, swanlab.init
    raised its own RuntimeError when training began, after the model had loaded, and left a run folder behind.
    The settings are read the way swanlab.init reads them (its `create_settings`); a swanlab whose internals
    differ is not pre-checked (swanlab.init still says what is wrong)."""
    import sys

    try:
        from swanlab.sdk.internal.settings import create_settings

        settings = create_settings()
        mode, key, interactive = settings.mode, settings.api_key, settings.interactive
    except Exception:  # noqa: BLE001 (another swanlab release: leave the check to swanlab.init)
        return
    if mode == "online" and not key and not (interactive and sys.stdin.isatty()):
        from ..errors import UserError

        raise UserError("train.report_to: swanlab is in cloud mode without an API key: run `swanlab login` (or set "
                        "SWANLAB_API_KEY), or set SWANLAB_MODE=local to log to files in the run folder only")


def tracker_callbacks(report_to: list[str], run_dir: Path, config: dict[str, Any]) -> list[TrainerCallback]:
    """domaintune's own tracker callbacks for train.report_to (SwanLab when named); `config` is the run's
    saved config, recorded with the SwanLab run; `run_dir` names the run and holds `swanlog/`."""
    return [_swanlab_callback(run_dir, config)] if _wanted(report_to, "swanlab") else []


def _swanlab_callback(run_dir: Path, config: dict[str, Any]) -> TrainerCallback:
    from transformers import TrainerCallback

    class SwanLab(TrainerCallback):
        """Logs the Trainer's log rows to SwanLab on the main process: `train/<key>` for training rows,
        `eval/<key>` for `eval_<key>`, at the optimizer step."""

        def __init__(self) -> None:
            self.run: Any = None

        def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                           **kw: Any) -> None:
            if not state.is_world_process_zero or self.run is not None:
                return
            import swanlab

            # An explicit log_dir would win over SWANLAB_LOG_DIR, so it is passed only when that is unset.
            where = {} if os.environ.get("SWANLAB_LOG_DIR") else {"log_dir": str(run_dir / "swanlog")}
            self.run = swanlab.init(project=os.environ.get("SWANLAB_PROJECT") or "domaintune",
                                    name=run_dir.name, config=config, **where)

        def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                   logs: dict | None = None, **kw: Any) -> None:
            if self.run is None or not logs:
                return
            import swanlab

            row = {(f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"): float(v)
                   for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if row:
                swanlab.log(row, step=state.global_step)

        def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                         **kw: Any) -> None:
            if self.run is None:
                return
            import swanlab

            swanlab.finish()
            self.run = None

    return SwanLab()
