"""``raptr compare``: several methods on the same data, seed, model and budget, then a report.

A comparison config names a base run config (a preset) and a list of arms; each arm is a set of
overrides on top of it. Arms run one after another into ``results/<name>/runs/<arm>/`` and each
resumes on its own, so an interrupted comparison continues where it stopped. An arm with
``match_flops_of: other`` gets the number of steps that spends the other arm's measured FLOPs
(the "equi-FLOP" baseline).
"""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from raptr.errors import RaptrError
from raptr.training.build import build_trainer, prepare_data
from raptr.training.config import from_dict, load_config, load_yaml, resolve_config_path

console = Console()


@dataclass
class Arm:
    name: str
    set: list[str] = field(default_factory=list)  # key=value overrides for this arm
    seeds: list[int] = field(default_factory=list)  # empty: the comparison's first seed
    match_flops_of: str = ""  # run as many steps as spend this arm's FLOPs


@dataclass
class CompareConfig:
    name: str
    base: str  # preset or YAML of the shared run config
    overrides: list[str] = field(default_factory=list)  # applied to every arm
    seeds: list[int] = field(default_factory=lambda: [0])
    baseline: str = "baseline"  # the arm wall-clock and loss ratios are taken against
    arms: list[Arm] = field(default_factory=list)


def load_compare_config(path: str, overrides: list[str] = ()) -> CompareConfig:
    data = load_yaml(resolve_config_path(path))
    arms = data.pop("arms", None)
    if not arms or not isinstance(arms, list):
        raise RaptrError(f"{path} has no 'arms': list the methods to compare, each with a name and overrides")
    cfg = from_dict(CompareConfig, data)
    cfg.arms = [from_dict(Arm, a, f"arms[{i}].") for i, a in enumerate(arms)]
    cfg.overrides = list(cfg.overrides) + list(overrides)
    names = [a.name for a in cfg.arms]
    if len(set(names)) != len(names):
        raise RaptrError(f"arm names must be unique, got {names}")
    for arm in cfg.arms:
        if arm.match_flops_of and arm.match_flops_of not in names:
            raise RaptrError(f"arm '{arm.name}' matches the FLOPs of unknown arm '{arm.match_flops_of}': use one of {names}")
    if cfg.baseline not in names:
        raise RaptrError(f"baseline arm '{cfg.baseline}' is not among the arms {names}")
    return cfg


def run_label(arm: Arm, seed: int) -> str:
    return arm.name if not arm.seeds or seed == arm.seeds[0] else f"{arm.name}-seed{seed}"


def arm_overrides(cfg: CompareConfig, arm: Arm, seed: int, root: Path) -> list[str]:
    label = run_label(arm, seed)
    return cfg.overrides + arm.set + [f"train.seed={seed}", f"name={label}", f"train.out_dir={root}/runs/{label}"]


def _order(cfg: CompareConfig) -> list[Arm]:
    """Arms that others match FLOPs with run first."""
    first = [a for a in cfg.arms if not a.match_flops_of]
    return first + [a for a in cfg.arms if a.match_flops_of]


def _fit_arm(base: str, overrides: list[str], progress: bool) -> dict:
    """One arm, start to finish (or resumed); runs in a worker process with --workers > 1."""
    return build_trainer(load_config(base, overrides), progress=progress).fit()


def run_compare(cfg: CompareConfig, results_dir: str | Path = "results", progress: bool = True, workers: int = 1) -> Path:
    """Run every arm (``workers`` at a time, each in its own process) and return the results dir."""
    root = Path(results_dir) / cfg.name
    root.mkdir(parents=True, exist_ok=True)
    (root / "compare.json").write_text(json.dumps({"name": cfg.name, "base": cfg.base, "overrides": cfg.overrides,
                                                   "baseline": cfg.baseline,
                                                   "arms": [a.__dict__ for a in cfg.arms]}, indent=2))
    # Validate every arm's config before spending any compute, and build the shared data once.
    planned = []
    for arm in _order(cfg):
        for seed in arm.seeds or cfg.seeds[:1]:
            planned.append((arm, seed, load_config(cfg.base, arm_overrides(cfg, arm, seed, root))))
    prepare_data(planned[0][2], progress)
    summaries: dict[str, dict] = {}
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1 else None
    pending = {}
    for i, (arm, seed, run_cfg) in enumerate(planned):
        label = run_label(arm, seed)
        overrides = arm_overrides(cfg, arm, seed, root)
        if arm.match_flops_of:
            for future, name in list(pending.items()):  # needs the matched arm's measured FLOPs
                if name == arm.match_flops_of:
                    summaries[name] = future.result()
                    del pending[future]
            target = summaries[arm.match_flops_of]
            overrides = overrides + [f"train.steps={max(1, round(target['total_steps'] * target['relative_flops']))}"]
            run_cfg = load_config(cfg.base, overrides)
        done = run_cfg.out_dir / "summary.json"
        if done.is_file() and json.loads(done.read_text()).get("steps") == run_cfg.train.steps:
            summaries[label] = json.loads(done.read_text())
            console.print(f"[{i + 1}/{len(planned)}] {label}: done already, skipping")
            continue
        console.print(f"[{i + 1}/{len(planned)}] {label}: {run_cfg.method.name}, {run_cfg.train.steps} steps, seed {seed}")
        if pool is None:
            summaries[label] = _fit_arm(cfg.base, overrides, progress)
        else:
            pending[pool.submit(_fit_arm, cfg.base, overrides, False)] = label
    for future, name in pending.items():
        summaries[name] = future.result()
    if pool is not None:
        pool.shutdown()
    return root
