"""Readers for the formats Debian packages ship prose in (R data, SWORD modules, rst, HTML, POD, GCIDE, WordNet).
"""

from __future__ import annotations

import bz2
import gzip
import html
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from raptr.data.corpus.clean import _group, _html_prose, _is_prose, _markup_prose, _merge_small, _squash


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
