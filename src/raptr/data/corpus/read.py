"""Reading a built corpus: its manifest and its documents.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

from raptr.errors import RaptrError
from raptr.data.corpus.build import MANIFEST, SPLITS


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
