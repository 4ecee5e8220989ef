"""The math of the polynomial and stability experiments, checked by hand, and their tiny presets end to end."""

import dataclasses
import math

import pytest
import torch

from raptr.errors import RaptrError
from raptr.experiments import polynomial as P
from raptr.experiments import stability as S
from raptr.experiments.protocol import run

PNG = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ Fourier-Walsh projection
def hand_polynomial(x: torch.Tensor) -> torch.Tensor:
    """f = 2 x1 − 0.5 x2 x3 + 0.25 x1 x4 x5 x6 (1-based variables)."""
    return 2 * x[:, 0] - 0.5 * x[:, 1] * x[:, 2] + 0.25 * x[:, 0] * x[:, 3] * x[:, 4] * x[:, 5]


def test_projection_is_exact_on_the_whole_cube():
    x = P.all_inputs(6)
    assert x.shape == (64, 6) and set(x.unique().tolist()) == {-1.0, 1.0}
    monomials = [(0,), (1, 2), (0, 3, 4, 5), (1,), (0, 1), (2, 3, 4)]
    coef = P.fourier_coefficients(hand_polynomial(x), x, monomials)
    assert coef.tolist() == pytest.approx([2.0, -0.5, 0.25, 0.0, 0.0, 0.0], abs=1e-12)


def test_projection_estimates_coefficients_from_samples():
    x = P.sample_inputs(40_000, 10, torch.Generator().manual_seed(0))
    coef = P.fourier_coefficients(hand_polynomial(x), x, [(0,), (1, 2), (0, 3, 4, 5), (7,)])
    assert coef.tolist() == pytest.approx([2.0, -0.5, 0.25, 0.0], abs=0.03)  # noise ~ ‖f‖/√n ≈ 0.01


def test_per_degree_errors_and_off_target_energy_by_hand():
    target = P.Target(6, ((0,), (1, 2), (0, 3, 4, 5)), (2.0, -0.5, 0.25))
    x = P.all_inputs(6)
    assert target(x).tolist() == pytest.approx(hand_polynomial(x).tolist())
    # learned f: degree 1 exact, degree-2 coefficient −0.2 instead of −0.5, degree 4 missing, plus 0.1·x5x6
    f = 2 * x[:, 0] - 0.2 * x[:, 1] * x[:, 2] + 0.1 * x[:, 4] * x[:, 5]
    out = P.projection(f, x, target)
    assert out["coef"] == pytest.approx([2.0, -0.2, 0.0], abs=1e-6)  # f is float32
    assert out["degree_error"] == pytest.approx({1: 0.0, 2: 0.3 / 0.5, 4: 1.0})
    assert out["mse"] == pytest.approx(0.3**2 + 0.25**2 + 0.1**2)  # Parseval
    assert out["off_target"] == pytest.approx(0.1**2)


def test_targets_have_the_asked_degrees_and_structure():
    for structure in P.STRUCTURES:
        cfg = P.make_config("cpu", structure=structure)
        target = P.make_target(cfg)
        assert target.degrees == [1, 2, 3, 4]
        assert all(len(target.of_degree(k)) == cfg.terms_per_degree for k in target.degrees)
        assert len(set(target.monomials)) == len(target.monomials)
        assert [target.coefficients[i] for i in target.of_degree(3)] == [cfg.coefficients[2]] * cfg.terms_per_degree
    stair = P.make_target(P.make_config("cpu", structure="staircase"))
    for k in (2, 3, 4):  # every monomial extends one of the degree below by one variable
        lower = {frozenset(stair.monomials[i]) for i in stair.of_degree(k - 1)}
        assert all(any(low < frozenset(stair.monomials[i]) for low in lower) for i in stair.of_degree(k))


def test_pld_gamma_matches_raptr_flops_and_bad_input_raises():
    cfg = P.make_config("cpu")
    want = P.raptr_schedule(cfg).relative_layer_flops()
    gamma = P.solve_pld_gamma(want, cfg.pld_theta, cfg.network.n_layers, cfg.steps)
    assert P.pld_relative_flops(cfg.pld_theta, gamma, cfg.network.n_layers, cfg.steps) == pytest.approx(want, abs=1e-6)
    with pytest.raises(RaptrError, match="lower pld_theta"):  # 6-8-10-12 (0.75) is below PLD's floor at θ̄ = 0.5
        P.solve_pld_gamma(0.75, 0.5, 12, 1000)
    with pytest.raises(RaptrError, match="unknown polynomial option"):
        P.make_config("cpu", widht=3)
    with pytest.raises(RaptrError, match="unknown polynomial preset"):
        P.make_config("gpu")
    with pytest.raises(RaptrError, match="one coefficient per degree"):
        P.make_config("cpu", coefficients=[1.0])


def test_the_raptr_arm_trains_the_schedule_the_report_states():
    """The RaPTr arm's options are the method's own typed options: the host's schedule is the one the
    report and PLD's γ are computed from (equal stages here, not the library's default stage lengths)."""
    cfg = P.make_config("cpu")
    model = P.ResidualMLP(cfg.d, cfg.network)
    host = P.method_host("raptr", cfg, seed=0, gamma=0.0).attach(model, cfg.steps, layers=model.blocks)
    trained, stated = host.method.raptr.schedule, P.raptr_schedule(cfg)
    assert trained.boundaries == stated.boundaries == [300, 600, 900]
    assert [s.keep_prob for s in trained.stages] == [s.keep_prob for s in stated.stages]
    host.detach()


# ------------------------------------------------------------------------------ Ψ
def test_psi_of_blocks_that_add_nothing_is_zero():
    x = torch.randn(5, 7)
    per = S.stability([lambda y: y + 0 * y for _ in range(4)], x)
    assert set(per) == {0, 1, 2, 3} and all(v["psi"] == 0.0 and v["psi_ratio"] == 0.0 for v in per.values())


def test_psi_of_doubling_blocks_by_hand():
    x = torch.randn(6, 5)
    per = S.stability([lambda y: 2 * y], x)
    assert per[0]["psi"] == pytest.approx(0.5)  # ‖2x − x‖ / ‖2x‖
    per = S.stability([lambda y: 2 * y, lambda y: 3 * y], x)
    assert per[0]["psi"] == pytest.approx(3 / 6)  # F = 6x, F_{−1} = 3x
    assert per[1]["psi"] == pytest.approx(4 / 6)  # F_{−2} = 2x
    assert S.mean_psi(per) == pytest.approx((0.5 + 4 / 6) / 2)
    # an output map applies to both networks: LN(6x) = LN(3x), so Ψ on LN outputs is 0
    assert S.mean_psi(S.stability([lambda y: 2 * y, lambda y: 3 * y], x, S._ln)) == pytest.approx(0.0, abs=1e-4)  # up to LN eps


def test_linear_psi_res_ln_decays_and_ln_without_residual_sits_near_sqrt2():
    res_ln = [S.linear_psi("res+LN", L, dim=64, inputs=16, draws=2)["psi"] for L in (2, 8, 32)]
    assert res_ln[0] > res_ln[1] > res_ln[2]
    ln_only = S.linear_psi("LN, no res", 8, dim=64, inputs=16, draws=2)["psi"]
    assert abs(ln_only - math.sqrt(2)) < 0.2  # skipping any layer decorrelates the output
    assert S.loglog_slope([1, 4, 16], [1, 0.5, 0.25]) == pytest.approx(-0.5)
    assert S.skip_indices(128, 32)[0] == 0 and S.skip_indices(128, 32)[-1] == 127 and len(S.skip_indices(128, 32)) == 32


def test_loss_jumps_from_a_hand_written_log():
    losses = [5, 4, 3, 3, 9, 9, 1, 1]  # stage 0 for steps 1-4, stage 1 after
    rows = [{"kind": "train", "step": i + 1, "loss": v, "stage": int(i >= 4)} for i, v in enumerate(losses)]
    (jump,) = S.loss_jumps(rows + [{"kind": "eval", "step": 4}], window=2)
    assert (jump["step"], jump["before"], jump["after"], jump["jump"]) == (4, 3, 9, 6)
    # inside-stage windows: (3 − 4.5) in stage 0 and (1 − 9) in stage 1
    assert (jump["trend_mean"], jump["trend_std"]) == pytest.approx((-4.75, 3.25))
    assert S.transition_verdict([{"step": 4, "p_ended": 0.5, "full": 2.0, "sub_ended": [3.0, 3.0],
                                  "p_next": 1.0, "sub_next": [2.0]}], [])[0] == "reproduced"
    assert S.transition_verdict([{"step": 4, "p_ended": 0.5, "full": 4.0, "sub_ended": [3.0],
                                  "p_next": 1.0, "sub_next": [4.0]}], [])[0] == "not reproduced"


def test_stability_bad_input_raises():
    with pytest.raises(RaptrError, match="at least two positive depths"):
        S.make_config("cpu", linear_depths=[4])
    with pytest.raises(RaptrError, match="unknown stability option"):
        S.make_config("cpu", depth=3)
    model = S.StabilityConfig().tf_model
    with pytest.raises(RaptrError, match="tf_model.n_layers is set by tf_depths"):
        S.make_config("cpu", tf_model=dataclasses.replace(model, n_layers=4))
    with pytest.raises(RaptrError, match="tf_model.d_model=64 is not divisible by tf_model.n_heads=3"):
        S.make_config("cpu", tf_model=dataclasses.replace(model, n_heads=3))
    with pytest.raises(RaptrError, match="unknown architecture"):
        S.linear_network("res", 2, 4, torch.Generator())


# ------------------------------------------------------------------------------ tiny presets end to end
def _check_outputs(out, report, names):
    assert report == out / "report.md" and report.read_text().startswith("# ")
    text = report.read_text()
    for name in names:
        assert (out / name).read_bytes()[:8] == PNG, name
        assert f"]({name})" in text


def test_polynomial_tiny_preset_end_to_end(tmp_path):
    report = run("polynomial", tmp_path / "poly", preset="tiny", progress=False)
    _check_outputs(tmp_path / "poly", report, ["degree_error_vs_step.png", "mse_vs_step.png",
                                               "final_coefficients.png", "layers_per_step.png"])
    text = report.read_text()
    assert "| baseline | 0 |" in text and "| pld | 0 |" in text and "| raptr | 0 |" in text
    assert "Result at this scale:" in text


def test_stability_tiny_preset_end_to_end(tmp_path, data_cache):
    report = run("stability", tmp_path / "stab", preset="tiny", overrides=[f"cache_dir={data_cache}"], progress=False)
    _check_outputs(tmp_path / "stab", report, ["psi_linear.png", "psi_transformer.png", "transitions.png"])
    text = report.read_text()
    assert "## (b) Loss at the stage transitions" in text and "| 6 | 0.50 → 1.00 |" in text
