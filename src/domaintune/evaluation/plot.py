"""Loss and learning-rate curves of a run, as a PNG (`domaintune plot`).

Reads log.jsonl (our run directory) or a Hugging Face ``trainer_state.json`` ("log_history"). Draws
training loss raw (thin) and smoothed (EMA), eval loss as markers and the learning rate on a second axis.

The figure is built with ``matplotlib.figure.Figure`` and the Agg canvas directly, never through pyplot:
that needs no global backend switch (``matplotlib.use``), so calling this from a training process or a
notebook leaves the caller's backend and open figures alone, and no figure is left registered in pyplot.

Chinese run names and titles need a CJK font; matplotlib's bundled DejaVu Sans has none and draws boxes
("tofu"). ``cjk_font_family`` finds one that is installed and uses it as the fallback after DejaVu Sans.
Ways to get one: ``pip install noto-cjk-sans-otc`` (Noto Sans CJK, OFL, no root; picked up automatically)
or ``apt-get install fonts-noto-cjk`` / ``fonts-wqy-microhei``.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .. import console, rundir
from ..errors import UserError
from ..jsonl import read_jsonl

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

WIDTH_IN, HEIGHT_IN, DPI = 10, 5, 100  # -> 1000 x 500 pixels
SINGLE_POINT_SIZE = 9  # points: the marker of a series that has a single point

# Preferred CJK families, Simplified Chinese first; the first one installed wins.
CJK_FAMILIES = (
    "Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "Source Han Sans CN", "WenQuanYi Micro Hei",
    "WenQuanYi Zen Hei", "Sarasa Gothic SC", "Microsoft YaHei", "PingFang SC", "Hiragino Sans GB", "Heiti SC",
    "SimHei", "Noto Sans CJK TC", "Noto Sans CJK JP", "Noto Sans CJK KR", "Droid Sans Fallback",
    "AR PL UMing CN", "Noto Serif CJK SC", "Source Han Serif SC",
)
# File names of CJK fonts, for fonts installed after matplotlib built its font cache.
_CJK_FILE_RE = re.compile(r"cjk|wqy|wenquanyi|sourcehan|simhei|msyh|droidsansfallback|notosanssc|uming|ukai",
                          re.IGNORECASE)
_CJK_CHAR_RE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")
_warned_no_cjk = False


def _installed_cjk_family() -> str | None:
    from matplotlib import font_manager, ft2font

    by_name: dict[str, str] = {}
    for entry in font_manager.fontManager.ttflist:
        by_name.setdefault(entry.name, entry.fname)
    extra = [n for n in by_name if "CJK" in n and n not in CJK_FAMILIES]
    for name in (*CJK_FAMILIES, *sorted(extra)):
        if name in by_name:
            try:  # the name alone can lie (a subset font): check it really has Chinese glyphs
                if ft2font.FT2Font(by_name[name]).get_char_index(ord("中")):
                    return name
            except (OSError, RuntimeError):
                continue
    return None


@functools.lru_cache(maxsize=1)
def cjk_font_family() -> str | None:
    """Name of an installed font family with Chinese glyphs, or None.

    Looks in matplotlib's font list, then at the ``noto-cjk-sans-otc`` package, then at font files on the
    system that matplotlib's cached font list does not know yet (installed after the cache was built).
    """
    from matplotlib import font_manager

    found = _installed_cjk_family()
    if found:
        return found
    try:
        import noto_cjk_sans_otc  # optional: Noto Sans CJK shipped on PyPI

        font_manager.fontManager.addfont(str(noto_cjk_sans_otc.FONT_PATH))
    except (ImportError, OSError, RuntimeError):
        pass
    else:
        found = _installed_cjk_family()
        if found:
            return found
    known = {e.fname for e in font_manager.fontManager.ttflist}
    for path in font_manager.findSystemFonts():
        if path not in known and _CJK_FILE_RE.search(os.path.basename(path)):
            try:
                font_manager.fontManager.addfont(path)
            except (OSError, RuntimeError, ValueError):
                continue
    return _installed_cjk_family()


def _font_rc(texts: list[str]) -> dict:
    """rcParams that make CJK text render: DejaVu Sans for Latin, the CJK font as per-glyph fallback."""
    global _warned_no_cjk
    family = cjk_font_family()
    if family:
        return {"font.family": ["DejaVu Sans", family]}
    if not _warned_no_cjk and any(_CJK_CHAR_RE.search(t) for t in texts):
        _warned_no_cjk = True
        console.warn("no CJK font found: Chinese text in plots shows as boxes; "
                     "`pip install noto-cjk-sans-otc` or `apt-get install fonts-noto-cjk` fixes it")
    return {}


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        x, y = _number(r.get("step")), _number(r.get(key))
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


def ema(values: list[float], weight: float) -> list[float]:
    """Debiased exponential moving average (as TensorBoard's smoothing slider), so early points are not
    pulled towards zero."""
    out, acc = [], 0.0
    for i, v in enumerate(values, start=1):
        acc = weight * acc + (1 - weight) * v
        out.append(acc / (1 - weight ** i))
    return out


def _single(xs: list[float]) -> dict:
    """Line style for a series of one point: a line needs two, so without a marker it would not show at all."""
    return {"marker": "o", "markersize": SINGLE_POINT_SIZE} if len(xs) == 1 else {}


def few_points_note(logged: int, steps: int | None) -> str | None:
    """The figure's note when the training series has too few points to be a curve (a short run with a large
    train.logging_steps: only the first step is logged, the end-of-training summary is not a step)."""
    if steps is None or logged > 2 or steps <= logged + (logged == 2):  # 2 points of 3 steps still draw a line
        return None
    return (f"only {logged} of {steps} steps logged (every train.logging_steps steps, and the first): "
            "lower train.logging_steps to see a curve")


def plot_records(records: list[dict], out: Path, title: str | None = None, steps: int | None = None) -> Path:
    """Draw training loss, eval loss and learning rate against "step" from log records; write a PNG.

    Records may carry any subset of "loss", "eval_loss", "learning_rate" (others are ignored).
    The image is WIDTH_IN x HEIGHT_IN inches at DPI (1000 x 500 pixels). A preference run (records with
    "rewards/margins") gets a second panel below, twice the height: the reward margin (train, eval) and the
    preference accuracy, the share of pairs whose chosen completion out-rewards the rejected one.
    `steps`: the steps the run made (default: the last step of the records); with two or fewer training points
    for more steps, the figure says so. A series of one point is drawn as a marker.
    """
    from matplotlib import rc_context

    title = title or "training loss"
    out = Path(out)
    with rc_context(_font_rc([title])):  # fonts are resolved when the figure is drawn, so saving is inside too
        fig = make_figure(records, title, steps)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        fig.savefig(tmp, format="png", dpi=DPI)
    os.replace(tmp, out)  # a live viewer never sees half an image
    return out


def make_figure(records: list[dict], title: str, steps: int | None = None) -> Figure:
    """The figure plot_records writes (see there); call it under plot_records' font settings."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not records:
        raise UserError("nothing to plot: the log has no records (has training logged a step yet?)")
    loss_x, loss_y = _series(records, "loss")
    eval_x, eval_y = _series(records, "eval_loss")
    lr_x, lr_y = _series(records, "learning_rate")
    if not (loss_x or eval_x or lr_x):
        raise UserError("nothing to plot: no record has \"step\" with \"loss\", \"eval_loss\" or \"learning_rate\"")
    margin_x, margin_y = _series(records, "rewards/margins")
    fig = Figure(figsize=(WIDTH_IN, HEIGHT_IN * (2 if margin_x else 1)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(2, 1, 1) if margin_x else fig.add_subplot()
    if margin_x:
        _preference_panel(fig.add_subplot(2, 1, 2), records, margin_x, margin_y)
    handles = []
    if loss_x:
        if len(loss_y) >= 10:
            # Window grows with the run (a tenth of the points), within TensorBoard-like bounds (0.6 .. 0.9).
            weight = min(0.9, max(0.6, 1 - 10 / len(loss_y)))
            handles += ax.plot(loss_x, loss_y, color="C0", alpha=0.3, linewidth=0.8, label="train loss")
            handles += ax.plot(loss_x, ema(loss_y, weight), color="C0", linewidth=2,
                               label=f"train loss (EMA {weight:.2f})")
        else:
            handles += ax.plot(loss_x, loss_y, color="C0", linewidth=1.5,
                               **(_single(loss_x) or {"marker": "."}), label="train loss")
    if eval_x:
        handles += ax.plot(eval_x, eval_y, color="C1", marker="o", linewidth=1.2, label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    if lr_x:
        ax_lr = ax.twinx()
        handles += ax_lr.plot(lr_x, lr_y, color="C2", linestyle="--", linewidth=1, **_single(lr_x),
                              markerfacecolor="none", label="learning rate")
        ax_lr.set_ylabel("learning rate")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.legend(handles=handles, loc="upper right")
    ax.set_title(title)
    last = max((x for r in records if (x := _number(r.get("step"))) is not None), default=None)
    steps = steps if steps is not None else (int(last) if last is not None else None)
    note = few_points_note(len(loss_x), steps)
    if note and loss_x and steps is not None:
        fig.suptitle(note, fontsize="medium", color="C3")
        from matplotlib.ticker import MaxNLocator

        for a in fig.axes:  # the whole run on the x axis, so the few points sit where they were logged
            a.set_xlim(0.5, steps + 0.5)
            a.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def _preference_panel(ax: Axes, records: list[dict], margin_x: list[float], margin_y: list[float]) -> None:
    handles = ax.plot(margin_x, margin_y, color="C3", linewidth=1.5, **(_single(margin_x) or {"marker": "."}),
                      label="reward margin")
    eval_x, eval_y = _series(records, "eval_rewards/margins")
    if eval_x:
        handles += ax.plot(eval_x, eval_y, color="C4", marker="o", linewidth=1.2, label="eval reward margin")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("reward margin (chosen - rejected)")
    ax.grid(True, alpha=0.3)
    acc_x, acc_y = _series(records, "rewards/accuracies")
    if acc_x:
        ax_acc = ax.twinx()
        handles += ax_acc.plot(acc_x, acc_y, color="C5", linestyle="--", linewidth=1, **_single(acc_x),
                               markerfacecolor="none", label="preference accuracy")
        ax_acc.set_ylim(-0.02, 1.02)
        ax_acc.set_ylabel("preference accuracy")
    ax.legend(handles=handles, loc="upper left")


def _read_log(path: Path) -> list[dict]:
    return read_jsonl(path, fix_hint="fix or delete that line")  # a bad line raises UserError naming it


def _read_trainer_state(path: Path) -> list[dict]:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise UserError(f"{path}: no \"log_history\" list; is this a Hugging Face trainer_state.json?")
    return [r for r in history if isinstance(r, dict)]


def plot_run(source: Path, out: Path | None = None) -> Path:
    """Plot a run directory (its log.jsonl, else trainer_state.json), a log.jsonl or a trainer_state.json.

    Default out: loss.png in the run directory, or next to the given file. The title is the run's name.
    """
    source = Path(source)
    if source.is_dir():
        folder = source
        if (source / rundir.LOG).is_file():
            source = source / rundir.LOG
        elif (source / rundir.TRAINER_STATE).is_file():
            source = source / rundir.TRAINER_STATE
        else:
            raise UserError(f"'{folder}' has no {rundir.LOG} or trainer_state.json: give a run directory "
                            "made by `domaintune train`, a log.jsonl or a trainer_state.json")
    elif source.is_file():
        folder = source.parent
    else:
        raise UserError(f"'{source}' not found: give a run directory, a log.jsonl or a trainer_state.json")
    records = _read_trainer_state(source) if source.suffix == ".json" else _read_log(source)
    out = Path(out) if out is not None else folder / rundir.LOSS_PNG
    return plot_records(records, out, title=folder.resolve().name, steps=_steps_run(source, folder))


def _steps_run(source: Path, folder: Path) -> int | None:
    """The steps the run made: run_info.json's train.global_steps (written when training ends; the end is not
    always a logged step), or trainer_state.json's global_step; None when neither says."""
    path, keys = ((source, ("global_step",)) if source.suffix == ".json" else
                  (folder / rundir.RUN_INFO, ("train", "global_steps")))
    try:
        value: object = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None
