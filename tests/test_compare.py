"""The comparison harness on a tiny real run: every arm, the table, every plot, equal-FLOP budgets."""

import json
import struct

import pytest

from raptr.experiments.compare import load_compare_config, run_compare
from raptr.experiments.report import PLOTS, make_report

TINY = ["model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.n_layers=6", "data.vocab_size=1024",
        "data.seq_len=32", "train.batch_size=4", "train.eval_batches=2", "train.threads=1", "train.steps=60",
        "train.eval_every=15", "train.checkpoint_every=30", "optim.warmup_steps=2", "data.sources=austen"]


@pytest.fixture(scope="module")
def comparison(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("results")
    cfg = load_compare_config("compare/bert-tiny", TINY + [f"data.cache_dir={data_cache}"])
    for arm in cfg.arms:  # the preset's 12-layer schedules, scaled to the 6-layer test model
        arm.set = [s.replace("6-8-10-12", "3-4-5-6").replace("6-9-12", "3-6") for s in arm.set]
    return run_compare(cfg, root, progress=False), cfg


def test_every_arm_ran_and_equal_flop_budgets_agree(comparison):
    root, cfg = comparison
    summaries = {d.name: json.loads((d / "summary.json").read_text()) for d in (root / "runs").iterdir()}
    assert set(summaries) == {"baseline", "baseline-seed1", "raptr", "stacking", "pld", "layerdrop", "baseline-equiflop"}
    raptr, equi = summaries["raptr"], summaries["baseline-equiflop"]
    assert equi["steps"] < raptr["steps"] == 60
    assert equi["flops"] == pytest.approx(raptr["flops"], rel=0.01)  # matched FLOPs within 1%
    assert summaries["raptr"]["relative_flops"] < 0.95 and summaries["stacking"]["relative_flops"] < 0.95


def test_report_has_table_spread_and_every_plot(comparison):
    root, _ = comparison
    report = make_report(root).read_text()
    for name in ("baseline", "raptr", "stacking", "pld", "layerdrop", "baseline-equiflop"):
        assert f"| {name} (" in report
    assert "Seed-to-seed spread of the baseline" in report
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
