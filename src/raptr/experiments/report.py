"""``raptr report DIR``: a comparison's evidence, rebuilt from whatever run logs are there.

Writes ``DIR/report.md`` (tables, verdicts, plots) and ``DIR/evidence.json`` (every number the
report states, per arm and per paired comparison). Runs are grouped into arms and seeds with the
comparison's ``compare.json``; runs that have not finished, and planned runs that never started,
are listed as missing instead of being counted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from raptr.errors import RaptrError  # noqa: E402
from raptr.experiments.compare import CompareConfig, arm_seeds, last_step, parse_label, run_label  # noqa: E402
from raptr.experiments.stats import (  # noqa: E402
    EQUIVALENCE_MARGIN, equivalence, first_crossing, interpolate, mean_std, paired_difference, seeds_needed, t975, verdict)
from raptr.training.config import from_dict  # noqa: E402
from raptr.training.runfiles import read_json, read_jsonl  # noqa: E402

PLOTS = {
    "val_loss_vs_flops.png": "full-model validation loss vs training FLOPs (mean over seeds, band: min-max)",
    "val_loss_vs_step.png": "full-model validation loss vs step (mean over seeds, band: min-max)",
    "val_loss_vs_wallclock.png": "full-model validation loss vs training wall-clock (mean over seeds)",
    "paired_difference.png": "paired difference to the baseline at equal FLOPs over training (mean, band: 95% CI)",
    "train_loss_transitions.png": "training loss around each stage transition (first seed)",
    "path_length.png": "layers run per step over training (first seed)",
}


@dataclass
class Run:
    label: str
    arm: str
    seed: int
    summary: dict
    train: list[dict] = field(default_factory=list)
    eval: list[dict] = field(default_factory=list)
    calibrated: dict[int, float] = field(default_factory=dict)  # step -> seconds from the quiet step-cost table

    @property
    def finished(self) -> bool:
        return self.summary.get("steps") is not None and self.summary.get("steps") == self.summary.get("total_steps")

    @property
    def final(self) -> float:
        return self.summary["final_val_loss"]


def _read_json(path: Path) -> dict | None:
    data = read_json(path)
    return data if isinstance(data, dict) else None


def load_compare_meta(root: Path) -> CompareConfig | None:
    meta = _read_json(root / "compare.json")
    if not meta or not isinstance(meta.get("arms"), list):
        return None
    from raptr.experiments.compare import Arm

    try:
        arms = [from_dict(Arm, a) for a in meta["arms"]]
        cfg = from_dict(CompareConfig, {k: v for k, v in meta.items() if k != "arms"})
    except (RaptrError, TypeError, AttributeError):
        return None
    cfg.arms = arms
    cfg.references = cfg.references or [cfg.baseline]
    return cfg


def step_cost(root: Path) -> dict | None:
    """The quiet step-time table written by ``benchmarks/step_cost.py`` (seconds per step by layers run)."""
    table = _read_json(root / "step_cost.json")
    return table if table and table.get("layers") and table.get("seconds") else None


def _calibrate(run: Run, table: dict) -> None:
    """Price each logged step by its layers run. A width step (a fraction of heads/units below 1) is not
    in the table, so such a run gets no calibrated seconds rather than a full step's price."""
    if any(row.get("fraction", 1.0) < 1.0 for row in run.train):
        return
    layers, seconds = table["layers"], table["seconds"]
    total = 0.0
    run.calibrated[0] = 0.0
    for row in run.train:
        k = row["layers_run"]
        cost = interpolate(layers, seconds, min(max(k, layers[0]), layers[-1]))
        total += cost
        run.calibrated[row["step"]] = total


def load_runs(root: Path, cfg: CompareConfig | None) -> list[Run]:
    runs_dir = root / "runs"
    if not runs_dir.is_dir():
        raise RaptrError(f"no runs under {root}: run `raptr compare --config ...` first")
    table = step_cost(root)
    runs = []
    for d in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        summary = _read_json(d / "summary.json")
        metrics = d / "metrics.jsonl"
        if summary is None or not metrics.is_file():
            continue
        config = _read_json(d / "config.json") or {}
        where = parse_label(d.name, cfg) if cfg else None
        arm = where[0] if where else d.name
        seed = config.get("train", {}).get("seed", where[1] if where else 0)  # the seed the run really used
        rows = [r for r in read_jsonl(metrics)[0]
                if r["kind"] != "eval" or isinstance(r.get("val_loss"), (int, float))]  # non-finite evals are null
        run = Run(d.name, arm, seed, summary, [r for r in rows if r["kind"] == "train"], [r for r in rows if r["kind"] == "eval"])
        if table:
            _calibrate(run, table)
        runs.append(run)
    return runs


# ------------------------------------------------------------------------------------ evidence
def _arm_order(cfg: CompareConfig | None, runs: list[Run]) -> list[str]:
    names = [a.name for a in cfg.arms] if cfg else []
    return names + sorted({r.arm for r in runs} - set(names))


def _time_to_target(run: Run, target: float, base: Run) -> dict:
    evals = run.eval
    losses = [e["val_loss"] for e in evals]
    flops = first_crossing([e["flops"] for e in evals], losses, target)
    raw = first_crossing([e["train_seconds"] for e in evals], losses, target)
    out = {"flops_ratio": None if flops is None else flops / base.summary["flops"],
           "wallclock_ratio_raw": None if raw is None else raw / base.summary["train_seconds"],
           "wallclock_ratio_calibrated": None}
    if run.calibrated and base.calibrated:
        cal = first_crossing([run.calibrated.get(e["step"], math.nan) for e in evals], losses, target)
        base_total = base.calibrated[max(base.calibrated)]
        out["wallclock_ratio_calibrated"] = None if cal is None else cal / base_total
    return out


TRANSITION_WINDOW = 20  # steps of training loss averaged on each side of a stage boundary


def _window_change(run: Run, step: int) -> float | None:
    """Mean training loss of the TRANSITION_WINDOW steps after ``step`` minus the ones up to it."""
    losses = {t["step"]: t["loss"] for t in run.train if isinstance(t.get("loss"), (int, float))}
    before = [losses[s] for s in range(step - TRANSITION_WINDOW + 1, step + 1) if s in losses]
    after = [losses[s] for s in range(step + 1, step + TRANSITION_WINDOW + 1) if s in losses]
    return sum(after) / len(after) - sum(before) / len(before) if before and after else None


def transitions(run: Run, base: Run | None = None) -> list[dict]:
    """Per stage boundary: mean training loss of the steps just before and just after it (a loss
    spike at a transition shows as after − before > 0), the same change in the baseline run of the
    same seed over the same steps (what plain training gives there), and the val loss at the boundary."""
    rows = [t for t in run.train if isinstance(t.get("loss"), (int, float))]
    out = []
    for i in range(1, len(rows)):
        if rows[i]["stage"] == rows[i - 1]["stage"]:
            continue
        windows = (rows[max(0, i - TRANSITION_WINDOW):i], rows[i:i + TRANSITION_WINDOW])
        before, after = ([t["loss"] for t in w] for w in windows)
        at = next((e["val_loss"] for e in run.eval if e["step"] == rows[i - 1]["step"]), None)
        work = [sum(t.get("layers_run", 0) * t.get("fraction", 1.0) for t in w) / len(w) for w in windows]
        out.append({"arm": run.arm, "seed": run.seed, "step": rows[i - 1]["step"], "to_stage": rows[i]["stage"],
                    "subnetwork": "grows" if work[1] > work[0] else "shrinks" if work[1] < work[0] else "same",
                    "train_before": sum(before) / len(before), "train_after": sum(after) / len(after),
                    "change": sum(after) / len(after) - sum(before) / len(before), "val_at_boundary": at,
                    "baseline_change": None if base is None else _window_change(base, rows[i - 1]["step"])})
    return out


def transition_excess(rows: list[dict]) -> list[dict]:
    """Per arm, the spike test: each seed's mean over its growing boundaries (the paper's claim is about
    moving to larger subnetworks; leaving a full-model warm-up for a smaller one is expected to cost)
    of (change − the baseline's change over the same steps), paired over seeds with a 95% t interval.
    A spike is an interval above 0."""
    rows = [t for t in rows if t.get("subnetwork", "grows") == "grows"]
    out = []
    for arm in dict.fromkeys(t["arm"] for t in rows):
        own, base = {}, {}
        for seed in dict.fromkeys(t["seed"] for t in rows if t["arm"] == arm):
            ts = [t for t in rows if t["arm"] == arm and t["seed"] == seed and t["baseline_change"] is not None]
            if ts:
                own[seed] = sum(t["change"] for t in ts) / len(ts)
                base[seed] = sum(t["baseline_change"] for t in ts) / len(ts)
        if own:
            diff = paired_difference(own, base)
            word = verdict(diff)
            word = "spike" if word == "worse" else "smaller than the baseline's" if word == "better" else word
            out.append({"arm": arm, "n": diff["n"], "mean_diff": diff["mean_diff"], "ci95": diff["ci95"],
                        "half_width": diff["half_width"], "verdict": word})
    return out


def _baseline_flops_to(base: Run, run: Run) -> float | None:
    at = first_crossing([e["flops"] for e in base.eval], [e["val_loss"] for e in base.eval], run.final)
    return None if at is None else at / run.summary["flops"]


def _baseline_loss_at(base: Run, run: Run) -> float | None:
    """The baseline's val loss at the FLOPs the arm spent in all (linear between its evaluations)."""
    return interpolate([e["flops"] for e in base.eval], [e["val_loss"] for e in base.eval], run.summary["flops"])


PLATEAU_MARGIN = 0.5  # nats below the unigram plateau that count as having left it


def training_health(run: Run, plateau: float | None) -> dict:
    """How a run's early training went: its largest logged gradient norm (before clipping; train rows are
    logged every ``log_every`` steps) and the first evaluation step whose full-model val loss is
    PLATEAU_MARGIN below the unigram plateau (None: never, or no plateau known)."""
    norms = [r["grad_norm"] for r in run.train if isinstance(r.get("grad_norm"), (int, float)) and math.isfinite(r["grad_norm"])]
    left = None if plateau is None else next((e["step"] for e in run.eval if e["val_loss"] <= plateau - PLATEAU_MARGIN), None)
    return {"max_grad_norm": max(norms) if norms else None, "plateau_exit_step": left}


def _mean_or_none(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals and len(vals) == len(values) else None


def horizon_change(root: Path, other: str, comparisons: list[dict]) -> dict | None:
    """How each paired gap (arm − reference) changed from the suite ``other`` (the same arms at another
    training length, in the same results root) to this one: per seed, gap here − gap there, with a 95%
    t interval over the seeds both suites have. Below 0: the arm gained on the reference here."""
    other_root = root.parent / other
    if other_root.resolve() == root.resolve() or not (other_root / "runs").is_dir():
        return {"suite": other, "steps": None, "comparisons": [],
                "note": f"horizon_of: no suite '{other}' beside this one ({other_root}) to compare with"}
    other_cfg = load_compare_meta(other_root)
    there: dict[str, dict[int, float]] = {}
    steps = None
    for r in load_runs(other_root, other_cfg):
        if r.finished and isinstance(r.summary.get("final_val_loss"), (int, float)):
            there.setdefault(r.arm, {})[r.seed] = r.final
            if r.arm == (other_cfg.baseline if other_cfg else r.arm):
                steps = r.summary.get("total_steps")
    rows = []
    for c in comparisons:
        if c["arm"] not in there or c["against"] not in there:
            continue
        gap_there = {s: there[c["arm"]][s] - there[c["against"]][s] for s in there[c["arm"]] if s in there[c["against"]]}
        change = paired_difference(dict(zip(c["seeds"], c["diffs"])), gap_there)
        if not change["n"]:
            continue
        word = verdict(change)
        word = {"better": "gains on it here", "worse": "loses ground here"}.get(word, word)
        rows.append({"arm": c["arm"], "against": c["against"], "n": change["n"], "seeds": change["seeds"],
                     "gap_there": sum(gap_there[s] for s in change["seeds"]) / change["n"],
                     "gap_here": sum(dict(zip(c["seeds"], c["diffs"]))[s] for s in change["seeds"]) / change["n"],
                     "mean_change": change["mean_diff"], "ci95": change["ci95"], "half_width": change["half_width"],
                     "verdict": word})
    return {"suite": other, "steps": steps, "comparisons": rows}


def build_evidence(root: str | Path) -> dict:
    """Every number of the report, from the committed logs (also written as DIR/evidence.json)."""
    root = Path(root)
    cfg = load_compare_meta(root)
    runs = load_runs(root, cfg)
    finished = [r for r in runs if r.finished and isinstance(r.summary.get("final_val_loss"), (int, float))]
    if not finished:
        raise RaptrError(f"no finished runs under {root / 'runs'}: let `raptr compare` finish some (it resumes) first")
    baseline = cfg.baseline if cfg else finished[0].arm
    by_arm: dict[str, dict[int, Run]] = {}
    for r in finished:
        by_arm.setdefault(r.arm, {})[r.seed] = r
    base_runs = by_arm.get(baseline, {})
    if not base_runs:
        raise RaptrError(f"the baseline arm '{baseline}' has no finished run yet: run it first "
                         f"(raptr compare ... --only {baseline})")
    data = _read_json(root / "data.json") or {}
    plateau = data.get("unigram_val_loss")
    arms = []
    for name in _arm_order(cfg, finished):
        seeds = by_arm.get(name, {})
        if not seeds:
            continue
        finals = [seeds[s].final for s in sorted(seeds)]
        mean, std = mean_std(finals)
        paired = [s for s in sorted(seeds) if s in base_runs]  # ratios only against the same seed's baseline
        rel = [seeds[s].summary["flops"] / base_runs[s].summary["flops"] for s in paired]
        ttt = [_time_to_target(seeds[s], base_runs[s].final, base_runs[s]) for s in paired]
        # The other way round: the FLOPs the baseline needed to reach this arm's final loss, over the
        # arm's FLOPs (> 1: the arm got there cheaper; < 1: its savings did not pay).
        reverse = [_baseline_flops_to(base_runs[s], seeds[s]) for s in paired]
        method = seeds[min(seeds)].summary.get("method")
        health = [training_health(seeds[s], plateau) for s in sorted(seeds)]
        arms.append({
            "arm": name, "method": method, "seeds": sorted(seeds), "steps": [seeds[s].summary["steps"] for s in sorted(seeds)],
            "rel_flops": sum(rel) / len(rel) if rel else None, "rel_flops_per_seed": rel, "ratio_seeds": paired,
            "final_val_loss": finals, "final_val_loss_mean": mean, "final_val_loss_std": std,
            "time_to_target_flops_ratio": _mean_or_none([t["flops_ratio"] for t in ttt]),
            "time_to_target_flops_ratio_per_seed": [t["flops_ratio"] for t in ttt],
            "baseline_flops_to_arm_loss_ratio": _mean_or_none(reverse),
            "baseline_flops_to_arm_loss_ratio_per_seed": reverse,
            # arm's final loss − the baseline's loss at the same FLOPs (< 0: the arm is ahead at equal FLOPs)
            "lead_at_equal_flops_per_seed": [None if (b := _baseline_loss_at(base_runs[s], seeds[s])) is None
                                             else seeds[s].final - b for s in paired],
            "train_seconds_per_seed": [seeds[s].summary["train_seconds"] for s in sorted(seeds)],
            "time_to_target_wallclock_ratio_raw": _mean_or_none([t["wallclock_ratio_raw"] for t in ttt]),
            "time_to_target_wallclock_ratio_calibrated": _mean_or_none([t["wallclock_ratio_calibrated"] for t in ttt]),
            "wallclock_ratio_raw": _mean_or_none([seeds[s].summary["train_seconds"] / base_runs[s].summary["train_seconds"]
                                                  for s in paired]) if paired else None,
            "max_grad_norm_per_seed": [h["max_grad_norm"] for h in health],
            "plateau_exit_step_per_seed": [h["plateau_exit_step"] for h in health],
            "git_commits": sorted({str(seeds[s].summary.get("git_commit")) for s in seeds}),
        })
    references = [r for r in (cfg.references if cfg else [baseline]) if r in by_arm]
    comparisons = []
    for a in arms:
        for ref in references:
            if a["arm"] in (ref, baseline):  # the baseline against the other references is the same pair flipped
                continue
            diff = paired_difference({s: r.final for s, r in by_arm[a["arm"]].items()},
                                     {s: r.final for s, r in by_arm[ref].items()})
            comparisons.append({"arm": a["arm"], "against": ref, "mean_diff": diff["mean_diff"], "ci95": diff["ci95"],
                                "half_width": diff["half_width"], "n": diff["n"], "seeds": diff["seeds"],
                                "diffs": diff["diffs"], "verdict": verdict(diff), "equivalence": equivalence(diff),
                                "seeds_for_equivalence": seeds_needed(diff)})
    planned = [(arm.name, s, run_label(arm, s, cfg)) for arm in cfg.arms for s in arm_seeds(cfg, arm)] if cfg else []
    done = {r.label for r in finished}
    partial = {lab: last_step(root / "runs" / lab) for _, _, lab in planned if lab not in done and (root / "runs" / lab).is_dir()}
    table = step_cost(root)
    return {
        "name": cfg.name if cfg else root.name, "base": cfg.base if cfg else None,
        "overrides": cfg.overrides if cfg else [], "baseline": baseline, "references": references,
        "unigram_val_loss": plateau, "data": data, "plateau_margin": PLATEAU_MARGIN,
        "step_cost": {k: table[k] for k in ("layers", "seconds", "threads", "note") if k in table} if table else None,
        "arms": arms, "comparisons": comparisons,
        "horizon": horizon_change(root, cfg.horizon_of, comparisons) if cfg and cfg.horizon_of else None,
        "transitions": (steps := [t for r in finished for t in transitions(r, base_runs.get(r.seed))]),
        "transition_excess": transition_excess(steps),
        "missing": [{"arm": a, "seed": s, "label": lab, "steps_done": partial.get(lab)} for a, s, lab in planned if lab not in done],
        "equivalence_margin": EQUIVALENCE_MARGIN,
        "_runs": finished, "_by_arm": by_arm,
    }


# ------------------------------------------------------------------------------------ report
def _f(x: float | None, fmt: str = ".4f") -> str:
    return "-" if x is None else format(x, fmt)


def make_report(root: str | Path) -> Path:
    root = Path(root)
    ev = build_evidence(root)
    runs, by_arm = ev.pop("_runs"), ev.pop("_by_arm")
    (root / "evidence.json").write_text(json.dumps(ev, indent=2, allow_nan=False, default=str) + "\n")
    plateau = ev["unigram_val_loss"]
    lines = [f"# Comparison: {ev['name']}", "",
             f"Base config `{ev['base']}`; overrides `{' '.join(ev['overrides']) or '-'}`. "
             f"Regenerate with `raptr report {root}`; every number here is also in `evidence.json`.", ""]
    if plateau is not None:
        lines += [f"Unigram plateau of this tokenizer on the val split (cross-entropy under the train split's token "
                  f"frequencies): **{plateau:.3f}** nats. A model that has learned only token frequencies sits there.", ""]
    n_planned = sum(len(a["seeds"]) for a in ev["arms"]) + len(ev["missing"])
    lines += [f"Runs finished: {sum(len(a['seeds']) for a in ev['arms'])} of {n_planned} planned."]
    if ev["missing"]:
        lines += ["Missing (not counted anywhere below): " + ", ".join(
            m["label"] + (f" (at step {m['steps_done']})" if m["steps_done"] else "") for m in ev["missing"]) + "."]
    lines += ["", "## Arms", "",
              "| arm (method) | seeds | rel. FLOPs | final val loss, mean ± std | per seed | below plateau "
              "| FLOPs to baseline's loss | wall-clock to it (calibrated / raw) | baseline's FLOPs to this loss / this arm's |",
              "|---|---|---|---|---|---|---|---|---|"]
    for a in ev["arms"]:
        below = "-" if plateau is None else f"{plateau - a['final_val_loss_mean']:.2f}"
        ttt = a["time_to_target_flops_ratio"]
        reached = sum(v is not None for v in a["time_to_target_flops_ratio_per_seed"])
        n_paired = len(a["ratio_seeds"])
        ttt_s = (_f(ttt, ".3f") if ttt is not None else
                 f"not reached ({reached}/{n_paired} seeds)" if n_paired else "no same-seed baseline")
        std = f" ± {a['final_val_loss_std']:.4f}" if a["final_val_loss_std"] is not None else " (1 seed)"
        lines.append(f"| {a['arm']} ({a['method']}) | {len(a['seeds'])} | {_f(a['rel_flops'], '.3f')} | {a['final_val_loss_mean']:.4f}{std} "
                     f"| {', '.join(f'{v:.4f}' for v in a['final_val_loss'])} | {below} | {ttt_s} "
                     f"| {_f(a['time_to_target_wallclock_ratio_calibrated'], '.3f')} / {_f(a['time_to_target_wallclock_ratio_raw'], '.3f')} "
                     f"| {_f(a['baseline_flops_to_arm_loss_ratio'], '.3f')} |")
    cal = ev["step_cost"]
    lines += ["", f"*rel. FLOPs*: the run's exact training FLOPs (from the layers that ran) over the `{ev['baseline']}` run "
              "of the same seed. *FLOPs to baseline's loss* (time-to-target): training FLOPs at which the arm's full-model "
              f"val loss first reaches the final loss of `{ev['baseline']}` (same seed; interpolated between evaluations), "
              f"over `{ev['baseline']}`'s total: below 1 is a speed-up. *Wall-clock*: the same ratio in seconds. "
              f"*Baseline's FLOPs to this loss*: the FLOPs at which `{ev['baseline']}` (same seed) first reached the arm's "
              "final loss, over the arm's FLOPs: above 1, the arm reached its loss for fewer FLOPs than standard training "
              "needs for it; below 1, its FLOP savings did not pay. "
              + ("Calibrated seconds come from per-step costs by layers run, measured in one quiet interleaved run "
                 f"(`step_cost.json`: {cal.get('note', '')}); raw seconds are what the runs logged while sharing a "
                 "loaded machine, so they are noise-prone. Width steps (fewer heads/units, all layers) are not in that "
                 "table, so width arms have no calibrated seconds." if cal else
                 "No quiet step-cost table (`benchmarks/step_cost.py`) is present, so only raw seconds are shown: "
                 "they were logged on a shared, loaded machine and are noise-prone."),
              "", "## Paired comparisons (final full-model val loss, arm − reference, same seeds)", "",
              f"| arm | against | n | mean diff | 95% CI | verdict | 90% CI | equivalent within ±{EQUIVALENCE_MARGIN}? (TOST) |",
              "|---|---|---|---|---|---|---|---|"]
    for c in ev["comparisons"]:
        eq = c["equivalence"]
        ci90 = "-" if eq["ci90"] is None else f"[{eq['ci90'][0]:+.4f}, {eq['ci90'][1]:+.4f}]"
        lines.append(f"| {c['arm']} | {c['against']} | {c['n']} | {_f(c['mean_diff'], '+.4f')} | {_ci(c)} | {c['verdict']} "
                     f"| {ci90} | {_equivalent(c)} |")
    lines += ["", "Negative = the arm reached a lower loss. Intervals are t intervals over the paired per-seed differences "
              f"(95%: t quantiles {', '.join(f'df={d}: {t975(d):.3f}' for d in (1, 2, 3))}). A verdict of *better*/*worse* "
              "means the 95% interval excludes 0; *no detectable difference* means it contains 0, which is not a claim that "
              f"the arms are alike. *Equivalent* comes only from a two one-sided test at ±{EQUIVALENCE_MARGIN} nats (each "
              "one-sided test at 5%: the 90% interval lies inside the margin); *~N seeds* is how many seeds that test would "
              "need if the mean difference and seed-to-seed sd stayed as measured. A result from one seed is labelled *one "
              "seed* and is not evidence.", ""]
    lines += ["## Training health", "",
              f"Per seed: the largest gradient norm logged (before clipping, every logged step) and the first evaluation "
              f"step at which the full-model val loss was {PLATEAU_MARGIN} nats below the unigram plateau "
              "(*never*: not within the run; *-*: no plateau known). Where the final losses of two arms differ, these "
              "say whether the difference was made at the start (one arm left the plateau later).", "",
              "| arm | max grad norm per seed | leaves the plateau at step, per seed |", "|---|---|---|"]
    for a in ev["arms"]:
        exits = ["-" if plateau is None else ("never" if s is None else str(s)) for s in a["plateau_exit_step_per_seed"]]
        lines.append(f"| {a['arm']} | {', '.join(_f(g, '.2f') for g in a['max_grad_norm_per_seed'])} | {', '.join(exits)} |")
    lines.append("")
    hz = ev.get("horizon")
    if hz and hz.get("note"):
        lines += [f"*{hz['note']}.*", ""]
    if hz and hz["comparisons"]:
        lines += [f"## The same gaps at another training length ({hz['suite']}, {hz['steps']} steps)", "",
                  f"Per seed, the paired gap (arm − reference, final val loss) in this suite minus the same gap in "
                  f"`{hz['suite']}`, 95% t interval over the seeds both have. Below 0: the arm gains on the reference "
                  "with this training length.", "",
                  f"| arm | against | seeds | gap in {hz['suite']} | gap here | change | 95% CI | verdict |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {h['arm']} | {h['against']} | {h['n']} | {h['gap_there']:+.4f} | {h['gap_here']:+.4f} | "
                  f"{h['mean_change']:+.4f} | {_ci(h)} | {h['verdict']} |" for h in hz["comparisons"]]
        lines.append("")
    if ev["transitions"]:
        worst = max(ev["transitions"], key=lambda t: t["change"])
        lines += ["## Stage transitions", "",
                  f"Mean training loss of the {TRANSITION_WINDOW} steps after each stage boundary minus the "
                  f"{TRANSITION_WINDOW} steps before it (a spike would be positive), over "
                  f"{len(ev['transitions'])} boundaries of {len({(t['arm'], t['seed']) for t in ev['transitions']})} runs:", "",
                  f"| arm | seed | boundary step | to stage | subnetwork | train loss before | after | change | {ev['baseline']}'s change, same steps |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {t['arm']} | {t['seed']} | {t['step']} | {t['to_stage']} | {t.get('subnetwork', '-')} | {t['train_before']:.4f} | "
                  f"{t['train_after']:.4f} | {t['change']:+.4f} | {_f(t['baseline_change'], '+.4f')} |" for t in ev["transitions"]]
        lines += ["", f"Largest change: {worst['change']:+.4f} ({worst['arm']}, seed {worst['seed']}, step {worst['step']}).", ""]
        if ev["transition_excess"]:
            lines += [f"Spike test: per seed, the mean over its boundaries to a larger subnetwork of (change − "
                      f"{ev['baseline']}'s change over the same steps), 95% t interval over seeds (a spike is an interval "
                      "above 0). Boundaries to a smaller subnetwork (the end of a full-model warm-up) are left out: "
                      "losing layers is expected to cost.", "",
                      "| arm | seeds | mean excess | 95% CI | verdict |", "|---|---|---|---|---|"]
            lines += [f"| {x['arm']} | {x['n']} | {x['mean_diff']:+.4f} | {_ci(x)} | {x['verdict']} |"
                      for x in ev["transition_excess"]]
            lines.append("")
    lines += ["## Plots", ""]
    lines += [f"![{title}]({name})  \n*{title}*" for name, title in PLOTS.items()]
    report = root / "report.md"
    report.write_text("\n".join(lines) + "\n")
    _plots(ev, runs, by_arm, root)
    return report


def _ci(row: dict) -> str:
    return "-" if row["ci95"] is None else f"[{row['ci95'][0]:+.4f}, {row['ci95'][1]:+.4f}]"


def _equivalent(c: dict) -> str:
    eq = c["equivalence"]
    if not c["n"]:
        return "no paired runs"
    if eq["equivalent"] is None:
        return "one seed: no test"
    if eq["equivalent"]:
        return "yes"
    n = c.get("seeds_for_equivalence")
    return f"no (~{n} seeds might show it)" if n else "no"

# ------------------------------------------------------------------------------------ plots
def _grid(seeds: dict[int, Run], key: str) -> tuple[list[float], list[list[float]]]:
    """x (mean over seeds) and the seeds' losses at the eval steps all seeds share."""
    steps = sorted(set.intersection(*({e["step"] for e in r.eval} for r in seeds.values())))
    xs, ys = [], []
    for step in steps:
        rows = [next(e for e in r.eval if e["step"] == step) for r in seeds.values()]
        x = [r.calibrated.get(step) if key == "calibrated" else e[key] for r, e in zip(seeds.values(), rows)]
        if any(v is None for v in x):
            continue
        xs.append(sum(x) / len(x))
        ys.append([e["val_loss"] for e in rows])
    return xs, ys


def _zoom(ax, values: list[float]) -> None:
    """Skip the initial loss drop so the differences between methods are visible."""
    tail = sorted(values)[: max(1, int(len(values) * 0.75))]
    if tail:
        ax.set_ylim(min(tail) - 0.05, max(tail) + 0.3)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def _plots(ev: dict, runs: list[Run], by_arm: dict[str, dict[int, Run]], root: Path) -> None:
    arms = [a["arm"] for a in ev["arms"]]
    colors = {a: plt.cm.tab10(i % 10) for i, a in enumerate(arms)}
    wall_key = "calibrated" if any(r.calibrated for r in runs) else "train_seconds"
    for key, xlabel, name in [("flops", "training FLOPs", "val_loss_vs_flops.png"),
                              ("step", "optimizer step", "val_loss_vs_step.png"),
                              (wall_key, "training wall-clock (s, " + ("calibrated" if wall_key == "calibrated" else "raw") + ")",
                               "val_loss_vs_wallclock.png")]:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        shown = []
        for arm in arms:
            xs, ys = _grid(by_arm[arm], key)
            if not xs:
                continue
            mean = [sum(y) / len(y) for y in ys]
            ax.plot(xs, mean, marker=".", ms=3, color=colors[arm], label=f"{arm} (n={len(by_arm[arm])})")
            if len(by_arm[arm]) > 1 and key != wall_key:
                ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=colors[arm], alpha=0.2)
            shown += mean
        ax.set(xlabel=xlabel, ylabel="full-model validation loss", title=PLOTS[name].split(" (")[0])
        _zoom(ax, shown)
        ax.legend(fontsize=8)
        _save(fig, root / name)

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    base = by_arm.get(ev["baseline"], {})
    for arm in arms:
        if arm == ev["baseline"]:
            continue
        grid, diffs = None, []
        for seed, run in by_arm[arm].items():
            ref = base.get(seed)
            if ref is None:
                continue
            xs = [e["flops"] for e in ref.eval][1:]
            mine = [interpolate([e["flops"] for e in run.eval], [e["val_loss"] for e in run.eval], x) for x in xs]
            keep = [(x, m - e["val_loss"]) for x, m, e in zip(xs, mine, ref.eval[1:]) if m is not None]
            grid = [x for x, _ in keep] if grid is None or len(keep) < len(grid) else grid
            diffs.append([d for _, d in keep])
        if not diffs or not grid:
            continue
        n = len(diffs)
        cols = [[d[i] for d in diffs] for i in range(len(grid))]
        mean = [sum(c) / n for c in cols]
        ax.plot(grid, mean, color=colors[arm], label=f"{arm} − {ev['baseline']} (n={n})")
        if n > 1:
            half = [t975(n - 1) * mean_std(c)[1] / math.sqrt(n) for c in cols]
            ax.fill_between(grid, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)],
                            color=colors[arm], alpha=0.15)
    ax.axhline(0, color="black", lw=0.8)
    ax.set(xlabel="training FLOPs", ylabel="val loss difference (nats)", title=PLOTS["paired_difference.png"].split(" (")[0])
    lo, hi = ax.get_ylim()  # the first evaluations can differ a lot: keep the view on the bulk of training
    ax.set_ylim(max(lo, -1.0), min(hi, 1.0))
    ax.legend(fontsize=8)
    _save(fig, root / "paired_difference.png")

    firsts = [by_arm[a][min(by_arm[a])] for a in arms]
    staged = [r for r in firsts if len({t["stage"] for t in r.train}) > 1]
    fig, axes = plt.subplots(1, max(1, len(staged)), figsize=(5 * max(1, len(staged)), 4), squeeze=False)
    for ax, r in zip(axes[0], staged):
        steps, losses = [t["step"] for t in r.train], [t["loss"] for t in r.train]
        ax.plot(steps, losses, lw=0.5, alpha=0.4, color="gray", label="per step")
        ax.plot(steps, _smooth(losses, 10), lw=1.2, label="mean of 10 steps")
        for i in range(1, len(r.train)):
            if r.train[i]["stage"] != r.train[i - 1]["stage"]:
                ax.axvline(r.train[i]["step"] - 0.5, color="red", ls="--", lw=0.8)
        ax.set(title=f"{r.label}: train loss (stage changes dashed)", xlabel="step", ylabel="training loss")
        lo = min(losses[len(losses) // 5:] or losses)
        ax.set_ylim(lo - 0.2, lo + 1.5)
        ax.legend(fontsize=8)
    if not staged:
        axes[0][0].text(0.5, 0.5, "no run with stages", ha="center")
    _save(fig, root / "train_loss_transitions.png")

    fig, ax = plt.subplots(figsize=(7.5, 4))
    for r in firsts:
        ax.plot([t["step"] for t in r.train], _smooth([float(t["layers_run"]) for t in r.train], 20), label=r.label,
                color=colors[r.arm])
    ax.set(xlabel="step", ylabel="layers run (mean of 20 steps)", title=PLOTS["path_length.png"].split(" (")[0])
    ax.legend(fontsize=8)
    _save(fig, root / "path_length.png")
