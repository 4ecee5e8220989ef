"""The method protocol: one registry, typed options, one resume rule, hosts that never switch on names.

A small method defined in this file alone (``SkipOne``) is registered and trained through
``raptr train`` and the plain loop, as a user's own method would be.
"""

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import AUSTEN_DATA, tiny
from raptr.cli import main
from raptr.core import GatedLayers
from raptr.errors import RaptrError
from raptr.methods import METHODS, Method, StepInfo, TrainingContext, build_method, register_method
from raptr.methods.pld import PLDOptions, ProgressiveLayerDrop
from raptr.methods.raptr import RaPTrMethod, RaPTrOptions
from raptr.models.registry import find_layer_stack, layer_contract
from raptr.training.config import describe_fields, load_config, to_dict

SRC = Path(__file__).resolve().parent.parent / "src" / "raptr"
TINY = tiny()


@dataclasses.dataclass
class SkipOneOptions:
    layer: int = 1  # the layer left out at every odd step

    def check(self, num_layers=None, total_steps=None):
        if self.layer < 0 or (num_layers is not None and self.layer >= num_layers):
            raise RaptrError(f"method.skipone.layer={self.layer} is not a layer of the model: use 0..{(num_layers or 1) - 1}")


class SkipOne(Method):
    """Every odd step skips one layer (identity, no compute, no gradient); even steps run all."""

    name = "skipone"
    Options = SkipOneOptions
    extendable = True

    def attach(self, context: TrainingContext) -> None:
        super().attach(context)
        self.gates = GatedLayers(context.layers, layer_contract(context.model)[0])

    def begin_step(self, step: int) -> StepInfo:
        active = tuple(not (step % 2 and i == self.options.layer) for i in range(len(self.layers)))
        self.gates.set_path(active, [1.0] * len(active))
        return StepInfo(0, sum(active), active)


@pytest.fixture
def skipone():
    register_method(SkipOne)
    yield SkipOne
    METHODS.pop("skipone")


def _method_branches(path: Path) -> list[str]:
    """Comparisons that read a method's name or test for a registered method's name."""
    names = {"standard", "raptr", "stacking", "pld", "layerdrop", "width", "depthwidth"}
    found = []
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Compare, ast.Match)):
            continue
        parts = [node.subject] if isinstance(node, ast.Match) else [node.left, *node.comparators]
        for part in parts:
            reads_name = isinstance(part, ast.Attribute) and part.attr == "name" and "method" in ast.unparse(part.value)
            literal = isinstance(part, ast.Constant) and part.value in names
            in_tuple = isinstance(part, (ast.Tuple, ast.List, ast.Set)) and any(
                isinstance(e, ast.Constant) and e.value in names for e in part.elts)
            if reads_name or literal or in_tuple:
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)[:80]}")
                break
    return found


def test_no_host_branches_on_method_names():
    files = [f for d in ("training", "integrations", "experiments", "methods") for f in sorted((SRC / d).rglob("*.py"))]
    assert len(files) >= 20
    hits = [h for f in files for h in _method_branches(f)]
    assert not hits, "\n".join(hits)


def test_the_branch_finder_finds_branches(tmp_path):
    bad = tmp_path / "branchy.py"
    bad.write_text('def f(cfg, m):\n    if cfg.method.name == "raptr":\n        pass\n    return m in ("pld", "x")\n')
    assert len(_method_branches(bad)) == 2


def test_registry_derives_config_keys_choices_and_checks(skipone):
    keys = {k: (kind, default) for k, kind, default in describe_fields()}
    assert keys["method.skipone.layer"] == ("int", 1)
    assert "skipone" in keys["method.name"][0].split("|")
    assert keys["method.raptr.scaling"][0] == "none|sqrt|linear"
    cfg = load_config("bert-tiny-raptr", TINY + ["method.name=skipone", "method.skipone.layer=3"])
    assert to_dict(cfg)["method"] == {"name": "skipone", "skipone": {"layer": 3}}  # only the chosen method's options
    with pytest.raises(RaptrError, match="method.skipone.layer=4 is not a layer"):
        load_config("bert-tiny-raptr", TINY + ["method.name=skipone", "method.skipone.layer=4"])
    with pytest.raises(RaptrError, match="'method.raptr.sampling' is 'random': use one of bernoulli, uniform"):
        load_config("bert-tiny-raptr", TINY + ["method.raptr.sampling=random"])
    with pytest.raises(RaptrError, match="'method.name' is 'magic': use one of standard, raptr, stacking, pld, layerdrop"):
        load_config("bert-tiny-raptr", TINY + ["method.name=magic"])
    with pytest.raises(RaptrError, match="already registered"):
        register_method(type("Other", (SkipOne,), {}))


def test_a_method_from_a_test_file_trains_through_raptr_train(skipone, tmp_path, data_cache, capsys):
    out = tmp_path / "run"
    args = ["train", "--config", "bert-tiny-raptr", "-q", *TINY, *AUSTEN_DATA, f"data.cache_dir={data_cache}",
            f"train.out_dir={out}", "train.steps=4", "train.eval_every=4", "train.checkpoint_every=2",
            "method.name=skipone", "method.skipone.layer=2"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["layers_run"] for r in rows if r["kind"] == "train"] == [4, 3, 4, 3]
    flops = [r["flops"] for r in rows if r["kind"] == "train"]
    assert flops[1] - flops[0] < flops[0]  # the step that skipped a layer cost less
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "skipone" and summary["relative_flops"] < 1
    assert json.loads((out / "config.json").read_text())["method"] == {"name": "skipone", "skipone": {"layer": 2}}
    # extendable: a resume may add steps, and continues the step parity
    assert main(args[:-1] + ["method.skipone.layer=2", "train.steps=6"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["layers_run"] for r in rows if r["kind"] == "train"] == [4, 3, 4, 3, 4, 3]
    # another option on resume: one error line, the run is kept
    capsys.readouterr()
    assert main(args[:-1] + ["method.skipone.layer=1", "train.steps=6"]) != 0
    err = capsys.readouterr().err
    assert "method.skipone.layer: 2 -> 1" in err and "Traceback" not in err


def test_a_method_from_a_test_file_runs_in_a_plain_loop(skipone):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=4, n_head=2, vocab_size=100, n_positions=16))
    layers = find_layer_stack(model)
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    method = build_method("skipone", SkipOneOptions(layer=1))
    method.attach(TrainingContext(model, layers, total_steps=2))
    ids = torch.randint(0, 100, (2, 8))
    for step in range(2):
        info = method.begin_step(step)
        model(ids, labels=ids).loss.backward()
        assert info.layers_run == (4 if step == 0 else 3)
    assert calls == [2, 1, 2, 2]


def _attached(method: Method, seed: int = 0) -> Method:
    layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(6))
    method.attach(TrainingContext(nn.Sequential(*layers), layers, total_steps=60, seed=seed))
    return method


def test_one_resume_rule_refuses_any_mismatch():
    state = _attached(RaPTrMethod(RaPTrOptions(schedule="3-4-6")), seed=1).state_dict()
    _attached(RaPTrMethod(RaPTrOptions(schedule="3-4-6")), seed=1).load_state_dict(state)  # same: fine
    with pytest.raises(RaptrError, match="seed: 1 -> 2"):
        _attached(RaPTrMethod(RaPTrOptions(schedule="3-4-6")), seed=2).load_state_dict(state)
    with pytest.raises(RaptrError, match="options.scaling: 'none' -> 'sqrt'"):
        _attached(RaPTrMethod(RaPTrOptions(schedule="3-4-6", scaling="sqrt")), seed=1).load_state_dict(state)
    pld = _attached(ProgressiveLayerDrop(PLDOptions(theta=0.5, gamma=0.1))).state_dict()
    with pytest.raises(RaptrError, match="options.theta: 0.5 -> 0.6"):
        _attached(ProgressiveLayerDrop(PLDOptions(theta=0.6, gamma=0.1))).load_state_dict(pld)
    with pytest.raises(RaptrError, match="method: 'pld' -> 'raptr'"):
        _attached(RaPTrMethod(RaPTrOptions(schedule="3-4-6"))).load_state_dict(pld)


def test_checkpoints_from_before_the_record_still_load_and_are_checked():
    old = _attached(RaPTrMethod(RaPTrOptions(schedule="3-4-6")), seed=1).raptr.state_dict()  # the old format
    _attached(RaPTrMethod(RaPTrOptions(schedule="3-4-6")), seed=1).load_state_dict(old)
    with pytest.raises(RaptrError, match="seed 1"):  # the sampler itself refuses, never adopts
        _attached(RaPTrMethod(RaPTrOptions(schedule="3-4-6")), seed=2).load_state_dict(old)


@pytest.fixture
def austen_sequences(data_cache):
    from raptr.training.build import prepare_data

    cfg = load_config(None, [f"data.cache_dir={data_cache}", *AUSTEN_DATA, "data.vocab_size=1024", "data.tokenizer=bpe",
                             "objective.name=causal", "data.seq_len=32"])
    return prepare_data(cfg, progress=False).train.batch(0, 32, 0)


def _gpt2(layers=4):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=layers, n_head=2, vocab_size=1024, n_positions=32))


def _layer_calls(layers, step_of):
    calls: dict[int, list[int]] = {}
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda m, a, o, i=i: m.training and torch.is_grad_enabled()
                                    and calls.setdefault(step_of(), []).append(i))
    return calls


def test_a_method_from_a_test_file_runs_under_the_hf_trainer(skipone, austen_sequences, tmp_path):
    pytest.importorskip("accelerate")
    from transformers import TrainerCallback, TrainingArguments

    from raptr.integrations import MethodCallback, RaptrTrainer

    model = _gpt2()
    step = {"now": 0}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            step["now"] = state.global_step

    calls = _layer_calls(find_layer_stack(model), lambda: step["now"])
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, use_cpu=True,
                             report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True)
    data = [{"input_ids": s, "labels": s.clone()} for s in austen_sequences]
    trainer = RaptrTrainer(model=model, args=args, train_dataset=data, callbacks=[Clock(), MethodCallback("skipone", layer=2)])
    trainer.train()
    assert [sorted(set(calls[s])) for s in range(4)] == [[0, 1, 2, 3], [0, 1, 3], [0, 1, 2, 3], [0, 1, 3]]
    per_layer = sum(p.numel() for p in find_layer_stack(model)[0].parameters())
    n = model.num_parameters(exclude_embeddings=True)
    assert trainer.state.total_flos == 6 * 4 * 32 * (4 * n - 2 * per_layer)
    assert [h["skipone/path_length"] for h in trainer.state.log_history if "skipone/path_length" in h] == [4, 3, 4, 3]


def _lightning_gpt2(pl, lr: float = 1e-3):
    """A user's LightningModule holding the tiny GPT-2 (``self.model``), trained with AdamW."""

    class LM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = _gpt2()

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=lr)

    return LM()


def test_a_method_from_a_test_file_runs_under_lightning(skipone, austen_sequences, tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from raptr.integrations.lightning import MethodCallback

    module = _lightning_gpt2(pl)
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    calls = _layer_calls(find_layer_stack(module.model), lambda: trainer.global_step)
    cb = MethodCallback("skipone", layer=2)
    trainer.callbacks.insert(0, cb)
    trainer.fit(module, torch.utils.data.DataLoader(list(austen_sequences), batch_size=4))
    assert [sorted(set(calls[s])) for s in range(4)] == [[0, 1, 2, 3], [0, 1, 3], [0, 1, 2, 3], [0, 1, 3]]
    per_layer = sum(p.numel() for p in find_layer_stack(module.model)[0].parameters())
    n = module.model.num_parameters(exclude_embeddings=True)
    assert cb.total_flos == 6 * 4 * 32 * (4 * n - 2 * per_layer)


def test_options_built_in_python_are_checked_like_a_config_file():
    """``RaPTrMethod(RaPTrOptions(scaling="sqr"))`` fails at construction with the YAML path's line,
    not later at attach; ``raptr.wrap`` and the HF/Lightning callbacks build their options the same way."""
    import raptr
    from raptr.errors import RaptrError
    from raptr.methods import RaPTrMethod, RaPTrOptions
    from raptr.methods.layerdrop import LayerDropOptions
    from raptr.methods.registry import method_class

    with pytest.raises(RaptrError, match=r"^'method.raptr.scaling' is 'sqr': use one of none, sqrt, linear$"):
        RaPTrMethod(RaPTrOptions(scaling="sqr"))
    with pytest.raises(RaptrError, match=r"'method.layerdrop.keep_prob' must be a number"):
        method_class("layerdrop")(LayerDropOptions(keep_prob="most"))
    with pytest.raises(RaptrError, match=r"^'sampling' is 'random': use one of bernoulli, uniform$"):
        raptr.wrap(torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(4)]), "3-4", 10, sampling="random")
    assert RaPTrMethod(RaPTrOptions(full_warmup=1)).options.full_warmup == 1.0  # converted, as YAML's 1 would be


@dataclasses.dataclass
class SlowOddOptions:
    layer: int = 2  # left out at every odd step, whose learning rate is also halved


class SlowOdd(SkipOne):
    """SkipOne with an lr factor: odd steps skip ``layer`` and train at half the learning rate."""

    name = "slowodd"
    Options = SlowOddOptions

    def begin_step(self, step: int) -> StepInfo:
        info = super().begin_step(step)
        return dataclasses.replace(info, lr_factor=0.5 if step % 2 else 1.0)


@pytest.fixture
def slowodd():
    register_method(SlowOdd)
    yield SlowOdd
    METHODS.pop("slowodd")


STEPS_SPEC, ACCUM, LR = 4, 2, 1e-3
SPEC_PATHS = [[0, 1, 2, 3], [0, 1, 3], [0, 1, 2, 3], [0, 1, 3]]
SPEC_LRS = [LR, LR / 2, LR, LR / 2]


def _lr_probe(optimizer, lrs: list) -> None:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    inner.register_step_pre_hook(lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))


def test_every_host_runs_one_specification(slowodd, austen_sequences, data_cache, tmp_path):
    """One method defined in this file, four hosts (own loop through raptr.wrap, HF Trainer, Lightning,
    ``raptr train``): the same layers run at each step, gradient accumulation keeps one path per
    optimizer step (each micro-batch runs it), the lr factor applies to its step and is undone after
    it, FLOPs count what ran, and a checkpoint of another seed is refused by every host alike."""
    pytest.importorskip("accelerate")
    pl = pytest.importorskip("lightning.pytorch")
    import raptr
    from transformers import TrainerCallback, TrainingArguments

    from raptr.integrations import MethodCallback as HFCallback, RaptrTrainer
    from raptr.integrations.lightning import MethodCallback as LCallback

    batches = [austen_sequences[i * 4:(i + 1) * 4] for i in range(STEPS_SPEC * ACCUM)]
    results = {}

    # 1. own loop
    model = _gpt2()
    host = raptr.wrap(model, method="slowodd", total_steps=STEPS_SPEC)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    lrs: list = []
    _lr_probe(opt, lrs)
    now = {"step": 0}
    calls = _layer_calls(find_layer_stack(model), lambda: now["step"])
    flops = 0.0
    for step in range(STEPS_SPEC):
        now["step"] = step
        host.step(step, opt)
        for micro in range(ACCUM):
            model(input_ids=batches[step * ACCUM + micro], labels=batches[step * ACCUM + micro]).loss.backward()
        opt.step()
        host.after_optimizer_step(opt)
        opt.zero_grad(set_to_none=True)
    results["own loop"] = (calls, lrs, opt.param_groups[0]["lr"])
    own_state = host.state_dict()
    host.detach()

    # 2. HF Trainer
    model = _gpt2()
    step = {"now": 0}
    lrs = []

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kw):
            _lr_probe(optimizer, lrs)

        def on_step_begin(self, args, state, control, **kw):
            step["now"] = state.global_step

    calls = _layer_calls(find_layer_stack(model), lambda: step["now"])
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=STEPS_SPEC, per_device_train_batch_size=4,
                             gradient_accumulation_steps=ACCUM, learning_rate=LR, lr_scheduler_type="constant",
                             use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True)
    data = [{"input_ids": s, "labels": s.clone()} for b in batches for s in b]
    hf_cb = HFCallback("slowodd", flops="analytic", seq_len=32)
    trainer = RaptrTrainer(model=model, args=args, train_dataset=data, callbacks=[Probe(), hf_cb])
    trainer.train()
    results["HF Trainer"] = (calls, lrs, trainer.optimizer.param_groups[0]["lr"])
    hf_flops = trainer.state.total_flos

    # 3. Lightning
    module = _lightning_gpt2(pl, LR)
    lrs = []
    trainer = pl.Trainer(max_steps=STEPS_SPEC, accumulate_grad_batches=ACCUM, accelerator="cpu", devices=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=tmp_path)

    class LProbe(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            _lr_probe(trainer.optimizers[0], lrs)

    calls = _layer_calls(find_layer_stack(module.model), lambda: trainer.global_step)
    l_cb = LCallback("slowodd", flops="analytic", seq_len=32)
    trainer.callbacks[:0] = [l_cb, LProbe()]
    trainer.fit(module, torch.utils.data.DataLoader([s for b in batches for s in b], batch_size=4))
    results["Lightning"] = (calls, lrs, trainer.optimizers[0].param_groups[0]["lr"])

    for host_name, (calls, lrs, final_lr) in results.items():
        assert [sorted(set(calls[s])) for s in range(STEPS_SPEC)] == SPEC_PATHS, host_name
        assert all(calls[s].count(i) == ACCUM for s in range(STEPS_SPEC) for i in set(calls[s])), host_name  # every micro-batch
        assert lrs == pytest.approx(SPEC_LRS), host_name  # the factor on its own step
        assert final_lr == pytest.approx(LR), host_name  # and undone after it
    # FLOPs: the same analytic count (ModelFlops of the layers that ran) in the HF and Lightning hosts
    from raptr.models.registry import model_flops

    fl = model_flops(_gpt2(), 32)
    expected = sum(fl.train_step(len(p), 4) for p in SPEC_PATHS for _ in range(ACCUM))
    assert l_cb.total_flos == pytest.approx(expected, rel=1e-6) and hf_flops == pytest.approx(expected, rel=1e-6)
    # resume refusal: one rule, the host's, whoever hosts
    other = raptr.Host("slowodd", seed=5).attach(_gpt2(), STEPS_SPEC)
    with pytest.raises(RaptrError, match="seed: 0 -> 5"):
        other.load_state_dict(own_state)
    other.detach()

    # 4. raptr train: the same paths and lr factors in its log
    from raptr.training.config import OptimConfig
    from raptr.training.trainer import lr_at
    from raptr.typed import from_dict

    out = tmp_path / "run"
    assert main(["train", "--config", "bert-tiny-raptr", "-q", *TINY, *AUSTEN_DATA, f"data.cache_dir={data_cache}",
                 f"train.out_dir={out}", f"train.steps={STEPS_SPEC}", "train.eval_every=4", "method.name=slowodd",
                 "method.slowodd.layer=2"]) == 0
    train = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert [r["layers_run"] for r in train] == [len(p) for p in SPEC_PATHS]
    optim = from_dict(OptimConfig, json.loads((out / "config.json").read_text())["optim"])
    assert [r["lr"] / lr_at(r["step"] - 1, STEPS_SPEC, optim) for r in train] == pytest.approx([1, 0.5, 1, 0.5])
