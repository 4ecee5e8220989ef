"""Baseline methods on real models: gradual stacking / MIDAS, PLD, LayerDrop.

Every test trains for real (forward, backward, AdamW) on tiny reference or Hugging Face models.
"""

import copy
import math

import pytest
import torch

from raptr.core import Schedule
from raptr.errors import RaptrError
from raptr.methods import GradualStacking, LayerDrop, ProgressiveLayerDrop, keep_prob_for_flops
from raptr.methods.base import TrainingContext, decay_groups
from raptr.methods.stacking import growth_plan, parse_depths
from raptr.models import TransformerConfig, TransformerLM, find_layer_stack
from raptr.models.hf import HFLanguageModel, build_hf_model
from raptr.methods.layerdrop import LayerDropOptions
from raptr.methods.pld import PLDOptions
from raptr.methods.stacking import StackingOptions
from raptr.training.config import OptimConfig
from raptr.training.trainer import make_optimizer

VOCAB, SEQ = 64, 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is fastest and fair to a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_lm(n_layers=6, seed=0):
    torch.manual_seed(seed)
    return TransformerLM(TransformerConfig(vocab_size=VOCAB, d_model=16, n_layers=n_layers, n_heads=2, d_ff=32,
                                           max_seq_len=SEQ, causal=False))


def tiny_hf(arch, n_layers=4, seed=0):
    torch.manual_seed(seed)
    return HFLanguageModel(build_hf_model(arch, VOCAB, 16, n_layers, 2, 32, SEQ))


def tokens(step):
    return torch.randint(1, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1000 + step))


def attach(method, model, total_steps, seed=0, optimizer=True):
    context = TrainingContext(model, find_layer_stack(model), total_steps, seed)
    method.attach(context)
    if optimizer:  # as the trainer does: the optimizer is built after attach
        context.optimizer = make_optimizer(model, OptimConfig(lr=1e-2))
    return context


def train_step(context, method, step):
    """One trainer step: begin_step, forward, backward, AdamW step, zero_grad(set_to_none)."""
    info = method.begin_step(step)
    for group in context.optimizer.param_groups:
        group["lr"] = 1e-2 * info.lr_factor
    x = tokens(step)
    loss = context.model(x, labels=x)
    loss.backward()
    context.optimizer.step()
    context.optimizer.zero_grad(set_to_none=True)
    return info, loss.item()


def param_ids(params):
    return [id(p) for p in params]


def assert_groups_in_model_order(model, optimizer):
    decay, no_decay = decay_groups(model)
    assert param_ids(optimizer.param_groups[0]["params"]) == param_ids(decay)
    assert param_ids(optimizer.param_groups[1]["params"]) == param_ids(no_decay)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ------------------------------------------------------------------------------------ stacking


def test_depth_schedule_parsing_and_growth_plans():
    assert parse_depths("6-9-12") == [6, 9, 12] and parse_depths("2,4") == [2, 4]
    for bad in ("6-6-12", "9-6", "0-4", "a-b", ""):
        with pytest.raises(RaptrError):
            parse_depths(bad)
    assert growth_plan(6, 9, "top") == [(3, 3, 6)]  # copy layers 3-5 onto the top
    assert growth_plan(2, 6, "top") == [(0, 2, 2), (2, 2, 4)]  # larger than the stack: in steps
    assert growth_plan(9, 12, "middle") == [(3, 3, 6)]  # 3 blocks of 3: the middle one
    assert growth_plan(3, 4, "middle") == [(1, 1, 2)]  # 3 blocks of 1: layer 1
    assert growth_plan(8, 10, "middle") == [(2, 2, 4)]  # 4 blocks of 2: block ceil(4/2) = 2
    assert growth_plan(6, 9, "middle") == [(0, 3, 3)]  # 2 blocks: block 1


def test_stacking_top_grows_at_the_right_steps_with_copies_and_optimizer_state():
    model = tiny_lm(6)
    method = GradualStacking(StackingOptions(schedule="2-4-6", copy="top", optimizer_state="copy"))
    ctx = attach(method, model, total_steps=9)
    layers = model.layer_stack()
    assert len(layers) == 2 and model.config.n_layers == 2  # shrunk in place, bottom layers kept
    assert method.stage_boundaries() == [3, 6] and [method.stage_of(s) for s in (0, 2, 3, 5, 6, 8, 50)] == [0, 0, 1, 1, 2, 2, 2]
    assert method.expected_relative_flops() == pytest.approx((3 * 2 + 3 * 4 + 3 * 6) / (9 * 6))
    depths = []
    for step in range(9):
        objects = list(layers)
        info, _ = train_step(ctx, method, step)  # grows (if at a boundary), then trains
        depths.append(info.layers_run)
        assert info.layers_run == len(layers) == method.depth and info.stage == method.stage_of(step)
        if step in (3, 6):
            n = len(objects)
            assert list(layers)[:n] == objects  # the old layers stay, same objects, at the bottom
            for j in range(2):  # new layers n, n+1 are copies of the top two (exact equality: next test)
                src, new = objects[n - 2 + j], layers[n + j]
                assert new not in objects
                for p_src, p_new in zip(src.parameters(), new.parameters()):
                    s_src, s_new = ctx.optimizer.state[p_src], ctx.optimizer.state[p_new]
                    assert s_new["exp_avg"] is not s_src["exp_avg"]
                    assert float(s_new["step"]) == float(s_src["step"]) == step + 1  # copied moments, one update each
            assert_groups_in_model_order(model, ctx.optimizer)
    assert depths == [2, 2, 2, 4, 4, 4, 6, 6, 6]
    assert model.config.n_layers == 6 and method.lineage == [0, 1, 0, 1, 0, 1]


def test_stacking_copies_weights_and_moments_exactly_at_growth():
    model = tiny_lm(6)
    method = GradualStacking(StackingOptions(schedule="3-6", copy="top", optimizer_state="copy"))
    ctx = attach(method, model, total_steps=4)
    for step in range(2):
        train_step(ctx, method, step)
    method.begin_step(2)  # grow only: no training, so the copies must equal their sources exactly
    layers = model.layer_stack()
    assert len(layers) == 6
    for j in range(3):
        src, new = layers[j], layers[3 + j]
        assert_same_weights(src, new)
        for p_src, p_new in zip(src.parameters(), new.parameters()):
            assert p_new is not p_src and p_new.grad is None
            s_src, s_new = ctx.optimizer.state[p_src], ctx.optimizer.state[p_new]
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(s_src[key], s_new[key]) and s_src[key] is not s_new[key]
    assert_groups_in_model_order(model, ctx.optimizer)
    # The copies now train independently (no shared storage).
    train_step(ctx, method, 2)  # different positions, different gradients: the copies drift apart
    assert not torch.equal(layers[0].fc1.weight, layers[3].fc1.weight)


def test_stacking_middle_inserts_copies_right_after_the_middle_block():
    model = tiny_lm(6)
    method = GradualStacking(StackingOptions(schedule="3-4-6", copy="middle", optimizer_state="reset"))
    ctx = attach(method, model, total_steps=6)
    layers = model.layer_stack()
    for step in range(2):
        train_step(ctx, method, step)
    old = list(layers)
    method.begin_step(2)  # 3 -> 4: blocks of 1, middle = layer 1, copy inserted at 2
    assert [layers[i] for i in (0, 1, 3)] == old and layers[2] not in old
    assert_same_weights(layers[2], layers[1])
    assert method.lineage == [0, 1, 1, 2]
    for p in layers[2].parameters():  # optimizer_state=reset: the copy starts with no moments
        assert p not in ctx.optimizer.state
    assert_groups_in_model_order(model, ctx.optimizer)
    for step in (2, 3):
        train_step(ctx, method, step)
    old = list(layers)
    method.begin_step(4)  # 4 -> 6: two blocks of 2, block 1 (layers 0, 1) copied, inserted at 2
    assert [layers[i] for i in (0, 1, 4, 5)] == old
    assert_same_weights(layers[2], layers[0])
    assert_same_weights(layers[3], layers[1])
    assert method.lineage == [0, 1, 0, 1, 1, 2] and model.config.n_layers == 6
    assert_groups_in_model_order(model, ctx.optimizer)
    _, loss = train_step(ctx, method, 4)
    assert math.isfinite(loss)
    for p in layers[2].parameters():  # reset: the first update is AdamW's step 1
        assert float(ctx.optimizer.state[p]["step"]) == 1


def test_stacking_with_an_optimizer_built_before_attach():
    model = tiny_lm(4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # one group, made before attach
    method = GradualStacking(StackingOptions(schedule="2-4"))
    ctx = TrainingContext(model, model.layer_stack(), 4, optimizer=optimizer)
    method.attach(ctx)  # the dropped layers leave the optimizer too
    assert param_ids(optimizer.param_groups[0]["params"]) == param_ids(model.parameters())
    for step in range(4):
        train_step(ctx, method, step)
    assert len(model.layer_stack()) == 4
    assert param_ids(optimizer.param_groups[0]["params"]) == param_ids(model.parameters())
    assert set(map(id, optimizer.state)) == set(param_ids(model.parameters()))


def test_stacking_lr_rewarmup_after_each_growth():
    method = GradualStacking(StackingOptions(schedule="2-4-6", rewarmup_steps=4))
    attach(method, tiny_lm(6), total_steps=30, optimizer=False)
    factors = [method.begin_step(s).lr_factor for s in range(30)]
    assert factors[:10] == [1.0] * 10  # stage 0: the trainer's own warm-up only
    assert factors[10:15] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert factors[20:24] == [0.25, 0.5, 0.75, 1.0]
    off = GradualStacking(StackingOptions(schedule="2-4-6", rewarmup_steps=0))
    attach(off, tiny_lm(6), total_steps=30, optimizer=False)
    assert {off.lr_factor(s) for s in range(30)} == {1.0}


def test_stacking_relative_flops_and_schedule_errors():
    m = GradualStacking(StackingOptions(schedule="6-9-12"))
    attach(m, tiny_lm(12), total_steps=300, optimizer=False)
    assert m.expected_relative_flops() == pytest.approx(0.75)  # the paper's 1.33x
    prop = GradualStacking(StackingOptions(schedule="6-9-12", stage_lengths="prop:1"))
    attach(prop, tiny_lm(12), total_steps=600, optimizer=False)
    assert prop.lengths == [100, 200, 300]
    assert prop.expected_relative_flops() == pytest.approx((100 * 6 + 200 * 9 + 300 * 12) / (600 * 12))
    with pytest.raises(RaptrError, match="ends at 12 layers but the model has 6"):
        attach(GradualStacking(StackingOptions(schedule="6-9-12")), tiny_lm(6), total_steps=10)
    with pytest.raises(RaptrError, match="'method.stacking.copy' is 'bottom': use one of top, middle"):
        GradualStacking(StackingOptions(copy="bottom"))
    with pytest.raises(RaptrError, match="optimizer_state"):
        GradualStacking(StackingOptions(optimizer_state="keep"))


@pytest.mark.parametrize("mode", ["top", "middle"])
def test_stacking_state_dict_regrows_a_fresh_model_for_resume(mode):
    opts = StackingOptions(schedule="2-3-4-6", copy=mode)
    model = tiny_lm(6, seed=0)
    method = GradualStacking(opts)
    ctx = attach(method, model, total_steps=8)
    for step in range(5):  # stages of 2 steps: depth 4 at step 4
        train_step(ctx, method, step)
    saved = copy.deepcopy({"method": method.state_dict(), "weights": model.state_dict(),
                           "optimizer": ctx.optimizer.state_dict()})
    assert saved["method"]["state"]["depth"] == 4 and saved["method"]["record"]["method"] == "stacking"

    fresh = tiny_lm(6, seed=1)  # another init: the weights must come from the checkpoint
    resumed = GradualStacking(opts)
    ctx2 = attach(resumed, fresh, total_steps=8)
    assert len(fresh.layer_stack()) == 2
    resumed.load_state_dict(saved["method"])  # as the trainer does: before the weights
    assert len(fresh.layer_stack()) == 4 and resumed.lineage == method.lineage and fresh.config.n_layers == 4
    fresh.load_state_dict(saved["weights"], strict=True)
    ctx2.optimizer = make_optimizer(fresh, OptimConfig(lr=1e-2))
    ctx2.optimizer.load_state_dict(saved["optimizer"])
    # Both continue identically, through the next growth (4 -> 6 at step 6) to the end.
    for step in range(5, 8):
        a, la = train_step(ctx, method, step)
        b, lb = train_step(ctx2, resumed, step)
        assert la == lb and a.layers_run == b.layers_run
    assert len(fresh.layer_stack()) == 6
    assert_same_weights(model, fresh)
    other = GradualStacking(StackingOptions(schedule="3-4-6", copy=mode))
    attach(other, tiny_lm(6), total_steps=8, optimizer=False)
    with pytest.raises(RaptrError, match="options.schedule: '2-3-4-6' -> '3-4-6'"):
        other.load_state_dict(saved["method"])


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_stacking_on_hf_models_updates_config_and_runs_every_layer(arch):
    model = tiny_hf(arch, n_layers=4)
    cfg = model.hf.config
    method = GradualStacking(StackingOptions(schedule="2-4", copy="top"))
    ctx = attach(method, model, total_steps=4)
    assert len(model.layer_stack()) == 2 and cfg.num_hidden_layers == 2
    for step in range(4):
        info, loss = train_step(ctx, method, step)
        assert math.isfinite(loss) and info.layers_run == len(model.layer_stack())
    layers = model.layer_stack()
    assert len(layers) == 4 and cfg.num_hidden_layers == 4
    assert_groups_in_model_order(model, ctx.optimizer)
    idx = [m.layer_idx for layer in layers for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    assert sorted(set(idx)) == [0, 1, 2, 3]  # KV-cache slots follow the positions
    for layer in layers:  # copies share the model's config object instead of copying it
        for m in layer.modules():
            if hasattr(m, "config"):
                assert m.config is cfg
    calls = []
    hooks = [layer.register_forward_hook(lambda mod, a, out, i=i: calls.append(i)) for i, layer in enumerate(layers)]
    model.eval()
    with torch.no_grad():
        model(tokens(0), labels=tokens(0))
    for h in hooks:
        h.remove()
    assert calls == [0, 1, 2, 3]  # Llama runs layers[:num_hidden_layers]: the grown layers run too
    # A fresh HF model re-grows from the method state and takes the weights strictly.
    fresh = tiny_hf(arch, n_layers=4, seed=3)
    again = GradualStacking(StackingOptions(schedule="2-4", copy="top"))
    attach(again, fresh, total_steps=4, optimizer=False)
    again.load_state_dict(method.state_dict())
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(tokens(1), labels=tokens(1)), model(tokens(1), labels=tokens(1)))


# ------------------------------------------------------------------------------------ PLD


def test_pld_theta_and_layer_probabilities_match_deepspeed_formula():
    method = ProgressiveLayerDrop(PLDOptions(theta=0.5, gamma=0.001))
    attach(method, tiny_lm(12), total_steps=100, optimizer=False)
    for t in (0, 1, 7, 100, 1000, 5000, 123456):
        theta = (1 - 0.5) * math.exp(-0.001 * t) + 0.5
        assert method.theta(t) == theta
        probs = method.keep_probs(t)
        assert probs == [1 - (i / 12) * (1 - theta) for i in range(12)]
        assert probs[0] == 1.0 and probs[-1] == pytest.approx(1 - (11 / 12) * (1 - theta))
        if t > 0:  # decreasing with depth once θ < 1
            assert all(a > b for a, b in zip(probs, probs[1:]))
    assert method.theta(0) == 1.0 and method.keep_probs(0) == [1.0] * 12
    assert method.theta(1000) == pytest.approx(0.684, abs=1e-3) and method.theta(5000) == pytest.approx(0.503, abs=1e-3)
    other = ProgressiveLayerDrop(PLDOptions(theta=0.2, gamma=0.05))
    assert other.keep_probs(30, num_layers=4) == [1 - (i / 4) * (1 - (0.8 * math.exp(-1.5) + 0.2)) for i in range(4)]
    with pytest.raises(RaptrError):
        ProgressiveLayerDrop(PLDOptions(theta=0.0))
    with pytest.raises(RaptrError):
        ProgressiveLayerDrop(PLDOptions(gamma=-1.0))


def test_pld_empirical_keep_frequencies_match_p_i():
    method = ProgressiveLayerDrop(PLDOptions(theta=0.3, gamma=0.01))
    attach(method, tiny_lm(6), total_steps=4000, optimizer=False, seed=5)
    steps = range(4000)
    kept = torch.tensor([method.path(t) for t in steps], dtype=torch.float64)
    expected = torch.tensor([method.keep_probs(t) for t in steps], dtype=torch.float64)
    counts, means = kept.sum(0), expected.sum(0)
    std = (expected * (1 - expected)).sum(0).sqrt()
    assert counts[0] == 4000  # layer 0 always runs
    assert torch.all((counts - means).abs() <= 4 * std + 1e-9), (counts, means)
    # Late in training θ ≈ θ̄: the last layer is kept ≈ 1 − (5/6)(0.7) ≈ 0.417 of the time.
    assert kept[2000:, 5].mean().item() == pytest.approx(1 - 5 / 6 * 0.7, abs=0.04)


def test_pld_scales_kept_layers_by_inverse_probability_and_eval_is_full():
    model = tiny_lm(6)
    reference = copy.deepcopy(model)
    method = ProgressiveLayerDrop(PLDOptions(theta=0.3, gamma=0.05))
    ctx = attach(method, model, total_steps=200)
    layers = model.layer_stack()
    step = next(t for t in range(100, 200) if not all(method.path(t)))
    info = method.begin_step(step)
    probs = method.keep_probs(step)
    assert info.path == method.path(step) and info.layers_run == sum(info.path) < 6
    assert info.extra["theta"] == method.theta(step)
    for layer, run, p in zip(layers, info.path, probs):
        assert layer._gate_run == run and layer._gate_scale == 1.0 / p
    # Training step: dropped layers get no gradient (grad stays None), kept ones do.
    x = tokens(0)
    model.train()
    model(x, labels=x).backward()
    for layer, run in zip(layers, info.path):
        assert all((p.grad is not None) == run for p in layer.parameters())
    # The kept layers' residual branch is scaled by 1/p_i: compare with a manual forward.
    with torch.no_grad():
        h = reference.tok(x) + reference.pos(torch.arange(SEQ))
        for block, run, p in zip(reference.blocks, info.path, probs):
            if run:
                h = h + (block(h) - h) / p
        manual = reference.head(reference.ln_f(h))
        assert torch.allclose(model(x), manual, atol=1e-5)
    ctx.optimizer.zero_grad(set_to_none=True)
    # Eval: the full model, unscaled, whatever the last path was.
    model.eval(), reference.eval()
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_pld_expected_flops_is_the_exact_mean_over_steps():
    for theta, gamma, L, T in ((0.5, 0.001, 12, 3000), (0.3, 0.0, 6, 50), (0.5, 0.02, 4, 777)):
        method = ProgressiveLayerDrop(PLDOptions(theta=theta, gamma=gamma))
        attach(method, tiny_lm(L), total_steps=T, optimizer=False)
        brute = sum(sum(method.keep_probs(t)) / L for t in range(T)) / T
        assert method.expected_relative_flops() == pytest.approx(brute, rel=1e-12, abs=1e-12)
    long = ProgressiveLayerDrop(PLDOptions(theta=0.5, gamma=0.001))
    attach(long, tiny_lm(12), total_steps=10_000_000, optimizer=False)
    assert long.expected_relative_flops() == pytest.approx(1 - 0.5 * 11 / 24, abs=1e-3)  # ≈ 0.771 (paper.md §4.2)


def test_pld_trains_and_state_round_trips():
    model = tiny_lm(4)
    method = ProgressiveLayerDrop(PLDOptions(theta=0.5, gamma=0.1))
    ctx = attach(method, model, total_steps=6)
    losses = [train_step(ctx, method, s)[1] for s in range(6)]
    assert all(math.isfinite(v) for v in losses)
    again = ProgressiveLayerDrop(PLDOptions(theta=0.5, gamma=0.1))
    attach(again, tiny_lm(4), total_steps=6, optimizer=False)
    again.load_state_dict(method.state_dict())
    other = ProgressiveLayerDrop(PLDOptions(theta=0.4, gamma=0.1))
    attach(other, tiny_lm(4), total_steps=6, optimizer=False)
    with pytest.raises(RaptrError, match="options.theta: 0.5 -> 0.4"):
        other.load_state_dict(method.state_dict())


# ------------------------------------------------------------------------------------ LayerDrop


def test_layerdrop_statistics_scales_and_flops():
    method = LayerDrop(LayerDropOptions(keep_prob=0.6, fixed="first,last", scaling="linear"))
    ctx = attach(method, tiny_lm(6), total_steps=3000, seed=3, optimizer=False)
    paths = torch.tensor([method.path(t) for t in range(3000)], dtype=torch.float64)
    freq = paths.mean(0)
    assert freq[0] == 1.0 and freq[5] == 1.0
    std = math.sqrt(0.6 * 0.4 / 3000)
    assert torch.all((freq[1:5] - 0.6).abs() < 4 * std), freq
    assert method.expected_relative_flops() == pytest.approx((2 + 0.6 * 4) / 6)
    assert paths.mean().item() == pytest.approx(method.expected_relative_flops(), abs=0.01)
    info = method.begin_step(11)
    layers = ctx.layers
    for i, (layer, run) in enumerate(zip(layers, info.path)):
        assert layer._gate_run == run
        assert layer._gate_scale == (1.0 if i in (0, 5) else 1 / 0.6)
    assert info.layers_run == sum(info.path) and info.extra["keep_prob"] == 0.6
    sqrt = LayerDrop(LayerDropOptions(keep_prob=0.64, scaling="sqrt"))
    attach(sqrt, tiny_lm(4), total_steps=10, optimizer=False)
    assert sqrt.scales == [1 / 0.8] * 4 and sqrt.fixed == ()
    none = LayerDrop(LayerDropOptions(keep_prob=0.5, scaling="none"))
    attach(none, tiny_lm(4), total_steps=10, optimizer=False)
    assert none.scales == [1.0] * 4
    with pytest.raises(RaptrError):
        LayerDrop(LayerDropOptions(keep_prob=0.0))
    with pytest.raises(RaptrError):
        LayerDrop(LayerDropOptions(scaling="cubic"))


def test_layerdrop_trains_and_eval_is_full():
    model = tiny_lm(4)
    reference = copy.deepcopy(model)
    method = LayerDrop(LayerDropOptions(keep_prob=0.5))
    ctx = attach(method, model, total_steps=8)
    for step in range(8):
        info, loss = train_step(ctx, method, step)
        assert math.isfinite(loss)
    model.eval()
    reference.load_state_dict(model.state_dict())
    reference.eval()
    with torch.no_grad():
        assert torch.equal(model(tokens(0)), reference(tokens(0)))


def test_keep_prob_for_flops_matches_other_methods():
    raptr_flops = Schedule.parse("6-8-10-12", 12, 1000).relative_layer_flops()
    assert keep_prob_for_flops(raptr_flops, 12, "none") == pytest.approx(0.75)
    p = keep_prob_for_flops(raptr_flops, 12, "first,last")
    assert p == pytest.approx(0.7)
    matched = LayerDrop(LayerDropOptions(keep_prob=p, fixed="first,last"))
    attach(matched, tiny_lm(12), total_steps=10, optimizer=False)
    assert matched.expected_relative_flops() == pytest.approx(raptr_flops)
    pld = ProgressiveLayerDrop(PLDOptions(theta=0.5, gamma=0.001))
    attach(pld, tiny_lm(12), total_steps=5000, optimizer=False)
    q = keep_prob_for_flops(pld.expected_relative_flops(), 12, [0])
    ld = LayerDrop(LayerDropOptions(keep_prob=q, fixed="0"))
    attach(ld, tiny_lm(12), total_steps=10, optimizer=False)
    assert ld.expected_relative_flops() == pytest.approx(pld.expected_relative_flops())
    assert keep_prob_for_flops(1.0, 6, "first,last") == 1.0
    assert keep_prob_for_flops(0.2, 12, "first,last") == pytest.approx(0.04)
    with pytest.raises(RaptrError, match="cannot be reached"):
        keep_prob_for_flops(0.1, 12, "first,last")  # the two fixed layers alone are 1/6


# ------------------------------------------------------------------------------------ determinism


def _paths(method, steps):
    return [(method.begin_step(s).path, method.begin_step(s).layers_run) for s in steps]


@pytest.mark.parametrize("make", [
    lambda: ProgressiveLayerDrop(PLDOptions(theta=0.3, gamma=0.05)),
    lambda: LayerDrop(LayerDropOptions(keep_prob=0.5, fixed="first")),
], ids=["pld", "layerdrop"])
def test_sampled_paths_depend_only_on_seed_and_step(make):
    steps = list(range(40))
    a, b, c = make(), make(), make()
    attach(a, tiny_lm(6), total_steps=40, seed=7, optimizer=False)
    attach(b, tiny_lm(6, seed=9), total_steps=40, seed=7, optimizer=False)
    attach(c, tiny_lm(6), total_steps=40, seed=8, optimizer=False)
    forward = _paths(a, steps)
    assert _paths(b, steps[::-1])[::-1] == forward  # any order, any model: the same paths
    assert _paths(c, steps) != forward  # another seed: other paths
    assert len({p for p, _ in forward}) > 1


def test_stacking_is_deterministic():
    runs = []
    for _ in range(2):
        model = tiny_lm(6)
        method = GradualStacking(StackingOptions(schedule="2-4-6", copy="middle"))
        ctx = attach(method, model, total_steps=6)
        runs.append(([train_step(ctx, method, s) for s in range(6)], method.lineage, model.state_dict()))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    for k in runs[0][2]:
        assert torch.equal(runs[0][2][k], runs[1][2][k])
