"""Frozen-model features: final hidden states mean-pooled over a text's tokens, batched by length.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch
from torch import nn

from raptr.errors import RaptrError


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
