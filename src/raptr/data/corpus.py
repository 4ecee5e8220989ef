"""Build a plain-text corpus directory from Debian packages or local files.

A corpus directory holds ``train.jsonl`` and ``val.jsonl`` (one document per line:
``{"text": ..., "source": ..., "doc": ...}``) and ``manifest.json`` (sources, licences, counts,
file hashes). Whole documents are held out for validation, so no validation text is ever
seen in training, by the tokenizer or by the model.

The default English corpus (~90 MB) is assembled from Debian packages that ship prose
(novels, a Bible translation, software manuals, a dictionary). They are fetched with
``apt-get download`` into a cache (no system install) and read straight from the ``.deb``
with ``dpkg-deb --fsys-tarfile``; every format is parsed here in pure Python
(``perl_doc`` needs ``perl``, which every Debian system has).
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import html
import json
import lzma
import os
import random
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from fnmatch import fnmatch
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence
from urllib.parse import unquote

from tqdm.auto import tqdm

from raptr.errors import RaptrError

MANIFEST = "manifest.json"
SPLITS = ("train", "val")
FORMAT = "raptr-corpus/1"

# Document sizes: grouped sources (dictionaries, glossaries) are cut into ~16 KB documents;
# anything over 64 KB (a long book chapter, a huge manual page) is split at paragraph
# boundaries into ~32 KB pieces so held-out documents are many and varied.
TARGET_DOC_CHARS = 16_000
MAX_DOC_CHARS = 64_000
# Debian pieces shorter than this (a book's title page, a 2-verse psalm) join the next document.
MIN_DOC_CHARS = 300


# --------------------------------------------------------------------------------------------
# Text cleaning helpers
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Extractors: (path, bytes) members of one .deb -> (doc id, text) documents
# --------------------------------------------------------------------------------------------

Members = Iterable[tuple[str, bytes]]


def _r_character_vectors(rdb: bytes) -> Iterator[list[str]]:
    """Character vectors stored in an R lazy-load database (``Rdata.rdb``), without R.

    The file is a sequence of blobs, each a 4-byte big-endian length followed by a zlib stream
    of an XDR-serialised R object. Only plain character vectors (STRSXP) are decoded.
    """
    pos = 0
    while pos + 4 < len(rdb):
        dec = zlib.decompressobj()
        data = dec.decompress(rdb[pos + 4 :])
        pos = len(rdb) - len(dec.unused_data)
        if not data.startswith(b"X\n"):
            continue  # not XDR (ascii/native serialisation): not used by janeaustenr
        version = struct.unpack_from(">i", data, 2)[0]
        off = 14  # "X\n", format version, writer R version, minimal reader R version
        if version == 3:  # v3 adds the native encoding name
            off += 4 + struct.unpack_from(">i", data, off)[0]
        flags, n = struct.unpack_from(">ii", data, off)
        off += 8
        if flags & 0xFF != 16:  # 16 = STRSXP
            continue
        strings = []
        for _ in range(n):
            cflags, length = struct.unpack_from(">ii", data, off)
            off += 8
            if length < 0:  # NA_STRING
                strings.append("")
                continue
            enc = "latin-1" if (cflags >> 12) & 4 else "utf-8"  # LATIN1_MASK in the gp bits
            strings.append(data[off : off + length].decode(enc, "replace"))
            off += length
        yield strings


_CHAPTER = re.compile(r"^(chapter|letter)\s+([ivxlc]+|\d+)\b\.?\s*$", re.I)
_VOLUME = re.compile(r"^(volume|book)\s+([ivxlc]+|\d+)\b\.?\s*$", re.I)
_ITALIC = re.compile(r"(?<!\w)_([^_\n]+?)_(?!\w)")


def _extract_austen(members: Members):
    for path, raw in members:
        for lines in _r_character_vectors(raw):
            # Project Gutenberg layout: hard-wrapped lines, blank line between paragraphs.
            paragraphs, cur = [], []
            for line in lines + [""]:
                if line.strip():
                    cur.append(line.strip())
                elif cur:
                    paragraphs.append(_ITALIC.sub(r"\1", " ".join(cur)))
                    cur = []
            if not paragraphs:
                continue
            slug = re.sub(r"\W+", "_", paragraphs[0].lower()).strip("_")
            chapters: list[list[str]] = [[]]
            for p in paragraphs:
                if _VOLUME.match(p):
                    continue
                if _CHAPTER.match(p) and chapters[-1]:
                    chapters.append([])
                chapters[-1].append(p)
            docs = ((f"{slug}/{k:03d}", "\n\n".join(ch)) for k, ch in enumerate(chapters))
            yield from _merge_small(docs)


def _sword_entries(members: Members) -> list[str]:
    """Entries (verses / comments) of a compressed SWORD module (zText, zText4, zCom, zCom4).

    Per testament there are three files: ``*.?zs`` block index (offset, size, raw size as
    uint32), ``*.?zv`` entry index (block, offset, size: uint32, uint32, uint16 for zText /
    uint32 for the *4 drivers and zCom4) and ``*.?zz`` the compressed blocks.
    """
    files = dict(members)
    conf = next((v.decode("utf-8", "replace") for k, v in files.items() if k.endswith(".conf")), "")
    drv = (re.search(r"^ModDrv=(\w+)", conf, re.M) or ["", "zText"])[1].lower()
    comp = (re.search(r"^CompressType=(\w+)", conf, re.M) or ["", "ZIP"])[1].upper()
    decompress = {"ZIP": zlib.decompress, "BZIP2": bz2.decompress, "XZ": lzma.decompress}.get(comp)
    if decompress is None:
        raise ValueError(f"unsupported SWORD compression {comp}")
    entry_fmt = "<IIH" if drv in ("ztext", "zcom") else "<III"
    step = struct.calcsize(entry_fmt)
    entries: list[str] = []
    for testament in ("ot", "nt"):
        idx = {k[-2:]: v for k, v in files.items() if re.search(rf"/{testament}\.[bc]z[svz]$", k)}
        if len(idx) < 3 or not idx["zs"]:
            continue
        blocks = [struct.unpack_from("<III", idx["zs"], i) for i in range(0, len(idx["zs"]) - 11, 12)]
        cache: dict[int, bytes] = {}
        last = None
        for i in range(0, len(idx["zv"]) - step + 1, step):
            b, o, n = struct.unpack_from(entry_fmt, idx["zv"], i)
            if n == 0 or (b, o, n) == last or b >= len(blocks):  # empty or linked to the previous
                continue
            last = (b, o, n)
            if b not in cache:
                cache = {b: decompress(idx["zz"][blocks[b][0] : blocks[b][0] + blocks[b][1]])}
            entries.append(cache[b][o : o + n].decode("utf-8", "replace"))
    return entries


def _osis_text(s: str) -> str:
    s = re.sub(r"<note\b[^>]*/>|<note\b.*?</note>", "", s, flags=re.S)  # footnotes
    s = re.sub(r"<title\b[^>]*>(.*?)</title>", r"\n\1\n", s, flags=re.S)
    s = re.sub(r"<(?:div|p|lb|l|lg|item|list|chapter)\b[^>]*>|</(?:p|l|lg|item|list)>", "\n", s)
    s = html.unescape(re.sub(r"<[^>]+>", "", s))
    return "\n".join(ln for ln in (_squash(x) for x in s.split("\n")) if ln)


def _extract_sword(members: Members):
    """One document per chapter (Bible) or per psalm (commentary), tags stripped."""
    docs, cur_id, cur = [], "front", []
    for entry in _sword_entries(members):
        m = re.search(r'<chapter\b[^>]*\bsID="([^"]+)"', entry)
        if m:
            if cur:
                docs.append((cur_id, _osis_text(" ".join(cur))))
            cur, cur_id = [], m.group(1)
        cur.append(entry)
    if cur:
        docs.append((cur_id, _osis_text(" ".join(cur))))
    yield from _merge_small(d for d in docs if d[1])


def _doc_id(path: str, anchor: str, suffixes: Sequence[str]) -> str:
    i = path.find(anchor)
    rel = path[i + len(anchor) :] if i >= 0 else path.rsplit("/", 1)[-1]
    for s in suffixes:
        rel = rel.removesuffix(s)
    return rel


def _extract_rst(anchor: str, suffix: str, gz: bool = False):
    def extract(members: Members):
        for path, raw in members:
            text = (gzip.decompress(raw) if gz else raw).decode("utf-8", "replace")
            yield _doc_id(path, anchor, [suffix]), _markup_prose(text)

    return extract


def _extract_html(anchor: str):
    def extract(members: Members):
        for path, raw in members:
            yield _doc_id(path, anchor, [".html"]), _html_prose(raw)

    return extract


# One perl process renders every POD file (pod2text per file would start perl 200 times).
_POD_SCRIPT = r"""
use strict; use warnings; use Pod::Text;
binmode STDOUT;
for my $f (@ARGV) {
    my $out = "";
    my $p = Pod::Text->new(width => 1000000, indent => 4, sentence => 0, utf8 => 1);
    $p->output_string(\$out);
    $p->parse_file($f);
    print "\x00\x01$f\n", $out;
}
"""


def _extract_pod(members: Members):
    perl = shutil.which("perl")
    if perl is None:
        raise RuntimeError("perl (for pod2text) is not installed")
    with tempfile.TemporaryDirectory(prefix="raptr-pod-") as tmp:
        names = []
        for path, raw in members:
            name = path.rsplit("/", 1)[-1]
            (Path(tmp) / name).write_bytes(raw)
            names.append(name)
        # Pod::Text is slow (~12 s for perl-doc): one perl per core, interleaved file lists.
        n = max(1, min(os.cpu_count() or 1, 8))
        names = sorted(names)
        # Output goes to files, not pipes: a full pipe would stall the processes not being read.
        outs = [Path(tmp) / f".out{i}" for i in range(n)]
        procs = []
        for i, out in enumerate(outs):
            with open(out, "wb") as f:
                procs.append(subprocess.Popen([perl, "-e", _POD_SCRIPT, *names[i::n]], cwd=tmp,
                                              stdout=f, stderr=subprocess.DEVNULL))
        if any(p.wait() for p in procs):
            raise RuntimeError("perl Pod::Text failed on the perl-doc pages")
        outputs = [out.read_bytes() for out in outs]
    chunks = sorted(c for out in outputs for c in out.split(b"\x00\x01")[1:])
    for chunk in chunks:
        name, _, body = chunk.partition(b"\n")
        # Pod::Text indents everything by 4 and code by 8; dedent so prose is not "literal".
        text = "\n".join(ln[4:] if ln.startswith("    ") else ln
                         for ln in body.decode("utf-8", "replace").split("\n"))
        yield name.decode().removesuffix(".pod"), _markup_prose(text)


def _extract_jargon(members: Members):
    for _, raw in members:
        text = gzip.decompress(raw).decode("utf-8", "replace")
        # {word} marks a cross-reference to another entry: keep the word.
        pars = (_squash(re.sub(r"\{([^{}]*)\}", r"\1", p)) for p in re.split(r"\n[ \t]*\n", text))
        yield from _group((p for p in pars if _is_prose(p, min_words=4, min_letters=0.8)), "jargon/")


_GCIDE_TAG_LINE = re.compile(r"^\s*\[[^\]]*\]\s*$", re.M)  # "[1913 Webster]", "[WordNet 1.5]"
_GCIDE_PRON = re.compile(r"\\[^\\\n]*\\")  # \A*ban"don\
_GCIDE_PAREN_CODES = re.compile(r"\([^()\n]*\[[^\]\n]{1,3}\][^()\n]*\)")  # ([.a]*b[a^]n"d[u^]n)
_GCIDE_CODE = re.compile(r"\[(?:[.=\-\"~`'^]?([a-zA-Z])[.=\-\"~`'^]?)\]")  # [a^] -> a


def _extract_gcide(members: Members):
    for _, raw in members:
        # dictzip is gzip-compatible; a few entries are not valid UTF-8.
        text = gzip.decompress(raw).decode("utf-8", "replace")
        text = _GCIDE_TAG_LINE.sub("", text)
        entries = []
        for par in re.split(r"\n[ \t]*\n", text):
            par = _GCIDE_PAREN_CODES.sub("", _GCIDE_PRON.sub("", par))
            par = _squash(_GCIDE_CODE.sub(r"\1", par).replace("{", "").replace("}", ""))
            if len(par.split()) >= 3 and not par.startswith("00-"):
                entries.append(par)
        yield from _group(entries, "gcide/")


def _extract_wordnet(members: Members):
    for path, raw in sorted(members):
        pos = path.rsplit(".", 1)[-1]
        glosses = []
        for line in raw.decode("utf-8", "replace").split("\n"):
            if not line or line.startswith("  ") or " | " not in line:
                continue  # licence header lines start with two spaces
            fields = line.split(" ", 5)
            glosses.append(f"{fields[4].replace('_', ' ')}: {line.split(' | ', 1)[1].strip()}")
        yield from _group(glosses, f"{pos}/", sep="\n")


# --------------------------------------------------------------------------------------------
# Built-in sources
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DebianSource:
    """One built-in corpus part: which Debian package, which files in it, how to read them."""

    name: str
    group: str  # lit | tech | ref
    packages: tuple[str, ...]  # preferred package names, in order
    pattern: str | None  # regex for other versions (e.g. linux-doc-6.12); highest wins
    include: tuple[str, ...]  # fnmatch patterns of the files to read from the .deb
    extract: Callable[[Members], Iterable[tuple[str, str]]]
    licence: str
    description: str
    exclude: tuple[str, ...] = ()


SOURCES: dict[str, DebianSource] = {
    s.name: s
    for s in [
        DebianSource(
            "austen", "lit", ("r-cran-janeaustenr",), None,
            ("*/janeaustenr/data/Rdata.rdb",), _extract_austen,
            "public domain texts (package: MIT)",
            "Jane Austen's six novels (1811-1817), one document per chapter",
        ),
        DebianSource(
            "bible", "lit", ("sword-text-web",), None,
            ("*/mods.d/*.conf", "*/modules/texts/*"), _extract_sword,
            "public domain",
            "World English Bible with Deuterocanon, one document per chapter",
        ),
        DebianSource(
            "tdavid", "lit", ("sword-comm-tdavid",), None,
            ("*/mods.d/*.conf", "*/modules/comments/*"), _extract_sword,
            "public domain",
            "C. H. Spurgeon, The Treasury of David (1885), Psalms commentary",
        ),
        DebianSource(
            "linux_doc", "tech", ("linux-doc-6.1",), r"linux-doc-(\d+)\.(\d+)",
            ("*/Documentation/*.rst.gz",), _extract_rst("/Documentation/", ".rst.gz", gz=True),
            "GPL-2.0",
            "Linux kernel documentation (reStructuredText prose paragraphs)",
            exclude=("*/Documentation/translations/*",),
        ),
        DebianSource(
            "python_doc", "tech", ("python3.11-doc",), r"python3\.(\d+)-doc",
            ("*/html/_sources/*.rst.txt",), _extract_rst("/_sources/", ".rst.txt"),
            "PSF-2.0",
            "Python documentation (reStructuredText sources, prose paragraphs)",
        ),
        DebianSource(
            "perl_doc", "tech", ("perl-doc",), None,
            ("*/usr/share/perl/*/pod/*.pod",), _extract_pod,
            "GPL-1.0-or-later OR Artistic-1.0",
            "Perl manual pages (perlfaq, perlop, tutorials ...) via Pod::Text",
        ),
        DebianSource(
            "postgres_doc", "tech", ("postgresql-doc-15",), r"postgresql-doc-(\d+)",
            ("*/html/*.html",), _extract_html("/html/"),
            "PostgreSQL",
            "PostgreSQL manual (HTML, code listings removed)",
        ),
        DebianSource(
            "git_doc", "tech", ("git-doc",), None,
            ("*/usr/share/doc/git-doc/*.txt", "*/usr/share/doc/git-doc/technical/*.txt",
             "*/usr/share/doc/git-doc/howto/*.txt"),
            _extract_rst("/git-doc/", ".txt"),
            "GPL-2.0",
            "Git manual pages, user manual and guides (AsciiDoc sources)",
        ),
        DebianSource(
            "debian_handbook", "tech", ("debian-handbook",), None,
            ("*/html/en-US/*.html",), _extract_html("/en-US/"),
            "GPL-2.0-or-later OR CC-BY-SA-3.0",
            "The Debian Administrator's Handbook (English HTML)",
        ),
        DebianSource(
            "jargon", "tech", ("jargon-text",), None,
            ("*/jargon.txt.gz",), _extract_jargon,
            "public domain",
            "The Jargon File 4.4.7 (hacker slang glossary with essays)",
        ),
        DebianSource(
            "gcide", "ref", ("dict-gcide",), None,
            ("*/gcide.dict.dz",), _extract_gcide,
            "GPL-2.0-or-later",
            "GNU Collaborative International Dictionary of English (Webster 1913 + WordNet)",
        ),
        DebianSource(
            "wordnet", "ref", ("wordnet-base",), None,
            ("*/wordnet/data.noun", "*/wordnet/data.verb", "*/wordnet/data.adj",
             "*/wordnet/data.adv"),
            _extract_wordnet,
            "WordNet-3.0 (permissive, attribution)",
            "WordNet 3.0 glosses and example sentences, 'word: gloss' per line",
        ),
    ]
}

GROUPS: dict[str, tuple[str, ...]] = {
    g: tuple(n for n, s in SOURCES.items() if s.group == g) for g in ("lit", "tech", "ref")
}
GROUPS["default"] = GROUPS["lit"] + GROUPS["tech"] + GROUPS["ref"]


# --------------------------------------------------------------------------------------------
# Fetching .deb files
# --------------------------------------------------------------------------------------------

_NO_APT = (
    "building the built-in corpus needs Debian's `apt-get` and `dpkg-deb`, which this machine "
    "lacks: use your own text instead with --source PATH (a .txt file, a folder of .txt/.md "
    "files, or .parquet/.json/.jsonl)"
)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "raptr" / "debian"


def _deb_version(deb: Path) -> str:
    parts = deb.name.split("_")
    return unquote(parts[1]) if len(parts) >= 3 else "?"


def _version_key(m: re.Match) -> tuple[int, ...]:
    return tuple(int(g) for g in m.groups())


def _cached_deb(debdir: Path, spec: DebianSource) -> Path | None:
    debs = sorted(debdir.glob("*.deb"))
    for name in spec.packages:
        hits = [d for d in debs if d.name.split("_")[0] == name]
        if hits:
            return hits[-1]
    if spec.pattern:
        hits = [(m, d) for d in debs if (m := re.fullmatch(spec.pattern, d.name.split("_")[0]))]
        if hits:
            return max(hits, key=lambda md: _version_key(md[0]))[1]
    return None


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def _apt_update() -> bool:
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        warnings.warn("apt package lists are missing or stale and `apt-get update` needs root: "
                      "run `sudo apt-get update` and retry", stacklevel=3)
        return False
    r = _run(["apt-get", "update"])
    if r.returncode != 0:
        warnings.warn(f"`apt-get update` failed: {r.stderr.strip()[-300:]}", stacklevel=3)
    return r.returncode == 0


def _resolve_package(spec: DebianSource, known: set[str]) -> str | None:
    for name in spec.packages:
        if name in known:
            return name
    if spec.pattern:
        hits = [m for n in known if (m := re.fullmatch(spec.pattern, n))]
        if hits:
            return max(hits, key=_version_key).group(0)
    return None


def _apt_download(names: list[str], dest: Path) -> None:
    """Download .deb files into dest; one call for all, then one by one if that fails."""
    if not names or _run(["apt-get", "download", *names], cwd=dest).returncode == 0:
        return
    for name in names:
        _run(["apt-get", "download", name], cwd=dest)


def fetch_debs(specs: Sequence[DebianSource], cache_dir: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Return ({source name: cached .deb}, {source name: why it is missing})."""
    debdir = Path(cache_dir) / "debs"
    debdir.mkdir(parents=True, exist_ok=True)
    found = {s.name: d for s in specs if (d := _cached_deb(debdir, s))}
    need = [s for s in specs if s.name not in found]
    if not need:
        return found, {}
    if not shutil.which("apt-get") or not shutil.which("apt-cache"):
        raise RaptrError(_NO_APT)

    def attempt(specs_left):
        known = set(_run(["apt-cache", "pkgnames"]).stdout.split())
        names = {s.name: _resolve_package(s, known) for s in specs_left}
        with tempfile.TemporaryDirectory(dir=debdir, prefix=".download-") as tmp:
            _apt_download(sorted({n for n in names.values() if n}), Path(tmp))
            for f in Path(tmp).glob("*.deb"):
                os.replace(f, debdir / f.name)  # same filesystem: atomic, no partial .deb in cache
        return [s for s in specs_left if not _cached_deb(debdir, s)], names

    missing, names = attempt(need)
    # Missing or stale package lists (fresh container, or a version gone from the mirror).
    if missing and _apt_update():
        missing, names = attempt(missing)
    found.update({s.name: d for s in need if (d := _cached_deb(debdir, s))})
    why = {}
    for s in missing:
        tried = ", ".join(s.packages) + (f" or /{s.pattern}/" if s.pattern else "")
        why[s.name] = (f"`apt-get download` found no package ({tried})" if not names.get(s.name)
                       else f"`apt-get download {names[s.name]}` failed")
    return found, why


def _deb_members(deb: Path, include: Sequence[str], exclude: Sequence[str] = ()) -> Iterator[tuple[str, bytes]]:
    """Stream the files of a .deb that match include (and not exclude), without unpacking it."""
    if not shutil.which("dpkg-deb"):
        raise RaptrError(_NO_APT)
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    complete = False
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for m in tar:
                if (m.isfile() and any(fnmatch(m.name, p) for p in include)
                        and not any(fnmatch(m.name, p) for p in exclude)):
                    yield m.name.removeprefix("."), tar.extractfile(m).read()
        complete = True
    finally:
        if not complete:  # the reader stopped early (an error downstream): just stop dpkg-deb
            proc.kill()
        proc.stdout.close()
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
        if proc.wait() != 0 and complete:
            raise RuntimeError(f"dpkg-deb failed on {deb.name}: {err.strip()[-300:]}")


# --------------------------------------------------------------------------------------------
# Local sources
# --------------------------------------------------------------------------------------------

_LOCAL_TEXT = (".txt", ".md")
_LOCAL_TABLE = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}


def _read_text_file(path: Path) -> str:
    """A local text file's contents; a binary file (NUL bytes, or >2% bytes that are not UTF-8) is refused."""
    raw = path.read_bytes()
    if b"\x00" in raw[:1 << 20]:
        raise RaptrError(f"'{path}' is not text (it has NUL bytes: a binary file?): pass text files only")
    text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")  # as read_text did
    bad = text.count("\ufffd")
    if text and bad / len(text) > 0.02:
        raise RaptrError(f"'{path}' is not UTF-8 text ({bad / len(text):.0%} undecodable bytes): convert it to UTF-8 "
                         "or leave it out of the sources")
    return text


def _text_docs(stem: str, text: str) -> list[tuple[str, str]]:
    text = text.replace("\r\n", "\n").strip()
    return _split_long(stem, text) if text else []


def _local_docs(path: Path, text_field: str) -> list[tuple[str, str]]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _LOCAL_TEXT)
        tables = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _LOCAL_TABLE)
        docs = []
        for f in files:
            rel = f.relative_to(path).with_suffix("").as_posix()
            docs += _text_docs(rel, _read_text_file(f))
        for f in tables:
            rel = f.relative_to(path).with_suffix("").as_posix()
            docs += [(f"{rel}/{d}", t) for d, t in _table_docs(f, text_field)]
        if not docs:
            raise RaptrError(f"no text in folder '{path}': put .txt/.md (or .parquet/.jsonl) files "
                             "with some text in it, or pass another --source")
        return docs
    suffix = path.suffix.lower()
    if suffix in _LOCAL_TABLE:
        docs = _table_docs(path, text_field)
    elif suffix in _LOCAL_TEXT or suffix == "":
        docs = _text_docs(path.stem, _read_text_file(path))
    else:
        raise RaptrError(f"cannot read '{path}' as text (suffix {suffix}): use a .txt/.md file, a "
                         "folder of them, or a .parquet/.json/.jsonl file with a 'text' column")
    if not docs:
        raise RaptrError(f"no text in '{path}': it is empty; pass a file with some text in it")
    return docs


def _table_docs(path: Path, text_field: str) -> list[tuple[str, str]]:
    """Rows of a parquet/json/jsonl file via HF datasets (local files only, no hub access)."""
    import datasets

    try:
        ds = datasets.load_dataset(_LOCAL_TABLE[path.suffix.lower()], data_files=str(path), split="train")
    except Exception as e:  # malformed file: datasets raises many different types
        raise RaptrError(f"cannot load '{path}' with HF datasets ({type(e).__name__}: {e}): "
                         "check that it is valid parquet/JSON lines") from e
    if text_field not in ds.column_names:
        raise RaptrError(f"'{path}' has no '{text_field}' column (columns: {', '.join(ds.column_names)}): "
                         "rename the text column or pass text_field=NAME")
    docs = []
    for i, text in enumerate(ds[text_field]):
        if isinstance(text, str):
            docs += _text_docs(f"row{i}", text)
    return docs


# --------------------------------------------------------------------------------------------
# Building a corpus
# --------------------------------------------------------------------------------------------


def _expand(sources: Sequence[str | os.PathLike]) -> list[tuple[str, DebianSource | Path]]:
    """Source names/groups/paths -> [(label, DebianSource | Path)] without duplicates."""
    plan: dict[str, DebianSource | Path] = {}
    for src in sources:
        s = str(src)
        if not isinstance(src, os.PathLike) and (s in GROUPS or s in SOURCES):
            for name in GROUPS.get(s, (s,)):
                plan.setdefault(name, SOURCES[name])
            continue
        label, path = None, Path(s).expanduser()
        if not path.exists() and re.match(r"^\w+=", s):  # "label=path" names a local source
            label, _, rest = s.partition("=")
            path = Path(rest).expanduser()
        if not path.exists():
            raise RaptrError(
                f"unknown source '{s}': not a built-in name ({', '.join([*GROUPS, *SOURCES])}) "
                "and no such file or folder; fix the name or the path"
            )
        label = label or re.sub(r"\W+", "_", path.resolve().stem if path.is_file() else path.resolve().name)
        base, k = label, 2
        while label in plan:
            label, k = f"{base}_{k}", k + 1
        plan[label] = path
    if not plan:
        raise RaptrError("no sources given: pass at least one, e.g. --source default or --source PATH")
    return list(plan.items())


def _val_indices(ids: Sequence[str], source: str, seed: int, fraction: float) -> set[int]:
    """Deterministic whole-document hold-out: the docs with the smallest keyed hash."""
    n = len(ids)
    k = round(n * fraction)
    if fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)  # every source with 2+ docs gets a val doc and keeps a train doc
    order = sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}\0{source}\0{ids[i]}".encode()).digest())
    return set(order[:k])


def _stats() -> dict:
    return {"docs": 0, "bytes": 0, "words": 0}


def _write_jsonl(path: Path, rows: Iterable[dict]) -> str:
    """Write rows atomically (temp file + rename); return the sha256 of the file."""
    h = hashlib.sha256()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            for row in rows:
                line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
                h.update(line)
                f.write(line)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return h.hexdigest()


def write_json(path: Path, obj) -> None:
    """Atomic JSON write (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def build_corpus(
    out_dir: str | os.PathLike,
    sources: Sequence[str | os.PathLike] | str = ("default",),
    val_fraction: float = 0.02,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    text_field: str = "text",
) -> dict:
    """Build ``out_dir/{train,val}.jsonl`` and ``manifest.json`` from sources; return the manifest.

    sources: built-in names (see ``SOURCES``), groups (``lit``, ``tech``, ``ref``, ``default``),
    or local paths: a .txt/.md file, a folder of them, or a .parquet/.json/.jsonl file whose
    ``text_field`` column holds the text (``label=PATH`` sets the source label).
    Built-in sources that cannot be downloaded are skipped with a warning.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not 0.0 <= val_fraction < 1.0:
        raise RaptrError(f"val_fraction={val_fraction} is out of range: use a value in [0, 1), e.g. 0.02")
    plan = _expand(list(sources))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()

    skipped: dict[str, str] = {}
    debs: dict[str, Path] = {}
    specs = [s for _, s in plan if isinstance(s, DebianSource)]
    if specs:
        debs, skipped = fetch_debs(specs, cache)
        for name, why in skipped.items():
            warnings.warn(f"skipping source '{name}': {why}", stacklevel=2)

    rows: dict[str, list[dict]] = {"train": [], "val": []}
    seen: set[bytes] = set()  # exact duplicates across sources would leak val text into train
    info: dict[str, dict] = {}
    bar = tqdm(plan, desc="corpus", unit="source", disable=not progress)
    for label, src in bar:
        bar.set_postfix_str(label)
        if isinstance(src, DebianSource):
            if label not in debs:
                continue
            try:
                members = _deb_members(debs[label], src.include, src.exclude)
                # Pieces under MIN_DOC_CHARS here are near-empty pages (an index, a stub).
                docs = [d for doc_id, text in src.extract(members) if len(text) >= MIN_DOC_CHARS
                        for d in _split_long(doc_id, text)]
            except RaptrError:
                raise
            except Exception as e:  # a changed package layout must not sink the whole corpus
                skipped[label] = f"could not read {debs[label].name}: {type(e).__name__}: {e}"
                warnings.warn(f"skipping source '{label}': {skipped[label]}", stacklevel=2)
                continue
            meta = {"kind": "debian", "package": debs[label].name.split("_")[0],
                    "version": _deb_version(debs[label]), "licence": src.licence,
                    "description": src.description, "group": src.group}
        else:
            docs = _local_docs(src, text_field)
            meta = {"kind": "local", "path": str(src.resolve()), "licence": "user-supplied"}

        unique: list[tuple[str, str]] = []
        used_ids: set[str] = set()
        for doc_id, text in docs:
            text = text.strip()
            key = hashlib.sha256(text.encode()).digest()
            if not text or key in seen:
                continue
            seen.add(key)
            while doc_id in used_ids:
                doc_id += "+"
            used_ids.add(doc_id)
            unique.append((doc_id, text))
        if not unique:
            skipped[label] = "no text extracted"
            warnings.warn(f"skipping source '{label}': no text extracted", stacklevel=2)
            continue
        val = _val_indices([d for d, _ in unique], label, seed, val_fraction)
        meta.update(train=_stats(), val=_stats())
        for i, (doc_id, text) in enumerate(unique):
            split = "val" if i in val else "train"
            rows[split].append({"text": text, "source": label, "doc": doc_id})
            st = meta[split]
            st["docs"] += 1
            st["bytes"] += len(text.encode("utf-8"))
            st["words"] += len(text.split())
        info[label] = meta

    if not info:
        detail = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        raise RaptrError(f"no text could be collected ({detail}): check the network to the Debian "
                         "mirror, or use your own text with --source PATH")

    # Interleave sources (seeded) so any prefix of val, e.g. a capped eval, covers every source.
    rng = random.Random(seed)
    for split in SPLITS:
        rng.shuffle(rows[split])
    # Remove the old manifest first: a crash mid-build must not leave a manifest over new files.
    (out / MANIFEST).unlink(missing_ok=True)
    splits = {}
    for split in SPLITS:
        sha = _write_jsonl(out / f"{split}.jsonl", rows[split])
        splits[split] = {
            "docs": len(rows[split]),
            "bytes": sum(m[split]["bytes"] for m in info.values()),
            "words": sum(m[split]["words"] for m in info.values()),
            "sha256": sha,
        }
    manifest = {
        "format": FORMAT,
        "request": {"sources": [str(s) for s in sources], "val_fraction": val_fraction, "seed": seed},
        "sources": info,
        "skipped": skipped,
        "splits": splits,
    }
    write_json(out / MANIFEST, manifest)
    return manifest


# --------------------------------------------------------------------------------------------
# Reading a corpus
# --------------------------------------------------------------------------------------------


def load_manifest(corpus_dir: str | os.PathLike) -> dict:
    """The manifest of a built corpus, or a RaptrError saying how to build one."""
    path = Path(corpus_dir) / MANIFEST
    if not path.is_file():
        raise RaptrError(f"no corpus at '{corpus_dir}': run `raptr data --out {corpus_dir}` first, "
                         "or pass --source PATH")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RaptrError(f"corrupt corpus manifest '{path}' ({e}): rebuild it with "
                         f"`raptr data --out {corpus_dir}`") from e
    for split in SPLITS:
        if not (Path(corpus_dir) / f"{split}.jsonl").is_file():
            raise RaptrError(f"corpus '{corpus_dir}' has no {split}.jsonl: rebuild it with "
                             f"`raptr data --out {corpus_dir}`")
    return manifest


def manifest_hash(corpus_dir: str | os.PathLike) -> str:
    load_manifest(corpus_dir)
    return hashlib.sha256((Path(corpus_dir) / MANIFEST).read_bytes()).hexdigest()


def iter_documents(corpus_dir: str | os.PathLike, split: str) -> Iterator[dict]:
    """Documents ({"text", "source", "doc"}) of one split, in file order."""
    if split not in SPLITS:
        raise RaptrError(f"unknown split '{split}': use one of {', '.join(SPLITS)}")
    load_manifest(corpus_dir)
    with open(Path(corpus_dir) / f"{split}.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def iter_texts(corpus_dir: str | os.PathLike, split: str) -> Iterator[str]:
    for doc in iter_documents(corpus_dir, split):
        yield doc["text"]
