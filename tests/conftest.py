"""Shared fixtures: one real corpus (Jane Austen's novels, from Debian) per test session."""

import os

import pytest

from raptr.training.build import prepare_data
from raptr.training.config import load_config


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """A data cache with the austen corpus and small wordpiece and BPE tokenizers built once."""
    root = os.environ.get("RAPTR_TEST_DATA") or str(tmp_path_factory.mktemp("data"))
    for tokenizer, objective in (("wordpiece", "mlm"), ("bpe", "causal")):
        cfg = load_config(None, [f"data.cache_dir={root}", "data.sources=austen", "data.vocab_size=1024",
                                 f"data.tokenizer={tokenizer}", f"objective.name={objective}", "data.seq_len=32"])
        prepare_data(cfg, progress=False)
    return root
