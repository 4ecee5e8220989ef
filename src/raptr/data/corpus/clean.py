"""Text cleaning: prose filters, markup stripping, and cutting documents to a useful size.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Iterable, Iterator


# Document sizes: grouped sources (dictionaries, glossaries) are cut into ~16 KB documents;
# anything over 64 KB (a long book chapter, a huge manual page) is split at paragraph
# boundaries into ~32 KB pieces so held-out documents are many and varied.
TARGET_DOC_CHARS = 16_000


MAX_DOC_CHARS = 64_000


# Debian pieces shorter than this (a book's title page, a 2-verse psalm) join the next document.
MIN_DOC_CHARS = 300


_NOT_LETTERS = bytes(b for b in range(128) if not (chr(b).isalpha() or b == 32))


def _is_prose(par: str, min_words: int = 6, min_letters: float = 0.85) -> bool:
    """Keep paragraphs that read like sentences: drops code, tables, headings, option lists."""
    if len(par.split()) < min_words:
        return False
    # ASCII letters only: isalpha() would also accept CJK translations shipped in the same package.
    letters = par.encode("ascii", "ignore").translate(None, _NOT_LETTERS)  # fast C-level count
    return len(letters) >= min_letters * len(par)


def _squash(s: str) -> str:
    return " ".join(s.split())


_UNDERLINE = re.compile(r"^\s*([=\-~^\"'`#*+.:_<>])\1{2,}\s*$")  # rst/asciidoc rules and titles


_RST_ROLE = re.compile(r":[\w:.+-]+:`([^`<]*?)\s*(?:<[^`>]*>)?`")  # :role:`text <target>` -> text


_RST_LINK = re.compile(r"`([^`<]+?)\s*(?:<[^`>]*>)?`__?")  # `text <url>`_ -> text


_RST_LITERAL = re.compile(r"``(.+?)``")


_BACKTICK = re.compile(r"`([^`]+)`")


_STRONG = re.compile(r"(?<![\w*])(\*\*|\*)(\S(?:[^*]*?\S)?)\1(?![\w*])")


_SUBST = re.compile(r"\|([\w -]+)\|")  # rst substitutions |name|


_LINKGIT = re.compile(r"linkgit:([\w.-]+)\[\d\]")


_ASCIIDOC_XREF = re.compile(r"<<[^,>]*,?([^>]*)>>")


def _inline_markup(p: str) -> str:
    p = _LINKGIT.sub(r"\1", p)
    p = _ASCIIDOC_XREF.sub(r"\1", p)
    p = _RST_ROLE.sub(r"\1", p)
    p = _RST_LITERAL.sub(r"\1", p)
    p = _RST_LINK.sub(r"\1", p)
    p = _BACKTICK.sub(r"\1", p)
    p = _STRONG.sub(r"\2", p)
    p = _SUBST.sub(r"\1", p)
    return p


def _markup_prose(text: str) -> str:
    """Prose paragraphs of a reStructuredText / AsciiDoc / plain-text file, one per line-pair.

    Paragraphs are unwrapped; literal blocks (indented text after a ``::`` paragraph),
    directives, tables, headings and code are dropped by the prose filter.
    """
    out = []
    literal_indent = None  # inside an rst literal block: skip paragraphs indented beyond this
    for block in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")):
        lines = [ln for ln in block.split("\n") if ln.strip()]
        if not lines:
            continue
        indent = len(lines[0]) - len(lines[0].lstrip())
        if literal_indent is not None and indent > literal_indent:
            continue
        literal_indent = None
        lines = [ln for ln in lines if not _UNDERLINE.match(ln)]
        if not lines or lines[0].lstrip().startswith(".. "):
            continue
        par = _squash(" ".join(lines))
        if par.endswith("::"):
            literal_indent = indent
            par = par[:-1]  # rst: "Example::" renders as "Example:"
        par = _squash(_inline_markup(par))
        if _is_prose(par):
            out.append(par)
    return "\n\n".join(out)


class _HTMLText(HTMLParser):
    """Visible text of an HTML page, one paragraph per block element; skips code listings."""

    SKIP_TAGS = {"pre", "script", "style", "head", "svg"}
    SKIP_CLASSES = {"navheader", "navfooter", "toc", "navigation", "footer", "header"}
    BLOCKS = {
        "p", "div", "br", "li", "dt", "dd", "tr", "td", "th", "table", "ul", "ol", "dl",
        "blockquote", "section", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "title", "caption",
    }

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip: list[str] = []  # stack of tag names opened while skipping

    def handle_starttag(self, tag, attrs):
        if self.skip:
            if tag == self.skip[0]:
                self.skip.append(tag)
            return
        classes = set((dict(attrs).get("class") or "").split())
        if tag in self.SKIP_TAGS or (tag == "div" and classes & self.SKIP_CLASSES):
            self.skip.append(tag)
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if self.skip:
            if tag == self.skip[0]:
                self.skip.pop()
            return
        if tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def _html_prose(raw: bytes) -> str:
    parser = _HTMLText()
    parser.feed(raw.decode("utf-8", "replace"))
    parser.close()
    pars = (_squash(p) for p in "".join(parser.parts).split("\n\n"))
    return "\n\n".join(p for p in pars if _is_prose(p))


def _split_long(doc_id: str, text: str) -> list[tuple[str, str]]:
    """Split a document over MAX_DOC_CHARS at paragraph (else line, else word) boundaries."""
    if len(text) <= MAX_DOC_CHARS:
        return [(doc_id, text)]
    target = 2 * TARGET_DOC_CHARS
    sep = "\n\n" if text.count("\n\n") >= len(text) // target else "\n"
    units: list[str] = []
    for u in text.split(sep):
        while len(u) > target:  # one giant paragraph: cut at the last space before the target
            cut = u.rfind(" ", 0, target)
            cut = cut if cut > 0 else target
            units.append(u[:cut])
            u = u[cut:].lstrip()
        units.append(u)
    pieces, cur, size = [], [], 0
    for u in units:
        if cur and size + len(u) > target:
            pieces.append(sep.join(cur))
            cur, size = [], 0
        cur.append(u)
        size += len(u) + len(sep)
    if cur:
        pieces.append(sep.join(cur))
    return [(f"{doc_id}#{k}", p) for k, p in enumerate(pieces)]


def _group(units: Iterable[str], prefix: str, sep: str = "\n\n") -> Iterator[tuple[str, str]]:
    """Pack short units (dictionary entries, glosses) into ~TARGET_DOC_CHARS documents."""
    cur: list[str] = []
    size = 0
    k = 0
    for u in units:
        cur.append(u)
        size += len(u) + len(sep)
        if size >= TARGET_DOC_CHARS:
            yield f"{prefix}{k:05d}", sep.join(cur)
            cur, size, k = [], 0, k + 1
    if cur:
        yield f"{prefix}{k:05d}", sep.join(cur)


def _merge_small(docs: Iterable[tuple[str, str]], min_chars: int = MIN_DOC_CHARS):
    """Prepend documents shorter than min_chars to the next one (title pages, tiny chapters)."""
    carry: list[str] = []
    carry_id = None
    for doc_id, text in docs:
        if carry:
            text = "\n\n".join(carry + [text])
            doc_id = carry_id
        if len(text) < min_chars:
            carry, carry_id = [text], doc_id
            continue
        carry, carry_id = [], None
        yield doc_id, text
    if carry:
        yield carry_id, "\n\n".join(carry)
