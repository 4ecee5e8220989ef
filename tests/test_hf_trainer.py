"""MethodCallback / RaPTrCallback with the real ``transformers.Trainer`` on tiny BERT / GPT-2 models and real text.

The text is a few hundred lines of the licence texts every Debian system ships; the tokenizer is a
word-level ``tokenizers`` model trained on it here, so nothing is downloaded.
"""

import glob
import json
import os
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

from transformers import (  # noqa: E402
    BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainerControl,
    TrainerState, TrainingArguments,
)

from raptr.core import LayerGate  # noqa: E402
from raptr.errors import RaptrError  # noqa: E402
from raptr.integrations import MethodCallback, RaPTrCallback, RaptrTrainer  # noqa: E402
from raptr.methods import TrainingContext, build_method  # noqa: E402
from raptr.methods.layerdrop import LayerDropOptions  # noqa: E402
from raptr.methods.pld import PLDOptions  # noqa: E402
from raptr.integrations.hf_trainer import unwrap_model  # noqa: E402
from raptr.models.registry import find_layer_stack, model_flops  # noqa: E402

L, T, B, STEPS = 6, 32, 4, 12
SCHEDULE = "3-4-5-6"  # fixed first+last; p = 0.25, 0.5, 0.75, 1 over four stages of 3 steps
EQUAL = {"stage_lengths": "equal"}  # (the default is Prop-1 lengths; these tests count equal stages)
KEEP = [0.25, 0.5, 0.75, 1.0]


# ------------------------------------------------------------------------------------------------
# Data and models
# ------------------------------------------------------------------------------------------------


def _licence_text(max_lines: int = 600) -> str:
    lines: list[str] = []
    for path in sorted(glob.glob("/usr/share/common-licenses/*")) + sorted(glob.glob("/usr/share/doc/*/copyright")):
        if os.path.isfile(path) and not os.path.islink(path):
            with open(path, encoding="utf-8", errors="ignore") as f:
                lines += [line.strip() for line in f if line.strip()]
        if len(lines) >= max_lines:
            break
    if len(lines) < 200:
        pytest.skip("no licence texts under /usr/share to train on")
    return "\n".join(lines[:max_lines])


class _Sequences(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is ~5x faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus():
    """Token ids of real English text, word-level tokenizer trained here; vocab ~300."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([_licence_text()], trainers.WordLevelTrainer(vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[MASK]"]))
    ids = torch.tensor(tok.encode(_licence_text().replace("\n", " ")).ids)
    n = len(ids) // T
    assert n >= 60, "need at least 60 sequences of real text"
    return {"vocab": tok.get_vocab_size(), "mask": tok.token_to_id("[MASK]"), "seqs": ids[: n * T].view(n, T)}


def dataset(corpus, arch):
    """BERT: 15% of positions masked once, deterministically; GPT-2: labels = inputs."""
    seqs = corpus["seqs"]
    if arch == "gpt2":
        return _Sequences([{"input_ids": s, "labels": s.clone()} for s in seqs])
    gen = torch.Generator().manual_seed(0)
    items = []
    for s in seqs:
        masked = torch.rand(T, generator=gen) < 0.15
        masked[0] = True
        items.append({"input_ids": torch.where(masked, corpus["mask"], s), "labels": torch.where(masked, s, -100)})
    return _Sequences(items)


def make_model(corpus, arch):
    torch.manual_seed(0)
    if arch == "bert":
        return BertForMaskedLM(BertConfig(vocab_size=corpus["vocab"], hidden_size=32, num_hidden_layers=L, num_attention_heads=2,
                                          intermediate_size=64, max_position_embeddings=T))
    return GPT2LMHeadModel(GPT2Config(vocab_size=corpus["vocab"], n_positions=T, n_embd=32, n_layer=L, n_head=2))


def make_args(out, **kw):
    base = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=B, learning_rate=1e-3, use_cpu=True,
                report_to=[], save_strategy="steps", save_steps=6, logging_steps=1, seed=0, disable_tqdm=True,
                dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


class Probe(TrainerCallback):
    """Watches the model from outside: which layers' forward ran, and which got gradients, per step."""

    def __init__(self):
        self.steps: dict[int, dict] = {}
        self.logs: list[dict] = []

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.layers = find_layer_stack(model)
        self.calls = [0] * len(self.layers)
        self.hooks = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]

    def _hook(self, i):
        def hook(module, inputs, output):
            if module.training:
                self.calls[i] += 1
        return hook

    def on_step_begin(self, args, state, control, **kw):
        self.calls = [0] * len(self.layers)

    def on_pre_optimizer_step(self, args, state, control, **kw):
        # After every micro-batch's backward, before optimizer.step() and zero_grad().
        grads = tuple(any(p.grad is not None for p in layer.parameters()) for layer in self.layers)
        self.steps[state.global_step] = {"calls": tuple(self.calls), "grad": grads,
                                         "ran": tuple(c > 0 for c in self.calls)}

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append(dict(logs))

    def on_train_end(self, args, state, control, **kw):
        for h in self.hooks:
            h.remove()

    def paths(self, steps):
        return [self.steps[s]["ran"] for s in steps]


def train(corpus, arch, out, callback=None, resume=None, trainer_cls=RaptrTrainer, **kw):
    probe = Probe()
    model = make_model(corpus, arch)
    # The probe comes first, as report_to integrations (TensorBoard, W&B) do: RaptrTrainer moves the
    # method's callback in front, so its path is set before the probe's on_step_begin and its keys are in `logs`.
    callbacks = [probe] + ([callback] if callback is not None else [])
    trainer = trainer_cls(model=model, args=make_args(out, **kw), train_dataset=dataset(corpus, arch), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, probe


def raptr_logs(trainer):
    return [h for h in trainer.state.log_history if "raptr/stage" in h]


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


def test_skips_layers_and_stages_progress(corpus, tmp_path):
    cb = RaPTrCallback(SCHEDULE, **EQUAL, seed=0)
    trainer, probe = train(corpus, "bert", tmp_path, cb)
    assert sorted(probe.steps) == list(range(STEPS))
    skipped_somewhere = False
    for step, seen in probe.steps.items():
        assert all(c in (0, 1) for c in seen["calls"])
        # What ran is what the schedule planned (a pure function of seed and step) ...
        assert seen["ran"] == cb_plan(SCHEDULE, 0, step)
        # ... skipped layers got no gradient at all, layers that ran did; first and last always run.
        assert seen["grad"] == seen["ran"]
        assert seen["ran"][0] and seen["ran"][-1]
        skipped_somewhere |= not all(seen["ran"])
    assert skipped_somewhere

    logs = raptr_logs(trainer)
    assert [h["step"] for h in logs] == list(range(1, STEPS + 1))
    assert [h["raptr/stage"] for h in logs] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [h["raptr/keep_prob"] for h in logs] == [p for p in KEEP for _ in range(3)]
    assert [h["raptr/path_length"] for h in logs] == [sum(probe.steps[s]["ran"]) for s in range(STEPS)]
    assert all(h["raptr/path_length"] == L for h in logs[-3:])  # last stage trains the full model
    assert [h for h in probe.logs if "raptr/stage" in h] == [{k: v for k, v in h.items() if k != "step"} for h in logs]
    # Training is over: the model is a plain BertForMaskedLM again, with no hooks left behind.
    layers = find_layer_stack(trainer.model)
    assert not any(isinstance(layer, LayerGate) for layer in layers)
    assert "floating_point_ops" not in trainer.model.__dict__ and "floating_point_ops" not in trainer.__dict__


def cb_plan(schedule, seed, step, **options):
    """The path RaPTr plans for ``step`` (independent of any Trainer)."""
    import raptr

    model = nn.Module()
    model.layer_stack = lambda: nn.ModuleList(nn.Linear(1, 1) for _ in range(L))
    return raptr.wrap(model, schedule, STEPS, seed, **{**EQUAL, **options}).method.raptr.plan(step).active


def test_gradient_accumulation_micro_batches_share_a_path(corpus, tmp_path):
    trainer, probe = train(corpus, "gpt2", tmp_path, RaPTrCallback(SCHEDULE, **EQUAL, seed=1), gradient_accumulation_steps=2,
                           logging_steps=4)
    assert sorted(probe.steps) == list(range(STEPS))
    for step, seen in probe.steps.items():
        # Every layer ran in both micro-batches or in neither: one path per optimizer step.
        assert seen["calls"] == tuple(2 if run else 0 for run in seen["ran"])
        assert seen["ran"] == cb_plan(SCHEDULE, 1, step)
        assert seen["grad"] == seen["ran"]
    assert any(not all(s["ran"]) for s in probe.steps.values())
    # With logging_steps=4, raptr/path_length is the mean path of the 4 steps since the last log.
    logs = raptr_logs(trainer)
    assert [h["step"] for h in logs] == [4, 8, 12]
    means = [sum(sum(probe.steps[s]["ran"]) for s in range(k, k + 4)) / 4 for k in (0, 4, 8)]
    assert [h["raptr/path_length"] for h in logs] == means


def test_total_flos_counts_only_layers_run(corpus, tmp_path):
    base, _ = train(corpus, "bert", tmp_path / "base")
    # Uniform sampling keeps exactly 1, 2, 3, 4 of the 4 free layers per stage: paths 3, 4, 5, 6.
    rp, probe = train(corpus, "bert", tmp_path / "raptr", RaPTrCallback(SCHEDULE, **EQUAL, sampling="uniform"))
    model = make_model(corpus, "bert")
    n_params = model.num_parameters(exclude_embeddings=True)
    per_layer = sum(p.numel() for p in find_layer_stack(model)[0].parameters())
    tokens = B * T
    assert base.state.total_flos == 6 * tokens * n_params * STEPS  # the Trainer's own 6·tokens·params

    lengths = [sum(probe.steps[s]["ran"]) for s in range(STEPS)]
    assert lengths == [3] * 3 + [4] * 3 + [5] * 3 + [6] * 3
    expected = sum(6 * tokens * (n_params - (L - n) * per_layer) for n in lengths)
    assert rp.state.total_flos == expected
    ratio = rp.state.total_flos / base.state.total_flos
    # Schedule expectation: layers run 4.5 of 6 on average = 75% of layer parameters.
    planned = 1 - 0.25 * L * per_layer / n_params
    assert ratio == pytest.approx(planned, rel=1e-9)
    assert ratio < 0.9


def test_analytic_flops(corpus, tmp_path):
    trainer, probe = train(corpus, "gpt2", tmp_path, RaPTrCallback(SCHEDULE, **EQUAL, flops="analytic"))
    model = trainer.model
    flops = model_flops(model, T)
    lengths = [sum(probe.steps[s]["ran"]) for s in range(STEPS)]
    assert trainer.state.total_flos == pytest.approx(sum(flops.train_step(n, B) for n in lengths), rel=1e-12)
    # Relation to the Trainer's 6·tokens·params for the full model: the analytic count adds the
    # attention scores (12·L·T·d per token) and the tied LM head (6·d·V per token) the HF count omits,
    # and omits biases and LayerNorms, which it counts.
    d, V = 32, model.config.vocab_size
    hf_full = 6 * B * T * model.num_parameters(exclude_embeddings=True)
    matmul_params = L * (4 * d * d + 2 * d * 4 * d)
    assert flops.full_step(B) == 6 * B * T * (matmul_params + d * V) + B * T * 12 * L * T * d
    assert hf_full > 6 * B * T * matmul_params


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_resume_continues_the_schedule(corpus, tmp_path, arch):
    full, probe_full = train(corpus, arch, tmp_path / "full", RaPTrCallback(SCHEDULE, **EQUAL, seed=7))
    ckpt = tmp_path / "full" / "checkpoint-6"
    saved = json.loads((ckpt / "trainer_state.json").read_text())["stateful_callbacks"]["RaPTrCallback"]
    assert saved["args"] == {"schedule": SCHEDULE, "seed": 7, "flops": "hf", "seq_len": None, "stage_lengths": "equal", "fixed": "first,last",
                             "count_fixed": True, "sampling": "bernoulli", "scaling": "none", "full_warmup": 0.0,
                             "require_full_final": True}
    assert saved["attributes"]["total_steps"] == STEPS
    assert saved["attributes"]["method_state"]["record"]["seed"] == 7

    # HF's default: the script's callback (same arguments) is used; paths are a function of (seed, step).
    _, probe_same = train(corpus, arch, tmp_path / "same", RaPTrCallback(SCHEDULE, **EQUAL, seed=7), resume=str(ckpt))
    assert sorted(probe_same.steps) == list(range(6, STEPS))
    assert probe_same.paths(range(6, STEPS)) == probe_full.paths(range(6, STEPS))

    # Without restore_callback_states_from_checkpoint, a script whose RaPTr arguments changed is refused
    # (the one resume rule of every method and host), and the model is left as it was.
    state = TrainerState.load_from_json(str(ckpt / "trainer_state.json"))
    other = RaPTrCallback(SCHEDULE, **EQUAL, seed=123, flops="off")
    model = make_model(corpus, arch)
    with pytest.raises(RaptrError, match="seed: 7 -> 123.*restore_callback_states_from_checkpoint"):
        other.on_train_begin(make_args(tmp_path), state, TrainerControl(), model=model)
    assert not any(isinstance(layer, LayerGate) for layer in find_layer_stack(model))

    # restore_callback_states_from_checkpoint: the checkpoint's configuration wins over the script's.
    with pytest.warns(UserWarning, match="keeping the checkpoint's schedule"):
        resumed, probe = train(corpus, arch, tmp_path / "restored", RaPTrCallback(SCHEDULE, **EQUAL, seed=123), resume=str(ckpt),
                               restore_callback_states_from_checkpoint=True, max_steps=STEPS + 2)
    cb = next(c for c in resumed.callback_handler.callbacks if isinstance(c, RaPTrCallback))
    assert (cb.seed, cb.total_steps) == (7, STEPS)
    assert probe.paths(range(6, STEPS)) == probe_full.paths(range(6, STEPS))
    assert probe.paths(range(STEPS, STEPS + 2)) == [(True,) * L] * 2  # past the schedule: last stage


def test_options_and_ddp_warnings(corpus, tmp_path):
    with pytest.raises(RaptrError, match="unknown RaPTrCallback option"):
        RaPTrCallback(SCHEDULE, **EQUAL, shedule_lengths="equal")
    with pytest.raises(RaptrError, match="unknown flops"):
        RaPTrCallback(SCHEDULE, **EQUAL, flops="exact")
    with pytest.raises(RaptrError, match="exceeds the model's 6 layers"):
        RaPTrCallback("6-8-10-12").on_train_begin(make_args(tmp_path), TrainerState(max_steps=STEPS), TrainerControl(),
                                                  model=make_model(corpus, "gpt2"))

    model = make_model(corpus, "gpt2")
    cb = RaPTrCallback(SCHEDULE, **EQUAL)
    with pytest.warns(UserWarning) as caught:
        cb.on_train_begin(make_args(tmp_path, ddp_find_unused_parameters=False, ddp_static_graph=True),
                          TrainerState(max_steps=STEPS), TrainerControl(), model=model)
    messages = " ".join(str(w.message) for w in caught)
    assert "ddp_find_unused_parameters=True" in messages and "ddp_static_graph" in messages
    cb.on_train_end(None, None, None)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cb = RaPTrCallback(SCHEDULE, **EQUAL, flops="off")  # the default DDP settings of the Trainer say nothing
        cb.on_train_begin(make_args(tmp_path), TrainerState(max_steps=STEPS), TrainerControl(), model=model)
        cb.on_train_end(None, None, None)


def test_model_inside_ddp_is_unwrapped(corpus, tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = make_model(corpus, "gpt2")
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        assert unwrap_model(ddp) is model
        cb = RaPTrCallback(SCHEDULE, **EQUAL, flops="off")
        cb.on_train_begin(make_args(tmp_path), TrainerState(max_steps=STEPS), TrainerControl(), model=ddp)
        assert all(isinstance(layer, LayerGate) for layer in find_layer_stack(model))
        ids = corpus["seqs"][:2]
        for step in range(3):  # skipped layers under DDP with find_unused_parameters=True: no error
            cb.on_step_begin(None, TrainerState(global_step=step), None)
            ddp.train()
            ddp(input_ids=ids, labels=ids).loss.backward()
            ran = cb.raptr.last_plan.active
            assert [p.grad is not None for p in (next(layer.parameters()) for layer in find_layer_stack(model))] == list(ran)
            model.zero_grad(set_to_none=True)
        cb.on_train_end(None, None, None)

        # What the warning is about: with find_unused_parameters=False, DDP fails once a layer sits out.
        plain = nn.parallel.DistributedDataParallel(make_model(corpus, "gpt2"), find_unused_parameters=False)
        cb = RaPTrCallback(SCHEDULE, **EQUAL, flops="off")
        cb.on_train_begin(make_args(tmp_path), TrainerState(max_steps=STEPS), TrainerControl(), model=plain)
        with pytest.raises(RuntimeError, match="find_unused_parameters=True"):
            for step in range(3):
                cb.on_step_begin(None, TrainerState(global_step=step), None)
                plain(input_ids=ids, labels=ids).loss.backward()
        assert not all(cb.raptr.last_plan.active)
        cb.on_train_end(None, None, None)
    finally:
        dist.destroy_process_group()


def test_plain_trainer_is_told_its_flops_count_every_layer(corpus, tmp_path):
    """transformers 5's Trainer.floating_point_ops never asks the model: without the mixin, say so once."""
    with pytest.warns(UserWarning, match="does not ask raptr for FLOPs") as caught:
        plain, probe = train(corpus, "gpt2", tmp_path / "plain", RaPTrCallback(SCHEDULE, **EQUAL), trainer_cls=Trainer)
    assert sum("does not ask raptr" in str(w.message) for w in caught) == 1
    assert any(not all(s["ran"]) for s in probe.steps.values())  # the method still ran
    base, _ = train(corpus, "gpt2", tmp_path / "base", trainer_cls=Trainer)
    assert plain.state.total_flos == base.state.total_flos


def planned_paths(corpus, arch, name, options, seed, steps):
    """What the method plans for each step, from a fresh method on a fresh model (no Trainer)."""
    model = make_model(corpus, arch)
    method = build_method(name, options)
    method.attach(TrainingContext(model, find_layer_stack(model), STEPS, seed))
    return [method.begin_step(s).path for s in steps]


METHOD_CASES = {
    "pld": ({"theta": 0.5, "gamma": 0.3}, PLDOptions(theta=0.5, gamma=0.3)),
    "layerdrop": ({"keep_prob": 0.5}, LayerDropOptions(keep_prob=0.5)),
    "raptr": ({"schedule": SCHEDULE}, None),
}


@pytest.mark.parametrize("name", ["pld", "layerdrop"])
def test_any_method_under_the_trainer_skips_counts_and_resumes(corpus, tmp_path, name):
    kwargs, options = METHOD_CASES[name]
    full, probe = train(corpus, "gpt2", tmp_path / "full", MethodCallback(name, seed=3, **kwargs))
    planned = planned_paths(corpus, "gpt2", name, options, 3, range(STEPS))
    assert probe.paths(range(STEPS)) == planned  # hook counts: what ran is what the method planned
    assert all(seen["grad"] == seen["ran"] for seen in probe.steps.values())  # skipped layers: no gradient
    assert any(not all(p) for p in planned)
    model = make_model(corpus, "gpt2")
    n_params = model.num_parameters(exclude_embeddings=True)
    per_layer = sum(p.numel() for p in find_layer_stack(model)[0].parameters())
    assert full.state.total_flos == sum(6 * B * T * (n_params - (L - sum(p)) * per_layer) for p in planned)
    logs = [h for h in full.state.log_history if f"{name}/path_length" in h]
    assert [h[f"{name}/path_length"] for h in logs] == [sum(p) for p in planned]
    # resume from the step-6 checkpoint: the same paths for steps 6..11
    _, again = train(corpus, "gpt2", tmp_path / "again", MethodCallback(name, seed=3, **kwargs),
                     resume=str(tmp_path / "full" / "checkpoint-6"))
    assert again.paths(range(6, STEPS)) == planned[6:]
    with pytest.raises(RaptrError, match="the checkpoint was written by another method configuration"):
        train(corpus, "gpt2", tmp_path / "other", MethodCallback(name, seed=4, **kwargs),
              resume=str(tmp_path / "full" / "checkpoint-6"))


def test_stacking_grows_the_model_under_the_trainer(corpus, tmp_path):
    cb = MethodCallback("stacking", schedule="2-4-6", rewarmup_steps=2)
    trainer, probe = train(corpus, "gpt2", tmp_path, cb, save_strategy="no")
    assert len(find_layer_stack(trainer.model)) == L and trainer.model.config.num_hidden_layers == L
    logs = [h for h in trainer.state.log_history if "stacking/path_length" in h]
    assert [h["stacking/path_length"] for h in logs] == [2] * 4 + [4] * 4 + [6] * 4
    # every parameter of the grown model is in the optimizer, and trained
    opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in trainer.model.parameters()} <= opt_params
    # FLOPs follow the depth: 6·tokens·params of the model as it was at each step
    model = make_model(corpus, "gpt2")
    n_params = model.num_parameters(exclude_embeddings=True)
    per_layer = sum(p.numel() for p in find_layer_stack(model)[0].parameters())
    assert trainer.state.total_flos == sum(6 * B * T * (n_params - (L - d) * per_layer) for d in [2] * 4 + [4] * 4 + [6] * 4)


def test_torch_compile_true_keeps_its_graphs_over_changing_paths(corpus, tmp_path):
    """TrainingArguments(torch_compile=True) compiles the whole wrapped model: bounded graphs, no
    recompile limit (it would raise), the paths still change every step, and the losses are eager's."""
    from torch._dynamo.utils import counters

    steps = 30

    class Paths(TrainerCallback):  # after the method's callback (RaptrTrainer puts it first): this step's path
        def __init__(self):
            self.paths = []

        def on_step_begin(self, args, state, control, model=None, **kw):
            self.paths.append(tuple(layer._gate_run for layer in find_layer_stack(unwrap_model(model))))

    def run(out, **kw):
        paths = Paths()
        model = GPT2LMHeadModel(GPT2Config(vocab_size=corpus["vocab"], n_positions=T, n_embd=32, n_layer=12, n_head=2,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
        trainer = RaptrTrainer(model=model, args=make_args(out, max_steps=steps, save_strategy="no", **kw),
                               train_dataset=dataset(corpus, "gpt2"), callbacks=[paths, RaPTrCallback("4-8-12", seed=0)])
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h], paths.paths

    torch.manual_seed(0)
    eager, eager_paths = run(tmp_path / "eager")
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        torch.manual_seed(0)
        compiled, paths = run(tmp_path / "compiled", torch_compile=True, torch_compile_backend="aot_eager")
    graphs = counters["stats"]["unique_graphs"]
    print(f"HF Trainer torch_compile=True: {graphs} graphs over {steps} steps and {len(set(paths))} distinct paths")
    assert paths == eager_paths and len(set(paths)) >= 15
    assert 1 <= graphs <= 5
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-4)


def test_logged_layer_units_are_means_over_the_logging_window(corpus, tmp_path):
    trainer, probe = train(corpus, "gpt2", tmp_path, RaPTrCallback(SCHEDULE, **EQUAL, seed=0), logging_steps=3, save_strategy="no")
    logs = raptr_logs(trainer)
    assert len(logs) == STEPS // 3
    for h in logs:
        window = range(h["step"] - 3, h["step"])
        mean = sum(sum(probe.steps[s]["ran"]) for s in window) / 3
        assert h["raptr/path_length"] == pytest.approx(mean) and h["raptr/layer_units"] == pytest.approx(mean)
