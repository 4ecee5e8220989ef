"""The built-in corpus sources: which Debian package, which files, which reader, which licence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from raptr.data.corpus.debian import Members, _extract_austen, _extract_gcide, _extract_html, _extract_jargon, _extract_pod, _extract_rst, _extract_sword, _extract_wordnet


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
