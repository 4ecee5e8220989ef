"""The probe report: probes.md, probes.json and probes.png.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import torch

from raptr.errors import RaptrError
from raptr.experiments.probes.cloze import N_CANDIDATES
from raptr.experiments.probes.logistic import MIN_DISCORDANT, paired_accuracy_difference


def _against_reference(rows: Sequence[dict], tasks: list[str], reference: str | None) -> list[str]:
    """Per run and task: accuracy − the reference run's on the same examples, 95% CI, verdict."""
    if not reference:
        return []
    ref = next((r for r in rows if r["run"] == reference), None)
    if ref is None:
        return ["", f"No comparison with a reference: no probed run is named `{reference}` (set reference=RUN)."]
    out = ["", f"## Against `{reference}` (paired over the same test examples)", "",
           "Accuracy difference and the 95% interval of the paired per-example difference (normal approximation "
           f"with continuity correction); **better** / **worse** where it excludes 0 and at least {MIN_DISCORDANT} "
           "examples have exactly one of the two runs right, else no detectable difference (n.d.); – where the two "
           "runs were not probed on the same examples (other tokenizer or data).", "",
           "| run | val loss − reference's | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 2)]
    for r in rows:
        if r is ref:
            continue
        dl = "–" if r["val_loss"] is None or ref["val_loss"] is None else f"{r['val_loss'] - ref['val_loss']:+.3f}"
        cells = []
        for t in tasks:
            a, b = r["tasks"].get(t, {}), ref["tasks"].get(t, {})
            same = a.get("examples") is not None and a.get("examples") == b.get("examples")
            got = paired_accuracy_difference(a.get("correct", ""), b.get("correct", "")) if same else None
            if got is None:
                cells.append("–")
                continue
            m, lo, hi, discordant = got
            decided = discordant >= MIN_DISCORDANT
            word = "**better**" if decided and lo > 0 else "**worse**" if decided and hi < 0 else "n.d."
            cells.append(f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}] {word}")
        out.append(f"| {r['run']} | {dl} | " + " | ".join(cells) + " |")
    return out


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def write_probe_report(results: Sequence[dict], out_dir: str | os.PathLike, reference: str | None = "standard",
                       skipped: Sequence[str] = ()) -> Path:
    """``probes.md`` (table: run, method, val loss, perplexity, accuracy ± binomial SE per task, chance;
    each run's paired accuracy difference from the ``reference`` run with a 95% interval, where both
    were probed on the same test examples), ``probes.json`` and ``probes.png`` (accuracy per task and
    run, with chance marked). ``skipped``: runs not probed (named in the report). Returns the .md path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise RaptrError("no probe results to report: run evaluate_runs(run_dirs) first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [t for r in results for t in r["tasks"]]
    tasks = list(dict.fromkeys(tasks))
    rows = sorted(results, key=lambda r: (r["val_loss"] is None, r["val_loss"] or 0.0))
    head = ["run", "method", "objective", "step", "val loss", "perplexity"] + [f"{t} acc" for t in tasks]
    lines = ["# Downstream probes", "",
             "Frozen full model (eval mode), last checkpoint. Linear probes: logistic regression on mean-pooled final "
             "hidden states; cloze: zero-shot. Accuracy ± binomial standard error on the test split. Rows are sorted by "
             "validation loss: compare methods at equal perplexity where possible (perplexity = exp(val loss); for MLM "
             "runs it is over masked tokens).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"], r["method"], r["objective"], str(r["step"]), _fmt(r["val_loss"]), _fmt(r["perplexity"], ".1f")]
        for t in tasks:
            res = r["tasks"].get(t)
            cells.append(f"{res['accuracy']:.3f} ± {res['stderr']:.3f}" if res else "–")
        lines.append("| " + " | ".join(cells) + " |")
    chance = []
    for t in tasks:
        vals = sorted({round(r["tasks"][t]["chance"], 3) for r in results if t in r["tasks"]})
        chance.append(f"{vals[0]:.3f}" if len(vals) == 1 else f"{vals[0]:.3f}–{vals[-1]:.3f}")
    lines.append("| chance | | | | | | " + " | ".join(chance) + " |")
    lines += _against_reference(rows, tasks, reference)
    if skipped:
        lines += ["", "Not probed (committed suites hold logs, not weights): " + "; ".join(skipped) + "."]
    lines += ["", "## Tasks", "", "| task | kind | train | test | classes | chance | what |", "|---|---|---|---|---|---|---|"]
    for t in tasks:
        res = next(r["tasks"][t] for r in results if t in r["tasks"])
        classes = ", ".join(res.get("classes", [])) or f"{N_CANDIDATES} candidates"
        lines.append(f"| {t} | {res['kind']} | {res['n_train']} | {res['n_test']} | {classes} | {res['chance']:.3f} | {res['note']} |")
    formats = sorted({f"{r['objective']}: {r.get('input_format', '?')}" for r in results})
    lines += ["", "Inputs: " + "; ".join(formats) + ". Untrained rows (method `init`) probe the initial weights: the floor."]
    lines += ["", "Evaluation time per run (wall / CPU): " + ", ".join(
        f"{r['run']} {r['seconds']:.0f} s / {r.get('cpu_seconds', float('nan')):.0f} s ({r['device']}, {torch.get_num_threads()} threads)"
        for r in results), "",
              "![accuracy per task](probes.png)", ""]
    md = out / "probes.md"
    md.write_text("\n".join(lines))
    (out / "probes.json").write_text(json.dumps(list(results), indent=2, default=str))
    (out / "probes_meta.json").write_text(json.dumps({"reference": reference, "skipped": list(skipped)}, indent=2))

    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks) * max(1, len(rows)) / 2 + 2), 4))
    width = 0.8 / len(rows)
    for k, r in enumerate(rows):
        xs = [i + (k - (len(rows) - 1) / 2) * width for i in range(len(tasks))]
        acc = [r["tasks"][t]["accuracy"] if t in r["tasks"] else 0.0 for t in tasks]
        err = [r["tasks"][t]["stderr"] if t in r["tasks"] else 0.0 for t in tasks]
        loss = f" (val {r['val_loss']:.2f})" if r["val_loss"] is not None else ""
        ax.bar(xs, acc, width, yerr=err, capsize=2, label=f"{r['run']}: {r['method']}{loss}")
    for i, t in enumerate(tasks):
        c = next(r["tasks"][t]["chance"] for r in results if t in r["tasks"])
        ax.hlines(c, i - 0.45, i + 0.45, colors="k", linestyles="dashed", linewidth=1)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy (dashed: chance)")
    ax.set_title("Downstream probes")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out / "probes.png", dpi=110)
    plt.close(fig)
    return md
