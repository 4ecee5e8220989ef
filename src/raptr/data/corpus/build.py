"""Building a corpus directory: whole-document train/val split, atomic files, the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import warnings
from pathlib import Path
from typing import Iterable, Sequence

from tqdm.auto import tqdm

from raptr.errors import RaptrError
from raptr.data.corpus.apt import _deb_members, _deb_version, default_cache_dir, fetch_debs
from raptr.data.corpus.clean import MIN_DOC_CHARS, _split_long
from raptr.data.corpus.local import _local_docs
from raptr.data.corpus.sources import DebianSource, GROUPS, SOURCES


MANIFEST = "manifest.json"


SPLITS = ("train", "val")


FORMAT = "raptr-corpus/1"


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
