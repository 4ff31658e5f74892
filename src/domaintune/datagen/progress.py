"""Progress of a gen-data run on stderr: `console.Progress` with the label "gen-data" (a tqdm bar on a
terminal; plain lines such as `gen-data answers: 12/50 (kept 12, dropped 3: judge_unclear 3) 45s` elsewhere)."""
from __future__ import annotations

from typing import Any

from .. import console

INTERVAL_S = console.PROGRESS_INTERVAL_S


class Progress(console.Progress):
    def __init__(self, desc: str, total: int, initial: int = 0, unit: str = "it", **kw: Any) -> None:
        super().__init__(desc, total, initial, unit, label="gen-data", **kw)
