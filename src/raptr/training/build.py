"""From a ``RunConfig`` to a ready ``Trainer``: data (built once and cached), objective, model, method."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from raptr.data.corpus import build_corpus
from raptr.data.objectives import CausalLMObjective, MLMObjective, UL2Objective
from raptr.data.tokenizer import load_tokenizer, special_ids, train_tokenizer
from raptr.data.tokens import PackedTokens, tokenize_corpus
from raptr.errors import RaptrError
from raptr.methods import Method
from raptr.methods.registry import build_method as registry_build
from raptr.models.hf import HFLanguageModel, build_hf_model
from raptr.models.reference import TransformerConfig, TransformerLM
from raptr.training.config import RunConfig
from raptr.training import distributed as D
from raptr.training.trainer import Batches, Trainer, resolve_device


@dataclass
class Data:
    tokenizer: object
    ids: dict
    train: PackedTokens
    val: PackedTokens
    corpus_dir: Path


def corpus_dir_for(cfg: RunConfig) -> Path:
    sources = cfg.data.sources
    name = "-".join(sources) if all(s.isidentifier() for s in sources) else "local-" + hashlib.sha1("|".join(sources).encode()).hexdigest()[:10]
    return Path(cfg.data.cache_dir) / "corpus" / f"{name}-val{cfg.data.val_fraction:g}"


def tokenizer_kind(cfg: RunConfig) -> str:
    if cfg.data.tokenizer != "auto":
        return cfg.data.tokenizer
    return "wordpiece" if cfg.objective.name == "mlm" else "bpe"


def prepare_data(cfg: RunConfig, progress: bool = True) -> Data:
    """Build (or reuse) the corpus, the tokenizer and the token files for this config."""
    corpus_dir = corpus_dir_for(cfg)
    if not (corpus_dir / "manifest.json").is_file():
        build_corpus(corpus_dir, sources=cfg.data.sources, val_fraction=cfg.data.val_fraction, seed=0, progress=progress)
    kind = tokenizer_kind(cfg)
    if kind in ("wordpiece", "bpe"):
        tokenizer = train_tokenizer(corpus_dir, kind, cfg.data.vocab_size)
        token_dir = corpus_dir / f"tokens-{kind}-{cfg.data.vocab_size}"
    else:
        tokenizer = load_tokenizer(kind)
        token_dir = corpus_dir / f"tokens-{hashlib.sha1(tokenizer.to_str().encode()).hexdigest()[:10]}"
    tokenize_corpus(corpus_dir, tokenizer, token_dir)
    seq = cfg.data.seq_len
    return Data(tokenizer, special_ids(tokenizer), PackedTokens.open(token_dir, "train", seq),
                PackedTokens.open(token_dir, "val", seq), corpus_dir)


def build_objective(cfg: RunConfig, ids: dict, vocab_size: int):
    name = cfg.objective.name
    if name == "mlm":
        if "mask" not in ids:
            raise RaptrError("the MLM objective needs a [MASK] token: use a wordpiece tokenizer (data.tokenizer=wordpiece)")
        specials = [v for k, v in ids.items() if k != "sentinels" and isinstance(v, int)]
        return MLMObjective(ids["mask"], vocab_size=vocab_size, special_ids=specials, mask_rate=cfg.objective.mask_rate)
    if name == "causal":
        return CausalLMObjective(pad_id=ids.get("pad"))
    missing = [k for k in ("r", "s", "x", "eos", "pad") if k not in ids]
    if missing or not ids.get("sentinels"):
        raise RaptrError("UL2 needs mode tokens [R] [S] [X], <extra_id_N> sentinels, eos and pad: use data.tokenizer=bpe (raptr's BPE has them)")
    return UL2Objective(ids["sentinels"], {"r": ids["r"], "s": ids["s"], "x": ids["x"]}, ids["eos"], ids["pad"], seq_len=cfg.data.seq_len)


def build_model(cfg: RunConfig, vocab_size: int) -> nn.Module:
    torch.manual_seed(cfg.train.seed)  # same init for every method of a comparison
    m = cfg.model
    if m.family == "hf":
        return HFLanguageModel(build_hf_model(m.hf_type, vocab_size, m.d_model, m.n_layers, m.n_heads, m.d_ff, cfg.data.seq_len))
    return TransformerLM(TransformerConfig(vocab_size=vocab_size, d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
                                           d_ff=m.d_ff, max_seq_len=cfg.data.seq_len, causal=cfg.objective.name != "mlm",
                                           layer_norm=m.layer_norm, residual=m.residual))


def build_method(cfg: RunConfig) -> Method:
    """The configured method, from the registry (``method.name`` and its ``method.<name>`` options)."""
    return registry_build(cfg.method.name, getattr(cfg.method, cfg.method.name, None))


def build_trainer(cfg: RunConfig, progress: bool = True, data: Data | None = None) -> Trainer:
    if data is None:
        # Under torchrun rank 0 builds the data cache first; the others then just read it.
        info = D.init_distributed(resolve_device(cfg.train.device))
        if not info.is_main:
            D.barrier(info)
        data = prepare_data(cfg, progress and info.is_main)
        if info.enabled and info.is_main:
            D.barrier(info)
    vocab = data.tokenizer.get_vocab_size()
    objective = build_objective(cfg, data.ids, vocab)
    model = build_model(cfg, vocab)
    head = cfg.objective.mask_rate if cfg.objective.name == "mlm" else 1.0
    flops = model.flops(cfg.data.seq_len, head)
    bsz, seed = cfg.train.batch_size, cfg.train.seed
    val = list(data.val.eval_batches(bsz, cfg.train.eval_batches))
    batches = Batches(train=lambda index: data.train.batch(index, bsz, seed), val=val)
    return Trainer(cfg, model, build_method(cfg), batches, objective, flops, progress=progress)
