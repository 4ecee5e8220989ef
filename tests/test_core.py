"""RaPTr core: schedules, path sampling, scaling and its errors."""

import math
import subprocess
import sys

import pytest
import torch

from raptr.core import PathSampler, RaPTr, Schedule, branch_scale, keep_prob_for_path
from raptr.errors import RaptrError
from raptr.models import TransformerConfig, TransformerLM


def test_paper_schedule_keep_probs_and_flops():
    s = Schedule.parse("6-8-10-12", num_layers=12, total_steps=1000)
    assert [round(st.keep_prob, 6) for st in s.stages] == [0.4, 0.6, 0.8, 1.0]
    assert [st.steps for st in s.stages] == [250, 250, 250, 250]
    assert s.relative_layer_flops() == pytest.approx(0.75)  # the paper's 1.33x
    assert s.boundaries == [250, 500, 750]
    assert s.stage_at(249).index == 0 and s.stage_at(250).index == 1 and s.stage_at(999).index == 3
    assert s.stage_at(5000).index == 3  # past the end: keep the last stage


def test_path_length_conversion_is_an_option():
    counted = Schedule.parse("6-8-10-12", 12, 100, count_fixed=True)
    not_counted = Schedule.parse("6-8-10-12", 12, 100, count_fixed=False)
    assert counted.stages[0].keep_prob == pytest.approx(0.4)
    assert not_counted.stages[0].keep_prob == pytest.approx(0.5)
    assert not_counted.stages[0].path_length == pytest.approx(2 + 0.5 * 10)
    assert keep_prob_for_path(12, 12, 2, True) == 1.0


def test_stage_lengths_prop_fractions_steps_and_warmup():
    prop = Schedule.parse("12-16-20-24", 24, 1000, stage_lengths="prop:1")
    assert [st.steps for st in prop.stages] == [100, 200, 300, 400]
    assert prop.relative_layer_flops() == pytest.approx(20 / 24)  # UL2's 1.2x arithmetic
    explicit = Schedule.parse("6-8-10-12", 12, 1000, stage_lengths="100,200,300,400")
    assert [st.steps for st in explicit.stages] == [100, 200, 300, 400]
    fractions = Schedule.parse("6-12", 12, 1000, stage_lengths="0.25,0.75")
    assert [st.steps for st in fractions.stages] == [250, 750]
    warm = Schedule.parse("6-8-10-12", 12, 1000, full_warmup=0.2)
    assert warm.stages[0].keep_prob == 1.0 and warm.stages[0].steps == 200
    assert sum(st.steps for st in warm.stages) == 1000 and len(warm.stages) == 5
    probs = Schedule.parse("p:0.5-1", 12, 10)
    assert [st.keep_prob for st in probs.stages] == [0.5, 1.0]


def test_depth_fractions_and_the_default_schedule():
    """f:0.25-0.5-0.75-1 is 3-6-9-12 on 12 layers (the same keep probabilities, bit for bit) and scales
    with depth; RaPTr's default is that with Prop-1 stage lengths, 0.75x the layer FLOPs."""
    from raptr.methods.raptr import RaPTrOptions, build_schedule

    frac, lengths = Schedule.parse("f:0.25-0.5-0.75-1", 12, 1000), Schedule.parse("3-6-9-12", 12, 1000)
    assert [st.keep_prob for st in frac.stages] == [st.keep_prob for st in lengths.stages] == pytest.approx([0.1, 0.4, 0.7, 1.0])
    assert [st.path_length for st in Schedule.parse("f:0.25-0.5-0.75-1", 32, 100).stages] == [8, 16, 24, 32]
    default = RaPTrOptions()
    assert (default.schedule, default.stage_lengths) == ("f:0.25-0.5-0.75-1", "prop:1")
    on12 = build_schedule(default, 12, 1000)
    assert [st.steps for st in on12.stages] == [100, 200, 300, 400]
    assert [st.path_length for st in on12.stages] == [3, 6, 9, 12]
    assert on12.relative_layer_flops() == pytest.approx(0.75)
    with pytest.raises(RaptrError, match=r"path length 1\.5 .* \(of 6 layers\) .*raptr plan --layers 6 --target 0\.75"):
        build_schedule(default, 6, 100)  # too shallow for the default: one line that says what to do
    for bad in ("f:0-1", "f:0.5-2"):
        with pytest.raises(RaptrError, match="depth fractions"):
            Schedule.parse(bad, 12, 100)


def test_presets_use_the_default_and_keep_the_papers_schedule_by_name():
    from raptr.training.config import load_config

    for preset in ("bert-tiny-raptr", "bert-base-raptr", "ul2-tiny-raptr"):
        r = load_config(preset).method.raptr
        assert (r.schedule, r.stage_lengths) == ("f:0.25-0.5-0.75-1", "prop:1"), preset
    for preset in ("bert-tiny-raptr-paper", "bert-base-raptr-paper"):
        r = load_config(preset).method.raptr
        assert (r.schedule, r.stage_lengths) == ("6-8-10-12", "equal"), preset


def test_plan_shows_the_default_and_ranks_prop1_first(capsys):
    from raptr.cli import main

    assert main(["plan", "--layers", "32", "--steps", "100"]) == 0
    out = capsys.readouterr().out
    assert "prop:1 stages" in out and "24.00" in out and "0.7500" in out
    assert main(["plan", "--layers", "12", "--target", "0.75", "--top", "3"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "0.75" in line and "│" in line]
    assert "3-6-9-12" in rows[0] and "prop:1" in rows[0], rows
    assert main(["plan", "--layers", "12", "--target", "0.75", "--stages", "equal"]) == 0
    assert "prop:1" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "spec, kwargs, message",
    [
        ("8-6-12", {}, "decreases"),
        ("6-8-14", {}, "exceeds the model's 12 layers"),
        ("1-6-12", {}, "not more than the 2 fixed layers"),
        ("p:0-1", {}, "outside (0, 1]"),
        ("p:0.5-1.5", {}, "outside (0, 1]"),
        ("6-8-10", {}, "not the full model"),
        ("6-x-12", {}, "cannot read schedule"),
        ("6-12", {"stage_lengths": "weird"}, "unknown stage lengths"),
        ("6-12", {"stage_lengths": "1,2,3"}, "3 stage lengths given for 2 stages"),
        ("6-12", {"fixed": "middle"}, "unknown fixed-layer option"),
        ("6-12", {"fixed": "0,40"}, "outside 0..11"),
        ("", {}, "empty schedule"),
    ],
)
def test_schedule_errors_are_one_clear_line(spec, kwargs, message):
    with pytest.raises(RaptrError) as info:
        Schedule.parse(spec, 12, 100, **kwargs)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_sampling_and_scaling_options():
    with pytest.raises(RaptrError, match="unknown sampling"):
        PathSampler(12, (0, 11), mode="gaussian")
    with pytest.raises(RaptrError, match="unknown scaling"):
        branch_scale(0.5, "cube")
    with pytest.raises(RaptrError, match="too few"):
        Schedule.parse("6-8-10-12", 12, 3)


def test_partial_final_stage_when_asked():
    s = Schedule.parse("6-8-10", 12, 90, require_full_final=False)
    assert s.stages[-1].keep_prob == pytest.approx(0.8)


def test_fixed_layers_always_run_and_full_stage_runs_everything():
    sampler = PathSampler(12, (0, 11), seed=3)
    for step in range(200):
        path = sampler.sample(step, 0.3)
        assert path[0] and path[11]
    assert all(sampler.sample(7, 1.0))


def test_bernoulli_statistics():
    sampler = PathSampler(12, (0, 11), seed=0, mode="bernoulli")
    n, p = 4000, 0.4
    counts = torch.zeros(12)
    for step in range(n):
        counts += torch.tensor(sampler.sample(step, p), dtype=torch.float)
    freq = counts[1:11] / n
    # each free layer kept with prob p: 4 sigma of a binomial proportion
    assert torch.all((freq - p).abs() < 4 * math.sqrt(p * (1 - p) / n)), freq
    lengths = [sum(sampler.sample(step, p)) for step in range(n)]
    assert len(set(lengths)) > 4  # the path length itself is random under Bernoulli
    assert sum(lengths) / n == pytest.approx(2 + p * 10, abs=0.1)


def test_uniform_fixed_size_statistics():
    sampler = PathSampler(12, (0, 11), seed=1, mode="uniform")
    n = 3000
    lengths = [sum(sampler.sample(step, 0.45)) for step in range(n)]  # 4.5 free layers on average
    assert set(lengths) == {6, 7}  # fixed size: floor or ceil of the target
    assert sum(lengths) / n == pytest.approx(2 + 4.5, abs=0.06)
    counts = torch.zeros(12)
    for step in range(n):
        counts += torch.tensor(sampler.sample(step, 0.4), dtype=torch.float)
    assert torch.all((counts[1:11] / n - 0.4).abs() < 0.04)  # uniform over layers
    assert {sum(sampler.sample(s, 0.4)) for s in range(50)} == {6}  # 0.4*10 = 4 exactly


def test_paths_depend_only_on_seed_and_step():
    a, b = PathSampler(12, (0, 11), seed=5), PathSampler(12, (0, 11), seed=5)
    assert [a.sample(s, 0.5) for s in range(30)] == [b.sample(s, 0.5) for s in range(30)]
    assert a.sample(10, 0.5) == a.sample(10, 0.5)  # order and repetition don't matter
    c = PathSampler(12, (0, 11), seed=6)
    assert [a.sample(s, 0.5) for s in range(30)] != [c.sample(s, 0.5) for s in range(30)]


def test_sampler_determinism_across_two_processes():
    code = ("from raptr.core import PathSampler; s = PathSampler(24, (0, 23), seed=11); "
            "print([''.join('1' if x else '0' for x in s.sample(t, 0.5)) for t in range(40)])")
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in range(2)]
    local = PathSampler(24, (0, 23), seed=11)
    assert outs[0] == outs[1] == str([''.join('1' if x else '0' for x in local.sample(t, 0.5)) for t in range(40)]) + "\n"


def test_sampler_state_dict_round_trip_and_mismatch():
    s = PathSampler(12, (0, 11), seed=9, mode="uniform")
    t = PathSampler(12, (0, 11), seed=9, mode="uniform")
    t.load_state_dict(s.state_dict())
    assert [t.sample(k, 0.5) for k in range(10)] == [s.sample(k, 0.5) for k in range(10)]
    with pytest.raises(RaptrError, match="resume with the same model"):
        PathSampler(6, (0, 5)).load_state_dict(s.state_dict())
    # One resume rule: another seed or sampling mode is refused, never silently adopted.
    with pytest.raises(RaptrError, match="seed 9, uniform sampling; this run has 12, fixed \\[0, 11\\], seed 0"):
        PathSampler(12, (0, 11), seed=0, mode="uniform").load_state_dict(s.state_dict())
    with pytest.raises(RaptrError, match="bernoulli"):
        PathSampler(12, (0, 11), seed=9).load_state_dict(s.state_dict())


def test_branch_scales():
    assert branch_scale(0.25, "none") == 1.0
    assert branch_scale(0.25, "sqrt") == pytest.approx(2.0)
    assert branch_scale(0.25, "linear") == pytest.approx(4.0)
    assert branch_scale(1.0, "linear") == 1.0


def _tiny(layers=6, causal=False):
    torch.manual_seed(0)
    return TransformerLM(TransformerConfig(vocab_size=97, d_model=32, n_layers=layers, n_heads=2, d_ff=64,
                                           max_seq_len=16, causal=causal))


def test_scaling_applies_to_the_residual_branch_of_kept_free_layers_only():
    model = _tiny(layers=4)
    ids = torch.randint(0, 97, (2, 16))
    # reference: y_l = y + a*(f(y) - y) computed by hand, layer by layer
    scale = 1 / math.sqrt(0.5)
    x = model.tok(ids) + model.pos(torch.arange(16))
    for i, block in enumerate(model.blocks):
        out = block(x)
        x = out if i in (0, 3) else x + scale * (out - x)
    expected = model.head(model.ln_f(x))
    schedule = Schedule.parse("p:0.5-1", 4, 10)
    raptr = RaPTr(model.blocks, schedule, seed=0, scaling="sqrt")
    model.train()
    raptr.gates.set_path([True] * 4, [1.0, scale, scale, 1.0])
    torch.testing.assert_close(model(ids), expected)
    model.eval()  # evaluation: full model, unscaled
    plain = _tiny(layers=4).eval()
    torch.testing.assert_close(model(ids), plain(ids))


def test_raptr_step_sets_the_sampled_path_and_state_round_trips():
    model = _tiny()
    schedule = Schedule.parse("3-4-6", 6, 30)
    raptr = RaPTr(model.blocks, schedule, seed=4, scaling="linear")
    plan = raptr.step(3)
    assert [layer._gate_run for layer in model.blocks] == list(plan.active)
    assert plan.scale == pytest.approx(1 / plan.keep_prob)
    other = RaPTr(_tiny().blocks, Schedule.parse("3-4-6", 6, 30), seed=4, scaling="linear")
    other.load_state_dict(raptr.state_dict())
    assert other.plan(17) == raptr.plan(17)
    with pytest.raises(RaptrError, match="scaling='linear', this run has 'none'"):
        RaPTr(_tiny().blocks, Schedule.parse("3-4-6", 6, 30), seed=4).load_state_dict(raptr.state_dict())
    with pytest.raises(RaptrError, match="different RaPTr schedule"):
        RaPTr(_tiny().blocks, Schedule.parse("3-4-6", 6, 60), seed=4).load_state_dict(raptr.state_dict())
    with pytest.raises(RaptrError, match="schedule is for 12 layers"):
        RaPTr(_tiny().blocks, Schedule.parse("6-12", 12, 10))


def test_wrapping_twice_is_refused_and_unwrap_allows_it_again():
    import raptr

    model = TransformerLM(TransformerConfig(vocab_size=97, d_model=32, n_layers=4, n_heads=2, d_ff=64, max_seq_len=16))
    first = raptr.wrap(model, schedule="3-4", total_steps=10)
    with pytest.raises(RaptrError, match="already wrapped by raptr"):
        raptr.wrap(model, schedule="3-4", total_steps=10)
    first.gates.unwrap()
    raptr.wrap(model, schedule="3-4", total_steps=10)  # fine once unwrapped


# ------------------------------------------------------------------------------------------------
# A wrapped model saves like a model; a forgotten or negative step is not silent
# ------------------------------------------------------------------------------------------------


def _wrapped_gpt2():
    import transformers as tf

    import raptr

    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                             bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    rp = raptr.wrap(model.train(), schedule="3-4", total_steps=10)
    rp.step(0)
    return model, rp


def test_torch_save_pickle_and_deepcopy_of_a_wrapped_model_keep_weights_gates_and_path(tmp_path):
    import copy
    import pickle

    from raptr.core import LayerGate

    model, rp = _wrapped_gpt2()
    path = [layer._gate_run for layer in model.transformer.h]
    assert not all(path)  # a partial path at step 0
    torch.save(model, tmp_path / "model.pt")
    copies = [torch.load(tmp_path / "model.pt", weights_only=False), pickle.loads(pickle.dumps(model)), copy.deepcopy(model)]
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    want = model(input_ids=ids, labels=ids).loss
    for other in copies:
        layers = other.transformer.h
        assert all(isinstance(layer, LayerGate) for layer in layers)
        assert [layer._gate_run for layer in layers] == path
        assert torch.equal(other(input_ids=ids, labels=ids).loss, want)  # same weights, same partial path
        assert layers[0].__dict__["_gate_stack"] is layers[-1].__dict__["_gate_stack"]  # still one stack


def test_training_forward_before_any_step_warns_once_and_negative_steps_are_refused():
    import warnings

    import transformers as tf

    import raptr

    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                             bos_token_id=0, eos_token_id=0)).train()
    rp = raptr.wrap(model, schedule="3-4", total_steps=10)
    ids = torch.randint(0, 64, (2, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(input_ids=ids)
        model(input_ids=ids)
    assert [str(w.message) for w in caught if "rp.step" in str(w.message)] == [
        "raptr: a wrapped model ran a training forward before any path was set, so it trains the full model: "
        "call rp.step(step) before each optimizer step"]
    for bad in (-1, "3", 1.5):
        with pytest.raises(RaptrError, match="step must be an integer >= 0"):
            rp.step(bad)
    rp.step(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(input_ids=ids)
    assert not [w for w in caught if "rp.step" in str(w.message)]


def test_a_model_without_config_is_found_or_told_a_fix_that_works():
    from torch import nn

    import raptr
    from raptr.models.registry import REGISTRY

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return x + self.fc(x)

    class Net(nn.Module):  # plain PyTorch: no .config, one list of same-class blocks
        def __init__(self, heads: bool = False):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(6))
            if heads:  # a second list of blocks makes the choice ambiguous
                self.heads = nn.ModuleList(Block() for _ in range(2))

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x.sum()

    rp = raptr.wrap(Net(), schedule="4-6", total_steps=10)
    assert len(rp.gates) == 6

    with pytest.raises(RaptrError) as e:
        raptr.wrap(Net(heads=True), schedule="4-6", total_steps=10)
    assert "raptr.register_layer_stack('Net', 'path.to.layers')" in str(e.value)
    raptr.register_layer_stack("Net", "blocks")  # the advice, followed
    try:
        model = Net(heads=True)
        rp = raptr.wrap(model, schedule="4-6", total_steps=10)
        assert list(rp.gates.layers) == list(model.blocks)
    finally:
        REGISTRY.pop("Net")
