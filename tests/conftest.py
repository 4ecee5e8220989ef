"""Shared fixtures: one real corpus per test session, built from the Austen chapters shipped in tests/fixtures."""

import os
from pathlib import Path

import pytest

from raptr.training.build import prepare_data
from raptr.training.config import load_config

# A local source labelled "austen": public-domain text shipped with the tests (tests/fixtures/README.md).
AUSTEN = "austen=" + str(Path(__file__).resolve().parent / "fixtures" / "austen")
# Its 48 chapters are few, so hold out 15% of them (7 chapters) for validation and the probes.
AUSTEN_DATA = [f"data.sources={AUSTEN}", "data.val_fraction=0.15"]
# The probes' Rotten Tomatoes snippets, shipped too (tests/fixtures/README.md): no PyPI download.
# Tests run the code as it is being written; evidence runs (`raptr compare`) refuse a dirty tree.
os.environ.setdefault("RAPTR_ALLOW_DIRTY", "1")
os.environ.setdefault("RAPTR_RT_CSV", str(Path(__file__).resolve().parent / "fixtures" / "rotten_tomatoes_corpus_full.csv.bz2"))


def tiny(*extra: str, layers: int = 4, heads: int = 2, batch: int = 4) -> list[str]:
    """The one tiny run the tests train (d=32, seq 32, 1024-token vocab, one thread), with a test's own
    overrides last (a later key wins)."""
    return ["model.d_model=32", f"model.n_heads={heads}", "model.d_ff=64", f"model.n_layers={layers}",
            "data.vocab_size=1024", "data.seq_len=32", f"train.batch_size={batch}", "train.eval_batches=2",
            "optim.warmup_steps=2", "train.threads=1", *extra]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """A data cache with the austen corpus and small wordpiece and BPE tokenizers built once."""
    root = os.environ.get("RAPTR_TEST_DATA") or str(tmp_path_factory.mktemp("data"))
    for tokenizer, objective in (("wordpiece", "mlm"), ("bpe", "causal")):
        cfg = load_config(None, [f"data.cache_dir={root}", *AUSTEN_DATA, "data.vocab_size=1024",
                                 f"data.tokenizer={tokenizer}", f"objective.name={objective}", "data.seq_len=32"])
        prepare_data(cfg, progress=False)
    return root
