"""The comparison harness on tiny real runs: every arm, paired seeds, equal-FLOP budgets, the
report and evidence.json, and a suite run in pieces (only the missing runs run)."""

import json
import math
import struct
import time
from pathlib import Path

import pytest

from raptr.errors import RaptrError
from raptr.experiments.compare import load_compare_config, run_compare
from raptr.experiments.report import PLOTS, make_report
from raptr.training.build import build_trainer
from raptr.training.config import load_config
from conftest import AUSTEN_DATA, tiny

TINY = tiny("train.steps=60", "train.eval_every=15", "train.checkpoint_every=30", *AUSTEN_DATA, layers=6)


def scaled(cfg):
    """The preset's 12-layer schedules, scaled to the 6-layer test model."""
    for arm in cfg.arms:
        arm.set = [s.replace("3-6-9-12", "3-4-5-6").replace("6-8-10-12", "3-4-5-6").replace("6-9-12", "3-6").replace("8-10-12", "4-5-6") for s in arm.set]
    return cfg


@pytest.fixture(scope="module")
def comparison(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("results")
    cfg = scaled(load_compare_config("compare/bert-tiny", TINY + [f"data.cache_dir={data_cache}"]))
    cfg.seeds = [0]  # one seed per arm, two for standard: the noise floor (the preset has three)
    next(a for a in cfg.arms if a.name == "standard").seeds = [0, 1]
    return run_compare(cfg, root, progress=False), cfg


def summaries_of(root):
    return {d.name: json.loads((d / "summary.json").read_text()) for d in (root / "runs").iterdir()}


def test_every_arm_ran_and_equal_flop_budgets_agree(comparison):
    root, cfg = comparison
    summaries = summaries_of(root)
    assert set(summaries) == {"standard", "standard-seed1", "raptr", "stacking", "pld", "layerdrop", "standard-equiflop",
                              "width", "depthwidth"}
    assert summaries["width"]["relative_flops"] < 0.95 and summaries["depthwidth"]["relative_flops"] < 0.95
    raptr, equi = summaries["raptr"], summaries["standard-equiflop"]
    assert equi["steps"] < raptr["steps"] == 60
    assert equi["flops"] == pytest.approx(raptr["flops"], rel=0.01)  # matched FLOPs within 1%
    assert summaries["raptr"]["relative_flops"] < 0.95 and summaries["stacking"]["relative_flops"] < 0.95
    assert all(s["git_commit"] for s in summaries.values())  # provenance of every run


def test_report_and_evidence_match_the_logs(comparison):
    root, _ = comparison
    report = make_report(root).read_text()
    for name in ("standard", "raptr", "stacking", "pld", "layerdrop", "standard-equiflop", "width", "depthwidth"):
        assert f"| {name} (" in report
    assert "Paired comparisons" in report and "Unigram plateau" in report
    ev = json.loads((root / "evidence.json").read_text())
    s = summaries_of(root)
    arms = {a["arm"]: a for a in ev["arms"]}
    assert arms["standard"]["seeds"] == [0, 1]
    assert arms["standard"]["final_val_loss"] == [s["standard"]["final_val_loss"], s["standard-seed1"]["final_val_loss"]]
    assert arms["raptr"]["rel_flops"] == pytest.approx(s["raptr"]["flops"] / s["standard"]["flops"])
    assert arms["standard"]["time_to_target_flops_ratio"] == pytest.approx(1.0, abs=0.2)
    from raptr.experiments.stats import first_crossing

    base_evals = [json.loads(line) for line in (root / "runs/standard/metrics.jsonl").read_text().splitlines()
                  if '"eval"' in line]
    at = first_crossing([e["flops"] for e in base_evals], [e["val_loss"] for e in base_evals], s["raptr"]["final_val_loss"])
    want = None if at is None else at / s["raptr"]["flops"]
    assert arms["raptr"]["baseline_flops_to_arm_loss_ratio"] == (pytest.approx(want) if want is not None else None)
    raptr = next(c for c in ev["comparisons"] if c["arm"] == "raptr" and c["against"] == "standard")
    assert raptr["n"] == 1 and raptr["ci95"] is None and raptr["verdict"] == "one seed: no interval"
    assert raptr["mean_diff"] == pytest.approx(s["raptr"]["final_val_loss"] - s["standard"]["final_val_loss"])
    assert ev["missing"] == [] and ev["unigram_val_loss"] > 4.0
    raptr_t = [t for t in ev["transitions"] if t["arm"] == "raptr"]  # 3-4-5-6: three boundaries
    assert [t["to_stage"] for t in raptr_t] == [1, 2, 3] and all(t["baseline_change"] is not None for t in raptr_t)
    assert "## Stage transitions" in report
    for name in PLOTS:
        png = (root / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", png[16:24])
        assert width > 300 and height > 200 and len(png) > 10_000  # a drawn figure, not an empty canvas
        assert f"]({name})" in report


def test_rerun_skips_finished_arms(comparison, capsys):
    root, cfg = comparison
    before = {d.name: (d / "summary.json").stat().st_mtime for d in (root / "runs").iterdir()}
    run_compare(cfg, root.parent, progress=False)
    after = {d.name: (d / "summary.json").stat().st_mtime for d in (root / "runs").iterdir()}
    assert before == after
    assert "done already" in capsys.readouterr().out


def test_suite_in_pieces_runs_only_what_is_missing(tmp_path, data_cache):
    cfg = scaled(load_compare_config("compare/clm-tiny", TINY + ["train.steps=24", "train.eval_every=8",
                                                                "data.vocab_size=1024", f"data.cache_dir={data_cache}"]))
    cfg.arms = [a for a in cfg.arms if a.name in ("standard", "raptr", "standard-equiflop")]
    cfg.seeds = [0, 1]
    with pytest.raises(RaptrError, match="run arm 'raptr' for seed 0 first"):
        run_compare(cfg, tmp_path, progress=False, only=["standard-equiflop"])
    root = run_compare(cfg, tmp_path, progress=False, only=["raptr"], seeds=[0])
    assert sorted(d.name for d in (root / "runs").iterdir()) == ["raptr"]
    first = (root / "runs/raptr/summary.json").stat().st_mtime
    with pytest.raises(RaptrError, match="baseline arm 'standard' has no finished run"):
        make_report(root)
    # the FLOP-matched arm alone, its target outside --only but finished on disk
    run_compare(cfg, tmp_path, progress=False, only=["standard-equiflop"], seeds=[0])
    assert sorted(d.name for d in (root / "runs").iterdir()) == ["raptr", "standard-equiflop"]
    run_compare(cfg, tmp_path, progress=False, workers=2)  # the rest, two at a time
    runs = {d.name: json.loads((d / "summary.json").read_text()) for d in (root / "runs").iterdir()}
    assert set(runs) == {"standard", "standard-seed1", "raptr", "raptr-seed1", "standard-equiflop", "standard-equiflop-seed1"}
    assert (root / "runs/raptr/summary.json").stat().st_mtime == first  # not rerun
    for seed in ("", "-seed1"):  # each equi-FLOP run spends the FLOPs of the RaPTr run of its own seed
        assert runs[f"standard-equiflop{seed}"]["flops"] == pytest.approx(runs[f"raptr{seed}"]["flops"], rel=0.02)
    configs = {n: json.loads((root / "runs" / n / "config.json").read_text())["train"] for n in runs}
    assert configs["raptr-seed1"]["seed"] == configs["standard-seed1"]["seed"] == 1  # paired: same init and data
    assert configs["raptr-seed1"]["path_seed"] == 1
    ev_path = make_report(root).parent / "evidence.json"
    ev = json.loads(ev_path.read_text())
    cmp = next(c for c in ev["comparisons"] if c["arm"] == "raptr" and c["against"] == "standard")
    assert cmp["n"] == 2 and len(cmp["ci95"]) == 2
    d = [runs[f"raptr{s}"]["final_val_loss"] - runs[f"standard{s}"]["final_val_loss"] for s in ("", "-seed1")]
    assert cmp["mean_diff"] == pytest.approx(sum(d) / 2)
    half90 = 6.3138 * abs(d[0] - d[1]) / math.sqrt(2) / math.sqrt(2)  # t_{0.95,1} * sd / sqrt(2), sd = |d0 - d1| / sqrt(2)
    assert cmp["equivalence"]["ci90"] == pytest.approx([cmp["mean_diff"] - half90, cmp["mean_diff"] + half90])
    assert cmp["equivalence"]["equivalent"] is (abs(cmp["mean_diff"]) + half90 < 0.03)
    assert "equivalent within ±0.03? (TOST)" in (root / "report.md").read_text()
    assert {c["against"] for c in ev["comparisons"]} == {"standard", "standard-equiflop", "raptr"}


def test_deadline_checkpoints_and_resumes_exactly(tmp_path, data_cache):
    base = TINY + ["objective.name=causal", "data.tokenizer=bpe", f"data.cache_dir={data_cache}", "train.steps=12",
                   "train.checkpoint_every=100", "method.name=raptr", "method.raptr.schedule=3-4-5-6"]
    whole = build_trainer(load_config(None, base + [f"train.out_dir={tmp_path}/whole"]), progress=False).fit()
    cut = build_trainer(load_config(None, base + [f"train.out_dir={tmp_path}/cut"]), progress=False).fit(deadline=time.time())
    assert cut["steps"] == 1  # stopped at the first step boundary past the deadline, with a checkpoint
    assert (tmp_path / "cut/checkpoints").is_dir()
    again = build_trainer(load_config(None, base + [f"train.out_dir={tmp_path}/cut"]), progress=False).fit()
    assert again["steps"] == 12 and again["final_val_loss"] == whole["final_val_loss"]
    losses = [[json.loads(line)["loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
               if '"train"' in line] for d in ("whole", "cut")]
    assert losses[0] == losses[1]


def test_spent_budget_starts_nothing(tmp_path, data_cache, capsys):
    cfg = scaled(load_compare_config("compare/clm-tiny", TINY + ["train.steps=6", f"data.cache_dir={data_cache}"]))
    root = run_compare(cfg, tmp_path, progress=False, budget_minutes=1e-6)  # spent before the first run
    assert not (root / "runs").exists() or not any((root / "runs").iterdir())
    assert "not finished (run the same command again to continue)" in capsys.readouterr().out


def test_reuse_copies_identical_runs_of_another_suite(tmp_path, data_cache):
    """compare/schedules reuses compare/clm-tiny's standard and RaPTr runs: a run of an identical
    config (but for its name and paths) is copied with its logs, not trained again; others train."""
    over = TINY + ["train.steps=24", "train.eval_every=8", f"data.cache_dir={data_cache}"]
    first = scaled(load_compare_config("compare/clm-tiny", over))
    first.arms = [a for a in first.arms if a.name in ("standard", "raptr")]
    first.seeds = [0]
    run_compare(first, tmp_path, progress=False)
    sched = scaled(load_compare_config("compare/schedules", over))
    assert sched.reuse == ["clm-tiny"]
    sched.arms = [a for a in sched.arms if a.name in ("standard", "6-8-10-12", "6-8-10-12-sqrt")]
    sched.seeds = [0]
    source = {n: (tmp_path / "clm-tiny/runs" / n / "summary.json").stat().st_mtime for n in ("standard", "raptr")}
    root = run_compare(sched, tmp_path, progress=False)
    runs = summaries_of(root)
    assert runs["standard"]["reused_from"] == "clm-tiny/runs/standard"
    assert runs["6-8-10-12"]["reused_from"] == "clm-tiny/runs/raptr"
    assert "reused_from" not in runs["6-8-10-12-sqrt"]  # no identical run anywhere: trained
    assert (root / "runs/6-8-10-12/metrics.jsonl").read_bytes() == (tmp_path / "clm-tiny/runs/raptr/metrics.jsonl").read_bytes()
    assert source == {n: (tmp_path / "clm-tiny/runs" / n / "summary.json").stat().st_mtime for n in source}
    assert not (root / "runs/standard/checkpoints").exists()
    # the copies are what training would give: the same config trained here reproduces the logged losses
    again = build_trainer(load_config(first.base, first.overrides + ["method.name=raptr", "method.raptr.schedule=3-4-5-6", "method.raptr.stage_lengths=equal",
                                                                      "train.seed=0", "train.path_seed=0",
                                                                      f"train.out_dir={tmp_path}/again"]), progress=False).fit()
    assert again["final_val_loss"] == runs["6-8-10-12"]["final_val_loss"]
    make_report(root)
    # a run of this suite already started in its directory resumes there; it is never overwritten
    from raptr.experiments.compare import plan_runs, reuse_finished

    started = next(r for r in plan_runs(sched, root) if r.label == "standard")
    cfg = load_config(sched.base, started.overrides)
    (cfg.out_dir / "summary.json").unlink()
    assert reuse_finished(cfg, tmp_path, ["clm-tiny"]) is None
    cfg.train.out_dir = str(tmp_path / "fresh")
    assert reuse_finished(cfg, tmp_path, ["clm-tiny"])["reused_from"] == "clm-tiny/runs/standard"


def test_chained_flop_matching_is_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: c\nbase: clm-tiny-baseline\nbaseline: a\narms:\n  - {name: a, set: [method.name=raptr]}\n"
                   "  - {name: b, match_flops_of: a}\n  - {name: c, match_flops_of: b}\n")
    with pytest.raises(RaptrError, match="which itself matches another arm's"):
        load_compare_config(str(cfg))


SIGNAL_SUITE = ("name: sig\nbase: clm-tiny-baseline\nseeds: [0, 1]\nbaseline: standard\narms:\n"
                "  - name: standard\n    set: [method.name=standard]\n"
                "  - name: raptr\n    set: [method.name=raptr, method.raptr.schedule=3-4-5-6]\n")


def _start_suite(tmp_path, data_cache, workers, suite=SIGNAL_SUITE, *extra):
    """`raptr compare --workers N` as a real process, in a session of its own (so a test can signal the
    whole group, as Ctrl-C does, and clean up whatever is left)."""
    import subprocess
    import sys

    (tmp_path / "sig.yaml").write_text(suite)
    over = [o for o in TINY if not o.startswith(("train.steps", "train.checkpoint_every", "train.eval_every"))]
    args = [sys.executable, "-m", "raptr", "compare", "--config", str(tmp_path / "sig.yaml"), "--results",
            str(tmp_path), "--workers", str(workers), "--quiet", *over, "train.steps=3000",
            "train.checkpoint_every=1500", "train.eval_every=500", "data.tokenizer=bpe", f"data.cache_dir={data_cache}", *extra]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    return proc, tmp_path / "sig", args


def _wait_until(proc, condition, what, limit=240):
    end = time.time() + limit
    while not condition():
        if proc.poll() is not None or time.time() > end:
            proc.kill()
            raise AssertionError(f"{what}: {proc.communicate(timeout=30)}")
        time.sleep(0.1)


def _training(root, name, steps=5):
    m = root / "runs" / name / "metrics.jsonl"
    return m.is_file() and m.read_text().count('"train"') >= steps


def _cleanup(proc):
    import os
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group: orphaned workers too, if a test failed
    except ProcessLookupError:
        pass


def _stopped_with_checkpoint(root, name):
    from raptr.training.runfiles import RunLock

    steps = json.loads((root / "runs" / name / "summary.json").read_text())["steps"]
    assert 5 <= steps < 3000 and (root / "runs" / name / "checkpoints" / f"step_{steps:07d}").is_dir()
    RunLock(root / "runs" / name).acquire().release()  # no process holds the run any more


@pytest.mark.parametrize("workers,to", [(2, "parent"), (1, "parent"), (2, "group")])
def test_a_signal_to_compare_checkpoints_every_running_run_and_starts_nothing(tmp_path, data_cache, workers, to):
    """SIGTERM to the compare process alone (Kubernetes, `kill PID`) is passed on to its workers; Ctrl-C
    (SIGINT to the whole group) reaches them too. Every running run finishes its step and checkpoints, no
    queued run starts, and the command exits 128+N with one line naming what to do."""
    import os
    import signal

    proc, root, _ = _start_suite(tmp_path, data_cache, workers)
    try:
        running = ("standard", "raptr")[:workers]
        _wait_until(proc, lambda: all(_training(root, n) for n in running), "the first runs never trained")
        signum = signal.SIGTERM if to == "parent" else signal.SIGINT
        os.kill(proc.pid, signum) if to == "parent" else os.killpg(proc.pid, signum)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signum, err
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"stopped by {signal.Signals(signum).name}: ") and last.endswith(
            "run the same command again to resume")
        assert all(name in last for name in running) and "Traceback" not in err
        assert sorted(p.name for p in (root / "runs").iterdir()) == sorted(running)  # seed 1 never started
        for name in running:
            _stopped_with_checkpoint(root, name)
    finally:
        _cleanup(proc)


def test_a_signal_with_an_idle_worker_still_stops_cleanly(tmp_path, data_cache):
    """A worker that finished its run and waits for none (the tail of a suite) is signalled too: it must
    not break the pool under the worker that is checkpointing."""
    import os
    import signal

    suite = ("name: sig\nbase: clm-tiny-baseline\nseeds: [0]\nbaseline: standard\narms:\n"
             "  - name: standard\n    set: [method.name=standard]\n"
             "  - name: short\n    set: [method.name=standard, train.steps=10, train.checkpoint_every=10]\n")
    proc, root, _ = _start_suite(tmp_path, data_cache, 2, suite)
    try:
        done = root / "runs/short/summary.json"
        _wait_until(proc, lambda: _training(root, "standard") and done.is_file()
                    and json.loads(done.read_text())["steps"] == 10, "the short run never finished")
        time.sleep(1.0)  # its worker is idle now
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
        assert "standard stopped at a step boundary" in err.strip().splitlines()[-1]
        _stopped_with_checkpoint(root, "standard")
    finally:
        _cleanup(proc)


def test_workers_of_a_killed_compare_checkpoint_and_exit(tmp_path, data_cache):
    """SIGKILL leaves no chance to pass a signal on: the workers notice their parent is gone, checkpoint
    and exit, instead of training on as orphans that hold the runs' locks; the same command resumes."""
    import os
    import signal
    import subprocess

    from raptr.training.runfiles import RunLock

    proc, root, args = _start_suite(tmp_path, data_cache, 2)
    try:
        _wait_until(proc, lambda: _training(root, "standard") and _training(root, "raptr"), "the runs never trained")
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=120)  # returns once the workers, which hold its pipes, have exited
        for name in ("standard", "raptr"):
            _stopped_with_checkpoint(root, name)
        log = root / "runs/standard/metrics.jsonl"
        stop = json.loads((root / "runs/standard/summary.json").read_text())["steps"]
        kept = [line for line in log.read_text().splitlines() if json.loads(line)["step"] <= stop]
        again = subprocess.run(args + ["--only", "standard", "--seeds", "0"], capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr
        assert json.loads((root / "runs/standard/summary.json").read_text())["steps"] == 3000
        assert log.read_text().splitlines()[: len(kept)] == kept  # resumed: the rows up to the stop (wall-clock too) kept
        RunLock(root / "runs/raptr").acquire().release()
    finally:
        _cleanup(proc)


def test_horizon_change_by_hand_from_committed_logs(tmp_path):
    """`horizon_of`: each paired gap here minus the same gap in the other suite, per seed, with its t
    interval. Checked on two committed suites (ul2-tiny as 'here', clm-tiny as 'there')."""
    import math
    import shutil
    from pathlib import Path

    from raptr.experiments.report import build_evidence

    results = Path(__file__).resolve().parents[1] / "docs/results"
    for suite in ("ul2-tiny", "clm-tiny"):
        (tmp_path / suite).mkdir()
        shutil.copy(results / suite / "compare.json", tmp_path / suite)
        for run in ("standard", "standard-seed1", "raptr", "raptr-seed1"):
            shutil.copytree(results / suite / "runs" / run, tmp_path / suite / "runs" / run)
    meta = json.loads((tmp_path / "ul2-tiny/compare.json").read_text())
    (tmp_path / "ul2-tiny/compare.json").write_text(json.dumps({**meta, "horizon_of": "clm-tiny"}))
    final = {(suite, run): json.loads((tmp_path / suite / "runs" / run / "summary.json").read_text())["final_val_loss"]
             for suite in ("ul2-tiny", "clm-tiny") for run in ("standard", "standard-seed1", "raptr", "raptr-seed1")}
    change = [(final["ul2-tiny", f"raptr{s}"] - final["ul2-tiny", f"standard{s}"])
              - (final["clm-tiny", f"raptr{s}"] - final["clm-tiny", f"standard{s}"]) for s in ("", "-seed1")]
    mean, half = sum(change) / 2, 12.7062 * abs(change[0] - change[1]) / math.sqrt(2) / math.sqrt(2)
    hz = build_evidence(tmp_path / "ul2-tiny")["horizon"]
    assert hz["suite"] == "clm-tiny" and hz["steps"] == 1000
    row = next(h for h in hz["comparisons"] if h["arm"] == "raptr" and h["against"] == "standard")
    assert row["n"] == 2 and row["mean_change"] == pytest.approx(mean)
    assert row["ci95"] == pytest.approx([mean - half, mean + half])
    assert row["gap_there"] == pytest.approx(sum(final["clm-tiny", f"raptr{s}"] - final["clm-tiny", f"standard{s}"]
                                                 for s in ("", "-seed1")) / 2)
    (tmp_path / "ul2-tiny/compare.json").write_text(json.dumps({**meta, "horizon_of": "clm-tiny-4000"}))
    hz = build_evidence(tmp_path / "ul2-tiny")["horizon"]
    assert hz["comparisons"] == [] and "no suite 'clm-tiny-4000'" in hz["note"]


def test_every_committed_run_is_what_its_suite_resolves_to_today():
    """A changed default (e.g. RaPTr's schedule) must not change what a committed suite means: every
    run under docs/results resolves, from its suite file and today's defaults, to the config it logged
    (a FLOP-matched arm's step count comes from its target's FLOPs, so only that may differ)."""
    from raptr.experiments.compare import _numerics, arm_overrides, load_compare_config, parse_label
    from raptr.training.config import RunConfig, from_dict

    root = Path(__file__).resolve().parent.parent / "docs" / "results"
    checked = 0
    for suite_dir in sorted(p for p in root.iterdir() if (p / "compare.json").is_file()):
        cfg = load_compare_config(f"compare/{suite_dir.name}")
        arms = {a.name: a for a in cfg.arms}
        for run in sorted((suite_dir / "runs").iterdir()):
            arm, seed = parse_label(run.name, cfg)
            ours = _numerics(load_config(cfg.base, arm_overrides(cfg, arms[arm], seed, suite_dir)))
            logged = _numerics(from_dict(RunConfig, json.loads((run / "config.json").read_text())))
            if arms[arm].match_flops_of:
                ours.pop("train.steps"), logged.pop("train.steps")
            assert ours == logged, (suite_dir.name, run.name, {k: (ours.get(k), logged.get(k)) for k in set(ours) | set(logged)
                                                               if ours.get(k) != logged.get(k)})
            checked += 1
    assert checked >= 60, checked
