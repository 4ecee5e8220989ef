"""The committed experiment presets, end to end (slow: `make test-slow`)."""

import pytest

from raptr.experiments.protocol import run

pytestmark = pytest.mark.slow


def test_polynomial_cpu_preset_writes_report_with_verdict(tmp_path):
    report = run("polynomial", tmp_path / "poly", preset="cpu", progress=False).read_text()
    assert "Result at this scale" in report
    assert all((tmp_path / "poly" / name).is_file() for name in ("degree_error_vs_step.png", "results.json"))


def test_stability_cpu_preset_writes_report_with_verdicts(tmp_path):
    report = run("stability", tmp_path / "stab", preset="cpu", progress=False).read_text()
    assert "(a)(i) Linear networks" in report and "(b) Trained RaPTr run" in report
    assert (tmp_path / "stab" / "psi_linear.png").is_file()
