"""Pretraining objectives: turn a batch of token windows into model inputs and aligned labels.

Every objective is a small callable built from token ids (no tokenizer object)::

    batch = objective(tokens, generator)   # tokens: LongTensor[B, T], generator: CPU torch.Generator

and returns a dict of CPU tensors:

``input_ids``  LongTensor[B, T]
``labels``     LongTensor[B, T], *already aligned* with the model output at the same position:
               the model computes ``cross_entropy(logits[labels != -100], labels[labels != -100])``
               and never shifts. -100 means "no loss here".
``prefix_len`` LongTensor[B], only for prefix-LM batches (UL2): positions ``< prefix_len[b]`` attend
               bidirectionally among themselves, later positions causally. Absent = plain causal
               (decoder) or full bidirectional (encoder).
``mode``       LongTensor[B], only for UL2: which denoiser made the row (0=R, 1=S, 2=X).

All randomness comes from ``generator``, so a batch is a pure function of (tokens, generator state);
the trainer seeds the generator per step for exact resume.

Formats
-------
MLM (BERT): ``mask_rate`` of the non-special positions are chosen; of those 80% become ``[MASK]``,
10% a random non-special token, 10% stay. Labels hold the original id at chosen positions only.

Causal LM: ``input_ids = tokens``, ``labels[:, t] = tokens[:, t + 1]``, last position -100.

UL2 (Tay et al. 2022, "Unifying Language Learning Paradigms"), decoder-only prefix-LM form. For a
source slice ``a b c d e f g h`` with noise spans ``c d`` and ``g`` an R/X row is::

    [R] a b <s0> e f <s1> h | <s0> c d <s1> g <eos> <pad> ...
    `------ prefix -------'   `------- targets ------'

``prefix_len`` = 1 + length of the corrupted input; the label at position t is the token at t + 1 for
every t from ``prefix_len - 1`` (the last prefix position predicts the first target sentinel) up to
the position before ``<eos>``; everything else (prefix, ``<eos>`` position, padding) is -100. The
slice length L is the largest that fits ``1 + (L - noise + spans) + (noise + spans) + 1 <= T`` and
its start is random inside the window. An S row is ``[S] prefix continuation`` filling all T
positions (no ``<eos>``: the window is cut mid-text, so the continuation has no real end), with the
split point uniform so that both parts are non-empty; labels cover the continuation.

Noise spans follow T5's ``random_spans_noise_mask`` arithmetic (``noise = round(L * rate)``,
``spans = round(noise / mean_span)``, both at least 1, span lengths a uniform random composition),
except that spans are placed uniformly: the non-noise text before the first and after the last span
may be empty, so a single long span is not forced to the end of the slice (which would make it a
prefix LM). Inside a window of T tokens the mean span is capped by the number of noise tokens, e.g.
at T=128 the X denoiser with mean span 64 and rate 0.15 corrupts one span of ~19 tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch

from raptr.errors import RaptrError

IGNORE = -100

MODE_R, MODE_S, MODE_X = 0, 1, 2
MODE_NAMES = ("r", "s", "x")  # index = the value in the ``mode`` output


def _round_half_up(x: float) -> int:
    # Python's round() is banker's rounding; half-up keeps the layout arithmetic obvious.
    return int(math.floor(x + 0.5))


def _check_generator(generator: torch.Generator) -> None:
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise TypeError("objectives need a CPU torch.Generator so batches are reproducible")


# --------------------------------------------------------------------------------------------------
# MLM
# --------------------------------------------------------------------------------------------------


class MLMObjective:
    """BERT masked-LM: 80% [MASK] / 10% random / 10% unchanged at ``mask_rate`` of non-special positions."""

    def __init__(
        self,
        mask_id: int,
        vocab_size: int,
        special_ids: Sequence[int],
        mask_rate: float = 0.15,
        replace_mask: float = 0.8,
        replace_random: float = 0.1,
    ) -> None:
        if not 0.0 < mask_rate < 1.0:
            raise RaptrError(f"mlm mask_rate must be in (0, 1), got {mask_rate}: set e.g. mask_rate: 0.15")
        if replace_mask < 0 or replace_random < 0 or replace_mask + replace_random > 1.0:
            raise RaptrError(
                f"mlm replace_mask ({replace_mask}) and replace_random ({replace_random}) must be >= 0 and sum "
                "to at most 1: use the BERT split 0.8 / 0.1"
            )
        if not 0 <= mask_id < vocab_size:
            raise RaptrError(
                f"mlm mask_id {mask_id} is outside the vocabulary (size {vocab_size}): check the tokenizer's mask token"
            )
        self.mask_id = int(mask_id)
        self.vocab_size = int(vocab_size)
        self.mask_rate = float(mask_rate)
        self.replace_mask = float(replace_mask)
        self.replace_random = float(replace_random)
        self.special = torch.tensor(sorted({int(i) for i in special_ids} | {self.mask_id}), dtype=torch.long)
        # Random replacements are drawn from ordinary tokens only: a random [CLS]/[PAD] would be noise
        # the model can never see at inference.
        allowed = torch.ones(self.vocab_size, dtype=torch.bool)
        allowed[self.special[self.special < self.vocab_size]] = False
        self.random_pool = allowed.nonzero().squeeze(1)
        if self.random_pool.numel() == 0:
            raise RaptrError("mlm: every vocabulary id is special: check special_ids and vocab_size")

    def __call__(self, tokens: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        _check_generator(generator)
        tokens = tokens.long()
        B, T = tokens.shape
        candidate = ~torch.isin(tokens, self.special)

        # Draw every random tensor at full size, independent of the data, so the generator stream
        # advances the same way for every batch shape [B, T].
        u_choose = torch.rand(B, T, generator=generator)
        u_fallback = torch.rand(B, T, generator=generator)
        u_action = torch.rand(B, T, generator=generator)
        rand_idx = torch.randint(self.random_pool.numel(), (B, T), generator=generator)

        chosen = candidate & (u_choose < self.mask_rate)
        # At least one label per sequence (short windows can otherwise draw none): pick a random candidate.
        empty = ~chosen.any(dim=1) & candidate.any(dim=1)
        if empty.any():
            pick = torch.where(candidate, u_fallback, -1.0).argmax(dim=1)
            chosen[empty, pick[empty]] = True

        to_mask = chosen & (u_action < self.replace_mask)
        to_random = chosen & (u_action >= self.replace_mask) & (u_action < self.replace_mask + self.replace_random)

        input_ids = tokens.clone()
        input_ids[to_mask] = self.mask_id
        input_ids[to_random] = self.random_pool[rand_idx[to_random]]
        labels = torch.where(chosen, tokens, IGNORE)
        return {"input_ids": input_ids, "labels": labels}


# --------------------------------------------------------------------------------------------------
# Causal LM
# --------------------------------------------------------------------------------------------------


class CausalLMObjective:
    """Next-token prediction inside the window; labels are pre-shifted (position t carries token t+1)."""

    def __init__(self, pad_id: int | None = None) -> None:
        self.pad_id = None if pad_id is None else int(pad_id)

    def __call__(self, tokens: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        # generator is unused (deterministic objective) but accepted so every objective has one call shape.
        tokens = tokens.long()
        labels = torch.full_like(tokens, IGNORE)
        labels[:, :-1] = tokens[:, 1:]
        if self.pad_id is not None:
            labels[labels == self.pad_id] = IGNORE
        return {"input_ids": tokens.clone(), "labels": labels}


# --------------------------------------------------------------------------------------------------
# UL2
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Denoiser:
    """One UL2 denoiser. ``mode`` is "r", "x" (span corruption) or "s" (prefix LM; rate/mean_span unused)."""

    mode: str
    weight: float
    rate: float = 0.15  # fraction of the slice that is corrupted (R/X)
    mean_span: float = 3.0  # mean noise-span length in tokens (R/X)


# UL2's seven denoisers (Tay et al. 2022, Table 1): R = {(mu=3, r=0.15), (mu=8, r=0.15)},
# X = {(3, 0.5), (8, 0.5), (64, 0.15), (64, 0.5)}, S = prefix LM. Paradigm weights R 40% / X 40% /
# S 20%: roughly equal paradigms with S kept at ~20% (our reading of UL2's guidance, not a number from
# its tables), each paradigm's weight split equally among its denoisers. At T=128 both mu=64
# denoisers are capped to a single long span (19 and 62 tokens), still the "extreme" regime.
UL2_MIXTURE: tuple[Denoiser, ...] = (
    Denoiser("r", 0.20, rate=0.15, mean_span=3),
    Denoiser("r", 0.20, rate=0.15, mean_span=8),
    Denoiser("x", 0.10, rate=0.50, mean_span=3),
    Denoiser("x", 0.10, rate=0.50, mean_span=8),
    Denoiser("x", 0.10, rate=0.15, mean_span=64),
    Denoiser("x", 0.10, rate=0.50, mean_span=64),
    Denoiser("s", 0.20),
)


@dataclass(frozen=True)
class _Layout:
    """Fixed sizes of one R/X denoiser at one window length (they only depend on rate, span and T)."""

    source_len: int  # L: tokens taken from the window
    noise: int  # corrupted tokens
    spans: int  # noise spans = sentinels used

    @property
    def prefix_len(self) -> int:
        return 1 + self.source_len - self.noise + self.spans

    @property
    def total(self) -> int:  # mode + input + targets + eos
        return self.prefix_len + self.noise + self.spans + 1


def _rx_layout(rate: float, mean_span: float, seq_len: int) -> _Layout | None:
    """Largest source slice whose corrupted form plus targets fits ``seq_len`` (None if none does)."""
    for length in range(seq_len - 2, 1, -1):
        noise = min(max(_round_half_up(length * rate), 1), length - 1)
        spans = max(1, _round_half_up(noise / mean_span))
        spans = min(spans, length - noise + 1)  # spans need non-noise text between them
        layout = _Layout(length, noise, spans)
        if layout.total <= seq_len:
            return layout
    return None


def _choose(valid: torch.Tensor, count: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Exactly ``count[b]`` random True among the True entries of ``valid[b]``, uniformly over subsets."""
    keys = torch.rand(valid.shape, generator=generator).masked_fill(~valid, 2.0)  # invalid sort last
    rank = keys.argsort(dim=1).argsort(dim=1)
    return rank < count.unsqueeze(1)


def _kth_true(mask: torch.Tensor, width: int) -> torch.Tensor:
    """[G, width]: column k holds the index of the k-th True of ``mask[b]`` (0 past the last one)."""
    G, W = mask.shape
    k = mask.long().cumsum(1) - 1
    out = torch.zeros(G, width + 1, dtype=torch.long)
    # Non-True entries are written to a spare last column that is dropped.
    out.scatter_(1, torch.where(mask, k, width), torch.arange(W).expand(G, W))
    return out[:, :width]


class UL2Objective:
    """UL2 mixture of denoisers as prefix-LM batches for a decoder-only model (format in the module doc)."""

    def __init__(
        self,
        sentinel_ids: Sequence[int],
        mode_ids: Mapping[str, int],
        eos_id: int,
        pad_id: int,
        mixture: Sequence[Denoiser | Mapping] = UL2_MIXTURE,
        seq_len: int | None = None,
    ) -> None:
        self.denoisers = tuple(self._parse(d) for d in mixture)
        if not self.denoisers:
            raise RaptrError("ul2 mixture is empty: list at least one denoiser or use the default UL2 mixture")
        used = {d.mode for d in self.denoisers}
        missing = sorted(m for m in used if m not in mode_ids)
        if missing:
            raise RaptrError(
                f"ul2 mode_ids lacks a token for mode(s) {missing}: give mode_ids for every mode in the mixture"
            )
        self.sentinel_ids = torch.tensor([int(i) for i in sentinel_ids], dtype=torch.long)
        if self.sentinel_ids.unique().numel() != self.sentinel_ids.numel():
            raise RaptrError("ul2 sentinel_ids contain duplicates: every span needs its own sentinel token")
        self.mode_ids = {k: int(v) for k, v in mode_ids.items()}
        self.eos_id = int(eos_id)
        self.pad_id = int(pad_id)
        self.weights = torch.tensor([d.weight for d in self.denoisers], dtype=torch.float64)
        self._mode_index = torch.tensor([MODE_NAMES.index(d.mode) for d in self.denoisers])
        self._mode_token = torch.tensor([self.mode_ids[d.mode] for d in self.denoisers])
        self._layouts: dict[int, list[_Layout | None]] = {}
        if seq_len is not None:
            self.layouts(seq_len)  # validate sentinels / length now instead of at the first step

    @staticmethod
    def _parse(d: Denoiser | Mapping) -> Denoiser:
        if isinstance(d, Mapping):
            names = {f.name for f in fields(Denoiser)}
            unknown = sorted(set(d) - names)
            if unknown or "mode" not in d or "weight" not in d:
                raise RaptrError(
                    f"ul2 denoiser {dict(d)} is malformed: use keys mode, weight and for r/x rate, mean_span"
                    + (f" (unknown {unknown})" if unknown else "")
                )
            d = Denoiser(**d)
        mode = str(d.mode).lower()
        if mode not in MODE_NAMES:
            raise RaptrError(f"ul2 denoiser mode {d.mode!r} is unknown: use 'r', 's' or 'x'")
        if not d.weight > 0:
            raise RaptrError(f"ul2 denoiser weight must be > 0, got {d.weight}: drop the denoiser instead")
        if mode != "s":
            if not 0.0 < d.rate < 1.0:
                raise RaptrError(f"ul2 {mode}-denoiser rate must be in (0, 1), got {d.rate}: e.g. 0.15 (R) or 0.5 (X)")
            if not d.mean_span >= 1:
                raise RaptrError(f"ul2 {mode}-denoiser mean_span must be >= 1, got {d.mean_span}: e.g. 3, 8 or 64")
        return Denoiser(mode, float(d.weight), float(d.rate), float(d.mean_span))

    def layouts(self, seq_len: int) -> list[_Layout | None]:
        """Per-denoiser sizes at window length ``seq_len`` (None for S); validates the sentinel budget."""
        if seq_len not in self._layouts:
            out: list[_Layout | None] = []
            for d in self.denoisers:
                if d.mode == "s":
                    if seq_len < 3:
                        raise RaptrError(f"ul2 S-denoiser needs seq_len >= 3, got {seq_len}: use a longer window")
                    out.append(None)
                    continue
                layout = _rx_layout(d.rate, d.mean_span, seq_len)
                if layout is None:
                    raise RaptrError(f"ul2 span corruption needs seq_len >= 6, got {seq_len}: use a longer window")
                out.append(layout)
            needed = max((lay.spans for lay in out if lay is not None), default=0)
            have = self.sentinel_ids.numel()
            if needed > have:
                raise RaptrError(
                    f"ul2 needs {needed} sentinels, tokenizer has {have}: add sentinel tokens to the tokenizer, "
                    f"shorten seq_len ({seq_len}) or raise the mean_span of the densest denoiser"
                )
            self._layouts[seq_len] = out
        return self._layouts[seq_len]

    def __call__(self, tokens: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        _check_generator(generator)
        tokens = tokens.long()
        B, T = tokens.shape
        # Per-denoiser lookup table of (source_len, noise, spans); zeros for S.
        sizes = torch.tensor([(lay.source_len, lay.noise, lay.spans) if lay else (0, 0, 0) for lay in self.layouts(T)])
        token_of = self._mode_token

        which = torch.multinomial(self.weights, B, replacement=True, generator=generator)
        mode = self._mode_index[which]
        input_ids = torch.empty((B, T), dtype=torch.long)
        labels = torch.empty((B, T), dtype=torch.long)
        prefix_len = torch.empty(B, dtype=torch.long)
        # All R/X rows are built together (their sizes differ per row, so they are tensors), then S rows.
        for is_s, build in ((False, self._rx_rows), (True, self._s_rows)):
            rows = ((mode == MODE_S) == is_s).nonzero().squeeze(1)
            if rows.numel():
                ids, lab, plen = build(tokens[rows], token_of[which[rows]], sizes[which[rows]], generator)
                input_ids[rows], labels[rows], prefix_len[rows] = ids, lab, plen

        # A pad inside a (not fully packed) source window is never a target. Skipped when pad == eos,
        # where it would also erase the eos targets.
        if self.pad_id != self.eos_id:
            labels[labels == self.pad_id] = IGNORE
        return {"input_ids": input_ids, "labels": labels, "prefix_len": prefix_len, "mode": mode}

    def _rx_rows(self, src: torch.Tensor, mode_tok: torch.Tensor, sizes: torch.Tensor, generator: torch.Generator):
        """Span-corruption rows. ``sizes[g] = (L, N, S)``: slice length, noise tokens, noise spans."""
        G, T = src.shape
        L, N, S = (x.unsqueeze(1) for x in sizes.unbind(1))  # each [G, 1]
        M = L - N  # kept (non-noise) tokens
        P = 1 + M + S  # prefix: mode token + kept text + one sentinel per span
        E = P + N + S  # position of <eos>: targets are one sentinel per span plus the noise
        col = torch.arange(T + 1).unsqueeze(0)
        idx = col[:, :T]  # reused below as kept-token index m, noise-token index j and span index k

        # Random slice of the window that fits after corruption.
        offset = (torch.rand(G, 1, generator=generator) * (T - L + 1)).long()

        # Noise tokens j = 0..N-1 are cut into S spans: a new span starts at j = 0 and at S - 1 random
        # inner boundaries (a uniform random composition, as in T5).
        new_span = _choose((idx >= 1) & (idx < N), S.squeeze(1) - 1, generator) | (idx == 0)
        span_of = new_span.long().cumsum(1) - 1  # span of noise token j
        noise_before = _kth_true(new_span, T + 1)  # [:, k] = noise tokens before span k ...
        noise_before.scatter_(1, S, N)  # ... and all N "before" the virtual span S

        # Span k is inserted before kept token m for S random slots m in 0..M (M = after the last
        # kept token), so the text before the first / after the last span may be empty.
        span_here = _choose(col <= M, S.squeeze(1), generator)  # [G, T + 1]
        spans_upto = span_here.long().cumsum(1)[:, :T]  # spans before kept token m
        kept_before = _kth_true(span_here, T)  # [:, k] = kept tokens before span k

        # Where each token sits in the slice, and its value from the window.
        kept_pos = idx + noise_before.gather(1, spans_upto)
        noise_pos = kept_before.gather(1, span_of) + idx

        def text(pos: torch.Tensor) -> torch.Tensor:
            return src.gather(1, (offset + pos).clamp(max=T - 1))  # clamp: unused entries only

        # Destinations in the output row; entries past a row's counts go to a spare column T.
        spare = T
        is_span = idx < S
        out = torch.full((G, T + 1), self.pad_id, dtype=torch.long)
        out.scatter_(1, torch.where(idx < M, 1 + idx + spans_upto, spare), text(kept_pos))
        out.scatter_(1, torch.where(idx < N, P + span_of + 1 + idx, spare), text(noise_pos))
        sentinels = self._sentinel_row(T).expand(G, T)
        out.scatter_(1, torch.where(is_span, 1 + kept_before + idx, spare), sentinels)  # replaces span k
        out.scatter_(1, torch.where(is_span, P + idx + noise_before[:, :T], spare), sentinels)  # announces it
        out.scatter_(1, E, self.eos_id)
        out = out[:, :T]
        out[:, 0] = mode_tok

        # Position t predicts token t + 1 from the last prefix position up to the one before <eos>.
        lab = torch.full((G, T), IGNORE, dtype=torch.long)
        lab[:, :-1] = out[:, 1:]
        lab.masked_fill_((idx < P - 1) | (idx >= E), IGNORE)
        return out, lab, P.squeeze(1)

    def _s_rows(self, src: torch.Tensor, mode_tok: torch.Tensor, sizes: torch.Tensor, generator: torch.Generator):
        """Prefix-LM rows: ``[S] prefix continuation`` over all T positions, split point uniform."""
        G, T = src.shape
        L = T - 1  # mode token + L text tokens fill the window exactly
        offset = torch.randint(0, T - L + 1, (G, 1), generator=generator)
        split = torch.randint(1, L, (G, 1), generator=generator)  # prefix text length; continuation >= 1
        out = torch.empty((G, T), dtype=torch.long)
        out[:, 0] = mode_tok
        out[:, 1:] = src.gather(1, offset + torch.arange(L))
        plen = 1 + split
        lab = torch.full((G, T), IGNORE, dtype=torch.long)
        lab[:, :-1] = out[:, 1:]
        lab.masked_fill_(torch.arange(T) < plen - 1, IGNORE)  # no loss inside the prefix
        return out, lab, plen.squeeze(1)

    def _sentinel_row(self, width: int) -> torch.Tensor:
        """sentinel_ids padded/cut to ``width`` (entries past the spans are never used)."""
        row = torch.full((width,), self.pad_id, dtype=torch.long)
        n = min(width, self.sentinel_ids.numel())
        row[:n] = self.sentinel_ids[:n]
        return row
