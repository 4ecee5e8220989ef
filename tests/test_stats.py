"""The statistics behind every verdict, against values computed by hand."""

import math

import pytest

from raptr.experiments.stats import equivalence, first_crossing, interpolate, mean_std, paired_difference, t975, verdict


def test_paired_difference_and_t_interval_by_hand():
    # diffs 0.5, 1.0, 1.0: mean 5/6; sample std sqrt(((-1/3)^2 + 2 (1/6)^2) / 2) = sqrt(1/12);
    # half-width t_{0.975, 2} * std / sqrt(3) = 4.3027 * sqrt(1/12) / sqrt(3) = 4.3027 / 6.
    d = paired_difference({0: 1.0, 1: 2.0, 2: 3.0, 7: 9.0}, {0: 0.5, 1: 1.0, 2: 2.0})
    assert d["n"] == 3 and d["seeds"] == [0, 1, 2]  # seed 7 has no partner
    assert d["mean_diff"] == pytest.approx(5 / 6)
    assert d["std"] == pytest.approx(math.sqrt(1 / 12))
    assert d["half_width"] == pytest.approx(4.3027 / 6)
    assert d["ci95"] == pytest.approx([5 / 6 - 4.3027 / 6, 5 / 6 + 4.3027 / 6])
    assert verdict(d) == "worse" and equivalence(d)["equivalent"] is False


def test_verdicts_from_the_interval():
    better = paired_difference({0: 1.00, 1: 1.01, 2: 1.02}, {0: 1.10, 1: 1.10, 2: 1.13})  # diffs -.10 -.09 -.11
    assert better["ci95"][1] < 0 and verdict(better) == "better"
    unclear = paired_difference({0: 1.0, 1: 1.2}, {0: 1.1, 1: 1.1})  # diffs -0.1, +0.1: mean 0, std 0.1414
    assert unclear["mean_diff"] == pytest.approx(0.0)
    assert unclear["half_width"] == pytest.approx(12.7062 * math.sqrt(0.02) / math.sqrt(2))
    assert verdict(unclear).startswith("no detectable difference (±1.271)") and not equivalence(unclear)["equivalent"]
    one = paired_difference({0: 1.0}, {0: 2.0})
    assert one["mean_diff"] == -1.0 and one["ci95"] is None and verdict(one) == "one seed: no interval"
    assert verdict(paired_difference({0: 1.0}, {1: 1.0})) == "no paired runs"


def test_t_quantiles_and_mean_std():
    assert t975(1) == 12.7062 and t975(2) == 4.3027 and t975(30) == 2.0423
    assert t975(22) == t975(20)  # between tabled values: the next lower df (a slightly wider interval)
    assert t975(1000) == 1.96
    with pytest.raises(ValueError):
        t975(0)
    assert mean_std([2.0, 4.0, 6.0]) == (4.0, 2.0)
    assert mean_std([3.0]) == (3.0, None)


def test_time_to_target_interpolation():
    flops, losses = [0.0, 10.0, 20.0, 30.0], [5.0, 4.0, 3.0, 2.0]
    assert first_crossing(flops, losses, 3.5) == pytest.approx(15.0)  # halfway between 4.0 and 3.0
    assert first_crossing(flops, losses, 3.0) == pytest.approx(20.0)
    assert first_crossing(flops, losses, 2.25) == pytest.approx(27.5)
    assert first_crossing(flops, losses, 6.0) == 0.0  # already there at the start
    assert first_crossing(flops, losses, 1.0) is None  # never reached
    # the first crossing counts, even if the loss rises again afterwards
    assert first_crossing([0, 1, 2, 3], [3.0, 1.0, 2.5, 0.5], 2.0) == pytest.approx(0.5)
    assert interpolate([0, 10, 20], [1.0, 2.0, 4.0], 15) == pytest.approx(3.0)
    assert interpolate([0, 10], [1.0, 2.0], 11) is None and interpolate([0, 10], [1.0, 2.0], 10) == 2.0


def test_calibrated_seconds_price_each_logged_step_by_its_layers(tmp_path):
    """The quiet step-cost table prices every logged step of a committed run by the layers it ran; with a
    cost of k seconds for k layers the calibrated total is the run's logged layer passes. A width run (all
    layers, fewer heads/units) is not in the table, so it gets no calibrated seconds."""
    import json
    import shutil
    from pathlib import Path

    from raptr.experiments.report import load_runs

    src = Path(__file__).resolve().parents[1] / "docs/results/bert-tiny/runs"
    for name in ("raptr", "width"):
        shutil.copytree(src / name, tmp_path / "runs" / name, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    (tmp_path / "step_cost.json").write_text(json.dumps({"layers": list(range(1, 13)), "seconds": list(range(1, 13))}))
    runs = {r.label: r for r in load_runs(tmp_path, None)}
    raptr, width = runs["raptr"], runs["width"]
    last = raptr.train[-1]
    assert raptr.calibrated[last["step"]] == pytest.approx(last["layer_passes"])
    assert 0.5 * 12 * last["step"] < last["layer_passes"] < 12 * last["step"]  # a real partial-path run
    mid = raptr.train[len(raptr.train) // 2]
    assert raptr.calibrated[mid["step"]] == pytest.approx(mid["layer_passes"])
    assert width.calibrated == {}


def test_equivalence_is_a_two_one_sided_test_by_hand():
    from raptr.experiments.stats import seeds_needed, t95

    # diffs +0.010, -0.010, +0.015: mean 0.005
    d = paired_difference({0: 1.010, 1: 0.990, 2: 1.015}, {0: 1.0, 1: 1.0, 2: 1.0})
    mean = 0.015 / 3  # (0.010 - 0.010 + 0.015) / 3
    sd = math.sqrt(((0.010 - mean) ** 2 + (-0.010 - mean) ** 2 + (0.015 - mean) ** 2) / 2)
    half90 = 2.9200 * sd / math.sqrt(3)  # t_{0.95, 2}
    eq = equivalence(d)
    assert eq["ci90"] == pytest.approx([mean - half90, mean + half90])
    assert eq["equivalent"] is (mean + half90 < 0.03)  # 0.005 + 0.0223 = 0.0273 < 0.03: equivalent
    assert eq["equivalent"] and verdict(d).startswith("no detectable difference")  # the 95% interval holds 0
    assert equivalence(d, margin=0.02)["equivalent"] is False
    # the ul2-tiny case: a 95% interval reaching +0.033 can still pass a TOST at ±0.03 (90% inside)
    assert t95(1) == 6.3138 and t95(2) == 2.92 and t95(22) == t95(20) and t95(1000) == 1.6449
    assert equivalence(paired_difference({0: 1.0}, {0: 1.0}))["equivalent"] is None  # one seed: no test
    # seeds a TOST would need at the measured mean and sd: |mean| + t95(n-1) sd / sqrt(n) < margin
    # mean 0.01, sd 0.02: n=5 gives 0.01 + 2.1318 * 0.02 / sqrt(5) = 0.02907 < 0.03; n=4: 0.01 + 2.3534 * 0.01 = 0.03353
    assert seeds_needed({"mean_diff": 0.01, "std": 0.02}) == 5
    assert seeds_needed({"mean_diff": -0.03, "std": 0.001}) is None  # the mean itself is at the margin
    assert seeds_needed({"mean_diff": 0.0, "std": None}) is None
    assert seeds_needed({"mean_diff": 0.0, "std": 2.0}) is None  # beyond 1000 seeds


def test_transition_spike_test_by_hand():
    from raptr.experiments.report import transition_excess

    rows = [  # seed 0: excesses +0.02 and +0.04 (mean +0.03); seed 1: +0.01 (one boundary with a baseline)
        {"arm": "raptr", "seed": 0, "change": 0.05, "baseline_change": 0.03},
        {"arm": "raptr", "seed": 0, "change": 0.00, "baseline_change": -0.04},
        {"arm": "raptr", "seed": 1, "change": -0.01, "baseline_change": -0.02},
        {"arm": "raptr", "seed": 1, "change": 0.50, "baseline_change": None},
        {"arm": "raptr", "seed": 1, "change": 0.30, "baseline_change": 0.0, "subnetwork": "shrinks"},  # a warm-up's end: left out
        {"arm": "stacking", "seed": 0, "change": 0.10, "baseline_change": 0.0},
    ]
    raptr, stacking = transition_excess(rows)
    # diffs 0.03, 0.01: mean 0.02, sd sqrt(2) * 0.01, half-width 12.7062 * 0.01
    assert raptr["n"] == 2 and raptr["mean_diff"] == pytest.approx(0.02)
    assert raptr["ci95"] == pytest.approx([0.02 - 0.127062, 0.02 + 0.127062])
    assert raptr["verdict"].startswith("no detectable difference")
    assert stacking["n"] == 1 and stacking["ci95"] is None and stacking["verdict"] == "one seed: no interval"
    spike = transition_excess([{"arm": "a", "seed": s, "change": 0.1 + s / 100, "baseline_change": 0.0} for s in range(3)])
    assert spike[0]["verdict"] == "spike"


def test_training_health_by_hand(tmp_path):
    """Largest logged (pre-clip) gradient norm, non-finite ones ignored; first eval 0.5 nats below the plateau."""
    import json
    import shutil
    from pathlib import Path

    from raptr.experiments.report import Run, build_evidence, make_report, training_health

    run = Run("r", "raptr", 0, {}, train=[{"grad_norm": 1.5}, {"grad_norm": 7.25}, {"grad_norm": float("nan")}, {"loss": 3.0}],
              eval=[{"step": 0, "val_loss": 8.3}, {"step": 50, "val_loss": 6.30}, {"step": 100, "val_loss": 6.26}])
    assert training_health(run, 6.764) == {"max_grad_norm": 7.25, "plateau_exit_step": 100}  # 6.26 <= 6.264 < 6.30
    assert training_health(run, 6.9)["plateau_exit_step"] == 50  # 6.30 <= 6.4
    assert training_health(run, 6.7)["plateau_exit_step"] is None  # 6.26 > 6.2: never left it
    assert training_health(run, None) == {"max_grad_norm": 7.25, "plateau_exit_step": None}

    # on committed logs: the values in evidence.json are those of each run's own metrics
    src = Path(__file__).resolve().parents[1] / "docs/results/schedules"
    for name in ("standard", "6-8-10-12-nofixed"):
        shutil.copytree(src / "runs" / name, tmp_path / "runs" / name, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    shutil.copy(src / "data.json", tmp_path)
    plateau = json.loads((src / "data.json").read_text())["unigram_val_loss"]
    ev = build_evidence(tmp_path)
    for arm in ev["arms"]:
        rows = [json.loads(line) for line in (tmp_path / "runs" / arm["arm"] / "metrics.jsonl").read_text().splitlines()]
        assert arm["max_grad_norm_per_seed"] == [max(r["grad_norm"] for r in rows if r["kind"] == "train")]
        first = min(r["step"] for r in rows if r["kind"] == "eval" and r["val_loss"] <= plateau - 0.5)
        assert arm["plateau_exit_step_per_seed"] == [first]
    assert "## Training health" in make_report(tmp_path).read_text()


def test_the_comparison_table_says_who_is_ahead_at_equal_flops(capsys, monkeypatch):
    """`raptr compare` ends with a table; on the committed clm-tiny suite RaPTr is ahead of standard
    training at its own FLOPs by 0.029 / 0.036 / 0.033 (seeds 0-2, standard's eval curve interpolated
    at RaPTr's final FLOPs: recomputed here from metrics.jsonl)."""
    import json
    from pathlib import Path

    from raptr.cli import print_comparison
    from raptr.experiments.stats import interpolate

    root = Path(__file__).resolve().parent.parent / "docs" / "results" / "clm-tiny"
    leads = []
    for suffix in ("", "-seed1", "-seed2"):
        def evals(arm):
            rows = [json.loads(line) for line in (root / "runs" / f"{arm}{suffix}" / "metrics.jsonl").read_text().splitlines()]
            return [r for r in rows if r["kind"] == "eval"]
        r, b = evals("raptr"), evals("standard")
        at = interpolate([e["flops"] for e in b], [e["val_loss"] for e in b], r[-1]["flops"])
        leads.append(r[-1]["val_loss"] - at)
    assert [round(x, 3) for x in leads] == [-0.029, -0.036, -0.033]
    ev = json.loads((root / "evidence.json").read_text())
    raptr = next(a for a in ev["arms"] if a["arm"] == "raptr")
    assert raptr["lead_at_equal_flops_per_seed"] == pytest.approx(leads)
    from rich.console import Console

    import raptr.cli

    monkeypatch.setattr(raptr.cli, "console", Console(width=200))  # one table row per line
    print_comparison(root / "evidence.json")
    out = capsys.readouterr().out
    assert f"raptr ahead by {-sum(leads) / 3:.3f}" in out and "One seed" not in out  # 3 seeds: no one-seed caveat
