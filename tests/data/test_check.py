"""check_data_files: the training file (and data.eval_path) validated exactly as load_examples does, with no
tokenizer, and without importing torch or transformers, so a bad file stops a run before any heavy import."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from domaintune.config import build_config
from domaintune.data.examples import load_examples
from domaintune.data.load import check_data_files
from domaintune.data.templates import BUILTIN, get_template
from domaintune.errors import UserError

ROWS = [{"instruction": "孩子不爱吃饭怎么办？", "input": "三岁", "output": "规律进餐。"},
        {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "您好！"}]}]


def _cfg(**data):
    return build_config({"data": data}).data


def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("template", BUILTIN)
def test_returns_the_row_count_for_every_template(tmp_path, template):
    p = _write(tmp_path / "train.jsonl", ROWS * 3)
    assert check_data_files(_cfg(path=str(p), template=template)) == 6


def test_same_error_as_load_examples(tmp_path):
    p = _write(tmp_path / "train.jsonl", [ROWS[0], {"instruction": "q", "output": 5}, {"instruction": "q"}])
    with pytest.raises(UserError) as e:
        load_examples(p, template=get_template("domain_zh"))
    with pytest.raises(UserError) as pre:
        check_data_files(_cfg(path=str(p)))
    assert str(pre.value) == str(e.value) == (
        f'2 invalid row(s); fix them and run again:\n  {p} line 2: "output" must be a string, got a number\n'
        f'  {p} line 3: missing "output"')


def test_eval_file_is_checked_too(tmp_path):
    train = _write(tmp_path / "train.jsonl", ROWS)
    ev = _write(tmp_path / "eval.jsonl", [ROWS[0], {"instruction": "q", "output": " "}])
    with pytest.raises(UserError) as e:
        check_data_files(_cfg(path=str(train), eval_path=str(ev)))
    assert str(e.value) == (f'1 invalid row(s); fix them and run again:\n  {ev} line 2: "output" is blank; '
                            "every training row needs an answer")
    with pytest.raises(UserError, match=f"data file '{tmp_path / 'nope.jsonl'}' not found"):
        check_data_files(_cfg(path=str(train), eval_path=str(tmp_path / "nope.jsonl")))
    assert check_data_files(_cfg(path=str(train), eval_path=str(train))) == 2


def test_file_level_errors_and_template_errors(tmp_path):
    with pytest.raises(UserError, match=f"data file '{tmp_path / 'nope.jsonl'}' not found"):
        check_data_files(_cfg(path=str(tmp_path / "nope.jsonl")))
    p = _write(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(UserError, match="unknown template 'nope': use one of domain_zh"):
        check_data_files(_cfg(path=str(p), template="nope"))
    tpl = tmp_path / "t.json"
    tpl.write_text('{"name": "t", "user_format": "Q:"}', encoding="utf-8")
    with pytest.raises(UserError, match="user_format must contain"):
        check_data_files(_cfg(path=str(p), template=str(tpl)))


def test_runs_without_torch_or_transformers(tmp_path):
    """In a fresh interpreter: the error is the UserError naming file and line, and neither torch nor
    transformers was imported (the point of the pre-check: it runs before the tokenizer loads)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q", "output": \n', encoding="utf-8")
    good = _write(tmp_path / "good.jsonl", ROWS)
    code = textwrap.dedent(f"""
        import sys
        from domaintune.config import build_config
        from domaintune.data.load import check_data_files
        from domaintune.errors import UserError
        print(check_data_files(build_config({{"data": {{"path": {str(good)!r}, "template": "tokenizer"}}}}).data))
        try:
            check_data_files(build_config({{"data": {{"path": {str(bad)!r}}}}}).data)
        except UserError as e:
            print("error:", e)
        print(sorted(m for m in ("torch", "transformers", "jinja2") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "2",
        f"error: {bad} line 2: not valid JSON (Expecting value at column 32); each line must hold one JSON object",
        "[]",
    ]
