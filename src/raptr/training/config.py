"""Typed run configuration: dataclasses, YAML presets, ``key=value`` overrides, validation.

Every field is a CLI override (``raptr train --config bert-tiny-raptr train.steps=200``) and every
mistake is one ``RaptrError`` line naming the key and the fix. ``Literal`` fields are the choices.
The ``method`` section is derived from the method registry: ``method.name`` picks a registered
method and ``method.<name>.*`` are the fields of that method's ``Options`` dataclass.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from raptr import typed
from raptr.errors import RaptrError
from raptr.methods.registry import METHODS, method_class

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class ModelConfig:
    family: Literal["reference", "hf"] = "reference"  # reference: our pre-LN transformer; hf: a transformers model built from config
    hf_type: Literal["bert", "roberta", "gpt2", "llama", "opt", "gpt_neox"] = "bert"  # family=hf
    d_model: int = 128
    n_layers: int = 12
    n_heads: int = 2
    d_ff: int = 512
    layer_norm: bool = True  # reference only: switches for the stability study
    residual: bool = True


@dataclass
class DataConfig:
    sources: list[str] = field(default_factory=lambda: ["default"])  # corpus names or local paths
    cache_dir: str = "data"  # corpora, tokenizers and token files are built here once
    tokenizer: str = "auto"  # auto (wordpiece for mlm, bpe otherwise) | wordpiece | bpe | path/to/tokenizer.json
    vocab_size: int = 8192
    seq_len: int = 128
    val_fraction: float = 0.02  # share of whole documents held out for validation


@dataclass
class ObjectiveConfig:
    name: Literal["mlm", "causal", "ul2"] = "mlm"  # mlm: encoder; causal, ul2 (UL2 mixture of denoisers): decoder
    mask_rate: float = 0.15  # mlm


class MethodConfig:
    """The ``method`` section: ``name`` plus one field per registered method holding its ``Options``.

    The dataclass is built from the registry (``method_config_type``), so a method registered by a
    user's code gets its config keys, CLI help and validation like the built-in ones.
    """

    name: str


_METHOD_TYPES: dict[tuple, type] = {}


def method_config_type() -> type:
    """The ``MethodConfig`` dataclass for the methods registered now (cached per registry state)."""
    key = tuple((name, cls.Options) for name, cls in METHODS.items())
    if key not in _METHOD_TYPES:
        fields = [("name", str, field(default="standard"))] + [
            (name, options, field(default_factory=options)) for name, options in key if options is not None]
        _METHOD_TYPES[key] = dataclasses.make_dataclass("MethodConfig", fields, bases=(MethodConfig,))
    return _METHOD_TYPES[key]


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 100
    decay: Literal["cosine", "linear", "constant"] = "cosine"  # after warm-up
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    grad_clip: float = 1.0  # 0 = off
    grad_accum: int = 1  # micro-batches per optimizer step (one RaPTr path for all of them)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # sequences per micro-batch
    seed: int = 0  # initial weights, data order and masking: a comparison's arms share it (paired design)
    path_seed: int = -1  # the method's own randomness (paths, drop masks); -1 = train.seed
    eval_every: int = 100  # also evaluated at every stage boundary and at the end
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    threads: int = 0  # torch threads (0 = torch's default)
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast on GPU
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun (fsdp: FSDP2, one unit per block); batch_size is the global batch
    compile: bool = False  # torch.compile each block (the path choice stays in eager Python)
    path_check_every: int = 50  # under torchrun: all-reduce a hash of the path every N steps
    max_nonfinite_steps: int = 5  # stop after this many steps in a row with a NaN/inf loss or gradient (none is applied)
    out_dir: str = "runs/{name}"


@dataclass
class RunConfig:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    method: MethodConfig = field(default_factory=lambda: method_config_type()())
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def out_dir(self) -> Path:
        return Path(self.train.out_dir.format(name=self.name))


def _resolve(kind: Any) -> Any:
    return method_config_type() if kind is MethodConfig else kind  # the registered methods' options


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """``cls(**data)`` with every value converted and checked against its field's type (raptr.typed)."""
    return typed.from_dict(cls, data, prefix, _resolve)


def merge_dicts(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (PRESET_DIR / f"{name_or_path}.yaml", PRESET_DIR / name_or_path):
        if candidate.is_file():
            return candidate
    presets = sorted(str(p.relative_to(PRESET_DIR).with_suffix("")) for p in PRESET_DIR.rglob("*.yaml"))
    raise RaptrError(f"no config file or preset named '{name_or_path}': give a YAML path or one of: {', '.join(presets)}")


def load_yaml(path: Path, _seen: tuple = ()) -> dict:
    if path.resolve() in _seen:
        chain = " -> ".join(str(p) for p in _seen + (path.resolve(),))
        raise RaptrError(f"config inheritance loops ({chain}): remove the 'inherit' that points back")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RaptrError(f"{path} is not valid YAML ({str(e).splitlines()[0]}): fix the syntax") from None
    if not isinstance(data, dict):
        raise RaptrError(f"{path} must hold a mapping of config sections, got {type(data).__name__}")
    inherits = data.pop("inherit", None)  # presets share a base file
    if inherits:
        if not isinstance(inherits, str):
            raise RaptrError(f"{path}: 'inherit' must name one YAML file or preset, got {inherits!r}")
        parent = path.parent / inherits
        parent = parent if parent.is_file() else resolve_config_path(inherits)
        data = merge_dicts(load_yaml(parent, _seen + (path.resolve(),)), data)
    return data


def parse_overrides(items: list[str]) -> dict:
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise RaptrError(f"override '{item}' has no '=': write section.key=value, e.g. train.steps=200")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def load_config(config: str | None, overrides: list[str] = ()) -> RunConfig:
    data = load_yaml(resolve_config_path(config)) if config else {}
    cfg = from_dict(RunConfig, merge_dicts(data, parse_overrides(list(overrides))))
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict:
    """The config as plain data; the ``method`` section keeps only the chosen method's options."""
    out = dataclasses.asdict(cfg)
    if isinstance(cfg, RunConfig):
        name = cfg.method.name
        out["method"] = {k: v for k, v in out["method"].items() if k in ("name", name)}
    return out


def validate(cfg: RunConfig) -> None:
    flat = flatten(to_dict(cfg))
    method = method_class(cfg.method.name)  # an unknown name is one error line listing the registered ones
    positive = ["model.d_model", "model.n_layers", "model.n_heads", "model.d_ff", "data.vocab_size", "data.seq_len",
                "train.steps", "train.batch_size", "train.eval_every", "train.eval_batches", "train.checkpoint_every",
                "train.keep_checkpoints", "train.log_every", "train.path_check_every", "optim.lr", "optim.grad_accum",
                "train.max_nonfinite_steps"]
    for key in positive:
        if flat[key] <= 0:
            raise RaptrError(f"'{key}' must be positive, got {flat[key]}")
    if cfg.train.threads < 0 or cfg.train.path_seed < -1:
        raise RaptrError("train.threads must be >= 0 (0 = torch's default) and train.path_seed >= -1 (-1 = train.seed)")
    try:
        out = cfg.out_dir
    except (KeyError, IndexError, ValueError) as e:
        raise RaptrError(f"train.out_dir {cfg.train.out_dir!r} has an unknown placeholder ({e}): only {{name}} is filled in") from None
    if out.exists() and not out.is_dir():
        raise RaptrError(f"train.out_dir {out} is a file: give a directory path")
    m, o = cfg.model, cfg.optim
    if m.d_model % m.n_heads:
        raise RaptrError(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}: pick a head count that divides it")
    if not 0 < cfg.objective.mask_rate < 1:
        raise RaptrError(f"objective.mask_rate must be in (0, 1), got {cfg.objective.mask_rate}")
    if not 0 <= cfg.data.val_fraction < 0.5:
        raise RaptrError(f"data.val_fraction must be in [0, 0.5), got {cfg.data.val_fraction}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise RaptrError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
    if o.warmup_steps < 0 or o.weight_decay < 0 or o.grad_clip < 0 or not 0 <= o.min_lr_ratio <= 1:
        raise RaptrError("optim.warmup_steps, weight_decay and grad_clip must be >= 0 and min_lr_ratio in [0, 1]")
    encoder = cfg.objective.name == "mlm"
    if m.family == "hf" and encoder != (m.hf_type in ("bert", "roberta")):
        raise RaptrError(f"objective '{cfg.objective.name}' does not fit model.hf_type={m.hf_type}: use mlm with bert/roberta, causal with gpt2/llama/opt/gpt_neox")
    if m.family == "hf" and cfg.objective.name == "ul2":
        raise RaptrError("UL2 needs prefix-LM attention, which only the reference decoder has: set model.family=reference")
    options = getattr(cfg.method, cfg.method.name, None)
    if hasattr(options, "check"):  # the method's own checks, with the model's depth and the run's length
        options.check(m.n_layers, cfg.train.steps)
    if method.Options is not None and not isinstance(options, method.Options):
        raise RaptrError(f"method.{cfg.method.name} holds {type(options).__name__}, not {method.Options.__name__}")


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def describe_fields(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(key, type, default) for every leaf field: the CLI's ``--help`` is derived from this."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if kind is MethodConfig:
            kind = method_config_type()
        if dataclasses.is_dataclass(kind):
            rows += describe_fields(kind, f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if typing.get_origin(kind) is Literal:
                name = "|".join(map(str, typing.get_args(kind)))
            elif prefix + f.name == "method.name":
                name = "|".join(METHODS)
            else:
                name = getattr(kind, "__name__", str(kind))
            rows.append((prefix + f.name, name, default))
    return rows
