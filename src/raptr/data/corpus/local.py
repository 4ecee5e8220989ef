"""The user's own text: .txt/.md files, folders of them, parquet/json/jsonl tables.
"""

from __future__ import annotations

from pathlib import Path

from raptr.errors import RaptrError
from raptr.data.corpus.clean import _split_long


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
