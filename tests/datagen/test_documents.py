"""Document extraction: blocks, spans, pages and heading paths per file type; problems reported per file;
pattern expansion. Every fixture is built here in tmp_path (python-docx, reportlab, plain bytes)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from domaintune.datagen.documents import (
    Document,
    Problem,
    extract,
)


def assert_spans(doc: Document) -> None:
    assert doc.text == "\n\n".join(b.text for b in doc.blocks)
    for b in doc.blocks:
        assert doc.text[b.start:b.end] == b.text
        assert b.source == str(doc.path)


def rows(doc: Document) -> list[tuple]:
    return [(b.text, b.page, b.heading) for b in doc.blocks]


# ------------------------------------------------------------------------------------------------------ DOCX
def test_docx_heading_paths_tables_and_document_order(tmp_path):
    import docx
    from docx.enum.style import WD_STYLE_TYPE

    d = docx.Document()
    d.add_heading("员工手册", level=0)  # the "Title" style: the top of every heading path
    d.add_heading("第一章 总则", level=1)
    d.add_paragraph("本手册适用于公司全体员工。")
    d.add_heading("第一条 目的", level=2)
    d.add_paragraph("为规范管理，制定本手册。")
    table = d.add_table(rows=3, cols=3)
    for r, values in enumerate([("假期", "天数", "备注"), ("年假", "5", "满一年"), ("婚假", "3", "")]):
        for c, v in enumerate(values):
            table.cell(r, c).text = v
    table.cell(2, 1).merge(table.cell(2, 2))  # a merged cell is one cell, not repeated
    d.add_paragraph("表后的段落。")
    d.styles.add_style("标题 2", WD_STYLE_TYPE.PARAGRAPH)  # a localized style name without an outline level
    d.add_paragraph("第二条 范围", style="标题 2")
    d.add_paragraph("范围内容。")
    d.add_heading("第二章 考勤", level=1)
    d.add_paragraph("")  # empty paragraphs give no block
    d.add_paragraph("按时上班。")
    path = tmp_path / "手册.docx"
    d.save(path)

    doc, problems = extract(path)
    assert problems == []
    h1 = "员工手册 > 第一章 总则"
    assert rows(doc) == [
        ("本手册适用于公司全体员工。", None, h1),
        ("为规范管理，制定本手册。", None, h1 + " > 第一条 目的"),
        ("假期 | 天数 | 备注", None, h1 + " > 第一条 目的"),
        ("年假 | 5 | 满一年", None, h1 + " > 第一条 目的"),
        ("婚假 | 3", None, h1 + " > 第一条 目的"),
        ("表后的段落。", None, h1 + " > 第一条 目的"),
        ("范围内容。", None, h1 + " > 第二条 范围"),
        ("按时上班。", None, "员工手册 > 第二章 考勤"),
    ]
    assert_spans(doc)


def test_docx_broken_and_old_doc_are_unreadable(tmp_path):
    broken = tmp_path / "broken.docx"
    broken.write_bytes(b"PK\x03\x04 not really a zip" * 10)
    old = tmp_path / "old.docx"
    old.write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 512)
    for path in (broken, old):
        doc, problems = extract(path)
        assert doc is None and [p.reason for p in problems] == ["unreadable"]
        assert problems[0].source == str(path)
    assert ".doc" in extract(old)[1][0].detail


# ------------------------------------------------------------------------------------------------------ PDF
def make_pdf(path: Path, pages: list[list[tuple[int, int, str]] | None], font: str = "Helvetica") -> Path:
    """pages: per page, lines (x, y, text) drawn at 12 pt, or None for a page with only drawn shapes.

    Chinese uses reportlab's built-in CID font STSong-Light (not embedded; text shown with the UniGB-UCS2-H
    CMap). pypdf maps it back to Unicode, so no TTF font is needed; the tests below check the characters."""
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.cidfonts import UnicodeCIDFont
    from reportlab.pdfgen import canvas

    pdfmetrics.registerFont(UnicodeCIDFont("STSong-Light"))
    c = canvas.Canvas(str(path))
    for lines in pages:
        if lines is None:
            c.setFillColorRGB(0.2, 0.4, 0.8)
            c.rect(72, 300, 400, 300, fill=1)  # a "scanned" page: pixels, no text
            c.circle(300, 200, 50, fill=1)
        for x, y, text in lines or []:
            c.setFont("STSong-Light" if any(ord(ch) > 0x2e80 for ch in text) else font, 12)
            c.drawString(x, y, text)
        c.showPage()
    c.save()
    return path


ZH_PAGE_1 = [(72, 700, "第一章 总则。本办法适用于所有"), (72, 686, "员工，自发布之日起施行！"),
             (72, 640, "第二段：请假须提前申请。"), (300, 60, "1")]
ZH_PAGE_2 = [(72, 700, "第二章 考勤"), (72, 660, "• 上午九点上班"), (72, 646, "• 下午六点下班")]
EN_PAGE = [(72, 700, "Hello world, this is English text that is an exam-"), (72, 686, "ple of wrapped lines."),
           (72, 640, "A new paragraph."), (300, 60, "- 3 -")]


def test_pdf_chinese_and_english_pages(tmp_path):
    path = make_pdf(tmp_path / "办法.pdf", [ZH_PAGE_1, ZH_PAGE_2, EN_PAGE])
    doc, problems = extract(path)
    assert problems == []
    assert rows(doc) == [
        # wrapped CJK lines joined without a space; the page number "1" dropped
        ("第一章 总则。本办法适用于所有员工，自发布之日起施行！", 1, None),
        ("第二段：请假须提前申请。", 1, None),
        ("第二章 考勤", 2, None),
        ("• 上午九点上班", 2, None),  # a bullet starts a paragraph even without a blank line
        ("• 下午六点下班", 2, None),
        ("Hello world, this is English text that is an example of wrapped lines.", 3, None),
        ("A new paragraph.", 3, None),
    ]
    assert_spans(doc)


def test_pdf_paragraphs_without_blank_lines_and_two_columns(tmp_path):
    long = "本条规定适用于公司全体员工以及派遣人员和实习人员，"  # 25 CJK characters: a full line
    even = [(72, 700, long), (72, 686, long), (72, 672, "到此结束。"),  # a short line ending a sentence
            (72, 658, long), (72, 644, "第二段结束。")]
    left = [(50, 700 - 12 * i, f"Left column line {i} of the first story, set") for i in range(10)]
    right = [(310, 700 - 12 * i, f"Right column line {i} of another story here") for i in range(10)]
    path = make_pdf(tmp_path / "layout.pdf", [even, left + [(50, 580, "and it ends.")] + right])
    doc, problems = extract(path)
    assert problems == []
    assert [b.text for b in doc.blocks] == [
        long * 2 + "到此结束。", long + "第二段结束。",
        # side-by-side columns are read column by column (layout mode would interleave their lines)
        " ".join(t for _, _, t in left) + " and it ends.", " ".join(t for _, _, t in right)]


def test_pdf_page_without_text_layer_is_reported_and_others_kept(tmp_path):
    path = make_pdf(tmp_path / "mixed.pdf", [ZH_PAGE_1, None, EN_PAGE, None])
    doc, problems = extract(path)
    assert [b.page for b in doc.blocks] == [1, 1, 3, 3]
    assert problems == [Problem(str(path), "no_text_layer", "pages 2, 4 have no text layer (scanned?); run OCR "
                                "(e.g. ocrmypdf in.pdf out.pdf) first")]

    one = make_pdf(tmp_path / "one.pdf", [EN_PAGE, None, ZH_PAGE_2])
    doc, problems = extract(one)
    assert sorted({b.page for b in doc.blocks}) == [1, 3]
    assert len(problems) == 1 and problems[0].detail.startswith("page 2 has no text layer")


def test_pdf_with_no_text_at_all_gives_no_document(tmp_path):
    path = make_pdf(tmp_path / "scan.pdf", [None, None])
    doc, problems = extract(path)
    assert doc is None
    assert [(p.reason, p.detail.split(";")[0]) for p in problems] == [("no_text_layer",
                                                                        "no page has a text layer (scanned?)")]


def test_pdf_encrypted_broken_and_empty(tmp_path):
    from pypdf import PdfWriter

    plain = make_pdf(tmp_path / "plain.pdf", [EN_PAGE])
    locked, owner_only = tmp_path / "locked.pdf", tmp_path / "owner_only.pdf"
    aes_owner_only = tmp_path / "aes_owner_only.pdf"  # common for official documents; needs pypdf[crypto]
    for out, user, algorithm in ((locked, "secret", "RC4-128"), (owner_only, "", "RC4-128"),
                                 (aes_owner_only, "", "AES-256")):
        writer = PdfWriter(clone_from=plain)
        writer.encrypt(user_password=user, owner_password="owner", algorithm=algorithm)
        writer.write(out)
    doc, problems = extract(locked)
    assert doc is None and [p.reason for p in problems] == ["encrypted"] and "password" in problems[0].detail
    for path in (owner_only, aes_owner_only):  # they open with the empty user password: read as usual
        doc, problems = extract(path)
        assert problems == [] and doc.blocks[-1].text == "A new paragraph."

    corrupt = tmp_path / "corrupt.pdf"
    corrupt.write_bytes(bytes((i * 37 + 11) % 256 for i in range(4096)))
    doc, problems = extract(corrupt)
    assert doc is None and [p.reason for p in problems] == ["unreadable"]
    assert "Traceback" not in problems[0].detail

    (tmp_path / "zero.pdf").write_bytes(b"")
    assert extract(tmp_path / "zero.pdf") == (None, [Problem(str(tmp_path / "zero.pdf"), "empty", "the file is empty")])


# ------------------------------------------------------------------------------------------------------ Markdown
MARKDOWN = """---
title: 手册
tags: [a, b]
---
# 第一章 总则

本章说明**适用范围**，详见[附录](appendix.md)。
第二行接着写。

## 第一条

- 第一项
- 第二项
  续行
1. 编号项

Setext 标题
-----------

```python
def f():

    return 1
```

| 列一 | 列二 |
|------|:----:|
| a    | b    |

另一章
======

> 引用的话。

***
最后一段 with `code`.
"""


def test_markdown_headings_lists_code_tables_front_matter(tmp_path):
    path = tmp_path / "guide.md"
    path.write_text(MARKDOWN, encoding="utf-8")
    doc, problems = extract(path)
    assert problems == []
    c1 = "第一章 总则"
    assert rows(doc) == [
        ("本章说明适用范围，详见附录。第二行接着写。", None, c1),
        ("第一项", None, c1 + " > 第一条"),
        ("第二项续行", None, c1 + " > 第一条"),
        ("1. 编号项", None, c1 + " > 第一条"),
        ("def f():\n\n    return 1", None, c1 + " > Setext 标题"),
        ("列一 | 列二", None, c1 + " > Setext 标题"),
        ("a | b", None, c1 + " > Setext 标题"),
        ("引用的话。", None, "另一章"),
        ("最后一段 with code.", None, "另一章"),
    ]
    assert_spans(doc)


# ------------------------------------------------------------------------------------------------------ HTML
HTML = """<!DOCTYPE html>
<html><head><title>页面标题</title><style>p { color: red }</style><script>var x = "<p>no</p>";</script></head>
<body>
<header><a href="/">网站首页</a> 登录</header>
<nav><ul><li>菜单一</li><li>菜单二</li></ul></nav>
<article>
  <header><h1>产品  手册</h1></header>
  <p>第一段   文字，
  换行继续。</p>
  <!-- a comment -->
  <h2>参数</h2>
  <table><thead><tr><th>名称</th><th>值</th></tr></thead>
         <tbody><tr><td>电压</td><td>220 V</td></tr></tbody></table>
  <ul><li>要点一<ul><li>子要点</li></ul></li></ul>
  <pre>line 1
    line 2</pre>
  <blockquote><p>引用。</p></blockquote>
  <dl><dt>术语</dt><dd>解释</dd></dl>
  <div>div 里的 <b>文字</b><br>second line</div>
</article>
<aside>相关文章</aside><noscript>开启 JS</noscript>
<footer>版权所有</footer>
</body></html>"""


def test_html_blocks_headings_and_junk_dropped(tmp_path):
    path = tmp_path / "page.html"
    path.write_text(HTML, encoding="utf-8")
    doc, problems = extract(path)
    assert problems == []
    h1, h2 = "产品 手册", "产品 手册 > 参数"
    assert rows(doc) == [
        ("第一段 文字，换行继续。", None, h1),
        ("名称 | 值", None, h2),
        ("电压 | 220 V", None, h2),
        ("要点一", None, h2),
        ("子要点", None, h2),
        ("line 1\n    line 2", None, h2),
        ("引用。", None, h2),
        ("术语", None, h2),
        ("解释", None, h2),
        ("div 里的 文字\nsecond line", None, h2),
    ]
    assert_spans(doc)


def test_html_fragment_nested_table_and_unclosed_code_fence(tmp_path):
    (tmp_path / "f.html").write_text("<p>one</p>loose text<table><tr><td>a<table><tr><td>in</td></tr></table></td>"
                                     "<td>b</td></tr></table>", encoding="utf-8")
    assert [b.text for b in extract(tmp_path / "f.html")[0].blocks] == ["one", "loose text", "a in | b"]
    (tmp_path / "u.md").write_text("# H\n\n```\nnever closed\n\n  more\n", encoding="utf-8")
    assert rows(extract(tmp_path / "u.md")[0]) == [("never closed\n\n  more", None, "H")]


def test_html_declared_legacy_encoding(tmp_path):
    path = tmp_path / "gbk.htm"
    path.write_bytes('<html><head><meta charset="gbk"></head><body><p>中文内容</p></body></html>'.encode("gbk"))
    doc, _ = extract(path)
    assert [b.text for b in doc.blocks] == ["中文内容"]


# ------------------------------------------------------------------------------------------------------ TXT
def test_txt_encodings_and_paragraphs(tmp_path):
    text = "第一段。\r\n第一段第二行。\r\n\r\n\r\n第二段。\n"
    gb = tmp_path / "gb.txt"
    gb.write_bytes(text.encode("gb18030"))
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    for path in (gb, bom):
        doc, problems = extract(path)
        assert problems == [] and [b.text for b in doc.blocks] == ["第一段。\n第一段第二行。", "第二段。"]
        assert_spans(doc)


def test_txt_binary_empty_and_unsupported(tmp_path):
    binary = tmp_path / "data.txt"
    binary.write_bytes(bytes(range(256)) * 8)
    doc, problems = extract(binary)
    assert doc is None and [p.reason for p in problems] == ["undecodable"] and "UTF-8" in problems[0].detail
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\n \n", encoding="utf-8")
    assert extract(blank) == (None, [Problem(str(blank), "empty", "no text found in the file")])
    other = tmp_path / "x.rtf"
    other.write_text("{\\rtf1}", encoding="utf-8")
    doc, problems = extract(other)
    assert doc is None and problems[0].reason == "unsupported_type" and ".docx" in problems[0].detail


def test_import_loads_no_parser_library():
    code = ("import sys, domaintune.datagen.documents, domaintune.datagen.chunking; "
            "print(sorted({'pypdf', 'docx', 'bs4', 'reportlab'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
