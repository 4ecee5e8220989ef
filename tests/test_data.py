"""Corpus, tokenizer and token-file tests on real text: the Austen chapters shipped in tests/fixtures.

The tests marked slow read the Debian packages themselves (the first run downloads one 1.6 MB
package into ~/.cache/raptr/debian; later runs reuse it).
"""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from raptr.data import corpus as corpus_mod
from raptr.data.corpus import build as corpus_build
from raptr.data.corpus import build_corpus, iter_documents, load_manifest
from raptr.data.tokenizer import load_tokenizer, special_ids, train_tokenizer
from raptr.data.tokens import PackedTokens, tokenize_corpus
from raptr.errors import RaptrError
from conftest import AUSTEN

SEQ = 128


@pytest.fixture(scope="session")
def austen(tmp_path_factory):
    out = tmp_path_factory.mktemp("austen")
    manifest = build_corpus(out, [AUSTEN], val_fraction=0.15, progress=False)
    return out, manifest


@pytest.fixture(scope="session")
def tokenizers(austen):
    corpus_dir, _ = austen
    return {kind: train_tokenizer(corpus_dir, kind, 4096, progress=False) for kind in ("wordpiece", "bpe")}


@pytest.fixture(scope="session")
def token_dirs(austen, tokenizers, tmp_path_factory):
    corpus_dir, _ = austen
    out = {}
    for kind, tok in tokenizers.items():
        out[kind] = tmp_path_factory.mktemp(f"tokens_{kind}")
        tokenize_corpus(corpus_dir, tok, out[kind], progress=False)
    return out


def _docs(corpus_dir, split):
    return list(iter_documents(corpus_dir, split))


# ------------------------------------------------------------------------------------- corpus


def test_manifest_matches_files(austen):
    corpus_dir, manifest = austen
    assert set(manifest["sources"]) == {"austen"}
    src = manifest["sources"]["austen"]
    assert src["kind"] == "local" and src["path"].endswith("fixtures/austen")
    for split in ("train", "val"):
        docs = _docs(corpus_dir, split)
        assert len(docs) == manifest["splits"][split]["docs"] == src[split]["docs"] > 0
        assert sum(len(d["text"].encode()) for d in docs) == manifest["splits"][split]["bytes"]
        assert all(d["source"] == "austen" and d["text"].strip() for d in docs)
    assert load_manifest(corpus_dir) == manifest
    # ~585 KB of Austen: 48 chapters of a few KB to tens of KB, one document each
    total = manifest["splits"]["train"]["bytes"] + manifest["splits"]["val"]["bytes"]
    assert 5.5e5 < total < 6.2e5
    assert manifest["splits"]["train"]["docs"] + manifest["splits"]["val"]["docs"] == 48
    sizes = [len(d["text"]) for d in _docs(corpus_dir, "train")]
    assert 1_000 < np.median(sizes) < 40_000 and max(sizes) <= corpus_mod.MAX_DOC_CHARS


@pytest.mark.slow
def test_debian_austen_source(tmp_path):
    manifest = build_corpus(tmp_path, ["austen"], progress=False)
    src = manifest["sources"]["austen"]
    assert src["package"] == "r-cran-janeaustenr" and "public domain" in src["licence"]
    # ~4 MB of Austen, chapters of a few KB to tens of KB
    total = manifest["splits"]["train"]["bytes"] + manifest["splits"]["val"]["bytes"]
    assert 3.5e6 < total < 4.5e6
    sizes = [len(d["text"]) for d in _docs(tmp_path, "train")]
    assert 1_000 < np.median(sizes) < 40_000 and max(sizes) <= corpus_mod.MAX_DOC_CHARS
    # the shipped fixture is this package's text, unchanged
    fixture = {d.stem: d.read_text().strip() for d in (Path(AUSTEN.split("=", 1)[1]) / "mansfield_park").glob("*.txt")}
    shipped = {d["doc"].split("/", 1)[1]: d["text"] for s in ("train", "val") for d in _docs(tmp_path, s)
               if d["doc"].startswith("mansfield_park/")}
    assert fixture and all(shipped[k] == v for k, v in fixture.items())


def test_train_val_documents_do_not_overlap(austen):
    corpus_dir, _ = austen
    train, val = _docs(corpus_dir, "train"), _docs(corpus_dir, "val")
    assert not {d["doc"] for d in train} & {d["doc"] for d in val}
    assert not {d["text"] for d in train} & {d["text"] for d in val}
    # No long passage of held-out text appears anywhere in the training text.
    train_text = "\n".join(d["text"] for d in train)
    rng = random.Random(0)
    for d in val:
        for _ in range(5):
            i = rng.randrange(0, len(d["text"]) - 200)
            assert d["text"][i : i + 200] not in train_text


def test_split_is_deterministic_by_seed(austen, tmp_path):
    corpus_dir, manifest = austen
    again = build_corpus(tmp_path / "same", [AUSTEN], val_fraction=0.15, progress=False)
    assert again["splits"] == manifest["splits"]
    other = build_corpus(tmp_path / "other", [AUSTEN], seed=1, val_fraction=0.15, progress=False)
    val_ids = {d["doc"] for d in _docs(corpus_dir, "val")}
    assert {d["doc"] for d in _docs(tmp_path / "other", "val")} != val_ids
    assert other["splits"]["train"]["docs"] + other["splits"]["val"]["docs"] == (
        manifest["splits"]["train"]["docs"] + manifest["splits"]["val"]["docs"]
    )


def test_local_sources(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "book.txt").write_text("Call me Ishmael. " * 100 + "\n\nSome years ago. " * 50)
    notes = tmp_path / "notes"
    (notes / "sub").mkdir(parents=True)
    for i in range(4):
        (notes / f"n{i}.md").write_text(f"# Note {i}\n\nThe quick brown fox number {i} jumps.\n")
    (notes / "sub" / "deep.txt").write_text("A nested text file with words in it.")
    (notes / "skip.bin").write_bytes(b"\x00\x01")
    rows = [{"text": f"row {i}: a sentence about parquet files.", "id": i} for i in range(6)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.table({"text": [r["text"] + " (pq)" for r in rows]}), tmp_path / "t.parquet")

    sources = [tmp_path / "book.txt", str(notes), str(tmp_path / "rows.jsonl"),
               f"mytable={tmp_path / 't.parquet'}"]
    m = build_corpus(tmp_path / "out", sources, val_fraction=0.2, progress=False)
    assert set(m["sources"]) == {"book", "notes", "rows", "mytable"}
    assert m["sources"]["notes"]["train"]["docs"] + m["sources"]["notes"]["val"]["docs"] == 5
    assert m["sources"]["rows"]["train"]["docs"] + m["sources"]["rows"]["val"]["docs"] == 6
    for name in ("notes", "rows", "mytable"):  # every source with 2+ docs holds one out
        assert m["sources"][name]["val"]["docs"] >= 1
    texts = {d["text"] for s in ("train", "val") for d in _docs(tmp_path / "out", s)}
    assert "row 3: a sentence about parquet files. (pq)" in texts

    with pytest.raises(RaptrError, match="no 'body' column"):
        build_corpus(tmp_path / "out2", [tmp_path / "rows.jsonl"], text_field="body", progress=False)


# ------------------------------------------------------------------------------------- errors


def test_clean_errors(tmp_path, monkeypatch):
    with pytest.raises(RaptrError, match="unknown source .*nope"):
        build_corpus(tmp_path / "o", [tmp_path / "nope"], progress=False)
    with pytest.raises(RaptrError, match="unknown source 'austin'"):
        build_corpus(tmp_path / "o", ["austin"], progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("  \n")
    with pytest.raises(RaptrError, match="no text in folder"):
        build_corpus(tmp_path / "o", [empty], progress=False)
    with pytest.raises(RaptrError, match="no corpus at .*raptr data"):
        load_manifest(tmp_path / "missing")
    with pytest.raises(RaptrError, match="no tokenizer at"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": {')
    with pytest.raises(RaptrError, match="corrupt tokenizer file"):
        load_tokenizer(bad)
    with pytest.raises(RaptrError, match="no token files"):
        PackedTokens.open(tmp_path, "train", SEQ)
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(RaptrError, match="no tokens"):
        PackedTokens(tmp_path / "empty.bin", SEQ, "uint16")
    np.arange(50, dtype=np.uint16).tofile(tmp_path / "short.bin")
    with pytest.raises(RaptrError, match="fewer than one window"):
        PackedTokens(tmp_path / "short.bin", SEQ, "uint16")

    # A machine without apt-get/dpkg-deb (and no cached .deb) is pointed to --source PATH.
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RaptrError, match="--source PATH"):
        build_corpus(tmp_path / "o", ["austen"], cache_dir=tmp_path / "nocache", progress=False)


@pytest.mark.slow
def test_unavailable_sources_are_skipped(tmp_path, monkeypatch):
    real = corpus_build.fetch_debs

    def fetch_without_bible(specs, cache_dir):
        found, why = real([s for s in specs if s.name != "bible"], cache_dir)
        return found, {**why, "bible": "`apt-get download sword-text-web` failed"}

    monkeypatch.setattr(corpus_build, "fetch_debs", fetch_without_bible)
    with pytest.warns(UserWarning, match="skipping source 'bible'"):
        m = build_corpus(tmp_path / "o", ["austen", "bible"], progress=False)
    assert set(m["sources"]) == {"austen"} and "bible" in m["skipped"]

    monkeypatch.setattr(corpus_build, "fetch_debs", lambda specs, cache: ({}, {"austen": "offline"}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RaptrError, match="no text could be collected"):
            build_corpus(tmp_path / "o2", ["austen"], progress=False)


# ---------------------------------------------------------------------------------- tokenizer


def test_wordpiece_round_trip(austen, tokenizers):
    tok = tokenizers["wordpiece"]
    corpus_dir, _ = austen
    text = _docs(corpus_dir, "train")[0]["text"][:5000]
    ids = tok.encode(text).ids
    assert special_ids(tok)["unk"] not in ids
    normalised = tok.normalizer.normalize_str(text)
    assert normalised == normalised.lower()
    # WordPiece splits punctuation off words, so compare up to whitespace.
    assert "".join(tok.decode(ids).split()) == "".join(normalised.split())


def test_bpe_round_trip_is_exact(austen, tokenizers):
    tok = tokenizers["bpe"]
    corpus_dir, _ = austen
    samples = [d["text"] for d in _docs(corpus_dir, "val")]
    samples.append("Ünïcödé — “quotes”, tabs\tand 🙂 emoji\n\n  indented  spaces ")
    for text in samples:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


def test_special_ids(tokenizers):
    wp = special_ids(tokenizers["wordpiece"])
    assert wp == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    bpe = special_ids(tokenizers["bpe"])
    assert {"eos", "pad", "r", "s", "x"} <= set(bpe) and "mask" not in bpe
    assert len(bpe["sentinels"]) == 64
    assert tokenizers["bpe"].id_to_token(bpe["sentinels"][63]) == "<extra_id_63>"
    assert tokenizers["bpe"].get_vocab_size() == tokenizers["wordpiece"].get_vocab_size() == 4096


def test_tokenizer_is_cached_and_trained_on_train_only(austen, tokenizers, tmp_path):
    corpus_dir, _ = austen
    again = train_tokenizer(corpus_dir, "bpe", 4096, progress=False)
    assert again.to_str() == tokenizers["bpe"].to_str()
    path = corpus_dir / "tokenizers" / "bpe-4096" / "tokenizer.json"
    assert load_tokenizer(path).to_str() == again.to_str()
    meta = json.loads(path.with_name("tokenizer.meta.json").read_text())
    assert meta["train_sha256"] == load_manifest(corpus_dir)["splits"]["train"]["sha256"]
    with pytest.raises(RaptrError, match="unknown tokenizer kind"):
        train_tokenizer(corpus_dir, "unigram")


# ------------------------------------------------------------------------------- token files


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_token_files_match_reencoding(austen, tokenizers, token_dirs, kind):
    corpus_dir, _ = austen
    tok, out = tokenizers[kind], token_dirs[kind]
    meta = json.loads((out / "meta.json").read_text())
    sep = tok.token_to_id("[SEP]" if kind == "wordpiece" else "<|endoftext|>")
    assert meta["dtype"] == "uint16" and meta["separator"]["id"] == sep
    # val: exact content; train: token count
    expect = []
    for d in _docs(corpus_dir, "val"):
        expect += tok.encode(d["text"]).ids + [sep]
    got = np.fromfile(out / "val.bin", dtype=np.uint16)
    assert got.tolist() == expect and meta["splits"]["val"]["tokens"] == len(expect)
    encs = tok.encode_batch([d["text"] for d in _docs(corpus_dir, "train")])
    n_train = sum(len(e.ids) + 1 for e in encs)
    assert meta["splits"]["train"]["tokens"] == n_train == (out / "train.bin").stat().st_size // 2
    # reused when up to date, redone when the tokenizer changes
    mtime = (out / "train.bin").stat().st_mtime_ns
    assert tokenize_corpus(corpus_dir, tok, out, progress=False) == meta
    assert (out / "train.bin").stat().st_mtime_ns == mtime
    assert load_tokenizer(out / "tokenizer.json").to_str() == tok.to_str()


def test_packed_tokens_real_file(token_dirs):
    train = PackedTokens.open(token_dirs["bpe"], "train", SEQ)
    assert train.num_windows == train.num_tokens // SEQ
    assert train.tokens_per_epoch == train.num_windows * SEQ
    b = train.batch(3, 8, seed=7)
    assert b.dtype == torch.long and b.shape == (8, SEQ)
    assert torch.equal(b, train.batch(3, 8, seed=7))
    assert torch.equal(b, PackedTokens.open(token_dirs["bpe"], "train", SEQ).batch(3, 8, seed=7))
    assert not torch.equal(b, train.batch(3, 8, seed=8))
    val = PackedTokens.open(token_dirs["bpe"], "val", SEQ)
    batches = list(val.eval_batches(16, max_batches=3))
    assert len(batches) == min(3, -(-val.num_windows // 16))
    assert torch.equal(batches[0][1], torch.from_numpy(val.tokens[SEQ : 2 * SEQ].astype(np.int64)))
    assert all(torch.equal(x, y) for x, y in zip(batches, val.eval_batches(16, max_batches=3)))


def test_packed_tokens_order_and_epochs(tmp_path):
    # Token value t sits at position t, so a row's first token / seq_len is its window index.
    np.arange(1000, dtype=np.uint16).tofile(tmp_path / "toy.bin")
    pt = PackedTokens(tmp_path / "toy.bin", 10, "uint16")
    assert pt.num_windows == len(pt) == 100 and pt.tokens_per_epoch == 1000

    def windows(step, bs, seed):
        rows = pt.batch(step, bs, seed)
        assert torch.equal(rows - rows[:, :1], torch.arange(10).expand_as(rows))  # whole windows
        return (rows[:, 0] // 10).tolist()

    # One epoch of consecutive steps visits every window exactly once, in a shuffled order.
    epoch0 = [w for s in range(10) for w in windows(s, 10, seed=0)]
    assert sorted(epoch0) == list(range(100)) and epoch0 != list(range(100))
    assert epoch0 == pt.order(0, 0).tolist()
    # The next epoch is a different permutation; a batch straddling the boundary wraps around.
    epoch1 = [w for s in range(10, 20) for w in windows(s, 10, seed=0)]
    assert sorted(epoch1) == list(range(100)) and epoch1 != epoch0
    straddle = windows(9, 11, seed=0)  # positions 99..109
    assert straddle == [pt.order(0, 0)[99]] + pt.order(0, 1)[:10].tolist()
    # A different seed gives a different order; resuming at any step needs no state.
    assert windows(0, 10, seed=1) != epoch0[:10]
    fresh = PackedTokens(tmp_path / "toy.bin", 10, "uint16")
    assert torch.equal(fresh.batch(15, 10, seed=0), pt.batch(15, 10, seed=0))
    # Data-parallel ranks split the global batch.
    full = pt.batch(4, 8, seed=3)
    parts = [pt.batch(4, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(full[0::2], parts[0]) and torch.equal(full[1::2], parts[1])
    # eval batches: fixed consecutive windows, the last one partial
    ev = list(pt.eval_batches(30))
    assert [len(b) for b in ev] == [30, 30, 30, 10]
    assert (ev[0][:, 0] // 10).tolist() == list(range(30))


# ----------------------------------------------------------------------------- full default


@pytest.mark.slow
def test_default_corpus_builds(tmp_path):
    m = build_corpus(tmp_path, ["default"], progress=False)
    assert not m["skipped"], m["skipped"]
    total = m["splits"]["train"]["bytes"] + m["splits"]["val"]["bytes"]
    assert 60e6 < total < 150e6
    for name, src in m["sources"].items():
        assert src["train"]["docs"] > 10 and src["val"]["docs"] >= 1, name


def test_tokenizers_are_reproducible_across_processes(austen, tmp_path):
    """HF's trainers number ties in hash-map order (random per process): our ids must not depend on it."""
    import subprocess
    import sys

    corpus_dir, _ = austen
    code = ("import sys; from raptr.data.tokenizer import train_tokenizer; "
            "train_tokenizer(sys.argv[1], sys.argv[2], 1024, out_path=sys.argv[3], progress=False)")
    for kind in ("wordpiece", "bpe"):
        files = []
        for i in range(2):
            out = tmp_path / f"{kind}{i}" / "tokenizer.json"
            subprocess.run([sys.executable, "-c", code, str(corpus_dir), kind, str(out)], check=True)
            files.append(out.read_bytes())
        assert files[0] == files[1], kind
