"""Train and load HF ``tokenizers`` tokenizers on a corpus directory's train split.

Two kinds:

* ``wordpiece``: BERT-style, lowercased with accents stripped (BERT normaliser), for MLM
  encoders. Specials ``[PAD] [UNK] [CLS] [SEP] [MASK]``.
* ``bpe``: byte-level BPE (any text round-trips exactly), for causal and UL2 decoders.
  Specials ``<|endoftext|> <pad> [R] [S] [X]`` and sentinels ``<extra_id_0>``..``<extra_id_63>``.

No post-processor is attached: ``encode(text).ids`` are the text's tokens only, and callers add
``[CLS]``/``[SEP]``/``<|endoftext|>`` themselves where their objective needs them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from raptr.data.corpus import iter_texts, load_manifest, write_json
from raptr.errors import RaptrError

KINDS = ("wordpiece", "bpe")
N_SENTINELS = 64
WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BPE_SPECIALS = ["<|endoftext|>", "<pad>", "[R]", "[S]", "[X]"] + [
    f"<extra_id_{i}>" for i in range(N_SENTINELS)
]
# special_ids() key -> token, in both vocabularies
_SPECIAL_NAMES = {
    "pad": ("[PAD]", "<pad>"),
    "unk": ("[UNK]",),
    "cls": ("[CLS]",),
    "sep": ("[SEP]",),
    "mask": ("[MASK]",),
    "eos": ("<|endoftext|>",),
    "r": ("[R]",),
    "s": ("[S]",),
    "x": ("[X]",),
}


def default_tokenizer_path(corpus_dir: str | os.PathLike, kind: str, vocab_size: int) -> Path:
    return Path(corpus_dir) / "tokenizers" / f"{kind}-{vocab_size}" / "tokenizer.json"


def _meta_path(path: Path) -> Path:
    return path.with_name(path.stem + ".meta.json")  # tokenizer.json -> tokenizer.meta.json


def _new_tokenizer(kind: str, vocab_size: int, progress: bool):
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        # limit_alphabet: rare symbols (CJK, math) must not eat an 8k vocabulary; they become [UNK].
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=2,
                                            special_tokens=WORDPIECE_SPECIALS, limit_alphabet=512,
                                            show_progress=progress)
    elif kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2,
                                      special_tokens=BPE_SPECIALS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=progress)
    else:
        raise RaptrError(f"unknown tokenizer kind '{kind}': use one of {', '.join(KINDS)}")
    return tok, trainer


def train_tokenizer(
    corpus_dir: str | os.PathLike,
    kind: str,
    vocab_size: int = 8192,
    out_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> Tokenizer:
    """Train a ``kind`` tokenizer on the train split of ``corpus_dir`` and save it as JSON.

    out_path defaults to ``<corpus_dir>/tokenizers/<kind>-<vocab_size>/tokenizer.json``. An existing
    file there is reused when its sidecar ``tokenizer.meta.json`` records the same kind, vocab
    size and training text.
    """
    if kind not in KINDS:
        raise RaptrError(f"unknown tokenizer kind '{kind}': use one of {', '.join(KINDS)}")
    n_specials = len(WORDPIECE_SPECIALS if kind == "wordpiece" else BPE_SPECIALS)
    if not isinstance(vocab_size, int) or vocab_size < n_specials + 256:
        raise RaptrError(f"vocab_size={vocab_size} is too small for {kind}: use at least "
                         f"{n_specials + 256}, e.g. 8192")
    manifest = load_manifest(corpus_dir)
    path = Path(out_path) if out_path else default_tokenizer_path(corpus_dir, kind, vocab_size)
    meta = {"kind": kind, "vocab_size": vocab_size,
            "train_sha256": manifest["splits"]["train"]["sha256"]}
    if kind == "wordpiece":
        meta["ids"] = "canonical"  # caches from before the renumbering are trained again
    if path.is_file() and _meta_path(path).is_file():
        try:
            if json.loads(_meta_path(path).read_text()) == meta:
                return load_tokenizer(path)
        except (json.JSONDecodeError, RaptrError):
            pass  # stale or broken cache: train again

    tok, trainer = _new_tokenizer(kind, vocab_size, progress)
    n_docs = manifest["splits"]["train"]["docs"]
    tok.train_from_iterator(iter_texts(corpus_dir, "train"), trainer, length=n_docs)
    if kind == "wordpiece":
        tok = _canonical_wordpiece(tok)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tok.save(str(tmp))
    os.replace(tmp, path)
    write_json(_meta_path(path), meta)
    return tok


def _canonical_wordpiece(tok: Tokenizer) -> Tokenizer:
    """The same vocabulary with ids in a fixed order: specials, then words, then ``##`` pieces by length.

    The WordPiece trainer numbers its alphabet (and ties between equally frequent merges) in
    hash-map order, which changes from process to process, so two builds of one corpus gave
    different ids (and different runs). WordPiece encodes by greedy longest match over the
    vocabulary *set*, so renumbering changes no tokenisation, only the ids, now reproducible.
    """
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    specials = [t for t in WORDPIECE_SPECIALS if t in vocab]
    rest = sorted((t for t in vocab if t not in specials), key=lambda t: (t.startswith("##"), len(t), t))
    data["model"]["vocab"] = {t: i for i, t in enumerate(specials + rest)}
    for added in data.get("added_tokens", []):
        added["id"] = data["model"]["vocab"][added["content"]]
    return Tokenizer.from_str(json.dumps(data))


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a local ``tokenizer.json`` (or a folder holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise RaptrError(f"no tokenizer at '{path}': train one with train_tokenizer(corpus_dir, kind) "
                         "(or `raptr data`), or pass the path of an existing tokenizer.json")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
        raise RaptrError(f"corrupt tokenizer file '{p}' ({str(e).splitlines()[0][:120]}): delete it "
                         "and train the tokenizer again") from e


def special_ids(tokenizer: Tokenizer) -> dict:
    """Ids of the special tokens this tokenizer has: pad, unk, cls, sep, mask, eos, r, s, x
    (ints) and sentinels (list of ids of ``<extra_id_0>``, ``<extra_id_1>``, ... in order)."""
    out: dict = {}
    for key, tokens in _SPECIAL_NAMES.items():
        for t in tokens:
            i = tokenizer.token_to_id(t)
            if i is not None:
                out[key] = i
                break
    sentinels = []
    while (i := tokenizer.token_to_id(f"<extra_id_{len(sentinels)}>")) is not None:
        sentinels.append(i)
    if sentinels:
        out["sentinels"] = sentinels
    return out


def separator(tokenizer: Tokenizer) -> tuple[str, int]:
    """The token written after every document in a token stream: [SEP] or <|endoftext|>."""
    for t in ("[SEP]", "<|endoftext|>"):
        i = tokenizer.token_to_id(t)
        if i is not None:
            return t, i
    raise RaptrError("tokenizer has neither [SEP] nor <|endoftext|>: train one with "
                     "train_tokenizer(corpus_dir, 'wordpiece' or 'bpe')")


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
