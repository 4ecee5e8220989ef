"""Fetching .deb files with ``apt-get download`` into a cache, and streaming their members.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import warnings
from fnmatch import fnmatch
from pathlib import Path
from typing import Iterator, Sequence
from urllib.parse import unquote

from raptr.errors import RaptrError
from raptr.data.corpus.sources import DebianSource


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
