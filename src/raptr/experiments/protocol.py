"""One protocol for every experiment: a typed config with presets, ``run(cfg, out)``, ``rebuild(out)``.

    raptr experiment polynomial --preset tiny steps=50 seeds=0,1     # same key=value parser as `raptr train`
    raptr experiment probes runs=docs/results/clm-tiny/runs
    raptr report DIR                                                # any experiment's or comparison's results

Each entry of ``EXPERIMENTS`` names the experiment's config dataclass and presets; ``parse``
applies ``key=value`` overrides to a preset through ``raptr.training.config`` (types, choices and
unknown keys checked there, one error line each), and the experiment validates the result.
``rebuild(out)`` regenerates the report from the results on disk without recomputing, and
``report_dir`` finds which experiment wrote a directory.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from raptr.errors import RaptrError
from raptr.training.config import from_dict, merge_dicts, parse_overrides


@dataclass
class ProbesConfig:
    runs: str = "results/bert-tiny/runs"  # a directory of finished runs (each with config.json and a checkpoint)
    tasks: list[str] = field(default_factory=lambda: ["sentiment", "subjectivity", "cloze", "source"])
    seed: int = 0
    max_examples: int = 8000  # per linear-probe task, train + test
    untrained: bool = False  # also probe each run's initial weights (the floor)
    reference: str = "standard"  # the run every other run's accuracies are compared with (paired over examples)


@dataclass
class SchedulesConfig:
    compare: str = "compare/schedules"  # the comparison preset: RaPTr schedule variants on one base run
    overrides: list[str] = field(default_factory=list)  # run-config key=value applied to every arm
    workers: int = 1


@dataclass(frozen=True)
class Experiment:
    name: str
    summary: str
    config_of: Callable[[], type]  # the typed config dataclass (its module is imported on first use)
    presets: Callable[[], dict[str, Any]]  # name -> config instance (loaded on use)
    run: Callable[[Any, Path, bool, str], Path]  # (cfg, out, progress, preset) -> report path
    rebuild: Callable[[Path], Path]  # report again from the results on disk
    owns: Callable[[Path], bool]  # whether a results directory was written by this experiment

    @property
    def config(self) -> type:
        return self.config_of()


def _polynomial():
    from raptr.experiments import polynomial

    return polynomial


def _stability():
    from raptr.experiments import stability

    return stability


def _run_probes(cfg: ProbesConfig, out: Path, progress: bool, preset: str) -> Path:
    from raptr.experiments.probes import evaluate_runs, write_probe_report

    from raptr.training.checkpoint import checkpoint_dirs, checkpoint_step
    from raptr.training.runfiles import read_json

    root = Path(cfg.runs)
    runs = sorted(p for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []
    if not runs:
        raise RaptrError(f"no finished runs under '{cfg.runs}': pass runs=results/<comparison>/runs")
    # Committed suites hold logs, not weights: probe the runs whose final checkpoint is on this machine.
    skipped, usable = [], []
    for p in runs:
        found = checkpoint_dirs(p / "checkpoints")
        done = read_json(p / "summary.json") or {}
        if cfg.untrained:
            usable.append(p)  # the initial weights come from the config alone
        elif not found:
            skipped.append(f"{p.name} (no checkpoint here)")
        elif done.get("steps") is None or checkpoint_step(found[-1]) != done["steps"]:
            skipped.append(f"{p.name} (its checkpoint is not of its last logged step)")
        else:
            usable.append(p)
    runs = usable
    if not runs:
        raise RaptrError(f"no run under '{cfg.runs}' has a checkpoint here (logs only): train the runs to probe "
                         "on this machine first (raptr compare keeps each run's last checkpoint)")
    results = evaluate_runs(runs, tasks=cfg.tasks, seed=cfg.seed, max_examples=cfg.max_examples, untrained=cfg.untrained)
    return write_probe_report(results, out, cfg.reference, skipped)


def _rebuild_probes(out: Path) -> Path:
    from raptr.experiments.probes import write_probe_report

    meta = json.loads((Path(out) / "probes_meta.json").read_text()) if (Path(out) / "probes_meta.json").is_file() else {}
    return write_probe_report(json.loads((Path(out) / "probes.json").read_text()), out, meta.get("reference", "standard"),
                              meta.get("skipped", ()))


def _run_schedules(cfg: SchedulesConfig, out: Path, progress: bool, preset: str) -> Path:
    from raptr.experiments.compare import load_compare_config, run_compare
    from raptr.experiments.report import make_report

    comparison = load_compare_config(cfg.compare, cfg.overrides)
    comparison.name = Path(out).name  # the comparison's runs and report go to ``out`` itself
    return make_report(run_compare(comparison, Path(out).parent, progress=progress, workers=cfg.workers))


def _rebuild_comparison(out: Path) -> Path:
    from raptr.experiments.report import make_report

    return make_report(out)


def _results_of(kind: str) -> Callable[[Path], bool]:
    """Results written by ``kind`` (older results.json without the key: recognised by their fields)."""
    fields = {"polynomial": "target", "stability": "linear"}[kind]

    def owns(out: Path) -> bool:
        try:
            results = json.loads((Path(out) / "results.json").read_text())
        except (OSError, ValueError):
            return False
        return results.get("experiment", kind if fields in results else None) == kind
    return owns


EXPERIMENTS: dict[str, Experiment] = {
    "polynomial": Experiment(
        "polynomial", "RaPTr vs standard training and PLD on sparse parities (the paper's §3 study)",
        lambda: _polynomial().PolynomialConfig, lambda: _polynomial().PRESETS,
        lambda cfg, out, progress, preset: _polynomial().run_config(cfg, out, progress, preset),
        lambda out: _polynomial().rebuild(out), _results_of("polynomial")),
    "stability": Experiment(
        "stability", "stability Ψ of skipping a layer vs depth, and loss jumps at a trained run's transitions",
        lambda: _stability().StabilityConfig, lambda: _stability().PRESETS,
        lambda cfg, out, progress, preset: _stability().run_config(cfg, out, progress, preset),
        lambda out: _stability().rebuild(out), _results_of("stability")),
    "schedules": Experiment(
        "schedules", "schedule robustness: RaPTr variants compared on one base run (a comparison)",
        lambda: SchedulesConfig, lambda: {"cpu": SchedulesConfig()}, _run_schedules, _rebuild_comparison,
        lambda out: (Path(out) / "compare.json").is_file()),
    "probes": Experiment(
        "probes", "downstream probes (sentiment, subjectivity, cloze, source) of finished runs' checkpoints",
        lambda: ProbesConfig, lambda: {"cpu": ProbesConfig()}, _run_probes, _rebuild_probes,
        lambda out: (Path(out) / "probes.json").is_file()),
}


def experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise RaptrError(f"unknown experiment {name!r}: use one of {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]


def parse(name: str, preset: str = "cpu", overrides: list[str] = ()) -> Any:
    """The experiment's config: a preset with ``key=value`` overrides, parsed like ``raptr train``'s."""
    exp = experiment(name)
    presets = exp.presets()
    if preset not in presets:
        raise RaptrError(f"experiment {name} has no preset '{preset}': use one of {', '.join(presets)}")
    data = merge_dicts(dataclasses.asdict(presets[preset]), parse_overrides(list(overrides)))
    return from_dict(exp.config, data)


def run(name: str, out: str | Path | None = None, preset: str = "cpu", overrides: list[str] = (),
        progress: bool = True) -> Path:
    """Parse, validate and run one experiment; results and report go to ``out`` (default results/NAME)."""
    cfg = parse(name, preset, overrides)
    return experiment(name).run(cfg, Path(out or f"results/{name}"), progress, preset)


def report_dir(out: str | Path) -> Path:
    """Regenerate the report of whatever experiment (or comparison) wrote ``out``, from its files."""
    out = Path(out)
    if not out.is_dir():
        raise RaptrError(f"'{out}' is not a directory: give a results directory, e.g. docs/results/clm-tiny")
    for exp in EXPERIMENTS.values():
        if exp.owns(out):
            return exp.rebuild(out)
    return _rebuild_comparison(out)  # a comparison directory (its own errors say what is missing)
