"""Every experiment through one protocol: presets + key=value (the `raptr train` parser), run, rebuild, `raptr report`."""

import json
import shutil
from pathlib import Path

import pytest

from raptr.cli import main
from raptr.errors import RaptrError
from raptr.experiments.protocol import EXPERIMENTS, parse, report_dir

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"


def test_every_experiment_has_a_typed_config_and_presets():
    assert set(EXPERIMENTS) == {"polynomial", "stability", "schedules", "probes"}
    for name, exp in EXPERIMENTS.items():
        assert "cpu" in exp.presets(), name
        assert isinstance(parse(name), exp.config)


def test_overrides_go_through_the_train_parser():
    cfg = parse("polynomial", "tiny", ["steps=30", "seeds=0,1", "lr=3e-3", "methods=baseline,raptr"])
    assert (cfg.steps, cfg.seeds, cfg.lr, cfg.methods) == (30, [0, 1], 0.003, ["baseline", "raptr"])
    with pytest.raises(RaptrError, match="unknown config key 'stepz': did you mean 'steps'"):
        parse("polynomial", "tiny", ["stepz=3"])
    with pytest.raises(RaptrError, match="'steps' must be an integer"):
        parse("polynomial", "tiny", ["steps=many"])
    assert parse("probes", "cpu", ["runs=x", "tasks=cloze"]).tasks == ["cloze"]
    # components carry their own typed config: dotted keys reach it, its types and choices are checked
    cfg = parse("polynomial", "tiny", ["network.width=8", "raptr.schedule=2-4", "raptr.scaling=sqrt"])
    assert (cfg.network.width, cfg.network.n_layers, cfg.raptr.schedule, cfg.raptr.stage_lengths) == (8, 4, "2-4", "equal")
    with pytest.raises(RaptrError, match="'raptr.scaling' is 'sqr': use one of none, sqrt, linear"):
        parse("polynomial", "tiny", ["raptr.scaling=sqr"])
    assert parse("stability", "tiny", ["tf_model.d_model=32"]).tf_model.d_model == 32


def test_polynomial_runs_from_the_cli_and_rebuilds_from_its_results(tmp_path):
    out = tmp_path / "poly"
    assert main(["experiment", "polynomial", "--preset", "tiny", "--out", str(out), "steps=16", "eval_every=8"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == "polynomial" and results["config"]["steps"] == 16
    first = (out / "report.md").read_text()
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0  # the same command rebuilds any experiment's report
    assert (out / "report.md").read_text() == first


@pytest.mark.parametrize("name", ["polynomial", "stability"])
def test_committed_results_rebuild_without_recomputing(name, tmp_path):
    shutil.copytree(RESULTS / name, tmp_path / name)
    (tmp_path / name / "report.md").unlink()
    report = report_dir(tmp_path / name)
    assert report.read_text().startswith("#") and (tmp_path / name / "results.json").is_file()


def test_report_of_a_directory_that_is_nothing(tmp_path):
    with pytest.raises(RaptrError):
        report_dir(tmp_path / "missing")
