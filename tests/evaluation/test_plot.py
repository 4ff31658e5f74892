"""plot: PNG files of the right size with real content, from log.jsonl and trainer_state.json; CJK glyphs."""
from __future__ import annotations

import argparse
import json
import math
import warnings

import pytest

from domaintune.cli import evaluate
from domaintune.errors import UserError
from domaintune.evaluation import plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _records(n=60, eval_every=20):
    recs = []
    for s in range(1, n + 1):
        recs.append({"step": s, "epoch": s / n, "loss": 2.0 * math.exp(-s / 20) + 0.5 + 0.1 * (s % 3),
                     "learning_rate": 2e-4 * (1 - s / n), "grad_norm": 1.0, "tokens": 512 * s, "time": 0.1 * s})
        if s % eval_every == 0:
            recs.append({"step": s, "epoch": s / n, "eval_loss": 1.5 * math.exp(-s / 30) + 0.6, "time": 0.1 * s})
    return recs


def _read_png(path):
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == PNG_MAGIC
    return mpimg.imread(str(path))


def _ink_share(img) -> float:
    """Share of pixels that are not (near) white background."""
    return float((img[..., :3].min(axis=2) < 0.95).mean())


def test_plot_run_from_run_dir_log_jsonl(tmp_path):
    run = tmp_path / "run1"
    run.mkdir()
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()), encoding="utf-8")
    out = plot.plot_run(run)
    assert out == run / "loss.png"
    img = _read_png(out)
    assert img.shape[:2] == (plot.HEIGHT_IN * plot.DPI, plot.WIDTH_IN * plot.DPI) == (500, 1000)
    assert 0.02 < _ink_share(img) < 0.5
    assert not list(run.glob("*.tmp"))


def test_plot_run_torn_last_line_is_ignored_but_bad_middle_line_is_an_error(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [json.dumps(r) for r in _records(n=5)]
    log.write_text("\n".join(lines) + '\n{"step": 6, "lo', encoding="utf-8")
    assert _read_png(plot.plot_run(log)).shape[:2] == (500, 1000)
    log.write_text(lines[0] + "\n{oops\n" + lines[1] + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"log\.jsonl line 2: not valid JSON"):
        plot.plot_run(log)


def test_plot_run_from_trainer_state(tmp_path):
    ckpt = tmp_path / "checkpoint-60"
    ckpt.mkdir()
    history = [{k: v for k, v in r.items() if k not in ("tokens", "time")} for r in _records()]
    history.append({"step": 60, "epoch": 1.0, "train_runtime": 12.3, "train_loss": 0.9})  # HF's final summary
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 60, "log_history": history}), encoding="utf-8")
    out = plot.plot_run(ckpt / "trainer_state.json", out=tmp_path / "curves" / "x.png")
    img = _read_png(out)
    assert img.shape[:2] == (500, 1000)
    assert 0.02 < _ink_share(img) < 0.5
    # A directory holding only trainer_state.json works too; default output goes next to it.
    assert plot.plot_run(ckpt) == ckpt / "loss.png"
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 1}), encoding="utf-8")
    with pytest.raises(UserError, match="log_history"):
        plot.plot_run(ckpt / "trainer_state.json")


def test_partial_keys_and_empty_input(tmp_path):
    only_eval = [{"step": 10, "eval_loss": 1.2}, {"step": 20, "eval_loss": 1.0}]
    assert _ink_share(_read_png(plot.plot_records(only_eval, tmp_path / "e.png"))) > 0.02
    only_lr = [{"step": s, "learning_rate": 1e-4 * s} for s in range(1, 4)]
    assert _read_png(plot.plot_records(only_lr, tmp_path / "lr.png")).shape[:2] == (500, 1000)
    with pytest.raises(UserError, match="no records"):
        plot.plot_records([], tmp_path / "x.png")
    with pytest.raises(UserError, match="nothing to plot"):
        plot.plot_records([{"step": 1, "train_runtime": 3.0}, {"loss": 1.0}], tmp_path / "x.png")
    with pytest.raises(UserError, match="not found"):
        plot.plot_run(tmp_path / "missing")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(UserError, match="has no log.jsonl"):
        plot.plot_run(tmp_path / "empty_run")
    assert not (tmp_path / "x.png").exists()


def test_ema_is_debiased():
    assert plot.ema([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])
    assert plot.ema([0.0, 10.0], 0.5) == pytest.approx([0.0, 5.0 / 0.75])


def _title_strip(tmp_path, title, name):
    img = _read_png(plot.plot_records(_records(n=12), tmp_path / name, title=title))
    return img[:30, 250:750, :3]  # the title sits centred in the top rows


def test_chinese_title_renders_glyphs_not_tofu(tmp_path, monkeypatch):
    import numpy as np

    family = plot.cjk_font_family()
    if family is None:
        pytest.skip("no CJK font installed (pip install noto-cjk-sans-otc, or apt-get install fonts-noto-cjk)")
    from matplotlib import font_manager, ft2font

    font_path = font_manager.findfont(font_manager.FontProperties(family=family), fallback_to_default=False)
    assert all(ft2font.FT2Font(font_path).get_char_index(ord(c)) for c in "训练损失模型评估")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = _title_strip(tmp_path, "训练损失", "a.png")
        b = _title_strip(tmp_path, "模型评估", "b.png")
    assert not [w for w in caught if "missing from font" in str(w.message)]
    assert not np.array_equal(a, b)  # real glyphs: different characters, different pixels
    # Control: without the CJK fallback both titles become the same four boxes, so the check above can fail.
    monkeypatch.setattr(plot, "cjk_font_family", lambda: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tofu_a = _title_strip(tmp_path, "训练损失", "ta.png")
        tofu_b = _title_strip(tmp_path, "模型评估", "tb.png")
    assert np.array_equal(tofu_a, tofu_b)
    assert not np.array_equal(a, tofu_a)


def test_no_cjk_font_warns_once_and_only_for_cjk_text(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(plot, "cjk_font_family", lambda: None)
    monkeypatch.setattr(plot, "_warned_no_cjk", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plot.plot_records(_records(n=3), tmp_path / "en.png", title="english only")
        assert capsys.readouterr().err == ""
        plot.plot_records(_records(n=3), tmp_path / "zh1.png", title="训练")
        plot.plot_records(_records(n=3), tmp_path / "zh2.png", title="训练")
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err.count("\n") == 1 and printed.err.startswith("warning: no CJK font found")
    assert (tmp_path / "zh2.png").is_file()


def test_cli_plot(tmp_path, capsys):
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records(n=5)), encoding="utf-8")
    parser = argparse.ArgumentParser()
    evaluate.register(parser.add_subparsers())
    args = parser.parse_args(["plot", str(tmp_path), "--out", str(tmp_path / "curve.png")])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'curve.png'}"
    assert _read_png(tmp_path / "curve.png").shape[:2] == (500, 1000)


def test_a_preference_run_gets_a_margin_and_accuracy_panel(tmp_path):
    recs = _records(20, 10)
    for r in recs:
        if "loss" in r:
            r.update({"rewards/margins": 0.02 * r["step"], "rewards/accuracies": min(1.0, 0.05 * r["step"])})
        else:
            r["eval_rewards/margins"] = 0.015 * r["step"]
    out = plot.plot_records(recs, tmp_path / "loss.png", title="dpo")
    img = _read_png(out)
    assert img.shape[:2] == (2 * plot.HEIGHT_IN * plot.DPI, plot.WIDTH_IN * plot.DPI) == (1000, 1000)
    top, bottom = img[:500], img[500:]
    assert _ink_share(top) > 0.02 and _ink_share(bottom) > 0.02
    # The margin line is drawn in C3 (matplotlib's red, #d62728) in the lower panel only.
    red = (abs(img[..., 0] - 0xd6 / 255) < 0.08) & (abs(img[..., 1] - 0x27 / 255) < 0.08) & \
        (abs(img[..., 2] - 0x28 / 255) < 0.08)
    assert red[500:].sum() > 200 and red[:500].sum() == 0
    sft = plot.plot_records(_records(20, 10), tmp_path / "sft.png")
    assert _read_png(sft).shape[:2] == (500, 1000)  # an SFT run keeps one panel


def _window_has(fig, ax, x, y, color, half=8) -> bool:
    """Whether the drawn figure has pixels of `color` (a matplotlib colour) within `half` pixels of data point
    (x, y) of `ax`."""
    import numpy as np
    from matplotlib.colors import to_rgb

    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3] / 255.0
    px, py = ax.transData.transform((x, y))
    row, col = int(round(img.shape[0] - py)), int(round(px))
    win = img[max(0, row - half): row + half + 1, max(0, col - half): col + half + 1]
    return bool((np.abs(win - np.array(to_rgb(color))).max(axis=2) < 0.1).any())


def test_a_short_preference_run_shows_its_single_logged_point_and_says_so(tmp_path):
    """DPO with max_steps 3 < logging_steps 10 logs step 1 only: every series is one point. Each is drawn as a
    visible marker (a line of one point draws nothing), and the figure says only 1 of 3 steps was logged
    (issue 22, 31)."""
    run = tmp_path / "dpo"
    run.mkdir()
    rec = {"step": 1, "epoch": 0.1, "loss": 0.6931, "learning_rate": 5e-6, "grad_norm": 1.0,
           "rewards/margins": 0.0, "rewards/accuracies": 0.0, "rewards/chosen": 0.0, "time": 1.0}
    (run / "log.jsonl").write_text(json.dumps(rec) + "\n", encoding="utf-8")
    (run / "run_info.json").write_text(json.dumps({"train": {"global_steps": 3}}), encoding="utf-8")
    assert _read_png(plot.plot_run(run)).shape[:2] == (1000, 1000)

    fig = plot.make_figure([rec], "dpo", steps=3)
    assert fig.get_suptitle().startswith("only 1 of 3 steps logged")
    top, top_lr, bottom, bottom_acc = fig.axes[0], None, None, None
    for ax in fig.axes[1:]:
        if ax.get_ylabel() == "learning rate":
            top_lr = ax
        elif ax.get_ylabel() == "preference accuracy":
            bottom_acc = ax
        elif ax.get_ylabel().startswith("reward margin"):
            bottom = ax
    for ax, y, color in ((top, 0.6931, "C0"), (top_lr, 5e-6, "C2"), (bottom, 0.0, "C3"), (bottom_acc, 0.0, "C5")):
        assert _window_has(fig, ax, 1, y, color), (ax.get_ylabel(), color)
    # Enough points: no note; two points of three steps still make a line.
    assert plot.make_figure(_records(20, 10), "sft", steps=20).get_suptitle() == ""
    two = [dict(rec, step=1), dict(rec, step=2)]
    assert plot.make_figure(two, "x", steps=3).get_suptitle() == ""
    assert plot.make_figure(two, "x", steps=40).get_suptitle().startswith("only 2 of 40 steps logged")
