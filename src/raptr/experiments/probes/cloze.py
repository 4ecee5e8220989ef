"""Zero-shot cloze: a masked content word among 5 frequency-matched candidates, and its scoring.
"""

from __future__ import annotations

import os
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from raptr.experiments.probes.features import _head, _hidden, _length_batches
from raptr.experiments.probes.tasks import sentences


N_CANDIDATES = 5


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
