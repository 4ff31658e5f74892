"""The user's own documents as text blocks (PDF, DOCX, Markdown, HTML, plain text), for grounded gen-data.

`load_documents(["docs/", "manual.pdf"])` expands the patterns and extracts each file: `Document`s, plus a
`Problem` for every file (or PDF page) that gave no text; nothing is skipped silently. A Document's text is its
blocks joined by a blank line; each `Block` knows its span in that text, its page (PDF) and the heading path in
force (headings are not blocks), so that chunking.py can cut passages that cite their source exactly.
Parsing is left to pypdf, python-docx and beautifulsoup4 (imported only when a file of their type is read);
what they lack is here: paragraphs of a PDF page (wrapped lines joined without a space between CJK characters),
heading paths, and Markdown's block structure (a line-based splitter).
"""
from __future__ import annotations

import contextlib
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from docx.text.paragraph import Paragraph

SUPPORTED = {".pdf", ".docx", ".md", ".markdown", ".html", ".htm", ".txt"}
# Han, kana, CJK punctuation and full-width forms: wrapped lines are joined without a space next to these
# (Hangul is written with spaces between words, so it is not here).
CJK = "\u2e80-\u2fdf\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef"
_CJK_RE = re.compile(f"[{CJK}]")
_SPACED_CJK = re.compile(f"(?<=[{CJK}]) (?=[{CJK}])")
_PAGE_NUMBER = re.compile(r"[-–—\s]*(?:(?:page|第)\s*)?\d{1,4}(?:\s*(?:/|of|页|頁)\s*\d{0,4})?\s*[页頁]?[-–—\s]*", re.I)
_N = "一二三四五六七八九十百零"  # a PDF line that starts with a bullet or an item number starts a paragraph
_BULLET = re.compile(rf"[•·▪●○◦■□➢✓*-]\s|\(?\d{{1,3}}[.)]\s|\d{{1,3}}、|[(（][{_N}\d]+[)）]|[{_N}]+、"
                     rf"|第[{_N}\d]+[章节条]")
Items = list[tuple[str, "int | None", "str | None"]]  # what a reader returns: (text, page, heading) per block


@dataclass(frozen=True)
class Block:
    """One structural unit (paragraph, list item, table row, code block); `text == Document.text[start:end]`."""
    text: str
    source: str
    page: int | None
    heading: str | None
    start: int
    end: int


@dataclass
class Document:
    path: Path
    text: str
    blocks: list[Block]


@dataclass(frozen=True)
class Problem:
    """Why a file (or part of it) gave no text. reason: no_text_layer, unsupported_type, unreadable, empty,
    encrypted or undecodable; detail says what to do."""
    source: str
    reason: str
    detail: str


class _Unusable(Exception):
    """args: (reason, detail) of the Problem: the file gives no text."""


def join_lines(lines: list[str]) -> str:
    """Join the wrapped lines of one paragraph: no space next to a CJK character; "exam-" + "ple" rejoined;
    runs of whitespace inside a line become one space."""
    out = ""
    for line in (" ".join(s.split()) for s in lines):
        if not line or not out:
            out = out or line
        elif out.endswith("-") and len(out) > 1 and out[-2].isalpha() and line[0].islower():
            out = out[:-1] + line
        else:
            out += line if _CJK_RE.match(out[-1]) or _CJK_RE.match(line[0]) else " " + line
    return out


class _Headings(list):
    """The heading path in force, as (level, text) pairs: a heading of level n replaces those of level >= n."""
    def set(self, level: int, text: str) -> None:
        self[:] = [(lv, t) for lv, t in self if lv < level] + ([(level, text)] if text else [])

    @property
    def path(self) -> str | None:
        return " > ".join(t for _, t in self) or None


def _decode(data: bytes, declared: str | None = None) -> str:
    for encoding in ["utf-8-sig"] + ([declared] if declared else []) + ["gb18030"]:
        with contextlib.suppress(UnicodeDecodeError, LookupError):
            if "\x00" not in (text := data.decode(encoding)):  # NUL bytes decode, but only binary files have them
                return text
    raise _Unusable("undecodable", "the file is not text in UTF-8 or GB18030 (binary?); save it as UTF-8 text")


def _two_columns(layout: str) -> bool:
    """Layout-mode text puts columns side by side: most lines then have a wide gap ending at one position."""
    lines = [ln for ln in layout.split("\n") if ln.strip()]
    starts = Counter(m.end() for ln in lines for m in re.finditer(r"(?<=\S) {4,}(?=\S)", ln))
    return len(lines) >= 6 and max(starts.values(), default=0) >= 0.6 * len(lines)


def _pdf_paragraphs(page_text: str) -> list[str]:
    """Paragraphs of a page: a blank line, an indent or a bullet starts one; a short line ending a sentence ends
    one. Page numbers are dropped; "本 办 法" (a space after each CJK character, from some PDFs) is undone."""
    paras: list[list[str]] = []  # paragraphs as lists of lines
    ended = False  # whether the last line ended one
    for group in re.split(r"\n\s*\n", page_text):
        lines = [ln.rstrip() for ln in group.split("\n") if ln.strip()]
        margin = min((len(ln) - len(ln.lstrip()) for ln in lines), default=0)
        width = max((len(ln) + len(_CJK_RE.findall(ln)) for ln in lines), default=0)  # CJK is twice as wide
        for i, ln in enumerate(lines):
            text = " ".join(ln.split())
            spaced = len(_SPACED_CJK.findall(text))
            if spaced >= 3 and spaced > len(re.findall(f"[{CJK}]{{2}}", text)):
                text = _SPACED_CJK.sub("", text)
            if i == 0 or len(ln) - len(ln.lstrip()) - margin >= 2 or _BULLET.match(text) or ended:
                paras.append([])
            paras[-1].append(text)
            ended = text[-1] in "。！？.!?:：" and len(ln) + len(_CJK_RE.findall(ln)) < 0.7 * width
    return [t for t in map(join_lines, paras) if t and not _PAGE_NUMBER.fullmatch(t)]


def _read_pdf(path: Path, problems: list[Problem]) -> Items:
    import pypdf

    # pypdf logs repairs of damaged files ("EOF marker not found") as warnings on stderr; the outcome is
    # reported as a Problem instead, so only its errors are let through.
    logging.getLogger("pypdf").setLevel(logging.ERROR)

    reader = pypdf.PdfReader(path)
    if reader.is_encrypted:
        try:
            opened = bool(reader.decrypt(""))  # a PasswordType: NOT_DECRYPTED is 0
            hint = "remove the password (qpdf --decrypt --password=... in.pdf out.pdf)"
        except pypdf.errors.DependencyError as e:  # AES needs the cryptography package
            opened, hint = False, f"{e}: pip install cryptography, or remove it (qpdf --decrypt in.pdf out.pdf)"
        if not opened:
            raise _Unusable("encrypted", f"the PDF is encrypted (password-protected); {hint}, then try again")
    items: Items = []
    blank: list[int] = []
    for number, page in enumerate(reader.pages, 1):
        try:  # layout mode keeps vertical gaps as blank lines (paragraphs); plain mode keeps columns apart
            text = page.extract_text(extraction_mode="layout")
        except Exception:  # noqa: BLE001 - pypdf raises many types on odd fonts
            text = ""
        text = text if text.strip() and not _two_columns(text) else page.extract_text()
        paras = _pdf_paragraphs(text or "")
        blank += [] if paras else [number]
        items += [(p, number, None) for p in paras]
    if blank:
        pages = ("pages " if len(blank) > 1 else "page ") + ", ".join(map(str, blank))
        which = "no page has a" if not items else f"{pages} {'have' if len(blank) > 1 else 'has'} no"
        problems.append(Problem(str(path), "no_text_layer",
                                f"{which} text layer (scanned?); run OCR (e.g. ocrmypdf in.pdf out.pdf) first"))
    return items


def _heading_level(paragraph: Paragraph) -> int | None:
    """Heading level of a DOCX paragraph: its outline level (set on it or on its style chain), else the style
    name ("Heading 2", "标题 2"); 0 for "Title"; None for body text."""
    ns = "{http://schemas.openxmlformats.org/wordprocessingml/2006/main}"
    elements, style = [paragraph._p], paragraph.style
    while style is not None:
        elements.append(style.element)
        style = style.base_style
    for element in elements:
        if (outline := element.find(f"{ns}pPr/{ns}outlineLvl")) is not None:
            return None if (value := int(outline.get(f"{ns}val", "9"))) >= 9 else value + 1  # 9: body text
    name = (paragraph.style.name or "").strip() if paragraph.style is not None else ""
    if m := re.fullmatch(r"(?i)(?:heading|标题|標題|titre|überschrift|título)\s*(\d)", name):
        return int(m.group(1))
    return 0 if name.lower() in {"title", "标题", "標題"} else None


def _read_docx(path: Path, problems: list[Problem]) -> Items:
    import docx
    from docx.table import Table

    headings = _Headings()
    items: Items = []
    for part in docx.Document(str(path)).iter_inner_content():  # paragraphs and tables in document order
        if isinstance(part, Table):
            for row in part.rows:
                unique = {id(c._tc): c for c in row.cells}.values()  # a merged cell comes once per grid column
                cells = [re.sub(r"\s+", " ", c.text).strip() for c in unique]
                if any(cells):
                    items.append((" | ".join(cells), None, headings.path))
        elif (level := _heading_level(part)) is not None:
            headings.set(level, re.sub(r"\s+", " ", part.text).strip())
        elif part.text.strip():
            items.append((part.text.strip(), None, headings.path))
    return items


_MD_INLINE = [(re.compile(p), r) for p, r in [(r"!?\[([^\]]*)\]\([^)]*\)", r"\1"), (r"<(https?://[^>]+)>", r"\1"),
                                              (r"(\*\*|__)(.+?)\1", r"\2"), (r"`([^`]+)`", r"\1")]]


def _md_inline(text: str) -> str:
    """Markdown inline markup reduced to its text: images and links to their text, bold and code marks dropped."""
    for pattern, repl in _MD_INLINE:
        text = pattern.sub(repl, text)
    return text


def _read_markdown(path: Path, problems: list[Problem]) -> Items:
    lines = _decode(path.read_bytes()).splitlines()
    if lines and lines[0].strip() in {"---", "+++"}:  # front matter (YAML or TOML)
        end = next((i for i, ln in enumerate(lines[1:], 1) if ln.strip() in {lines[0].strip(), "..."}), None)
        lines = lines[end + 1:] if end is not None else lines
    headings = _Headings()
    items: Items = []
    para: list[str] = []  # the open paragraph or list item (a list item's first line starts with "\x00")
    fence: tuple[str, list[str]] | None = None

    def flush() -> None:
        if para:
            items.append((_md_inline(join_lines(para)).replace("\x00", ""), None, headings.path))
            para.clear()

    for line in lines:
        if fence is not None:
            if re.fullmatch(rf" {{0,3}}{re.escape(fence[0][0])}{{{len(fence[0])},}}\s*", line):
                if code := "\n".join(ln.rstrip() for ln in fence[1]).strip("\n"):
                    items.append((code, None, headings.path))
                fence = None
            else:
                fence[1].append(line)
        elif m := re.match(r" {0,3}(`{3,}|~{3,})", line):
            flush()
            fence = (m.group(1), [])
        elif m := re.fullmatch(r" {0,3}(#{1,6})(?:\s+(.*?))?(?:\s+#+)?\s*", line):
            flush()
            headings.set(len(m.group(1)), _md_inline(m.group(2) or "").strip())
        elif (m := re.fullmatch(r" {0,3}(=+|-+)\s*", line)) and para and not para[0].startswith("\x00"):
            headings.set(1 if m.group(1)[0] == "=" else 2, _md_inline(join_lines(para)))  # setext heading
            para.clear()
        elif not line.strip() or re.fullmatch(r" {0,3}([-*_])(\s*\1){2,}\s*", line):  # blank or thematic break
            flush()
        elif m := re.match(r"\s*(?:[-*+]|(\d{1,9}[.)]))\s+(.*)", line):  # list item; bullets dropped, numbers kept
            flush()
            para.append("\x00" + (m.group(1) + " " if m.group(1) else "") + m.group(2))
        elif line.lstrip().startswith("|"):  # table row; the |---| rule is dropped
            flush()
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                items.append((_md_inline(" | ".join(cells)), None, headings.path))
        else:
            para.append(re.sub(r"^ {0,3}>\s?", "", line))  # a paragraph line, block quotes unquoted
    if fence is not None and (code := "\n".join(fence[1]).strip("\n")):  # an unclosed fence runs to the end
        items.append((code, None, headings.path))
    flush()
    return items


_HTML_DROP = {"script", "style", "noscript", "nav", "aside", "template", "head", "form", "svg", "iframe"}
_HTML_BLOCK = {"p", "li", "blockquote", "dd", "dt", "div", "section", "article", "main", "ul", "ol", "dl", "table",
               "figure", "figcaption", "caption", "address", "details", "summary", "header", "footer"}


def _read_html(path: Path, problems: list[Problem]) -> Items:
    from bs4 import BeautifulSoup, NavigableString, Tag
    from bs4.dammit import EncodingDetector

    data = path.read_bytes()
    soup = BeautifulSoup(_decode(data, EncodingDetector.find_declared_encoding(data, is_html=True)), "html.parser")
    headings = _Headings()
    items: Items = []
    buffer: list[str] = []

    def clean(tag: Tag) -> str:
        return re.sub(r"\s+", " ", tag.get_text(" ")).strip()

    def flush() -> None:  # the inline text so far is a block: source line breaks join like wrapped lines,
        hard = "".join(buffer).split("\x01")  # a <br> (\x01 here) stays a line break
        if text := "\n".join(filter(None, (join_lines(segment.split("\n")) for segment in hard))):
            items.append((text, None, headings.path))
        buffer.clear()

    def walk(node: Tag) -> None:
        for child in node.children:
            if isinstance(child, NavigableString):
                if type(child) is NavigableString:  # not a comment, doctype or CDATA (subclasses)
                    buffer.append(str(child))
            elif not isinstance(child, Tag) or child.name in _HTML_DROP or (  # and the page's header/footer, but
                    child.name in {"header", "footer"} and not child.find_parent(["article", "main", "section"])):
                continue  # not an article's own (it holds the article's title)
            elif re.fullmatch(r"h[1-6]", child.name):
                flush()
                headings.set(int(child.name[1]), clean(child))
            elif child.name == "tr":
                flush()
                if any(cells := [clean(c) for c in child.find_all(["td", "th"], recursive=False)]):
                    items.append((" | ".join(cells), None, headings.path))
            elif child.name == "pre":
                flush()
                if code := "\n".join(ln.rstrip() for ln in child.get_text().split("\n")).strip("\n"):
                    items.append((code, None, headings.path))
            elif child.name == "br":
                buffer.append("\x01")
            elif child.name in _HTML_BLOCK:
                flush()
                walk(child)
                flush()
            else:  # inline markup
                walk(child)

    walk(soup.body or soup)
    flush()
    return items


def _read_txt(path: Path, problems: list[Problem]) -> Items:
    text = _decode(path.read_bytes()).replace("\r\n", "\n").replace("\r", "\n")
    paras = ("\n".join(ln.rstrip() for ln in p.split("\n")).strip() for p in re.split(r"\n[ \t\u3000]*\n", text))
    return [(p, None, None) for p in paras if p]


_READERS = {".pdf": _read_pdf, ".docx": _read_docx, ".md": _read_markdown, ".markdown": _read_markdown,
            ".html": _read_html, ".htm": _read_html, ".txt": _read_txt}


def build_document(path: Path, items: Items) -> Document:
    """A Document from (text, page, heading) items: texts joined by a blank line, each block with its span."""
    blocks: list[Block] = []
    for text, page, heading in (item for item in items if item[0]):
        start = blocks[-1].end + 2 if blocks else 0
        blocks.append(Block(text, str(path), page, heading, start, start + len(text)))
    return Document(Path(path), "\n\n".join(b.text for b in blocks), blocks)


def extract(path: Path) -> tuple[Document | None, list[Problem]]:
    """Extract one file. The Document is None when nothing usable came out; the Problems say why (and, for a
    PDF, which pages had no text layer). A library's error on a broken file becomes Problem "unreadable"."""
    path, source = Path(path), str(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        return None, [Problem(source, "unsupported_type", f"unsupported file type '{path.suffix}'; supported: "
                              f"{', '.join(sorted(SUPPORTED))}")]
    problems: list[Problem] = []
    try:
        if path.stat().st_size == 0:
            return None, [Problem(source, "empty", "the file is empty")]
        items = reader(path, problems)
    except _Unusable as e:
        return None, [Problem(source, *e.args)]
    except OSError as e:
        return None, [Problem(source, "unreadable", f"cannot read the file ({e.strerror or e})")]
    except Exception as e:  # noqa: BLE001 - each library has its own error types for broken files
        return None, [Problem(source, "unreadable", f"cannot parse the {path.suffix} file ({type(e).__name__}: "
                              f"{e}); damaged, or another format renamed (an old .doc)? open it and save it again")]
    document = build_document(path, items)
    if not document.blocks:
        return None, problems or [Problem(source, "empty", "no text found in the file")]
    return document, problems
