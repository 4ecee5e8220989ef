"""Tokenize a corpus once into flat token files, and serve fixed-length training windows.

``tokenize_corpus`` writes ``train.bin`` / ``val.bin`` (raw little-endian uint16, or uint32 for
vocabularies over 65,536; every document followed by the separator ``[SEP]`` or
``<|endoftext|>``), a copy of the tokenizer and ``meta.json``.

``PackedTokens`` memory-maps one of those files and cuts it into non-overlapping windows of
``seq_len`` tokens. ``batch(step, batch_size, seed)`` is a pure function of its arguments, so a
resumed run only needs the step number to continue on exactly the same data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from raptr.data.corpus import SPLITS, iter_texts, load_manifest, manifest_hash, write_json
from raptr.data.tokenizer import load_tokenizer, separator, special_ids, tokenizer_hash
from raptr.errors import RaptrError

META = "meta.json"
FORMAT = "raptr-tokens/1"
_BATCH_CHARS = 2_000_000  # text per encode_batch call: big enough to keep every core busy


def _text_batches(texts: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for t in texts:
        batch.append(t)
        size += len(t)
        if size >= _BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _up_to_date(out: Path, expect: dict) -> dict | None:
    """The existing meta.json if it was made from this tokenizer and corpus and is complete."""
    try:
        meta = json.loads((out / META).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if any(meta.get(k) != v for k, v in expect.items()):
        return None
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in SPLITS:
        f = out / f"{split}.bin"
        if not f.is_file() or f.stat().st_size != meta["splits"][split]["tokens"] * itemsize:
            return None
    return meta


def tokenize_corpus(
    corpus_dir: str | os.PathLike,
    tokenizer: Tokenizer | str | os.PathLike,
    out_dir: str | os.PathLike,
    progress: bool = True,
) -> dict:
    """Encode both splits of ``corpus_dir`` into ``out_dir``; return the token metadata.

    Reuses the files in out_dir when meta.json records the same tokenizer and corpus.
    """
    tokenizer = getattr(tokenizer, "backend_tokenizer", tokenizer)  # a transformers fast tokenizer
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = load_tokenizer(tokenizer)
    manifest = load_manifest(corpus_dir)
    out = Path(out_dir)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = _dtype_for(vocab_size)
    expect = {"format": FORMAT, "tokenizer_sha256": tokenizer_hash(tokenizer),
              "corpus_manifest_sha256": manifest_hash(corpus_dir), "dtype": dtype.name,
              "vocab_size": vocab_size}
    if (meta := _up_to_date(out, expect)) is not None:
        return meta

    # Work on a copy that treats "[SEP]" or "<|endoftext|>" *written in the text* as plain text:
    # only our own separators may produce special ids in the stream.
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.encode_special_tokens = True
    tok.no_truncation()
    tok.no_padding()
    sep_token, sep_id = separator(tok)

    out.mkdir(parents=True, exist_ok=True)
    (out / META).unlink(missing_ok=True)  # a crash below must not leave a valid-looking meta
    splits = {}
    for split in SPLITS:
        n_docs = manifest["splits"][split]["docs"]
        path = out / f"{split}.bin"
        tmp = out / f".{split}.bin.{os.getpid()}.tmp"
        n_tokens = 0
        bar = tqdm(total=n_docs, desc=f"tokenize {split}", unit="doc", disable=not progress)
        try:
            with open(tmp, "wb") as f:
                for batch in _text_batches(iter_texts(corpus_dir, split)):
                    encs = tok.encode_batch(batch, add_special_tokens=False)
                    ids = np.concatenate([np.append(np.asarray(e.ids, dtype=np.int64), sep_id)
                                          for e in encs])
                    ids.astype(dtype).tofile(f)
                    n_tokens += len(ids)
                    bar.update(len(batch))
            os.replace(tmp, path)
        finally:
            bar.close()
            tmp.unlink(missing_ok=True)
        splits[split] = {"file": path.name, "tokens": n_tokens, "docs": n_docs}

    tmp = out / f".tokenizer.json.{os.getpid()}.tmp"
    tokenizer.save(str(tmp))  # the exact tokenizer the ids belong to, next to them
    os.replace(tmp, out / "tokenizer.json")
    meta = {
        **expect,
        "corpus_dir": str(Path(corpus_dir).resolve()),
        "separator": {"token": sep_token, "id": sep_id},
        "special_ids": special_ids(tokenizer),
        "splits": splits,
    }
    write_json(out / META, meta)
    return meta


def load_token_meta(out_dir: str | os.PathLike) -> dict:
    path = Path(out_dir) / META
    if not path.is_file():
        raise RaptrError(f"no token files at '{out_dir}': run tokenize_corpus(corpus_dir, tokenizer, "
                         f"'{out_dir}') (or `raptr data`) first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RaptrError(f"corrupt '{path}' ({e}): delete '{out_dir}' and tokenize again") from e


class PackedTokens:
    """A token file cut into ``num_windows`` non-overlapping windows of ``seq_len`` tokens.

    Training order: epoch ``e`` visits the windows in a permutation seeded by ``(seed, e)``;
    the epochs are concatenated and step ``s`` takes positions ``[s*B, (s+1)*B)`` of that sequence.
    The tail of the stream shorter than one window is never used.
    """

    def __init__(self, path: str | os.PathLike, seq_len: int, dtype: str | np.dtype | None = None):
        path = Path(path)
        if not path.is_file():
            raise RaptrError(f"no token file '{path}': run tokenize_corpus(...) (or `raptr data`) first")
        if dtype is None:  # read it from the meta.json that tokenize_corpus wrote beside the file
            dtype = load_token_meta(path.parent)["dtype"]
        if not isinstance(seq_len, int) or seq_len < 1:
            raise RaptrError(f"seq_len={seq_len} is invalid: use a positive integer, e.g. 128")
        self.path, self.seq_len, self.dtype = path, seq_len, np.dtype(dtype)
        n = path.stat().st_size // self.dtype.itemsize
        if n == 0:
            raise RaptrError(f"'{path}' holds no tokens (empty split): rebuild the corpus with more "
                             "text, or a larger val_fraction for val")
        if n < seq_len:
            raise RaptrError(f"'{path}' has {n} tokens, fewer than one window of seq_len={seq_len}: "
                             "use a shorter seq_len, or more text (a larger val_fraction for val)")
        self.tokens = np.memmap(path, dtype=self.dtype, mode="r", shape=(n,))
        self.num_tokens = n
        self.num_windows = n // seq_len
        self.tokens_per_epoch = self.num_windows * seq_len
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    @classmethod
    def open(cls, out_dir: str | os.PathLike, split: str, seq_len: int) -> "PackedTokens":
        """The ``split`` ("train" or "val") of a tokenize_corpus output folder."""
        if split not in SPLITS:
            raise RaptrError(f"unknown split '{split}': use one of {', '.join(SPLITS)}")
        meta = load_token_meta(out_dir)
        return cls(Path(out_dir) / meta["splits"][split]["file"], seq_len, meta["dtype"])

    def __len__(self) -> int:
        return self.num_windows

    def __repr__(self) -> str:
        return (f"PackedTokens('{self.path}', seq_len={self.seq_len}, windows={self.num_windows}, "
                f"tokens_per_epoch={self.tokens_per_epoch})")

    def order(self, seed: int, epoch: int) -> np.ndarray:
        """Window indices in the order epoch ``epoch`` visits them."""
        key = (seed, epoch)
        if key not in self._orders:
            if len(self._orders) >= 4:  # a batch spans at most 2 epochs; keep a few
                self._orders.pop(next(iter(self._orders)))
            rng = np.random.default_rng([seed % (1 << 64), epoch])
            self._orders[key] = rng.permutation(self.num_windows)
        return self._orders[key]

    def _rows(self, windows: np.ndarray) -> torch.Tensor:
        idx = windows[:, None] * self.seq_len + np.arange(self.seq_len)
        return torch.from_numpy(self.tokens[idx].astype(np.int64))

    def batch(self, step: int, batch_size: int, seed: int = 0, rank: int = 0,
              world_size: int = 1) -> torch.Tensor:
        """Batch ``step`` as a LongTensor [batch_size // world_size, seq_len].

        A pure function of its arguments. With ``world_size > 1`` each rank gets rows
        ``rank::world_size`` of the global batch, so all ranks together see the global batch.
        """
        if step < 0 or batch_size < 1:
            raise RaptrError(f"invalid step={step} / batch_size={batch_size}: use step >= 0 and "
                             "batch_size >= 1")
        if world_size < 1 or not 0 <= rank < world_size or batch_size % world_size:
            raise RaptrError(f"batch_size={batch_size} cannot be split over world_size={world_size} "
                             f"(rank {rank}): use a batch size divisible by the number of processes")
        pos = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)[rank::world_size]
        epochs, idx = np.divmod(pos, self.num_windows)
        windows = np.empty_like(pos)
        for e in np.unique(epochs):
            m = epochs == e
            windows[m] = self.order(seed, int(e))[idx[m]]
        return self._rows(windows)

    def eval_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[torch.Tensor]:
        """Fixed, unshuffled batches of consecutive windows (the last one may be smaller)."""
        if batch_size < 1:
            raise RaptrError(f"invalid batch_size={batch_size}: use batch_size >= 1")
        n = self.num_windows if max_batches is None else min(self.num_windows, max_batches * batch_size)
        for start in range(0, n, batch_size):
            yield self._rows(np.arange(start, min(start + batch_size, n), dtype=np.int64))
