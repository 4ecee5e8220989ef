"""``raptr report results/<name>``: the comparison's table and plots, rebuilt from the run logs."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from raptr.errors import RaptrError  # noqa: E402

PLOTS = {
    "val_loss_vs_flops.png": "full-model validation loss vs training FLOPs",
    "val_loss_vs_wallclock.png": "full-model validation loss vs training wall-clock",
    "val_loss_vs_step.png": "full-model validation loss vs step",
    "train_loss_transitions.png": "training loss around each stage transition",
    "path_length.png": "layers run per step over training",
}


def read_run(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"name": run_dir.name, "summary": summary, "train": [r for r in rows if r["kind"] == "train"],
            "eval": [r for r in rows if r["kind"] == "eval"]}


def loss_at_flops(evals: list[dict], flops: float) -> float | None:
    """Validation loss at a FLOPs budget, linearly interpolated between evaluations."""
    points = [(e["flops"], e["val_loss"]) for e in evals]
    for (f0, l0), (f1, l1) in zip(points, points[1:]):
        if f0 <= flops <= f1:
            return l0 if f1 == f0 else l0 + (l1 - l0) * (flops - f0) / (f1 - f0)
    return None


def smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def make_report(root: str | Path) -> Path:
    root = Path(root)
    runs_dir = root / "runs"
    if not runs_dir.is_dir():
        raise RaptrError(f"no runs under {root}: run `raptr compare --config ...` first")
    runs = [read_run(d) for d in sorted(runs_dir.iterdir()) if (d / "summary.json").is_file()]
    if not runs:
        raise RaptrError(f"no finished runs under {runs_dir}: let `raptr compare` finish (it resumes) first")
    meta = json.loads((root / "compare.json").read_text()) if (root / "compare.json").is_file() else {}
    baseline_name = meta.get("baseline", "baseline")
    base = next((r for r in runs if r["name"] == baseline_name), runs[0])
    seeds = [r for r in runs if r["name"] == baseline_name or r["name"].startswith(baseline_name + "-seed")]
    budget = min(r["summary"]["flops"] for r in runs)  # every run has spent at least this much

    lines = [f"# Comparison: {meta.get('name', root.name)}", "",
             f"Base config `{meta.get('base', '?')}`; overrides `{' '.join(meta.get('overrides', [])) or '-'}`.",
             f"Regenerate with `raptr report {root}`.", "",
             "| method | steps | rel. FLOPs | wall-clock (s) | wall-clock vs baseline | final val loss | val loss at equal FLOPs |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        s, b = r["summary"], base["summary"]
        at_budget = loss_at_flops(r["eval"], budget)
        lines.append(f"| {r['name']} ({s['method']}) | {s['steps']} | {s['flops'] / b['flops']:.3f} | {s['train_seconds']:.1f} "
                     f"| {s['train_seconds'] / b['train_seconds']:.3f} | {s['final_val_loss']:.4f} "
                     f"| {'-' if at_budget is None else f'{at_budget:.4f}'} |")
    lines += ["", f"*rel. FLOPs*: training FLOPs (exact, from the layers actually run) over those of the baseline run "
              f"`{base['name']}`. *Equal FLOPs*: {budget:.3e}, the smallest budget among the runs; loss interpolated "
              "between evaluations. Stacking's loss is that of the model as grown so far."]
    if len(seeds) >= 2:
        finals = [r["summary"]["final_val_loss"] for r in seeds]
        spread = max(finals) - min(finals)
        lines += ["", f"**Seed-to-seed spread of the baseline** ({len(seeds)} seeds: "
                  f"{', '.join(f'{v:.4f}' for v in finals)}): range {spread:.4f}, std {statistics.stdev(finals):.4f}. "
                  "Differences between methods smaller than this range are within noise."]
    lines += ["", "## Plots", ""] + [f"![{title}]({name})  \n*{title}*" for name, title in PLOTS.items()]
    report = root / "report.md"
    report.write_text("\n".join(lines) + "\n")
    _plots(runs, root)
    return report


def _plots(runs: list[dict], root: Path) -> None:
    for key, xlabel, name in [("flops", "training FLOPs", "val_loss_vs_flops.png"),
                              ("train_seconds", "training wall-clock (s)", "val_loss_vs_wallclock.png"),
                              ("step", "optimizer step", "val_loss_vs_step.png")]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in runs:
            ax.plot([e[key] for e in r["eval"]], [e["val_loss"] for e in r["eval"]], marker=".", label=r["name"])
        ax.set(xlabel=xlabel, ylabel="full-model validation loss", title=PLOTS[name])
        _zoom(ax, runs)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(root / name, dpi=110)
        plt.close(fig)

    staged = [r for r in runs if len({t["stage"] for t in r["train"]}) > 1]
    fig, axes = plt.subplots(1, max(1, len(staged)), figsize=(5 * max(1, len(staged)), 4), squeeze=False)
    for ax, r in zip(axes[0], staged):
        steps, losses = [t["step"] for t in r["train"]], [t["loss"] for t in r["train"]]
        ax.plot(steps, losses, lw=0.5, alpha=0.4, color="gray", label="per step")
        ax.plot(steps, smooth(losses, 10), lw=1.2, label="mean of 10 steps")
        for i in range(1, len(r["train"])):
            if r["train"][i]["stage"] != r["train"][i - 1]["stage"]:
                ax.axvline(r["train"][i]["step"] - 0.5, color="red", ls="--", lw=0.8)
        ax.set(title=f"{r['name']}: train loss (stage changes dashed)", xlabel="step", ylabel="training loss")
        lo = min(losses[len(losses) // 5:] or losses)
        ax.set_ylim(lo - 0.2, lo + 1.5)
        ax.legend(fontsize=8)
    if not staged:
        axes[0][0].text(0.5, 0.5, "no run with stages", ha="center")
    fig.tight_layout()
    fig.savefig(root / "train_loss_transitions.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        ax.plot([t["step"] for t in r["train"]], smooth([float(t["layers_run"]) for t in r["train"]], 20), label=r["name"])
    ax.set(xlabel="step", ylabel="layers run (mean of 20 steps)", title=PLOTS["path_length.png"])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "path_length.png", dpi=110)
    plt.close(fig)


def _zoom(ax, runs: list[dict]) -> None:
    """Skip the initial loss drop so the differences between methods are visible."""
    tails = [e["val_loss"] for r in runs for e in r["eval"][len(r["eval"]) // 4:]]
    if tails:
        ax.set_ylim(min(tails) - 0.1, max(tails) + 0.3)
